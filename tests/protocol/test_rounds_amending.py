"""The round machines healing a round, stepped by hand: the reducer's amended plan when an assigned
combiner dies, a combiner reopened by more clients, orphaned clients re-pushing what they kept,
and reducer terms (stale-term rejections, stepping down, resuming a session)."""

from __future__ import annotations

from typing import Any

import pytest
from rounds_kit import (
    C1,
    C2,
    CLIENT_KEYS,
    D0,
    DEADLINE_S,
    K1,
    K2,
    K3,
    K4,
    KEY_OF,
    OUTSIDER_KEY,
    REDUCER,
    SUCCESSOR,
    SUCCESSOR_KEY,
    config,
    ended,
    kinds,
    loads,
    partial,
    plan,
    reducer,
    result,
    update,
)

from fednode.crypto import digest
from fednode.protocol import client as cl
from fednode.protocol import combiner as co
from fednode.protocol import reducer as re_
from fednode.protocol.rounds import (
    CombinerLoad,
    PlanRejected,
    PlanRejection,
    ResultRejected,
    ResultRejection,
)
from fednode.wire import Assignment, Nonce, PeerId

CLIENTS = (K1, K2, K3, K4)
D1 = digest(b"global model 1")
NEWCOMER = OUTSIDER_KEY.peer_id


def started(capacity: int = 4, **cfg: Any) -> re_.ReducerMachine:
    """A reducer with round 1 planned: C1 takes K1 and K3, C2 takes K2 and K4."""
    r = reducer(config(**cfg))
    r.start(0.0, CLIENTS, loads(capacity))
    assert r.plan is not None and r.plan.clients_of(C2) == (K2, K4)
    return r


def published(actions: list[Any]) -> Any:
    (plan_,) = [a.plan for a in actions if isinstance(a, re_.PublishPlan)]
    return plan_


# ------------------------------------------------------------------------- the reducer


def test_a_dead_combiners_clients_move_to_the_survivors_in_an_amended_plan() -> None:
    # Prepare: C1's partial is in; C2 dies before its own
    r = started()
    first = r.plan
    assert first is not None
    p1 = partial(C1, (K1, K3))
    r.on_partial(p1, 1.0)
    # Execute
    actions = r.on_peer_dead(C2, 5.0)
    # Assert: the same round and parent, amendment 1; C1 keeps its clients and takes C2's
    assert kinds(actions) == ["CombinerLost", "PublishPlan"]
    lost = actions[0]
    assert (lost.combiner, lost.clients, lost.waiting) == (C2, (K2, K4), ())
    amended = published(actions)
    assert (amended.round, amended.amendment, amended.parent, amended.term) == (1, 1, D0, 0)
    assert amended.assignments == (Assignment(combiner=C1, clients=CLIENTS),)
    assert amended.deadline_ms == first.deadline_ms  # 55 s left: more than half a round
    # C1's partial stays counted; C1 owes one counting the newcomers, so nothing closes yet
    stats = r.statistics()
    assert (stats.partials, stats.covered, stats.amendment, stats.retries) == (1, 2, 1, 0)
    assert r.state is re_.State.COLLECTING
    superset = partial(C1, CLIENTS)
    closing = r.on_partial(superset, 6.0)
    assert kinds(closing) == ["FetchPartial", "Reduce"]
    assert closing[-1].partials == (superset,)


def test_an_amended_plan_late_in_the_round_leaves_the_orphans_half_a_round() -> None:
    r = started()
    (replan,) = [a for a in r.on_peer_dead(C2, 50.0) if isinstance(a, re_.PublishPlan)]
    assert replan.plan.deadline_ms == 50_000 + 30_000
    assert r.next_deadline() == 80.0
    assert re_.ORPHAN_GRACE == 0.5


def test_a_partial_in_before_its_combiner_died_is_counted_once() -> None:
    # Prepare: C2 pushed at its cut-off with K2 only (K4 straggled), then died
    r = started()
    p2 = partial(C2, (K2,))
    r.on_partial(p2, 54.0)
    # Execute
    actions = r.on_peer_dead(C2, 55.0)
    # Assert: only the straggler K4 moves; K2 stays counted in C2's partial
    assert actions[0] == re_.CombinerLost(round=1, combiner=C2, clients=(K4,), waiting=())
    assert published(actions).assignments == (Assignment(combiner=C1, clients=(K1, K3, K4)),)
    stolen = partial(C1, CLIENTS)
    assert r.on_partial(stolen, 56.0)[0].reason is re_.PartialRejection.DOUBLE_COUNT  # type: ignore[union-attr]
    assert r.statistics().covered == 1
    # C1's partial completes the round, with C2's partial from before its death
    p1 = partial(C1, (K1, K3, K4))
    reduce = r.on_partial(p1, 57.0)[-1]
    assert isinstance(reduce, re_.Reduce)
    assert reduce.partials == (p1, p2)
    (published_result, _) = r.on_reduced(D1, 100, {}, 58.0)
    counted = [c.signer for c in published_result.result.included]  # type: ignore[union-attr]
    assert sorted(counted) == sorted(KEY_OF[c].public_key for c in CLIENTS)


def test_a_reopened_combiner_is_awaited_before_the_round_closes() -> None:
    # Prepare: C1 (room for one more) pushed; a newcomer with room for one joins; C2 dies
    r = reducer()
    r.start(0.0, CLIENTS, [CombinerLoad(peer=C1, capacity=3), CombinerLoad(peer=C2, capacity=4)])
    assert r.plan is not None
    own, orphans = r.plan.clients_of(C1), r.plan.clients_of(C2)
    r.on_partial(partial(C1, own), 1.0)
    r.on_peers(CLIENTS, [*loads(3, C1), CombinerLoad(peer=NEWCOMER, capacity=1)])
    amended = published(r.on_peer_dead(C2, 5.0))
    (to_c1,) = set(amended.clients_of(C1)) - set(own)
    (to_newcomer,) = amended.clients_of(NEWCOMER)
    assert {to_c1, to_newcomer} == set(orphans)
    # Execute: the newcomer's partial comes first
    first = r.on_partial(partial(NEWCOMER, (to_newcomer,)), 6.0)
    # Assert: C1 owes a partial counting its orphan, so the round stays open for it
    assert kinds(first) == ["FetchPartial"]
    closing = r.on_partial(partial(C1, (*own, to_c1)), 7.0)
    assert kinds(closing) == ["FetchPartial", "Reduce"]
    assert sum(len(p.contributions) for p in closing[-1].partials) == 4


def test_a_partial_from_a_combiner_declared_dead_is_not_counted() -> None:
    r = started()
    r.on_peer_dead(C2, 5.0)
    rejected = r.on_partial(partial(C2, (K2, K4)), 6.0)
    assert rejected[0].reason is re_.PartialRejection.NOT_ASSIGNED  # type: ignore[union-attr]


def test_orphans_wait_for_a_combiner_with_room_then_move() -> None:
    # Prepare: each combiner full; C1's partial is in and covers min_clients
    r = started(capacity=2)
    r.on_partial(partial(C1, (K1, K3)), 1.0)
    # Execute: C2 dies: nowhere to go
    stuck = r.on_peer_dead(C2, 5.0)
    # Assert: the orphans wait; the round does not close early without them
    assert stuck == [re_.CombinerLost(round=1, combiner=C2, clients=(K2, K4), waiting=(K2, K4))]
    assert r.state is re_.State.COLLECTING and r.statistics().waiting == 2
    assert r.on_timer(10.0) == []
    # A combiner with room joins: the orphans move to it at once
    moved = r.on_peers(CLIENTS, [*loads(2, C1), CombinerLoad(peer=NEWCOMER, capacity=2)], 20.0)
    assert kinds(moved) == ["PublishPlan"]
    amended = published(moved)
    assert amended.amendment == 1
    assert amended.clients_of(C1) == (K1, K3) and amended.clients_of(NEWCOMER) == (K2, K4)
    assert r.statistics().waiting == 0


def test_a_combiner_declared_dead_gets_no_orphans_back_in_the_same_attempt() -> None:
    # Prepare: C2 died (its partial counted K2 alone); a false alarm: it is back in membership
    r = started(capacity=2)
    r.on_partial(partial(C2, (K2,)), 1.0)
    r.on_peer_dead(C2, 5.0)  # K4 waits: C1 is full
    # Execute
    actions = r.on_peers(CLIENTS, loads(2), 6.0)
    # Assert: K4 keeps waiting rather than going back to C2
    assert actions == [] and r.statistics().waiting == 1


def test_waiting_orphans_move_at_a_timer_tick_when_the_driver_gives_no_time() -> None:
    r = started(capacity=2)
    r.on_peer_dead(C2, 5.0)
    assert r.on_peers(CLIENTS, [*loads(2, C1), CombinerLoad(peer=NEWCOMER, capacity=2)]) == []
    assert kinds(r.on_timer(6.0)) == ["PublishPlan"]


def test_orphans_that_never_find_room_leave_the_round_to_its_deadline() -> None:
    r = started(capacity=2)
    p1 = partial(C1, (K1, K3))
    r.on_partial(p1, 1.0)
    r.on_peer_dead(C2, 5.0)
    assert r.on_timer(DEADLINE_S) == [re_.Reduce(round=1, parent=D0, partials=(p1,))]


def test_a_dead_orphan_is_not_moved_and_the_round_can_close_without_it() -> None:
    # Prepare: C1's partial is in; C2's clients died
    r = started()
    r.on_partial(partial(C1, (K1, K3)), 1.0)
    r.on_peer_dead(K2, 2.0)
    r.on_peer_dead(K4, 2.0)
    # Execute
    actions = r.on_peer_dead(C2, 3.0)
    # Assert
    assert kinds(actions) == ["CombinerLost", "Reduce"]


def test_a_dead_combiner_outside_collecting_changes_nothing() -> None:
    r = started()
    r.on_partial(partial(C1, (K1, K3)), 1.0)
    r.on_partial(partial(C2, (K2, K4)), 2.0)
    assert r.state is re_.State.REDUCING
    assert r.on_peer_dead(C2, 3.0) == []


# ------------------------------------------------------------------------- terms at the reducer


def test_a_reducer_seeing_a_higher_term_steps_down_and_closes_no_further_round() -> None:
    # Prepare
    r = started()
    r.on_partial(partial(C1, (K1, K3)), 1.0)
    newer = plan(term=1, key=SUCCESSOR_KEY, created_ms=5_000)
    # Execute
    actions = r.on_plan(newer, 5.0)
    # Assert
    assert actions == [re_.SteppedDown(round=1, term=0, by_term=1, by=SUCCESSOR_KEY.public_key)]
    assert r.state is re_.State.SUPERSEDED and r.next_deadline() is None
    assert r.on_timer(DEADLINE_S) == []
    late = r.on_partial(partial(C2, (K2, K4)), 6.0)
    assert late[0].reason is re_.PartialRejection.STALE  # type: ignore[union-attr]
    assert r.on_peer_dead(C2, 7.0) == []
    assert r.on_plan(newer, 8.0) == []  # already stepped down for it


def test_a_reducer_steps_down_on_a_newer_result_or_session_end_and_ignores_its_own_work() -> None:
    # Prepare: round 1 being reduced when the newer reducer's result comes
    r = started()
    r.on_partial(partial(C1, (K1, K3)), 1.0)
    r.on_partial(partial(C2, (K2, K4)), 2.0)
    # Execute
    stepped = r.on_result(result(1, term=2, key=SUCCESSOR_KEY), 3.0)
    # Assert: the reduce that was under way reports into nothing
    assert kinds(stepped) == ["SteppedDown"]
    assert r.on_reduced(D1, 100, {}, 4.0) == []
    assert r.on_partials_missing([D1], 4.0) == []
    assert r.on_evaluated({}, 4.0) == []
    assert r.start(5.0, CLIENTS, loads()) == []
    other = reducer()
    assert kinds(other.on_session_ended(ended(term=1, key=SUCCESSOR_KEY), 1.0)) == ["SteppedDown"]


def test_a_reducer_rejects_stale_foreign_and_rival_messages_and_ignores_its_own() -> None:
    # Prepare: term 2
    r = reducer(term=2)
    (mine,) = r.start(0.0, CLIENTS, loads())
    assert isinstance(mine, re_.PublishPlan)
    # Execute / Assert
    assert r.on_plan(mine.plan, 1.0) == []
    assert r.on_plan(plan(term=1), 1.0) == [
        PlanRejected(term=1, round=1, amendment=0, reason=PlanRejection.STALE_TERM)
    ]
    assert r.on_plan(plan(term=2, key=SUCCESSOR_KEY), 1.0) == [
        PlanRejected(term=2, round=1, amendment=0, reason=PlanRejection.WRONG_REDUCER)
    ]
    assert r.on_result(result(1, term=1), 1.0) == [
        ResultRejected(round=1, reason=ResultRejection.STALE_TERM)
    ]
    assert r.on_session_ended(ended(term=0), 1.0) == [
        ResultRejected(round=1, reason=ResultRejection.STALE_TERM)
    ]
    assert r.on_plan(plan(term=5, session="s2", key=SUCCESSOR_KEY), 1.0)[0].reason is (  # type: ignore[union-attr]
        PlanRejection.OTHER_SESSION
    )
    assert r.state is re_.State.COLLECTING


def test_a_finished_reducer_notes_a_newer_term_without_a_transition() -> None:
    r = started(rounds=1)
    r.on_partial(partial(C1, (K1, K3)), 1.0)
    r.on_partial(partial(C2, (K2, K4)), 2.0)
    r.on_reduced(D1, 100, {}, 3.0)
    assert r.state is re_.State.COMPLETED
    assert r.on_plan(plan(term=1, key=SUCCESSOR_KEY), 4.0) == []
    assert r.on_plan(plan(term=0, key=SUCCESSOR_KEY), 4.0)[0].reason is (  # type: ignore[union-attr]
        PlanRejection.STALE_TERM
    )


def test_a_reducer_resuming_a_session_plans_from_the_last_results_model_in_its_term() -> None:
    # Prepare: the last result was round 1's, model D1, held by C1
    r = re_.ReducerMachine(
        config=config(rounds=2),
        peer=SUCCESSOR,
        public_key=SUCCESSOR_KEY.public_key,
        federation="demo",
        session="s1",
        initial_model=D1,
        initial_size=100,
        term=1,
        first_round=2,
        holders=(C1,),
    )
    # Execute
    (first,) = r.start(90.0, CLIENTS, loads())
    r.on_partial(partial(C1, (K1, K3), round=2, parent=D1), 91.0)
    r.on_partial(partial(C2, (K2, K4), round=2, parent=D1), 92.0)
    done = r.on_reduced(digest(b"g2"), 100, {}, 93.0)
    # Assert
    assert isinstance(first, re_.PublishPlan)
    assert (first.plan.term, first.plan.round, first.plan.amendment) == (1, 2, 0)
    assert (first.plan.parent, first.plan.holders) == (D1, (SUCCESSOR, C1))
    assert first.plan.reducer == SUCCESSOR_KEY.public_key
    assert kinds(done) == ["PublishResult", "SessionCompleted"]
    assert (done[0].result.term, done[0].result.round) == (1, 2)  # type: ignore[union-attr]
    assert (done[1].ended.term, done[1].ended.rounds) == (1, 2)  # type: ignore[union-attr]


# ------------------------------------------------------------------------- the combiner


def combiner(**kwargs: Any) -> co.CombinerMachine:
    return co.CombinerMachine(peer=C1, capacity=4, federation="demo", **kwargs)


def stored(c: co.CombinerMachine, client: PeerId, now: float = 1.0) -> list[Any]:
    u = update(client)
    assert c.admit(u, client, now) is None
    return c.on_update_stored(u, now)


def test_a_combiner_given_more_clients_after_its_partial_reopens_and_pushes_a_superset() -> None:
    # Prepare: C1 pushed K1 and K3; C2 died and its clients come to C1
    c = combiner()
    c.on_plan(plan(assignments={C1: (K1, K3), C2: (K2, K4)}), 0.0)
    stored(c, K1)
    (first_push,) = [a for a in stored(c, K3) if isinstance(a, co.PushPartial)]
    assert c.state is co.State.CLOSED
    amended = plan(amendment=1, assignments={C1: CLIENTS}, created_ms=5_000)
    # Execute
    reopened = c.on_plan(amended, 5.0)
    stored(c, K2, 6.0)
    actions = stored(c, K4, 7.0)
    # Assert: reopened without rebuilding; the new partial counts the first and the newcomers
    assert reopened == []
    assert c.admit(update(K1), K1, 6.5) is co.UpdateRejection.HAVE
    (push,) = [a for a in actions if isinstance(a, co.PushPartial)]
    assert set(first_push.contributions) < set(push.contributions)
    assert [x.signer for x in push.contributions] == sorted(KEY_OF[k].public_key for k in CLIENTS)
    assert c.statistics().partials_pushed == 2


def test_a_reopened_combiner_with_only_its_old_clients_at_the_cutoff_pushes_them_again() -> None:
    c = combiner()
    c.on_plan(plan(assignments={C1: (K1, K3), C2: (K2, K4)}), 0.0)
    stored(c, K1)
    stored(c, K3)
    c.on_plan(plan(amendment=1, assignments={C1: CLIENTS}, created_ms=5_000), 5.0)
    (push,) = c.on_timer(5.0 + DEADLINE_S - 6.0)
    assert isinstance(push, co.PushPartial) and len(push.contributions) == 2


def test_a_combiner_pushes_what_it_holds_to_the_reducer_of_a_higher_term() -> None:
    # Prepare: complete and pushed to the old reducer, which then died
    c = combiner()
    c.on_plan(plan(), 0.0)
    stored(c, K1)
    stored(c, K2)
    # Execute: the new reducer plans the same round from the same parent
    actions = c.on_plan(plan(term=1, key=SUCCESSOR_KEY, created_ms=9_000), 9.0)
    # Assert
    (push,) = actions
    assert isinstance(push, co.PushPartial) and push.reducer == SUCCESSOR_KEY.public_key
    assert len(push.contributions) == 2


def test_a_combiner_rejects_plans_results_and_session_ends_of_a_stale_term() -> None:
    c = combiner()
    c.on_plan(plan(term=1, key=SUCCESSOR_KEY), 0.0)
    assert c.on_plan(plan(term=0, amendment=3), 1.0)[0].reason is PlanRejection.STALE_TERM  # type: ignore[union-attr]
    assert c.on_session_ended(ended(term=0), 1.0) == [
        ResultRejected(round=1, reason=ResultRejection.STALE_TERM)
    ]
    assert c.state is co.State.COLLECTING


# ------------------------------------------------------------------------- the client

ME = CLIENT_KEYS[1]  # K2
NONCE = Nonce(bytes(16))
SPLIT = {C1: (K1, K3), C2: (K2, K4)}  # K2 starts at C2
MOVED = plan(amendment=1, assignments={C1: CLIENTS}, created_ms=10_000)


def client() -> cl.ClientMachine:
    c = cl.ClientMachine(peer=K2, public_key=ME.public_key, federation="demo")
    (fetch,) = c.on_plan(plan(assignments=SPLIT), 0.0)
    assert isinstance(fetch, cl.FetchModel) and fetch.holders == (C2, REDUCER)
    return c


def train(c: cl.ClientMachine, job: cl.Train, now: float) -> list[Any]:
    return c.on_trained(
        job, update=digest(b"K2"), size=50, num_examples=20, metrics={}, nonce=NONCE, now=now
    )


def test_an_orphan_fetching_from_its_dead_combiner_fetches_from_the_new_one_or_the_holders() -> (
    None
):
    # Prepare: fetching from C2 first; the fetch fails (C2 died)
    c = client()
    c.on_fetch_failed(D0, 1.0)
    # Execute
    assert c.on_plan(MOVED, 1.2) == []
    (retry,) = c.on_timer(1.5)
    # Assert
    assert retry == cl.FetchModel(round=1, model=D0, size=100, holders=(C1, REDUCER))


def test_an_orphan_training_pushes_to_its_new_combiner_when_done() -> None:
    c = client()
    (job,) = c.on_model_fetched(D0, 1.0)
    assert c.on_plan(MOVED, 2.0) == []
    (push,) = train(c, job, 3.0)
    assert isinstance(push, cl.PushUpdate) and push.combiner == C1


@pytest.mark.parametrize("acked", [False, True], ids=["pushing", "pushed"])
def test_an_orphan_re_pushes_its_kept_update_to_its_new_combiner_without_retraining(
    acked: bool,
) -> None:
    c = client()
    (job,) = c.on_model_fetched(D0, 1.0)
    (first,) = train(c, job, 2.0)
    if acked:
        c.on_push_acked(first.update.update, 3.0)
    actions = c.on_plan(MOVED, 10.0)
    assert actions[-1] == cl.PushUpdate(combiner=C1, update=first.update)
    assert not any(isinstance(a, (cl.Train, cl.FetchModel)) for a in actions)


def test_a_push_refused_as_not_assigned_is_retried_the_new_combiners_plan_may_be_late() -> None:
    c = client()
    (job,) = c.on_model_fetched(D0, 1.0)
    train(c, job, 2.0)
    (push,) = c.on_plan(MOVED, 10.0)
    assert c.on_push_refused(push.update.update, "not-assigned", 10.1) == []
    assert c.state is cl.State.PUSHING
    assert c.on_timer(10.6) == [push]


def test_a_new_reducers_plan_of_a_round_we_kept_an_update_for_re_pushes_it() -> None:
    # Prepare: pushed round 1, then followed round 2 (the result of round 1 never came)
    c = client()
    (job,) = c.on_model_fetched(D0, 1.0)
    (first,) = train(c, job, 2.0)
    c.on_push_acked(first.update.update, 3.0)
    c.on_plan(plan(round=2, parent=D1, assignments=SPLIT, created_ms=60_000), 60.0)
    assert c.state is cl.State.FETCHING
    # Execute: a reducer of term 1 resumes at round 1 from D0
    resumed = plan(term=1, key=SUCCESSOR_KEY, assignments=SPLIT, created_ms=70_000)
    actions = c.on_plan(resumed, 70.0)
    # Assert
    assert actions == [
        cl.Cancel(what="fetch", round=2),
        cl.PushUpdate(combiner=C2, update=first.update),
    ]
    assert c.statistics().kept == (1,)


def test_a_client_rejects_stale_term_messages_and_follows_a_newer_term() -> None:
    c = client()
    assert c.on_plan(plan(term=1, key=SUCCESSOR_KEY, assignments=SPLIT), 1.0) == []
    assert c.plan is not None and c.plan.term == 1
    assert c.on_plan(plan(term=0, amendment=5), 2.0) == [
        PlanRejected(term=0, round=1, amendment=5, reason=PlanRejection.STALE_TERM)
    ]
    assert c.on_result(result(1, term=0), 3.0) == [
        ResultRejected(round=1, reason=ResultRejection.STALE_TERM)
    ]
    assert c.on_session_ended(ended(term=0), 3.0) == [
        ResultRejected(round=1, reason=ResultRejection.STALE_TERM)
    ]
    assert c.state is cl.State.FETCHING
