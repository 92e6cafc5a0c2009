"""Node events decoded from their JSON objects, and folded into the demo's snapshot."""

from __future__ import annotations

import pytest

from fednode.scenario.events import (
    CombinerAssigned,
    EventError,
    PartialPushed,
    ReducerElected,
    RoundCompleted,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
    Stopped,
    UpdateIncluded,
    UpdatePushed,
    decode,
)
from fednode.scenario.progress import Progress

ROUND = {
    "event": "round-completed",
    "round": 2,
    "accuracy": 0.9,
    "loss": None,
    "seconds": 1,
    "clients_included": 10,
    "num_examples": 1437,
    "fetch_s": 0.01,
    "train_s": 0.5,
    "push_s": 0.02,
    "aggregate_s": None,
    "bytes_sent": 123,
    "t": 1700000000.5,
}


def test_decode_every_kind() -> None:
    # Prepare
    t = {"t": 5}
    # Execute
    events = [
        decode(
            {"event": "session-started", "session": "s", "rounds": 5, "clients": 10,
             "combiners": ["12D3a", "12D3b"], **t}
        ),
        decode(ROUND),
        decode(
            {"event": "session-completed", "rounds": 5, "final_accuracy": 0.95, "model": "ab", **t}
        ),
        decode({"event": "session-failed", "reason": "no clients", **t}),
        decode({"event": "partial-pushed", "round": 1, "contributions": 5, **t}),
        decode({"event": "update-pushed", "round": 1, "num_examples": 143,
                "train_seconds": 0.2, **t}),
        decode({"event": "update-included", "round": 1, **t}),
        decode({"event": "stopped", "bytes_sent": 99, "extra": "ignored", **t}),
    ]  # fmt: skip
    # Assert
    assert events == [
        SessionStarted(session="s", rounds=5, clients=10, combiners=2, t=5.0),
        RoundCompleted(
            round=2,
            accuracy=0.9,
            loss=None,
            seconds=1.0,
            clients_included=10,
            num_examples=1437,
            fetch_s=0.01,
            train_s=0.5,
            push_s=0.02,
            aggregate_s=None,
            bytes_sent=123,
            t=1700000000.5,
        ),
        SessionCompleted(rounds=5, final_accuracy=0.95, model="ab", t=5.0),
        SessionFailed(reason="no clients", t=5.0),
        PartialPushed(round=1, contributions=5, t=5.0),
        UpdatePushed(round=1, num_examples=143, train_seconds=0.2, t=5.0),
        UpdateIncluded(round=1, t=5.0),
        Stopped(bytes_sent=99, t=5.0),
    ]


def test_unknown_kinds_are_skipped() -> None:
    # Execute, Assert
    assert decode({"event": "elected", "term": 3, "t": 1}) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"round": 1}, "an event line without an 'event' name"),
        ({**ROUND, "round": 1.5}, "round-completed event: 'round' must be an integer, got 1.5"),
        ({**ROUND, "round": True}, "'round' must be an integer, got True"),
        ({**ROUND, "seconds": "1"}, "'seconds' must be a number, got '1'"),
        ({**ROUND, "seconds": None}, "'seconds' must be a number, got None"),
        ({"event": "stopped", "t": 1}, "stopped event without 'bytes_sent'"),
        ({"event": "stopped", "bytes_sent": 1}, "stopped event without 't'"),
        ({"event": "session-failed", "reason": 7, "t": 1}, "'reason' must be a string, got 7"),
    ],
)
def test_a_known_kind_with_a_bad_key_is_an_error(data: dict[str, object], message: str) -> None:
    # Execute, Assert
    with pytest.raises(EventError, match=message):
        decode(data)


def test_progress_folds_a_session_into_snapshots() -> None:
    # Prepare
    progress = Progress(clients=1, combiners=1, rounds=2, started=100.0)
    for name, role in [("bootstrap", "bootstrap"), ("reducer", "reducer"),
                       ("combiner-0", "combiner"), ("client-0", "client")]:  # fmt: skip
        progress.add_node(name, role)  # type: ignore[arg-type]
    progress.node_ready("bootstrap", "12D3b")
    before = progress.snapshot(100.5)

    # Execute
    for name in ("reducer", "combiner-0", "client-0"):
        progress.node_ready(name, f"12D3{name}")
    progress.apply("reducer", SessionStarted(session="s", rounds=2, clients=1, combiners=1, t=0),
                   102.0)  # fmt: skip
    progress.apply("client-0", UpdatePushed(round=1, num_examples=9, train_seconds=0.1, t=0), 103)
    progress.apply("combiner-0", PartialPushed(round=1, contributions=1, t=0), 103.1)
    progress.apply("reducer", decode(ROUND | {"round": 1}), 103.5)  # type: ignore[arg-type]
    progress.apply("client-0", UpdateIncluded(round=1, t=0), 103.6)
    during = progress.snapshot(104.0)
    progress.apply("reducer", decode(ROUND), 105.0)  # type: ignore[arg-type]
    progress.apply("reducer", SessionCompleted(rounds=2, final_accuracy=0.9, model="ab", t=0), 105)
    progress.apply("reducer", Stopped(bytes_sent=10, t=0), 105.1)
    progress.exited("reducer", 0)
    for name in ("bootstrap", "combiner-0"):
        progress.apply(name, Stopped(bytes_sent=1, t=0), 106)
        progress.exited(name, 0)
    progress.exited("client-0", -9)
    progress.finish()
    after = progress.snapshot(107.0)

    # Assert
    assert before.phase == "starting"
    assert [node.state for node in before.nodes] == ["up", "starting", "starting", "starting"]
    assert during.phase == "running"
    assert during.current_round == 2
    assert during.startup_seconds == 2.0
    assert [(n.name, n.state, n.round) for n in during.nodes] == [
        ("bootstrap", "up", None),
        ("reducer", "running", 1),
        ("combiner-0", "pushed", 1),
        ("client-0", "included", 1),
    ]
    assert after.phase == "completed"
    assert after.current_round is None
    assert after.elapsed == 7.0
    assert [row.round for row in after.completed] == [1, 2]
    assert after.final_accuracy == 0.9
    assert [n.state for n in after.nodes] == ["stopped", "stopped", "stopped", "killed (SIGKILL)"]
    assert progress.bytes_sent == 12
    assert progress.first_round_at == 103.5


def test_progress_failure_keeps_the_first_error() -> None:
    # Prepare
    progress = Progress(clients=1, combiners=1, rounds=1, started=0.0)
    progress.add_node("reducer", "reducer")
    # Execute
    progress.apply("reducer", SessionFailed(reason="round 1 fell short", t=0), 1.0)
    progress.exited("reducer", 1)
    progress.fail("reducer exited unexpectedly (code 1)")
    progress.finish()
    # Assert
    snapshot = progress.snapshot(2.0)
    assert snapshot.phase == "failed"
    assert snapshot.error == "the session failed: round 1 fell short"
    assert snapshot.nodes[0].state == "exited 1"


def test_decode_the_seat_and_combiner_events() -> None:
    # Execute
    elected = decode(
        {"event": "reducer-elected", "term": 2, "session": "s", "resume_round": 1, "t": 5}
    )
    assigned = decode(
        {"event": "combiner-assigned", "round": 3, "amendment": 1, "clients": 4, "t": 5}
    )
    # Assert
    assert elected == ReducerElected(term=2, t=5.0)
    assert assigned == CombinerAssigned(round=3, amendment=1, clients=4, t=5.0)
    with pytest.raises(EventError, match="combiner-assigned event without 'amendment'"):
        decode({"event": "combiner-assigned", "round": 3, "clients": 4, "t": 5})


def test_progress_records_who_combines_each_round_in_auto_mode() -> None:
    # Prepare: auto nodes 0 .. 11; auto-10 and auto-2 combine in round 1
    progress = Progress(clients=12, combiners=2, rounds=2, started=0.0, auto=True)
    progress.add_node("reducer", "reducer")
    for i in range(12):
        progress.add_node(f"auto-{i}", "auto")
    progress.apply("reducer", SessionStarted(session="s", rounds=2, clients=12, combiners=2, t=0),
                   1.0)  # fmt: skip
    for node in ("auto-10", "auto-2", "auto-10"):  # a copy of the plan heard again
        progress.apply(node, CombinerAssigned(round=1, amendment=0, clients=6, t=0), 1.1)
    during = progress.snapshot(1.5)
    # Execute: round 1 completes; in round 2 auto-2 dies and auto-5 takes its orphans
    progress.apply("reducer", decode(ROUND | {"round": 1}), 2.0)  # type: ignore[arg-type]
    for node, amendment in (("auto-2", 0), ("auto-10", 0), ("auto-10", 1), ("auto-5", 1)):
        progress.apply(node, CombinerAssigned(round=2, amendment=amendment, clients=6, t=0), 2.1)
    progress.apply("auto-5", ReducerElected(term=2, t=0), 2.2)
    later = progress.snapshot(2.5)
    progress.apply("reducer", decode(ROUND | {"round": 2}), 3.0)  # type: ignore[arg-type]
    # Assert
    assert during.auto and during.serving == ("auto-2", "auto-10")
    assert later.serving == ("auto-2", "auto-5", "auto-10")
    assert [row.combiners for row in progress.completed] == [
        ("auto-2", "auto-10"),
        ("auto-2", "auto-5", "auto-10"),
    ]
    assert progress.nodes["auto-10"].state == "combining"
    assert progress.nodes["auto-5"].state == "elected (term 2)"
    progress.apply("auto-5", SessionCompleted(rounds=2, final_accuracy=0.9, model="ab", t=0), 4)
    assert progress.snapshot(4.0).serving == ()  # the session is over: no round in progress
