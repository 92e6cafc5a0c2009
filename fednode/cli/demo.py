"""CLI layer: ``fednode demo``, a whole local federation as separate OS processes over libp2p on
loopback: a bootstrap node, a reducer, combiners and clients training the built-in task; or, with
``--auto``, a bootstrap node, a reducer and ``auto`` nodes (data nodes that the reducer's
election makes combiners, and that stand by as reducers), ``--combiners`` saying how many of
them the election should pick.

It shows live progress (a rich view when stdout is a terminal, one plain line per round
otherwise), prints the per-round table and a summary, and with ``--json`` writes the result. The
machinery is :class:`fednode.scenario.federation.Federation`; every process it starts is stopped
on the way out, whether the run completed, failed, or was interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from fednode.cli.command import Subparsers
    from fednode.scenario.federation import DemoConfig, DemoResult
    from fednode.scenario.progress import FederationSnapshot

DEFAULT_TASK = "fednode.task.digits"
#: How far the demo's final accuracy may be from the in-process reference (``--check-reference``).
REFERENCE_TOLERANCE = 0.005
EXIT_TERMINATED = 143  # 128 + SIGTERM, as shells report it


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run a whole local federation as separate processes and show it learn",
        description="Start a bootstrap node, a reducer, combiners and clients as separate "
        "processes over libp2p on loopback, train the task for some rounds, show the progress "
        "and stop every process. Exits non-zero if the federation fails. With --auto the data "
        "nodes run --role auto (auto-0, auto-1, ...) and no combiner process starts: the "
        "reducer elects K of the auto nodes as combiners (each advertises room for "
        "ceil(N / K) clients, itself included), and the auto nodes are its standbys.",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=10,
        metavar="N",
        help="data nodes: clients, or auto nodes with --auto (default: 10)",
    )
    parser.add_argument(
        "--combiners",
        type=int,
        default=2,
        metavar="K",
        help="combiner processes; with --auto, how many auto nodes the election should pick "
        "(default: 2)",
    )
    parser.add_argument(
        "--auto",
        action="store_true",
        help="a federation of --role auto nodes: each trains on its share, serves as combiner "
        "when the reducer's election picks it, and stands by to take over as reducer. "
        "--kill combiner kills an auto node serving as combiner in that round, --kill client "
        "one that is not; every kill costs an auto node's data (one that takes over as "
        "reducer trains no more), so the rounds after it count one fewer",
    )
    parser.add_argument("--rounds", type=int, default=5, help="training rounds (default: 5)")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    parser.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (default: 0.5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="session seed (default: 0)")
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"(default: {DEFAULT_TASK})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON")
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the nodes' data directories and logs (default: a temporary directory, removed "
        "at the end unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--no-live", action="store_true", help="plain lines, no live view")
    parser.add_argument(
        "--check-reference",
        action="store_true",
        help="also run the same training as in-process FedAvg and compare the final accuracy "
        f"(fails if they differ by more than {REFERENCE_TOLERANCE})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="give up if the session has not completed by then (default: 900)",
    )
    parser.add_argument(
        "--round-deadline", type=float, default=120.0, metavar="SECONDS", help="(default: 120)"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the nodes' heartbeat period: a peer silent for 3 periods is suspected, for 5 "
        "declared dead (default: 1)",
    )
    parser.add_argument(
        "--launcher",
        choices=("fork", "exec"),
        default="fork",
        help="fork: every node is forked from one process that imported the node's modules, "
        "torch and the task's data once (Linux; seconds faster); exec: every node is a fresh "
        "`fednode start` (default: fork)",
    )
    parser.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="ROLE@ROUND[:PHASE]",
        help="kill -9 a process of ROLE (client, combiner, reducer) when PHASE (plan, fetch, "
        "train, push, partial, reduce; default push) of ROUND begins, to watch the federation "
        "heal; repeatable. The JSON summary lists the events and each failure's heal time",
    )
    parser.add_argument(
        "--standbys",
        type=int,
        metavar="N",
        help="standby reducers that take over when the reducer dies (default: 1 with "
        "--kill reducer@..., else 0; 0 with --auto, whose auto nodes stand by)",
    )
    # A test seam: run another program in place of `fednode start` (a stand-in node).
    parser.add_argument("--node-program", help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> int:
    import shutil
    import sys
    import tempfile

    from fednode.cli.console import stdout_console
    from fednode.scenario.federation import DemoConfig, Terminated
    from fednode.scenario.processes import FEDNODE_START

    console = stdout_console()
    lr = args.lr if args.lr is not None else _task_default_lr(args.task)
    if lr is None and args.check_reference:
        from fednode.errors import ConfigError

        raise ConfigError(f"task {args.task} has no DEFAULT_CONFIG: give --lr")
    from fednode.scenario.kills import parse_kill

    config = DemoConfig(
        kills=tuple(parse_kill(k) for k in args.kill),
        standbys=args.standbys,
        auto=args.auto,
        clients=args.clients,
        combiners=args.combiners,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=lr,
        partition=args.partition,
        alpha=args.alpha,
        seed=args.seed,
        task=args.task,
        heartbeat_interval=args.heartbeat_interval,
        round_deadline=args.round_deadline,
        timeout=args.timeout,
        program=tuple(shlex.split(args.node_program)) if args.node_program else FEDNODE_START,
        launcher=args.launcher,
    )
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="fednode-demo-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = _run_federation(config, data_dir, console, live=not args.no_live)
    except Terminated:
        print("fednode: terminated", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    finally:
        if temporary and not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        elif temporary:
            print(f"data and logs kept in {data_dir}", file=sys.stderr, flush=True)
    reference = _check_reference(config, console) if args.check_reference else None
    _print_report(console, result, reference)
    if args.json is not None:
        document = result.to_json()
        if reference is not None:
            document["reference_final_accuracy"] = reference
        _write_json(args.json, document)
    if reference is not None and result.final_accuracy is not None:
        difference = result.final_accuracy - reference
        if abs(difference) > REFERENCE_TOLERANCE:
            from fednode.scenario.federation import DemoFailed

            raise DemoFailed(
                f"the final accuracy {result.final_accuracy:.4f} differs from the in-process "
                f"reference {reference:.4f} by {difference:+.4f} (tolerance {REFERENCE_TOLERANCE})"
            )
    return 0


def _run_federation(
    config: DemoConfig, data_dir: Path, console: Console, *, live: bool
) -> DemoResult:
    from rich.live import Live

    from fednode.scenario.federation import DemoFailed, Federation, sigterm_raises
    from fednode.ui.federation import render, rounds_table

    plain = _PlainProgress(console)
    if live and console.is_terminal:
        with (
            sigterm_raises(),
            Live(console=console, auto_refresh=False, transient=True) as view,
            Federation(
                config, data_dir, on_progress=lambda s: view.update(render(s), refresh=True)
            ) as federation,
        ):
            try:
                return federation.run()
            except DemoFailed:
                view.stop()
                console.print(render(federation.snapshot()))
                raise
    with sigterm_raises(), Federation(config, data_dir, on_progress=plain.update) as federation:
        try:
            return federation.run()
        except DemoFailed:
            snapshot = federation.snapshot()
            if snapshot.completed:
                console.print(rounds_table(snapshot.completed))
            raise


class _PlainProgress:
    """One line when the session starts and one per round, for logs and pipes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = False
        self.printed = 0

    def update(self, snapshot: FederationSnapshot) -> None:
        from fednode.ui.federation import round_line, startup_line

        if not self.started and snapshot.startup_seconds is not None:
            self.started = True
            self._say(startup_line(snapshot))
        for row in snapshot.completed[self.printed :]:
            self._say(round_line(row, snapshot.rounds))
        self.printed = len(snapshot.completed)

    def _say(self, line: str) -> None:
        self.console.print(line, soft_wrap=True)
        self.console.file.flush()


def _print_report(console: Console, result: DemoResult, reference: float | None) -> None:
    from fednode.cli.console import heading
    from fednode.ui.federation import combiners_line, rounds_table, summary

    console.print()
    console.print(heading("rounds"))
    console.print(rounds_table(result.rounds))
    served = combiners_line(result.rounds)
    if served:
        console.print(served, highlight=False, soft_wrap=True)
    if result.heal_seconds:  # kills fired (--kill)
        console.print()
        console.print(heading("failures and healing"))
        for event in result.events:
            details = "  ".join(f"{k} {v}" for k, v in event.items() if k not in ("t", "kind"))
            console.print(f"{event['t']:>8.2f} s  {event['kind']:<14} {details}", highlight=False)
        heals = ", ".join("-" if h is None else f"{h:.2f} s" for h in result.heal_seconds)
        console.print(f"heal time (kill -> round completed): {heals}", highlight=False)
    console.print()
    console.print(summary(result, reference=reference, tolerance=REFERENCE_TOLERANCE))


def _task_default_lr(spec: str) -> float | None:
    """The learning rate of the task's ``DEFAULT_CONFIG``, if it has one."""
    from fednode.task.api import TrainConfig, load_task

    default = getattr(load_task(spec).module, "DEFAULT_CONFIG", None)
    return default.lr if isinstance(default, TrainConfig) else None


def _check_reference(config: DemoConfig, console: Console) -> float:
    """The final accuracy of the same training as in-process FedAvg (same seeds)."""
    from fednode.task.api import TrainConfig, load_task
    from fednode.task.reference import run_reference

    assert config.lr is not None
    console.print("running the in-process FedAvg reference (same settings, same seeds) ...")
    console.file.flush()
    history = run_reference(
        load_task(config.task),
        clients=config.clients,
        rounds=config.rounds,
        config=TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr),
        scheme=config.partition,
        alpha=config.alpha,
        seed=config.seed,
    )
    return history[-1].accuracy


def _write_json(path: Path, document: dict[str, object]) -> None:
    import json

    path.write_text(json.dumps(document, indent=2) + "\n")
