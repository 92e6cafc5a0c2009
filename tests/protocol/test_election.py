"""Electing combiners by load and building each round's tree: pure functions over a membership
snapshot, checked by hand-built views, sequences of views (seeded noise) and hypothesis."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fednode.crypto import NodeKey
from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol import election
from fednode.protocol.election import (
    Branch,
    Candidate,
    Policy,
    Tree,
    assign_by_election,
    build_tree,
    candidates_of,
    score,
)
from fednode.protocol.membership import DetectorConfig, MembershipView
from fednode.protocol.rounds import CombinerLoad
from fednode.wire import Assignment, FederationId, Heartbeat, PeerId, SessionId


def pid(prefix: str, i: int) -> PeerId:
    """A base58-safe peer ID that sorts like ``i`` (0 <= i < 6561): no 0, O, I or l."""
    digits = ""
    for _ in range(4):
        i, d = divmod(i, 9)
        digits = "123456789"[d] + digits
    return PeerId(prefix + digits)


def auto(i: int, **fields: Any) -> Candidate:
    return Candidate(peer=pid("A", i), role="auto", **{"capacity": 20, **fields})


def combiner(i: int, **fields: Any) -> Candidate:
    return Candidate(peer=pid("C", i), role="combiner", **{"capacity": 20, **fields})


def client(i: int, **fields: Any) -> Candidate:
    return Candidate(peer=pid("K", i), role="client", **fields)


def sizes(tree: Tree) -> dict[PeerId, int]:
    return {b.combiner: len(b.clients) for b in tree.branches}


def check_invariants(cands: Sequence[Candidate], tree: Tree) -> None:
    """What holds of every tree: roles, capacity, each data client placed or left out once."""
    by_peer = {c.peer: c for c in cands}
    data = sorted(c.peer for c in cands if c.has_data)
    placed = [k for b in tree.branches for k in b.clients]
    assert sorted(placed + list(tree.left_out)) == data  # each exactly once, nothing else
    for branch in tree.branches:
        head = by_peer[branch.combiner]
        assert head.role != "client"
        assert head.attached + len(branch.clients) <= head.capacity
        if head.role == "auto":
            assert head.peer in branch.clients  # it aggregates its own update


# ----------------------------------------------------------------------------- score


def test_score_follows_the_documented_formula() -> None:
    # Prepare: half of each saturating term, CPU 0.2
    c = auto(1, capacity=42, attached=10, cpu=0.2, bandwidth=12_500_000.0, rtt=0.05)
    # Execute / Assert: 0.35*0.5 + 0.25*0.8 + 0.20*0.5 + 0.20*0.5
    assert score(c) == pytest.approx(0.575)
    base = dataclasses.replace(c, rtt=None, region="eu")
    assert score(base, home_region="eu") == pytest.approx(0.575 + 0.1)  # same region: P = 1
    assert score(base, home_region="us") == pytest.approx(0.575 - 0.1)  # other region: P = 0
    assert score(base) == pytest.approx(0.575)  # unknown: as rtt = rtt_ref
    assert score(auto(1, capacity=0, cpu=1.0)) == pytest.approx(0.2 * 0.5)
    assert "0.35 * S + 0.25 * (1 - cpu) + 0.20 * B + 0.20 * P" in (election.__doc__ or "")


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ({"capacity": 40}, {"capacity": 10}),
        ({"attached": 0}, {"attached": 15}),
        ({"cpu": 0.1}, {"cpu": 0.6}),
        ({"bandwidth": 50e6}, {"bandwidth": 1e6}),
        ({"rtt": 0.01}, {"rtt": 0.2}),
    ],
)
def test_score_rises_with_spare_capacity_idle_cpu_bandwidth_and_proximity(
    better: dict[str, Any], worse: dict[str, Any]
) -> None:
    assert score(auto(1, **better)) > score(auto(1, **worse))


# ----------------------------------------------------------------------------- determinism

ROLES = st.sampled_from(["client", "combiner", "auto"])
NODE = st.fixed_dictionaries(
    {
        "role": ROLES,
        "capacity": st.integers(0, 8),
        "attached": st.integers(0, 3),
        "cpu": st.sampled_from([0.1, 0.4, 0.4, 0.95]),
        "memory": st.sampled_from([0.2, 0.2, 0.2, 0.99]),
        "bandwidth": st.sampled_from([0.0, 1e6, 1e7]),
        "rtt": st.sampled_from([None, 0.01, 0.03, 0.03, 0.2]),
        "region": st.sampled_from(["", "eu", "us"]),
        "suspect": st.booleans(),
    }
)


def view_of(nodes: Sequence[dict[str, Any]]) -> list[Candidate]:
    return [Candidate(peer=pid("P", i), **node) for i, node in enumerate(nodes) if node is not None]


VIEWS = st.lists(st.one_of(st.none(), NODE), max_size=40).map(view_of)
POLICY = Policy(target=4)


@given(view=VIEWS, before=VIEWS, data=st.data())
def test_the_same_view_in_any_order_gives_the_same_tree(
    view: list[Candidate], before: list[Candidate], data: st.DataObject
) -> None:
    # Prepare: a previous tree from another view of the same peers, as a node would hold it
    previous = build_tree(before, policy=POLICY)
    shuffled = data.draw(st.permutations(view))
    # Execute
    fresh = build_tree(view, policy=POLICY)
    again = build_tree(shuffled, policy=POLICY)
    sticky = build_tree(view, previous, policy=POLICY)
    sticky_again = build_tree(
        shuffled, Tree.from_assignments(previous.assignments()), policy=POLICY
    )
    # Assert
    assert fresh == again
    assert sticky == sticky_again
    check_invariants(view, fresh)
    check_invariants(view, sticky)


@given(view=VIEWS)
def test_a_fresh_tree_uses_explicit_combiners_balances_and_leaves_out_a_clear_tail(
    view: list[Candidate],
) -> None:
    # Execute
    tree = build_tree(view, policy=POLICY)
    # Assert
    healthy = {
        c.peer: c.spare
        for c in view
        if c.stands and c.spare > 0 and not (c.suspect or POLICY.overloaded(c))
    }
    explicit = {c.peer for c in view if c.role == "combiner" and c.peer in healthy}
    assert explicit <= set(tree.combiners)
    n_data = sum(c.has_data for c in view)
    by_peer = {c.peer: c for c in view}
    if sum(healthy.values()) >= n_data:
        assert set(tree.combiners) <= set(healthy)
    else:  # short of healthy room: loaded or suspect nodes are drafted rather than leave clients
        assert set(tree.combiners) <= {c.peer for c in view if c.stands and c.spare > 0}
    if sum(healthy.values()) >= n_data:
        assert tree.left_out == ()  # everyone placed when capacity suffices
    # those left out are the highest peer IDs among the clients that are not combiners
    others = sorted(c.peer for c in view if c.has_data and c.peer not in tree.combiners)
    assert list(tree.left_out) == others[len(others) - len(tree.left_out) :]
    # balanced: a combiner holds at most one more than another unless that one is full
    for a in tree.branches:
        for b in tree.branches:
            room = healthy.get(b.combiner, by_peer[b.combiner].spare)
            assert len(a.clients) <= len(b.clients) + 1 or len(b.clients) == room


def test_duplicate_candidates_are_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        build_tree([auto(1), auto(1, cpu=0.5)])


def test_policy_rejects_nonsense() -> None:
    for bad in ({"target": 0}, {"shrink_fill": 0.0}, {"margin": -0.1}, {"max_cpu": 1.5}):
        with pytest.raises(ConfigError):
            Policy(**bad)


# ----------------------------------------------------------------------------- how many


@pytest.mark.parametrize(
    ("n_autos", "capacity", "target", "expected"),
    [
        (100, 50, 32, 4),  # ceil(100 / 32)
        (100, 50, 10, 10),  # ceil(100 / 10)
        (100, 10, 32, 10),  # 4 would hold 40 < 100: as many as the capacity needs
        (100, 7, 32, 15),  # ceil(100 / 7)
        (1, 5, 32, 1),  # at least one
        (30, 50, 32, 1),
        (33, 50, 32, 2),
    ],
)
def test_the_count_of_combiners_follows_clients_and_capacities(
    n_autos: int, capacity: int, target: int, expected: int
) -> None:
    # Prepare
    view = [auto(i, capacity=capacity) for i in range(n_autos)]
    # Execute
    tree = build_tree(view, policy=Policy(target=target))
    # Assert
    assert len(tree.combiners) == expected
    assert tree.left_out == ()
    check_invariants(view, tree)


def test_no_candidate_that_can_combine_means_no_tree_and_everyone_out() -> None:
    # Prepare: clients advertising capacity are still clients
    view = [client(i, capacity=100) for i in range(3)]
    # Execute
    tree = build_tree(view)
    # Assert
    assert tree == Tree(left_out=tuple(c.peer for c in view))
    assert build_tree([]) == Tree()


def test_the_count_has_hysteresis_around_the_target() -> None:
    # Prepare: target 10; the band keeps k' while ceil(n/10) <= k' <= ceil(n/7.5)
    policy = Policy(target=10)
    counts = [20, 21, 20, 19, 16, 15, 21, 31]
    # Execute
    sticky: list[int] = []
    fresh: list[int] = []
    tree: Tree | None = None
    for n in counts:
        view = [auto(i) for i in range(n)]
        tree = build_tree(view, tree, policy=policy)
        sticky.append(len(tree.combiners))
        fresh.append(len(build_tree(view, policy=policy).combiners))
    # Assert
    assert fresh == [2, 3, 2, 2, 2, 2, 3, 4]
    assert sticky == [2, 3, 3, 3, 3, 2, 3, 4]


# ----------------------------------------------------------------------------- explicit roles


def test_explicit_combiners_come_first_and_clients_never_combine() -> None:
    # Prepare: a mediocre explicit combiner, excellent auto nodes, clients with "capacity"
    mediocre = combiner(1, capacity=50, cpu=0.85, rtt=0.3)
    stars = [auto(i, capacity=50, cpu=0.0, bandwidth=1e9, rtt=0.001) for i in range(10)]
    clients = [client(i, capacity=500, cpu=0.0, bandwidth=1e9) for i in range(5)]
    # Execute
    tree = build_tree([*stars, mediocre, *clients])
    # Assert: 15 clients fit under the explicit combiner: no auto node is needed
    assert tree.combiners == (mediocre.peer,)
    assert len(tree.clients) == 15


def test_auto_nodes_join_explicit_combiners_when_capacity_falls_short() -> None:
    # Prepare
    view = [combiner(1, capacity=4), *(auto(i, capacity=4, cpu=i / 10) for i in range(8))]
    # Execute
    tree = build_tree(view)
    # Assert: the explicit one takes 4 of 8, the best auto (lowest CPU) the rest
    assert tree.combiners == (pid("A", 0), pid("C", 1))
    assert sizes(tree) == {pid("A", 0): 4, pid("C", 1): 4}
    assert pid("A", 0) in tree.clients_of(pid("A", 0))


def test_an_overloaded_or_suspect_node_is_not_newly_elected() -> None:
    # Prepare
    view = [
        combiner(1, cpu=0.95),
        combiner(2, memory=0.99),
        combiner(3, suspect=True),
        combiner(4, capacity=5, attached=5),
        auto(1, cpu=0.5),
        client(1),
    ]
    # Execute
    tree = build_tree(view)
    # Assert
    assert tree.combiners == (pid("A", 1),)
    assert tree.clients == (pid("A", 1), pid("K", 1))


# ----------------------------------------------------------------------------- overload


def four_combiners(**c1: Any) -> list[Candidate]:
    return [combiner(1, **c1), *(combiner(i) for i in (2, 3, 4)), *(client(i) for i in range(40))]


def test_a_combiner_that_reports_overload_loses_clients_at_the_next_round() -> None:
    # Prepare
    policy = Policy(target=10)
    first = build_tree(four_combiners(), policy=policy)
    assert set(sizes(first).values()) == {10}
    # Execute
    hot = build_tree(four_combiners(cpu=0.97), first, policy=policy)
    hotter = build_tree(four_combiners(cpu=0.97), hot, policy=policy)
    cooled = build_tree(four_combiners(cpu=0.3), hotter, policy=policy)
    # Assert: sheds ceil(25%) each round it is overloaded; only those clients move
    c1 = pid("C", 1)
    assert sizes(hot) == {c1: 7, pid("C", 2): 11, pid("C", 3): 11, pid("C", 4): 11}
    assert hot.moved(first) == tuple(sorted(set(first.clients_of(c1)) - set(hot.clients_of(c1))))
    assert len(hot.moved(first)) == 3
    assert sizes(hotter)[c1] == 5 and len(hotter.moved(hot)) == 2
    assert cooled == hotter  # recovering does not pull clients back: no flapping
    check_invariants(four_combiners(cpu=0.97), hot)


def test_a_combiner_whose_capacity_shrinks_sheds_just_the_excess() -> None:
    # Prepare: other sessions now take 14 of its 20 slots
    policy = Policy(target=10)
    first = build_tree(four_combiners(), policy=policy)
    # Execute
    after = build_tree(four_combiners(attached=14), first, policy=policy)
    # Assert
    assert sizes(after)[pid("C", 1)] == 6
    assert len(after.moved(first)) == 4
    assert set(after.clients_of(pid("C", 1))) <= set(first.clients_of(pid("C", 1)))


def test_an_overloaded_combiner_is_left_out_of_a_fresh_tree() -> None:
    tree = build_tree(four_combiners(cpu=0.97), policy=Policy(target=10))
    assert pid("C", 1) not in tree.combiners
    assert tree.left_out == ()


def test_a_dead_combiners_clients_move_and_no_one_else() -> None:
    # Prepare
    policy = Policy(target=10)
    first = build_tree(four_combiners(), policy=policy)
    # Execute
    after = build_tree(four_combiners()[1:], first, policy=policy)
    # Assert
    assert set(after.moved(Tree(branches=first.branches[1:]))) == set()
    assert sorted(after.clients) == sorted(first.clients)
    assert set(sizes(after).values()) <= {13, 14}


def test_a_skewed_tree_is_rebalanced_beyond_the_tolerance() -> None:
    # Prepare: C1 carried all 30 clients; C2 is new. Fair share 15, tolerance 1.5x: 23
    view = [combiner(1, capacity=40), combiner(2, capacity=40), *(client(i) for i in range(30))]
    previous = Tree(
        branches=(Branch(combiner=pid("C", 1), clients=tuple(c.peer for c in view[2:])),)
    )
    # Execute
    tree = build_tree(view, previous, policy=Policy(target=32))
    # Assert
    assert sizes(tree) == {pid("C", 1): 23, pid("C", 2): 7}


# ----------------------------------------------------------------------------- hysteresis


def steady_view(rng: random.Random) -> list[Candidate]:
    """Eight alike auto nodes and forty clients in two regions, with seeded noise in CPU and RTT
    (±0.03 CPU, ±10% RTT): what a steady federation's heartbeats look like round after round."""

    def cpu(base: float) -> float:
        return min(1.0, max(0.0, base + rng.uniform(-0.03, 0.03)))

    def rtt(base: float) -> float:
        return base * rng.uniform(0.9, 1.1)

    autos = [
        auto(i, capacity=16, cpu=cpu(0.4), bandwidth=1e7, rtt=rtt(0.02 + 0.001 * i), region=r)
        for i, r in enumerate(["eu", "us"] * 4)
    ]
    clients = [
        client(i, cpu=cpu(0.5), rtt=rtt(0.005 + 0.002 * i), region=("eu", "us")[i % 2])
        for i in range(40)
    ]
    return autos + clients


def test_no_flapping_under_steady_load_and_flapping_without_hysteresis() -> None:
    # Prepare: 50 noisy views of one steady federation
    rng = random.Random(20_240_601)
    views = [steady_view(rng) for _ in range(50)]
    policy = Policy(target=10)
    # Execute
    sticky: list[Tree] = []
    for view in views:
        sticky.append(build_tree(view, sticky[-1] if sticky else None, policy=policy))
    fresh = [build_tree(view, policy=policy) for view in views]
    no_margin = Policy(target=10, margin=0.0)
    unmarg: list[Tree] = []
    for view in views:
        unmarg.append(build_tree(view, unmarg[-1] if unmarg else None, policy=no_margin))
    # Assert: with hysteresis the tree never changes
    assert all(tree == sticky[0] for tree in sticky)
    assert len(sticky[0].combiners) == 5 and sticky[0].left_out == ()
    # without it, the same noise moves combiners and clients round after round
    changes = sum(a != b for a, b in itertools.pairwise(fresh))
    assert changes == len(views) - 1
    assert len({t.combiners for t in fresh}) >= 10
    assert sum(len(b.moved(a)) for a, b in itertools.pairwise(fresh)) >= 1000
    # and without the margin alone, the combiner set itself flaps
    assert len({t.combiners for t in unmarg}) >= 10


def test_a_challenger_must_beat_an_incumbent_by_the_margin() -> None:
    # Prepare: one seat; A1 holds it
    policy = Policy(target=32)
    first = build_tree([auto(1, cpu=0.40), auto(2, cpu=0.44)], policy=policy)
    assert first.combiners == (pid("A", 1),)
    # Execute: A2 edges ahead by 0.25 * 0.2 = 0.05 < margin, then by 0.25 * 0.6 = 0.15 > margin
    close = build_tree([auto(1, cpu=0.40), auto(2, cpu=0.20)], first, policy=policy)
    clear = build_tree([auto(1, cpu=0.80), auto(2, cpu=0.20)], first, policy=policy)
    # Assert
    assert close == first
    assert clear.combiners == (pid("A", 2),)
    assert build_tree([auto(1, cpu=0.40), auto(2, cpu=0.20)], policy=policy).combiners == (
        pid("A", 2),
    )


# ----------------------------------------------------------------------------- capacity


def test_every_client_is_placed_exactly_once_when_capacity_suffices() -> None:
    # Prepare
    view = [combiner(1, capacity=3), combiner(2, capacity=7), *(client(i) for i in range(10))]
    # Execute
    tree = build_tree(view)
    # Assert
    assert sizes(tree) == {pid("C", 1): 3, pid("C", 2): 7}
    assert tree.left_out == ()
    check_invariants(view, tree)


def test_short_capacity_leaves_out_the_highest_peer_ids_after_those_keeping_their_place() -> None:
    # Prepare: five slots for eight clients; K8 already had a place
    view = [combiner(1, capacity=2), combiner(2, capacity=3), *(client(i) for i in range(8))]
    previous = Tree(branches=(Branch(combiner=pid("C", 2), clients=(pid("K", 7),)),))
    # Execute
    fresh = build_tree(view)
    sticky = build_tree(view, previous)
    # Assert
    assert fresh.left_out == tuple(pid("K", i) for i in (5, 6, 7))
    assert sticky.left_out == tuple(pid("K", i) for i in (4, 5, 6))
    assert sticky.combiner_of(pid("K", 7)) == pid("C", 2)
    check_invariants(view, sticky)


# ----------------------------------------------------------------------------- proximity


def test_clients_go_to_a_combiner_of_their_region_first() -> None:
    # Prepare: RTTs point the wrong way; the region wins
    view = [
        combiner(1, region="eu", rtt=0.100),
        combiner(2, region="us", rtt=0.010),
        client(1, region="eu", rtt=0.010),
        client(2, region="us", rtt=0.100),
        client(3, region="eu", rtt=0.011),
        client(4, region="us", rtt=0.101),
    ]
    # Execute
    tree = build_tree(view)
    # Assert
    assert tree.clients_of(pid("C", 1)) == (pid("K", 1), pid("K", 3))
    assert tree.clients_of(pid("C", 2)) == (pid("K", 2), pid("K", 4))


def test_within_a_region_clients_go_to_the_smallest_rtt_gap() -> None:
    # Prepare: near (10 ms) and far (100 ms) from the reducer; an unmeasured client
    view = [
        combiner(1, rtt=0.100),
        combiner(2, rtt=0.010),
        client(1, rtt=0.012),
        client(2, rtt=0.090),
        client(3, rtt=0.011),
        client(4, rtt=0.120),
        client(5),
    ]
    # Execute
    tree = build_tree(view)
    # Assert: level 3 each; K5 has no RTT: the smallest peer ID with room
    assert tree.clients_of(pid("C", 2)) == (pid("K", 1), pid("K", 3))
    assert tree.clients_of(pid("C", 1)) == (pid("K", 2), pid("K", 4), pid("K", 5))


def test_balance_comes_before_proximity() -> None:
    # Prepare: three eu clients, one us client, one combiner in each region
    view = [combiner(1, region="eu"), combiner(2, region="us")]
    view += [client(i, region="eu") for i in range(3)] + [client(3, region="us")]
    # Execute
    tree = build_tree(view)
    # Assert: two each; the eu client past the eu combiner's share goes to us
    assert sizes(tree) == {pid("C", 1): 2, pid("C", 2): 2}
    assert tree.combiner_of(pid("K", 3)) == pid("C", 2)
    assert tree.combiner_of(pid("K", 2)) == pid("C", 2)


# ----------------------------------------------------------------------------- plans and views


def test_a_tree_converts_to_plan_assignments_and_back() -> None:
    # Prepare
    view = [combiner(3), combiner(1), combiner(2), client(1), client(0)]
    tree = build_tree(view)
    # Execute
    assignments = tree.assignments()
    # Assert: sorted by combiner, sorted clients, an empty branch dropped
    assert [a.combiner for a in assignments] == sorted(a.combiner for a in assignments)
    assert all(list(a.clients) == sorted(a.clients) for a in assignments)
    assert Tree.from_assignments(reversed(assignments)).assignments() == assignments
    assert len(assignments) == 2 and tree.clients_of(pid("C", 3)) == ()
    assert build_tree(view, Tree.from_assignments(assignments)) == tree


def test_assign_by_election_is_a_drop_in_for_assign_clients() -> None:
    # Prepare: what ReducerMachine holds; C is a combiner only, A both (auto)
    c, a = pid("C", 1), pid("A", 1)
    clients = [pid("K", i) for i in range(5)] + [a]
    loads = [CombinerLoad(peer=c, capacity=3), CombinerLoad(peer=a, capacity=4, attached=1)]
    # Execute
    first = assign_by_election(clients, loads)
    again = assign_by_election(list(reversed(clients)), list(reversed(loads)))
    sticky = assign_by_election(clients, loads, first)
    # Assert
    assert first == again == sticky
    assert first == (
        Assignment(combiner=a, clients=(a, pid("K", 0), pid("K", 3))),
        Assignment(combiner=c, clients=(pid("K", 1), pid("K", 2), pid("K", 4))),
    )
    assert assign_by_election([pid("K", 1)], []) == ()


FED = FederationId("demo")
KEYS = sorted((NodeKey(bytes([i + 1]) * 32) for i in range(7)), key=lambda k: k.peer_id)
ME, CLIENT, COMB, AUTO, REDUCER, BOOT, GONE = (k.peer_id for k in KEYS)


def heartbeat(peer: PeerId, role: Any, **fields: Any) -> Heartbeat:
    base: dict[str, Any] = {
        "federation": FED,
        "peer": peer,
        "incarnation": 1,
        "seq": 0,
        "sent_ms": 1,
        "interval_ms": 1000,
        "role": role,
        "capacity": 10,
        "attached": 4,
        "cpu": 0.3,
        "memory": 0.4,
        "bandwidth": 1e6,
        "region": "eu",
        "addrs": (),
        "session": SessionId("s1"),
        "round": 3,
    }
    return Heartbeat(**{**base, **fields})


def test_candidates_come_from_the_membership_view() -> None:
    # Prepare: GONE goes silent at 0 and is dead by 6; COMB serves another session
    view = MembershipView(ME, FED, DetectorConfig())
    view.on_heartbeat(heartbeat(GONE, "combiner"), 0.0)
    view.on_heartbeat(heartbeat(AUTO, "auto"), 2.0)  # suspect by 6
    view.on_timer(3.0)  # on time: a late tick's suspicion would count from the tick
    view.on_timer(6.0)
    for peer, role, session in [
        (CLIENT, "client", "s1"),
        (COMB, "combiner", "other"),
        (REDUCER, "auto", "s1"),
        (BOOT, "bootstrap", ""),
    ]:
        view.on_heartbeat(heartbeat(peer, role, session=SessionId(session)), 6.0)
    view.record_rtt(COMB, 0.025)
    # Execute
    cands = candidates_of(view.members(), session="s1", exclude=[REDUCER])
    # Assert
    by_peer = {c.peer: c for c in cands}
    assert [c.peer for c in cands] == sorted([CLIENT, COMB, AUTO])
    assert (by_peer[COMB].attached, by_peer[COMB].rtt, by_peer[COMB].role) == (4, 0.025, "combiner")
    assert by_peer[CLIENT].attached == 0  # our own session's clients are replaced by each tree
    assert by_peer[AUTO].suspect and not by_peer[CLIENT].suspect
    assert (by_peer[CLIENT].cpu, by_peer[CLIENT].region, by_peer[CLIENT].rtt) == (0.3, "eu", None)
    # every node that holds this view computes the same tree
    assert build_tree(cands) == build_tree(reversed(cands))
    assert math.isfinite(score(by_peer[COMB]))


def test_rounds_md_states_the_score_and_the_policy_defaults() -> None:
    # Prepare
    text = (Path(__file__).resolve().parents[2] / "protocols" / "rounds.md").read_text()
    section = text.split("## Election\n", 1)[1].split("\n## ", 1)[0]
    p = Policy()
    # Assert
    assert "score = 0.35 * S + 0.25 * (1 - cpu) + 0.20 * B + 0.20 * P" in section
    assert (p.w_spare, p.w_cpu, p.w_bandwidth, p.w_proximity) == (0.35, 0.25, 0.20, 0.20)
    assert (p.bandwidth_ref, p.rtt_ref) == (12_500_000.0, 0.05)
    for row in [
        f"| {p.target}, {p.shrink_fill} |",
        f"| {p.margin} |",
        f"| {1 + p.skew} |",
        f"| {p.max_cpu}, {p.max_memory} |",
        f"| {p.shed_fraction:.0%} |",
    ]:
        assert row in section, row


def test_when_every_combiner_is_overloaded_they_still_serve() -> None:
    # Prepare: a busy machine: every node reports a saturated CPU
    hot = [Candidate(peer=f"C{i}", role="combiner", capacity=4, cpu=1.0) for i in range(2)]
    clients = [Candidate(peer=f"K{i}", role="client", cpu=1.0) for i in range(6)]
    # Execute
    tree = build_tree([*hot, *clients], policy=POLICY)
    # Assert: nobody sits the round out for want of a healthy combiner
    assert tree.left_out == ()
    assert set(tree.combiners) == {"C0", "C1"}


def test_under_uniform_overload_the_incumbents_keep_serving_and_the_tree_holds() -> None:
    # Prepare: ten auto nodes on one busy machine (every CPU saturated), room for five each, so
    # two combiners do; their other readings jitter from tree to tree
    rng = random.Random(5)

    def view() -> list[Candidate]:
        return [
            auto(i, capacity=5, cpu=1.0, bandwidth=rng.uniform(5e6, 2e7), rtt=rng.uniform(0, 0.01))
            for i in range(10)
        ]

    tree = build_tree(view(), policy=POLICY)
    first = set(tree.combiners)
    # Execute
    trees = []
    for _ in range(20):
        tree = build_tree(view(), tree, policy=POLICY)
        trees.append(tree)
    # Assert: the same two serve throughout, nobody left out (the incumbents' shed room comes
    # back to them before an equally loaded newcomer is raised)
    assert len(first) == 2
    assert all(set(t.combiners) == first and t.left_out == () for t in trees)
