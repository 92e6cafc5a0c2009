"""The dial planner: who to dial and when, stepped by hand."""

from __future__ import annotations

import random

import pytest

from fednode.crypto import NodeKey
from fednode.protocol.dialing import BackoffPolicy, DialPlanner, peer_of

SELF = NodeKey(bytes(32)).peer_id
PEER = NodeKey(bytes([1] * 32)).peer_id
ADDR = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"


def _planner(jitter: float = 0.0) -> DialPlanner:
    return DialPlanner(
        self_peer=SELF, rng=random.Random(7), policy=BackoffPolicy(base=0.5, cap=4.0, jitter=jitter)
    )


def test_peer_of_reads_the_p2p_component() -> None:
    assert peer_of(ADDR) == PEER
    with pytest.raises(ValueError):
        peer_of("/ip4/127.0.0.1/tcp/4001")


def test_new_target_is_due_at_once_and_then_in_flight() -> None:
    # Prepare
    planner = _planner()
    planner.add(ADDR, now=10.0)
    # Execute / Assert
    assert planner.due(10.0) == [ADDR]
    assert planner.due(10.0) == []
    assert planner.next_deadline() is None


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    # Prepare
    planner = _planner()
    planner.add(ADDR, now=0.0)
    now, delays = 0.0, []
    # Execute
    for _ in range(6):
        assert planner.due(now) == [ADDR]
        planner.on_dial_failed(ADDR, now)
        deadline = planner.next_deadline()
        assert deadline is not None
        delays.append(deadline - now)
        assert planner.due(deadline - 1e-9) == []
        now = deadline
    # Assert
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_stays_within_its_band_and_is_seeded() -> None:
    # Prepare
    a, b = _planner(jitter=0.5), _planner(jitter=0.5)
    for planner in (a, b):
        planner.add(ADDR, now=0.0)
        planner.due(0.0)
        planner.on_dial_failed(ADDR, 0.0)
    # Assert
    assert a.next_deadline() == b.next_deadline()
    deadline = a.next_deadline()
    assert deadline is not None and 0.25 <= deadline <= 0.5


def test_connected_peer_is_not_dialled_and_reset_on_disconnect() -> None:
    # Prepare
    planner = _planner()
    planner.add(ADDR, now=0.0)
    planner.due(0.0)
    planner.on_dial_failed(ADDR, 0.0)
    # Execute
    planner.on_connected(PEER)
    # Assert
    assert planner.due(100.0) == [] and planner.failures(ADDR) == 0
    planner.on_disconnected(PEER, now=100.0)
    assert planner.next_deadline() == 100.5
    assert planner.due(100.5) == [ADDR]


def test_self_is_never_a_target_and_permanent_targets_stay() -> None:
    # Prepare
    planner = _planner()
    planner.add(f"/ip4/127.0.0.1/tcp/1/p2p/{SELF}", now=0.0)
    planner.add(ADDR, now=0.0, permanent=True)
    # Execute
    planner.remove(ADDR)
    # Assert
    assert planner.targets() == [ADDR]
