"""Round time and start-up of a whole federation of real processes over libp2p on loopback.

Runs ``fednode demo``'s machinery (:class:`fednode.scenario.federation.Federation`: a bootstrap, a
reducer, 2 combiners and 10 clients, each a ``fednode start`` process) for a few warm-up rounds
and then the measured rounds, and prints one JSON object: start-up (demo start to the session's
start, and to the first completed round), the wall time of each measured round (median, min,
max) and its split into fetch / train / push / aggregate as the reducer reports it.

One local epoch by default: the goal is the protocol's overhead, not the training. ``--epochs 1
5`` also measures the demo's 5 epochs. The reference figures are the issue's, measured on this
machine with other frameworks, for context.

    python benchmarks/rounds.py --clients 10 --warmup 2 --rounds 5 --epochs 1 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from fednode.scenario.federation import DemoConfig, DemoFailed, DemoResult, Federation
from fednode.scenario.progress import FederationSnapshot

GOAL = {"round_seconds": 0.3, "startup_seconds": 5.0}
REFERENCES = {
    "fedn_0.33": {"round_seconds": 1.9, "all_clients_online_seconds": 10.0},
    "flower_1.42_deployment_engine": {
        "round_seconds": [17.0, 27.0],
        "first_round_seconds": [22.0, 34.0],
    },
    "flower_1.42_in_process_simulation": {"round_seconds": 0.3},
    "note": "measured on this machine, from the issue",
}
PHASES = ("fetch_s", "train_s", "push_s", "aggregate_s")


def measure(config: DemoConfig, warmup: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="fednode-bench-") as tmp:
        with Federation(config, Path(tmp), on_progress=_progress(config)) as federation:
            result = federation.run()
    return summarize(result, config, warmup)


def summarize(result: DemoResult, config: DemoConfig, warmup: int) -> dict[str, object]:
    measured = result.rounds[warmup:]
    seconds = [row.seconds for row in measured]
    phases: dict[str, float | None] = {}
    for phase in PHASES:
        values = [v for row in measured if (v := getattr(row, phase)) is not None]
        phases[phase.removesuffix("_s")] = _r(statistics.median(values)) if values else None
    return {
        "epochs": config.epochs,
        "startup_seconds": _r(result.startup_seconds),
        "first_round_seconds": _r(result.first_round_seconds),
        "round_seconds": {
            "median": _r(statistics.median(seconds)),
            "min": _r(min(seconds)),
            "max": _r(max(seconds)),
            "each": [_r(s) for s in seconds],
        },
        "phase_seconds_median": phases,
        "warmup_round_seconds": [_r(row.seconds) for row in result.rounds[:warmup]],
        "final_accuracy": result.final_accuracy,
        "bytes_sent": result.bytes_sent,
        "meets_goal": {
            "round_seconds": statistics.median(seconds) <= GOAL["round_seconds"],
            "startup_seconds": result.startup_seconds <= GOAL["startup_seconds"],
        },
        "warnings": list(result.warnings),
    }


def _progress(config: DemoConfig) -> Callable[[FederationSnapshot], None]:
    printed = [0]

    def show(snapshot: FederationSnapshot) -> None:
        for row in snapshot.completed[printed[0] :]:
            print(
                f"epochs={config.epochs} round {row.round}: {row.seconds:.3f} s",
                file=sys.stderr,
                flush=True,
            )
        printed[0] = len(snapshot.completed)

    return show


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--combiners", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="rounds not measured")
    parser.add_argument("--rounds", type=int, default=5, help="rounds measured")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1], help="one run per value")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    runs: list[dict[str, object]] = []
    load_before = os.getloadavg()
    for epochs in args.epochs:
        config = DemoConfig(
            clients=args.clients,
            combiners=args.combiners,
            rounds=args.warmup + args.rounds,
            epochs=epochs,
            timeout=args.timeout,
        )
        try:
            runs.append(measure(config, args.warmup))
        except DemoFailed as exc:
            runs.append({"epochs": epochs, "error": str(exc)})
    report = {
        "benchmark": "rounds",
        "clients": args.clients,
        "combiners": args.combiners,
        "warmup_rounds": args.warmup,
        "measured_rounds": args.rounds,
        "runs": runs,
        "goal": GOAL,
        "references": REFERENCES,
        # Everything runs on this machine's cores: other work on it slows every figure.
        "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    print(json.dumps(report, indent=2))
    if any("error" in run for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
