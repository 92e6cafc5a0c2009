"""A stand-in for ``fednode start --events``: the same arguments, the same identity block, the same
JSON events, no network. The demo machinery's tests run federations of these.

It writes its pid to ``<data-dir>/pid`` and its parent's command line to ``<data-dir>/parent``.
The reducer plays a session of ``--rounds`` rounds with ``--min-clients`` clients; the others
wait for SIGINT/SIGTERM. Every node prints ``stopped`` (``bytes_sent`` = :data:`BYTES_SENT`) and
exits 0 when it ends cleanly. Faults, from the environment (the demo passes its environment on):

    FAKE_FAIL_ROUND=r      the reducer reports session-failed at round r and exits 1
    FAKE_HANG=1            the reducer starts the session, then waits for a signal
    FAKE_LINGER=1          the reducer completes the session, then waits for a signal
    FAKE_CRASH_CLIENT=i    client i pushes one update, then exits 3
    FAKE_STUBBORN=role     nodes of that role ignore SIGINT and SIGTERM (only SIGKILL works)
    FAKE_WORKER=1          every node starts a worker process (pid in <data-dir>/worker.pid)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

BYTES_SENT = 1000
ROUND_SECONDS = 0.02


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields, "t": time.time()}), flush=True)


def stop(signum: int, frame: FrameType | None) -> None:
    emit("stopped", bytes_sent=BYTES_SENT)
    sys.exit(0)


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--role", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--min-clients", type=int, default=1)
    parser.add_argument("--partition-index", type=int, default=0)
    parser.add_argument("--events", action="store_true")
    args, _ = parser.parse_known_args()

    args.data_dir.mkdir(parents=True, exist_ok=True)
    (args.data_dir / "pid").write_text(str(os.getpid()))
    parent = Path(f"/proc/{os.getppid()}/cmdline")
    if parent.exists():  # who started us: the demo, or the zygote it forked us from
        (args.data_dir / "parent").write_bytes(parent.read_bytes().replace(b"\0", b" "))
    if os.environ.get("FAKE_WORKER"):
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (args.data_dir / "worker.pid").write_text(str(worker.pid))
    handler = signal.SIG_IGN if os.environ.get("FAKE_STUBBORN") == args.role else stop
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)

    peer = "12D3KooW" + hashlib.sha256(str(args.data_dir).encode()).hexdigest()[:44]
    print(f"peer ID     {peer}")
    print(f"role        {args.role}")
    print("federation  demo")
    if args.listen:
        print(f"listening   /ip4/127.0.0.1/tcp/{4000 + os.getpid() % 1000}/p2p/{peer}")
    else:
        print("listening   no inbound port (dials out only)")
    sys.stdout.flush()

    if args.role == "reducer":
        return reducer(args.rounds, args.min_clients)
    if args.role == "client" and os.environ.get("FAKE_CRASH_CLIENT") == str(args.partition_index):
        emit("update-pushed", round=1, num_examples=100, train_seconds=0.1)
        return 3
    while True:
        signal.pause()


def reducer(rounds: int, clients: int) -> int:
    emit("session-started", session="s1", rounds=rounds, clients=clients, combiners=2)
    if os.environ.get("FAKE_HANG"):
        while True:
            signal.pause()
    fail_round = int(os.environ.get("FAKE_FAIL_ROUND", "0"))
    for r in range(1, rounds + 1):
        time.sleep(ROUND_SECONDS)  # stands in for the round's work; nobody waits on it
        if r == fail_round:
            emit("session-failed", reason=f"round {r} fell short: 0 of {clients} clients")
            return 1
        emit(
            "round-completed",
            round=r,
            accuracy=round(0.5 + 0.1 * r, 4),
            loss=round(1.0 / r, 4),
            seconds=ROUND_SECONDS,
            clients_included=clients,
            num_examples=100 * clients,
            fetch_s=0.001,
            train_s=0.015,
            push_s=0.002,
            aggregate_s=0.001,
            bytes_sent=5000,
        )
    emit(
        "session-completed",
        rounds=rounds,
        final_accuracy=round(0.5 + 0.1 * rounds, 4),
        model="ab" * 32,
    )
    if os.environ.get("FAKE_LINGER"):
        while True:
            signal.pause()
    emit("stopped", bytes_sent=BYTES_SENT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
