"""Whole sessions that heal: a combiner, a client or the reducer killed at each phase of a round
(planning, model fetch, training, push, partial push, reduce), on the in-test network
(``rounds_kit.Network``) with the clock stepped by hand. Each session must complete, and each
round's signed result must count every surviving client's update exactly once, its model the
FedAvg of exactly those updates."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from rounds_kit import (
    C1,
    C2,
    K1,
    K2,
    K3,
    K4,
    REDUCER,
    REDUCER_KEY,
    SUCCESSOR,
    SUCCESSOR_KEY,
    Network,
    config,
)

from fednode.protocol import client as cl
from fednode.protocol import combiner as co
from fednode.protocol import reducer as re_
from fednode.protocol.rounds import PlanRejected, PlanRejection, ResultRejected, peer_of
from fednode.wire import PeerId, RoundResult

ROUNDS = 3
KILL_ROUND = 2
FETCH_S, TRAIN_S, DETECT_S, TAKEOVER_S = 1.0, 5.0, 1.0, 5.0
CLIENTS = (K1, K2, K3, K4)
PHASES = ["planning", "fetch", "training", "push", "partial-push", "reduce"]
#: The phases after which the dead client's update of the round is already in.
COUNTED_BEFORE = {"partial-push", "reduce"}


def trigger(phase: str) -> tuple[Callable[[PeerId, object], bool], float]:
    """Which action of round ``KILL_ROUND`` marks ``phase`` (K2 is the client watched, C2 its
    combiner), and how long after it the victim dies (mid-transfer, mid-training)."""
    r = KILL_ROUND
    when: dict[str, tuple[Callable[[PeerId, object], bool], float]] = {
        "planning": (
            lambda who, a: (
                isinstance(a, re_.PublishPlan) and (a.plan.round, a.plan.amendment) == (r, 0)
            ),
            0.0,
        ),
        "fetch": (
            lambda who, a: who == K2 and isinstance(a, cl.FetchModel) and a.round == r,
            FETCH_S / 2,
        ),
        "training": (
            lambda who, a: who == K2 and isinstance(a, cl.Train) and a.round == r,
            TRAIN_S / 2,
        ),
        "push": (
            lambda who, a: who == K2 and isinstance(a, cl.PushUpdate) and a.update.round == r,
            0.0,
        ),
        "partial-push": (
            lambda who, a: who == C2 and isinstance(a, co.PushPartial) and a.round == r,
            0.0,
        ),
        "reduce": (lambda who, a: isinstance(a, re_.Reduce) and a.round == r, 0.0),
    }
    return when[phase]


def session(phase: str, victim: PeerId, **kwargs: Any) -> Network:
    """A three-round session in which ``victim`` dies at ``phase`` of round 2; when the victim is
    the reducer, a successor of term 1 takes over ``TAKEOVER_S`` later, and the old reducer comes
    back a second after that."""
    fired, delay = trigger(phase)
    done: list[bool] = []

    def hook(who: PeerId, action: object) -> None:
        if done or not fired(who, action):
            return
        done.append(True)
        if delay:
            net._after(delay, lambda: die(net.now))
        else:
            die(net.now)

    def die(at: float) -> None:
        net.kill(victim, detect_after=None if victim == REDUCER else DETECT_S)
        if victim == REDUCER:
            net._after(TAKEOVER_S, take_over)
            net._after(TAKEOVER_S + 1.0, lambda: net.revive(REDUCER))

    def take_over() -> None:
        last = net.results[-1]
        net.take_over(SUCCESSOR_KEY, term=1, first_round=last.round + 1, model=last.model)

    cfg = kwargs.pop("cfg", config(rounds=ROUNDS))
    net = Network(
        cfg,
        combiners={C1: 4, C2: 4},  # room for each other's clients
        fetch_s=FETCH_S,
        train_s=TRAIN_S,
        hook=hook,
        **kwargs,
    )
    net.start()
    net.advance(10 * cfg.round_deadline_ms / 1000)
    assert done, f"the {phase} phase never came"
    return net


def included(result: RoundResult) -> set[PeerId]:
    return {peer_of(c.signer) for c in result.included}


def check_results(net: Network, expected: dict[int, Iterable[PeerId]]) -> None:
    """One signed result per round, chained; each counts exactly the ``expected`` clients'
    updates, each that client's own update of that round, and its model is their FedAvg."""
    assert [r.round for r in net.results] == list(range(1, len(expected) + 1))
    parent = net.initial
    for result in net.results:
        want = set(expected[result.round])
        assert result.parent == parent
        assert included(result) == want, f"round {result.round}"
        for c in result.included:
            mine = net.blobs[parent] + 1.0 + sorted(net.clients).index(peer_of(c.signer))
            assert np.array_equal(net.blobs[c.update], mine)
            assert c.weight == net.examples[peer_of(c.signer)]
        weights = sum(c.weight for c in result.included)
        fedavg = sum(net.blobs[c.update] * c.weight for c in result.included) / weights
        assert np.allclose(net.blobs[result.model], fedavg)
        assert result.num_examples == weights == sum(p.total_weight for p in result.partials)
        parent = result.model
    completed = [e for e in net.ended if isinstance(e, re_.SessionCompleted)]
    assert len(completed) == 1 and not [e for e in net.ended if e not in completed]
    assert completed[0].ended.model == parent


def amended_plans(net: Network, round_: int) -> list[Any]:
    return [
        a.plan
        for _, a in net.log
        if isinstance(a, re_.PublishPlan) and a.plan.round == round_ and a.plan.amendment > 0
    ]


# ------------------------------------------------------------------------- kill a combiner


@pytest.mark.parametrize("phase", PHASES)
def test_a_combiner_killed_at_any_phase_has_its_clients_moved_and_counted_once(phase: str) -> None:
    # Execute: C2, which holds K2 and K4, dies at this phase of round 2
    net = session(phase, C2)
    # Assert: every client counted in every round, without training twice
    check_results(net, {r: CLIENTS for r in range(1, ROUNDS + 1)})
    assert all(net.trained[c] == ROUNDS for c in CLIENTS)
    # The round C2 died in (the next one, when it died at the reduce, before the reducer knew)
    # was amended: C1 took K2 and K4 beside its own
    healed = KILL_ROUND + 1 if phase == "reduce" else KILL_ROUND
    (amended,) = amended_plans(net, healed)
    assert amended.clients_of(C1) == CLIENTS and amended.clients_of(C2) == ()
    assert {peer_of(p.combiner) for p in net.results[healed - 1].partials} == {C1}
    later = net.results[-1] if healed < ROUNDS else None
    assert later is None or {peer_of(p.combiner) for p in later.partials} == {C1}
    assert not net.actions_of(C2, co.PushPartial)[KILL_ROUND:]


def test_a_partial_in_before_its_combiner_died_counts_and_only_its_straggler_moves() -> None:
    # Prepare: K4's pushes to C2 are lost, so C2 pushes K2 alone at its cut-off (54 s), then dies;
    # C1's first partial is lost too, so the round is still open then
    def drop(kind: str, src: PeerId, dst: PeerId) -> bool:
        lost_partial = kind == "partial" and src == C1 and net.now < 54.0
        return lost_partial or (kind == "update" and (src, dst) == (K4, C2))

    net = Network(config(rounds=1), combiners={C1: 4, C2: 4}, drop=drop)
    net.start()
    net.advance(54.5)
    assert [len(p.contributions) for p in net.actions_of(C2, co.PushPartial)] == [1]
    # Execute
    net.kill(C2, detect_after=0.5)
    net.advance(120.0)
    # Assert: K2 counted once, from C2's partial; K4 moved to C1, whose new partial counts it
    check_results(net, {1: CLIENTS})
    (result,) = net.results
    by_combiner = {peer_of(p.combiner): p.total_weight for p in result.partials}
    assert by_combiner == {C1: 10 + 30 + 40, C2: 20}
    (amended,) = amended_plans(net, 1)
    assert amended.clients_of(C1) == (K1, K3, K4)
    assert amended.deadline_ms == 55_000 + 30_000  # half a round left to the orphan
    assert net.trained[K4] == 1


# ------------------------------------------------------------------------- kill a client


@pytest.mark.parametrize("phase", PHASES)
def test_a_client_killed_at_any_phase_leaves_the_round_to_close_with_the_rest(phase: str) -> None:
    # Execute: K2 dies at this phase of round 2
    net = session(phase, K2)
    # Assert: rounds close without it once it is gone (its update counts if it was in)
    survivors = {K1, K3, K4}
    dying_round = survivors | ({K2} if phase in COUNTED_BEFORE else set())
    check_results(net, {1: CLIENTS, 2: dying_round, 3: survivors})
    assert all(net.trained[c] == ROUNDS for c in survivors)


# ------------------------------------------------------------------------- kill the reducer


@pytest.mark.parametrize("phase", PHASES)
def test_a_reducer_killed_at_any_phase_is_replaced_and_the_old_one_steps_down(phase: str) -> None:
    # Execute: the reducer dies at this phase of round 2; a successor resumes from round 1's
    # result; the old reducer comes back later
    net = session(phase, REDUCER)
    # Assert: every client counted in every round, kept updates re-pushed, not retrained
    check_results(net, {r: CLIENTS for r in range(1, ROUNDS + 1)})
    assert all(net.trained[c] == ROUNDS for c in CLIENTS)
    assert [r.term for r in net.results] == [0, 1, 1]
    assert net.results[1].reducer == SUCCESSOR_KEY.public_key
    # The old reducer heard the successor and stepped down without publishing again
    old = net.reducers[REDUCER]
    assert old.state is re_.State.SUPERSEDED
    (stepped,) = net.actions_of(REDUCER, re_.SteppedDown)
    assert (stepped.term, stepped.by_term, stepped.by) == (0, 1, SUCCESSOR_KEY.public_key)
    after = net.log[net.log.index((REDUCER, stepped)) :]
    assert not [a for w, a in after if w == REDUCER and isinstance(a, re_.PublishPlan)]
    assert net.reducers[SUCCESSOR].state is re_.State.COMPLETED


def test_a_deaf_old_reducers_plans_and_session_end_are_rejected_as_stale_term() -> None:
    # Prepare: five 20 s rounds; the old reducer dies at round 2's push and comes back deaf to
    # its successor, so at its round-2 deadline it retries the round, then fails the session
    cfg = config(rounds=5, round_deadline_ms=20_000, max_retries=1)

    def drop(kind: str, src: PeerId, dst: PeerId) -> bool:
        return (src, dst) == (SUCCESSOR, REDUCER)

    # Execute
    net = session("push", REDUCER, cfg=cfg, drop=drop)
    # Assert: the successor's session completed, every client counted in every round
    by_successor = [r for r in net.results if r.reducer == SUCCESSOR_KEY.public_key]
    assert [r.round for r in by_successor] == [2, 3, 4, 5]
    assert [r.reducer for r in net.results].count(REDUCER_KEY.public_key) == 1
    done = [e for e in net.ended if isinstance(e, re_.SessionCompleted)]
    assert [e.ended.reducer for e in done] == [SUCCESSOR_KEY.public_key]
    assert all(included(r) == set(CLIENTS) for r in net.results)
    # The old reducer's retry reached clients and combiners still in the session: stale term
    (retry,) = amended_plans(net, KILL_ROUND)
    assert retry.term == 0 and retry.reducer == REDUCER_KEY.public_key
    for peer in (*CLIENTS, C1, C2):
        stale = [
            a for a in net.actions_of(peer, PlanRejected) if a.reason is PlanRejection.STALE_TERM
        ]
        assert [(a.term, a.round, a.amendment) for a in stale] == [(0, KILL_ROUND, 1)]
    # ... and its failed session end, after the successor's end: stale term too
    (failed,) = [e for e in net.ended if isinstance(e, re_.SessionFailed)]
    assert failed.ended.term == 0
    for peer in (*CLIENTS, C1, C2):
        reasons = [a.reason.value for a in net.actions_of(peer, ResultRejected)]
        assert reasons == ["stale-term"]
