"""A training session over real libp2p, every node its own OS process (``fednode start``): a
bootstrap, a reducer, two combiners and four clients train the built-in digits task for two
rounds. The test follows the nodes' JSON event lines (``--events``), never the clock, and checks
the signed round results the reducer wrote. Reducers and combiners must never load torch."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest

from fednode.crypto import open_envelope, peer_id_from_public_key
from fednode.scenario.processes import NodeLine, NodeOutput, NodeProcess, stop_all
from fednode.wire import RoundResult

pytestmark = [pytest.mark.libp2p, pytest.mark.timeout(240)]

LOOPBACK = ("--listen", "/ip4/127.0.0.1/tcp/0")
WAIT = 90.0  # seconds a node may take to start on a loaded 2-core machine
SESSION_WAIT = 150.0
CLIENTS = 4
ROUNDS = 2


def _follow(
    events: queue.Queue[NodeOutput], exits: set[str], limit: float
) -> list[tuple[str, dict[str, object]]]:
    """Every event line read until the reducer completes the session and each node of ``exits``
    has exited (a node's lines all come before its exit)."""
    seen: list[tuple[str, dict[str, object]]] = []
    waiting = set(exits)
    completed = False
    deadline = time.monotonic() + limit
    while waiting or not completed:
        item = events.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(item, NodeLine):
            seen.append((item.node, item.data))
            if item.node == "reducer" and item.data["event"] == "session-failed":
                raise AssertionError(f"the session failed: {item.data}")
            completed = completed or (
                item.node == "reducer" and item.data["event"] == "session-completed"
            )
        else:
            if item.node == "reducer" and not completed:
                raise AssertionError(f"the reducer exited ({item.code}) first: {seen}")
            waiting.discard(item.node)
    return seen


def _modules(node: NodeProcess) -> set[str]:
    for line in node.stderr_after_exit().splitlines():
        if "modules loaded:" in line:
            return set(line.split("modules loaded:")[1].split())
    raise AssertionError(f"{node.name} did not list its modules")


def test_a_session_trains_over_libp2p_between_processes(tmp_path: Path) -> None:
    # Prepare
    events: queue.Queue[NodeOutput] = queue.Queue()
    nodes: list[NodeProcess] = []
    env = {"FEDNODE_LOG_MODULES": "1"}
    try:
        boot = NodeProcess(
            tmp_path / "boot", "--role", "bootstrap", *LOOPBACK, name="boot", wait=WAIT
        )
        nodes.append(boot)
        common = ("--bootstrap", boot.addr, "--events")

        def start(name: str, *args: str) -> NodeProcess:
            node = NodeProcess(
                tmp_path / name,
                *common,
                *args,
                name=name,
                events=events,
                extra_env=env,
                wait=WAIT,
                ready=False,
            )
            nodes.append(node)
            return node

        reducer = start(
            "reducer",
            *("--role", "reducer", *LOOPBACK),
            *("--rounds", str(ROUNDS), "--min-clients", str(CLIENTS), "--epochs", "1"),
            *("--round-deadline", "120", "--wait-for", str(CLIENTS), "--wait-for-combiners", "2"),
        )
        combiners = [start(f"combiner-{i}", "--role", "combiner", *LOOPBACK) for i in range(2)]
        clients = [
            start(
                f"client-{i}",
                *("--role", "client", "--exit-after-session"),
                *("--partition-index", str(i), "--partition-count", str(CLIENTS)),
            )
            for i in range(CLIENTS)
        ]
        for node in nodes:
            node.wait_ready()

        # Execute
        seen = _follow(events, {"reducer", *(c.name for c in clients)}, SESSION_WAIT)
        reducer_code = reducer.proc.wait(timeout=60)
        client_codes = [client.proc.wait(timeout=60) for client in clients]
    finally:
        codes = stop_all(nodes)

    # Assert: the session, as the events tell it
    # (only the session's milestones: the nodes also report phases and elections)
    milestones = {"session-started", "round-completed", "session-completed", "stopped",
                  "update-pushed", "update-included"}  # fmt: skip
    by = {
        name: [data for node, data in seen if node == name and data["event"] in milestones]
        for name in codes
    }
    reducer_events = [e["event"] for e in by["reducer"]]
    assert reducer_events == ["session-started", "round-completed", "round-completed",
                              "session-completed", "stopped"], by["reducer"]  # fmt: skip
    started, *rounds, completed, _ = by["reducer"]
    # both combiners, unless the election left out one that reported an overloaded CPU (a busy
    # test machine): every healthy explicit combiner is used, an overloaded one is not
    assert started["clients"] == CLIENTS and started["combiners"] in (1, 2)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_included"] == CLIENTS for r in rounds)
    assert isinstance(completed["final_accuracy"], float)
    assert reducer_code == 0 and client_codes == [0] * CLIENTS
    assert all(code == 0 for code in codes.values()), codes
    # ... and as the reducer's signed results tell it: each client counted once per round
    results_dir = tmp_path / "reducer" / "sessions" / str(started["session"])
    client_ids = {client.peer_id for client in clients}
    for r in range(1, ROUNDS + 1):
        result, envelope = open_envelope((results_dir / f"round-{r:04d}.result").read_bytes(),
                                         RoundResult)  # fmt: skip
        assert peer_id_from_public_key(envelope.signer) == reducer.peer_id
        assert result.round == r
        included = [peer_id_from_public_key(c.signer) for c in result.included]
        assert sorted(included) == sorted(client_ids)
    assert result.model.hex() == completed["model"]
    for client in clients:
        kinds = [e["event"] for e in by[client.name]]
        assert kinds == ["update-pushed", "update-included"] * ROUNDS + ["stopped"], kinds
    # Reducers and combiners stay torch-free: the reducer evaluates in a worker process.
    for node in (reducer, *combiners):
        assert "torch" not in _modules(node), node.name
