"""Real OS processes over real libp2p on loopback: ``fednode start`` nodes find each other through
a bootstrap node, a ``kill -9`` is declared dead by every survivor within the detection time,
and a restarted node rejoins. Waits are on the nodes' own log lines, never on the clock."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.libp2p, pytest.mark.timeout(180)]

INTERVAL = 0.5
# Suspected after 3 silent intervals, dead 2 intervals later (fednode.protocol.membership);
# a survivor connected to the victim suspects it at once on the broken connection.
DETECTION = 5 * INTERVAL
SLACK = 2.0  # gossip delivery and a loaded 2-core machine
WAIT = 60.0


class NodeProcess:
    """A ``fednode start`` subprocess whose stdout and stderr lines are read into queues."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fednode",
                "start",
                "--data-dir",
                str(data_dir),
                "--heartbeat-interval",
                str(INTERVAL),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[tuple[float, str]] = queue.Queue()
        self.log: list[tuple[float, str]] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, False), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, True), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        fields = {}
        while "listening" not in fields:
            line = self.out.get(timeout=WAIT)
            key, _, value = line.partition("  ")
            fields.setdefault(key.strip(), value.strip())
        self.peer_id = fields["peer ID"]
        self.addr = fields["listening"]

    def _pump(self, stream, is_err: bool) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            if is_err:
                self.err.put((time.monotonic(), line.rstrip("\n")))
            else:
                self.out.put(line.rstrip("\n"))

    def wait_for(self, *needles: str, since: float = 0.0) -> float:
        """Block until a stderr line read after ``since`` contains every needle; return when it
        was read. Lines read while waiting for something else are kept and searched too."""
        for at, line in self.log:
            if at >= since and all(n in line for n in needles):
                return at
        deadline = time.monotonic() + WAIT
        while True:
            at, line = self.err.get(timeout=max(0.01, deadline - time.monotonic()))
            self.log.append((at, line))
            if at >= since and all(n in line for n in needles):
                return at

    def stderr_after_exit(self) -> str:
        """Everything the (exited) process wrote on stderr."""
        for pump in self._pumps:
            pump.join(timeout=WAIT)
        while not self.err.empty():
            self.log.append(self.err.get_nowait())
        return "\n".join(line for _, line in self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


def test_processes_join_detect_a_kill_and_rejoin(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    # Prepare: a bootstrap and three nodes, each a separate process
    boot = NodeProcess(tmp_path / "boot", "--role", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    nodes.append(boot)
    for i, role in enumerate(["combiner", "combiner", "client"]):
        listen = [] if role == "client" else ["--listen", "/ip4/127.0.0.1/tcp/0"]
        nodes.append(
            NodeProcess(tmp_path / f"n{i}", "--role", role, "--bootstrap", boot.addr, *listen)
        )
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.wait_for("PeerJoined", other.peer_id)
    victim, survivors = nodes[1], [nodes[0], nodes[2], nodes[3]]

    # Execute: kill -9, then restart with the same data directory (same key, same peerstore)
    killed_at = time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    detected = [
        node.wait_for("PeerDied", victim.peer_id, since=killed_at) - killed_at for node in survivors
    ]
    restarted = NodeProcess(
        tmp_path / "n0",
        "--role",
        "combiner",
        "--bootstrap",
        boot.addr,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    )
    nodes.append(restarted)
    for node in survivors:
        node.wait_for("PeerRecovered", victim.peer_id, since=killed_at)

    # Assert
    assert restarted.peer_id == victim.peer_id
    assert max(detected) <= DETECTION + SLACK, detected


def test_sigint_stops_a_node_cleanly(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    # Prepare
    node = NodeProcess(tmp_path / "n", "--role", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    nodes.append(node)
    # Execute
    node.proc.send_signal(signal.SIGINT)
    code = node.proc.wait(timeout=10)
    # Assert
    assert code == 0
    assert "Traceback" not in node.stderr_after_exit()
