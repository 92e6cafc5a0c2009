"""The reducer's round machine, stepped by hand: every transition, every partial rejection,
retries and failure, evaluation, and least-loaded assignment."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from rounds_kit import (
    C1,
    C2,
    D0,
    DEADLINE_S,
    FED,
    K1,
    K2,
    K3,
    K4,
    KEY_OF,
    OUTSIDER_KEY,
    REDUCER,
    REDUCER_KEY,
    SESSION,
    config,
    kinds,
    loads,
    partial,
    plan,
    reducer,
    replace,
)

from fednode.crypto import NodeKey, contributions_digest, digest
from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol import reducer as mod
from fednode.protocol.election import Candidate
from fednode.protocol.reducer import (
    TRANSITIONS,
    CombinerLost,
    Evaluate,
    FetchPartial,
    Input,
    PartialRejected,
    PartialRejection,
    PublishPlan,
    PublishResult,
    Reduce,
    ReducerMachine,
    SessionCompleted,
    SessionFailed,
    State,
)
from fednode.protocol.rounds import CombinerLoad, assign_clients
from fednode.wire import Assignment, PeerId

CLIENTS = (K1, K2, K3, K4)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every (state, input) the reducer steps through, in order."""
    seen: list[tuple[str, str]] = []
    real = mod.step

    def spy(table: Any, machine: str, state: Any, inp: Any, actions: list[Any]) -> Any:
        seen.append((state, inp))
        return real(table, machine, state, inp, actions)

    monkeypatch.setattr(mod, "step", spy)
    return seen


def started(**cfg: Any) -> ReducerMachine:
    r = reducer(config(**cfg))
    r.start(0.0, CLIENTS, loads())
    return r


def part(r: ReducerMachine, combiner: PeerId, n: int | None = None, **changes: Any) -> Any:
    """``combiner``'s partial counting its first ``n`` assigned clients (all by default)."""
    assert r.plan is not None
    clients = r.plan.clients_of(combiner)
    return partial(combiner, clients[:n] if n is not None else clients, **changes)


def reducing(**cfg: Any) -> ReducerMachine:
    r = started(**cfg)
    r.on_partial(part(r, C1), 1.0)
    r.on_partial(part(r, C2), 2.0)
    assert r.state is State.REDUCING
    return r


def evaluating(**cfg: Any) -> ReducerMachine:
    r = reducing(eval_every=1, **cfg)
    r.on_reduced(digest(b"g1"), 100, {"loss": 0.5}, 3.0)
    assert r.state is State.EVALUATING
    return r


def missing(r: ReducerMachine) -> list[Any]:
    assert r.plan is not None
    return r.on_partials_missing([part(r, C2).partial], 4.0)


Scenario = Callable[[], tuple[ReducerMachine, Callable[[], list[Any]]]]


def _scenarios() -> dict[tuple[State, Input], Scenario]:
    S, I_ = State, Input
    g1 = digest(b"g1")

    def idle_start() -> Any:
        r = reducer()
        return r, lambda: r.start(0.0, CLIENTS, loads())

    def partial_in() -> Any:
        r = started()
        return r, lambda: r.on_partial(part(r, C1), 1.0)

    def last_partial() -> Any:
        r = started()
        r.on_partial(part(r, C1), 1.0)
        return r, lambda: r.on_partial(part(r, C2), 2.0)

    def deadline(n: int, **cfg: Any) -> Scenario:
        def build() -> Any:
            r = started(**cfg)
            if n:
                r.on_partial(part(r, C1, n), 1.0)
            return r, lambda: r.on_timer(DEADLINE_S)

        return build

    def combiner_dead(capacity: int) -> Scenario:
        def build() -> Any:
            r = reducer()
            r.start(0.0, CLIENTS, loads(capacity))
            return r, lambda: r.on_peer_dead(C1, 5.0)

        return build

    def combiner_dead_last() -> Any:
        # C2's partial is in; C1's clients died, then C1: nobody left to wait for
        r = started()
        r.on_partial(part(r, C2), 1.0)
        assert r.plan is not None
        for client in r.plan.clients_of(C1):
            r.on_peer_dead(client, 2.0)
        return r, lambda: r.on_peer_dead(C1, 5.0)

    def orphans_moved() -> Any:
        r = started()
        r.on_peer_dead(C1, 5.0)  # C2 is full: C1's clients wait
        newcomer = CombinerLoad(peer=OUTSIDER_KEY.peer_id, capacity=2)
        return r, lambda: r.on_peers(CLIENTS, [*loads(2, C2), newcomer], 6.0)

    def superseded(build: Callable[[], ReducerMachine]) -> Scenario:
        def scenario() -> Any:
            r = build()
            return r, lambda: r.on_plan(plan(term=1, key=OUTSIDER_KEY), 5.0)

        return scenario

    def reduced(**cfg: Any) -> Scenario:
        def build() -> Any:
            r = reducing(**cfg)
            return r, lambda: r.on_reduced(g1, 100, {"loss": 0.5}, 3.0)

        return build

    def missing_(**cfg: Any) -> Scenario:
        def build() -> Any:
            r = reducing(**cfg)
            return r, lambda: missing(r)

        return build

    def evaluated(**cfg: Any) -> Scenario:
        def build() -> Any:
            r = evaluating(**cfg)
            return r, lambda: r.on_evaluated({"eval_accuracy": 0.9}, 4.0)

        return build

    return {
        (S.IDLE, I_.START): idle_start,
        (S.COLLECTING, I_.PARTIAL): partial_in,
        (S.COLLECTING, I_.LAST_PARTIAL): last_partial,
        (S.COLLECTING, I_.DEADLINE): deadline(2),
        (S.COLLECTING, I_.DEADLINE_SHORT): deadline(1),
        (S.COLLECTING, I_.DEADLINE_FAILED): deadline(1, max_retries=0),
        (S.COLLECTING, I_.COMBINER_DEAD): combiner_dead(4),
        (S.COLLECTING, I_.COMBINER_DEAD_STUCK): combiner_dead(2),
        (S.COLLECTING, I_.COMBINER_DEAD_LAST): combiner_dead_last,
        (S.COLLECTING, I_.ORPHANS_MOVED): orphans_moved,
        (S.REDUCING, I_.REDUCED): reduced(),
        (S.REDUCING, I_.REDUCED_EVAL): reduced(eval_every=1),
        (S.REDUCING, I_.REDUCED_FINAL): reduced(rounds=1),
        (S.REDUCING, I_.MISSING): missing_(),
        (S.REDUCING, I_.MISSING_SHORT): missing_(min_clients=3),
        (S.REDUCING, I_.MISSING_FAILED): missing_(min_clients=3, max_retries=0),
        (S.EVALUATING, I_.EVALUATED): evaluated(),
        (S.EVALUATING, I_.EVALUATED_FINAL): evaluated(rounds=1),
        (S.IDLE, I_.SUPERSEDED): superseded(reducer),
        (S.COLLECTING, I_.SUPERSEDED): superseded(started),
        (S.REDUCING, I_.SUPERSEDED): superseded(reducing),
        (S.EVALUATING, I_.SUPERSEDED): superseded(evaluating),
    }


SCENARIOS = _scenarios()


# ------------------------------------------------------------------------- every transition


def test_every_transition_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(TRANSITIONS)


@pytest.mark.parametrize("row", list(TRANSITIONS), ids=lambda row: f"{row[0]}-{row[1]}")
def test_transition(row: tuple[State, Input], taken: list[tuple[str, str]]) -> None:
    # Prepare
    machine, apply = SCENARIOS[row]()
    assert machine.state is row[0]
    taken.clear()
    # Execute
    actions = apply()
    # Assert: exactly this row fired, to its next state (step() checked the actions against it)
    assert taken == [row]
    assert machine.state is TRANSITIONS[row][0]
    assert not any(isinstance(a, PartialRejected) for a in actions)


# ------------------------------------------------------------------------- planning


def test_start_publishes_a_plan_elected_by_load() -> None:
    # Prepare
    r = reducer(config(), holders=(K4,))
    # Execute
    (action,) = r.start(
        10.0, CLIENTS, [CombinerLoad(peer=C1, capacity=3, attached=2), *loads(2, C2)]
    )
    # Assert: C2 has 2 spare, C1 1 (fednode.protocol.election fills each to its room); the
    # clients in peer-ID order take the places, K4 (the highest peer ID) is left out
    assert isinstance(action, PublishPlan)
    plan = action.plan
    assert sorted(CLIENTS) == [K1, K2, K3, K4]
    assert plan.assignments == (
        Assignment(combiner=C1, clients=(K1,)),
        Assignment(combiner=C2, clients=(K2, K3)),
    )
    assert (plan.federation, plan.session, plan.term, plan.round, plan.amendment) == (
        FED,
        SESSION,
        0,
        1,
        0,
    )
    assert (plan.parent, plan.parent_size, plan.holders) == (D0, 100, (REDUCER, K4))
    assert (plan.created_ms, plan.deadline_ms) == (10_000, 70_000)
    assert plan.reducer == REDUCER_KEY.public_key
    assert r.next_deadline() == 70.0


def test_a_plan_names_each_holder_once_and_at_most_64() -> None:
    # Prepare
    many = [NodeKey(i.to_bytes(2, "big") * 16).peer_id for i in range(100)]
    # Execute
    (few,) = reducer(holders=[K1, K1, REDUCER, K2]).start(0.0, CLIENTS, loads())
    (lots,) = reducer(holders=many).start(0.0, CLIENTS, loads())
    # Assert
    assert few.plan.holders == (REDUCER, K1, K2)  # type: ignore[union-attr]
    assert lots.plan.holders == (REDUCER, *many[:63])  # type: ignore[union-attr]


def test_assignment_is_deterministic_whatever_the_input_order() -> None:
    # Prepare
    combiners = [
        CombinerLoad(peer=p, capacity=c, attached=a)
        for p, c, a in [(C1, 3, 0), (C2, 5, 2), (K4, 2, 0)]
    ]
    clients = [K1, K2, K3, REDUCER]
    rng = random.Random(4)
    # Execute
    outcomes = set()
    for _ in range(20):
        rng.shuffle(combiners)
        rng.shuffle(clients)
        outcomes.add(assign_clients(clients, combiners))
    # Assert
    assert len(outcomes) == 1


def test_assignment_takes_the_most_spare_combiner_and_breaks_ties_by_peer_id() -> None:
    # Prepare: C1 and C2 tie at 2 spare; the first client goes to the smaller peer ID
    combiners = [CombinerLoad(peer=C2, capacity=2), CombinerLoad(peer=C1, capacity=2)]
    # Execute
    assignments = assign_clients([K1, K2, K3, K4], combiners)
    # Assert: K1 -> C1 (tie), K2 -> C2 (2 > 1), K3 -> C1 (tie), K4 -> C2
    assert assignments == (
        Assignment(combiner=C1, clients=(K1, K3)),
        Assignment(combiner=C2, clients=(K2, K4)),
    )


def test_no_combiners_or_no_capacity_assigns_no_one() -> None:
    assert assign_clients([K1, K2], []) == ()
    assert assign_clients([K1, K2], [CombinerLoad(peer=C1, capacity=2, attached=5)]) == ()


def test_start_twice_is_a_local_error() -> None:
    r = started()
    with pytest.raises(LocalProtocolError):
        r.start(1.0, CLIENTS, loads())


def test_bad_construction_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        reducer(first_round=4)  # beyond config().rounds
    with pytest.raises(ConfigError):
        reducer(term=-1)
    with pytest.raises(ConfigError, match="key"):
        ReducerMachine(
            config=config(),
            peer=C1,
            public_key=REDUCER_KEY.public_key,
            federation=FED,
            session=SESSION,
            initial_model=D0,
            initial_size=1,
        )
    with pytest.raises(ConfigError):
        ReducerMachine(
            config=config(),
            peer=REDUCER,
            public_key=REDUCER_KEY.public_key,
            federation="no spaces",
            session=SESSION,
            initial_model=D0,
            initial_size=1,
        )


# ------------------------------------------------------------------------- partials


def test_partial_is_fetched_from_its_combiner_and_round_closes_when_all_are_in() -> None:
    # Prepare
    r = started()
    p1, p2 = part(r, C1), part(r, C2)
    # Execute
    first = r.on_partial(p1, 1.0)
    second = r.on_partial(p2, 2.0)
    # Assert
    assert first == [FetchPartial(partial=p1.partial, size=p1.size, peer=C1)]
    assert second[0] == FetchPartial(partial=p2.partial, size=p2.size, peer=C2)
    assert second[1] == Reduce(round=1, parent=D0, partials=(p1, p2))
    assert second[1].weights == (20, 20)
    assert r.next_deadline() is None


def test_every_combiner_in_but_short_of_min_clients_waits_for_the_deadline() -> None:
    # Prepare
    r = started(min_clients=4)
    r.on_partial(part(r, C1), 1.0)
    # Execute
    actions = r.on_partial(part(r, C2, 1), 2.0)
    # Assert: 3 clients < 4: no early close (more may still be planned in a retry)
    assert kinds(actions) == ["FetchPartial"]
    assert r.state is State.COLLECTING


def rejection(r: ReducerMachine, p: Any) -> PartialRejection:
    (action,) = r.on_partial(p, 1.0)
    assert isinstance(action, PartialRejected)
    assert (action.round, action.combiner, action.partial) == (p.round, p.combiner, p.partial)
    return action.reason


def test_partial_from_another_session_is_rejected() -> None:
    r = started()
    assert rejection(r, part(r, C1, session="s2")) is PartialRejection.WRONG_SESSION
    assert rejection(r, part(r, C1, federation="other")) is PartialRejection.WRONG_SESSION


def test_partial_for_a_future_round_or_before_any_plan_is_rejected() -> None:
    r = started()
    assert rejection(r, part(r, C1, round=2)) is PartialRejection.WRONG_ROUND
    assert rejection(reducer(), partial(C1)) is PartialRejection.WRONG_ROUND


def test_partial_for_a_closed_or_earlier_round_is_stale() -> None:
    # Prepare: round 1 closed (reducing), then round 2 planned
    r = reducing()
    late = partial(C1, [K1])
    assert rejection(r, late) is PartialRejection.STALE
    r.on_reduced(digest(b"g1"), 100, {}, 3.0)
    # Execute / Assert
    assert rejection(r, late) is PartialRejection.STALE


def test_partial_with_a_wrong_parent_is_rejected() -> None:
    r = started()
    assert rejection(r, part(r, C1, parent=digest(b"other"))) is PartialRejection.WRONG_PARENT


def test_partial_from_an_unassigned_combiner_is_rejected() -> None:
    # Prepare: a combiner the plan gives no clients (signed by someone else entirely)
    r = started()
    stranger = replace(partial(C1, [K1]), combiner=OUTSIDER_KEY.public_key)
    # Execute / Assert
    assert rejection(r, stranger) is PartialRejection.NOT_ASSIGNED
    assert r.statistics().rejected[PartialRejection.NOT_ASSIGNED] == 1


def test_partial_counting_a_client_of_another_combiner_is_rejected() -> None:
    # Prepare
    r = started()
    assert r.plan is not None
    other = r.plan.clients_of(C2)[0]
    # Execute / Assert
    bad = partial(C1, [*r.plan.clients_of(C1), other])
    assert rejection(r, bad) is PartialRejection.FOREIGN_CLIENT


def test_a_client_counted_by_one_combiner_is_not_counted_again_by_another() -> None:
    # Prepare: C2's partial counts its clients; then C1's partial claims one of them
    r = started()
    assert r.plan is not None
    r.on_partial(part(r, C2), 1.0)
    stolen = r.plan.clients_of(C2)[0]
    # Execute
    reason = rejection(r, partial(C1, [*r.plan.clients_of(C1), stolen]))
    # Assert
    assert reason is PartialRejection.DOUBLE_COUNT
    assert r.statistics().covered == 2


def test_a_second_partial_from_a_combiner_is_a_duplicate_unless_it_adds_to_the_first() -> None:
    # Prepare
    r = started(min_clients=3)
    one, both = part(r, C1, 1), part(r, C1)
    r.on_partial(both, 1.0)
    # Execute / Assert: the same again, or a smaller one, is a duplicate
    assert rejection(r, both) is PartialRejection.DUPLICATE
    assert rejection(r, one) is PartialRejection.DUPLICATE


def test_a_later_partial_that_adds_to_the_first_replaces_it() -> None:
    # Prepare: a combiner's partial of one client, then its superset (a re-push after a retry)
    r = started(min_clients=3)
    one, both = part(r, C1, 1), part(r, C1)
    r.on_partial(one, 1.0)
    # Execute
    actions = r.on_partial(both, 2.0)
    # Assert: counted once, the newer one reduced
    assert kinds(actions) == ["FetchPartial"]
    assert r.statistics().covered == 2
    closing = r.on_partial(part(r, C2), 3.0)
    assert isinstance(closing[-1], Reduce)
    assert closing[-1].partials[0] == both


# ------------------------------------------------------------------------- closing, retrying


def test_deadline_closes_with_what_arrived_when_min_clients_are_covered() -> None:
    # Prepare: only C1's two clients reported
    r = started()
    p1 = part(r, C1)
    r.on_partial(p1, 1.0)
    # Execute
    assert r.on_timer(DEADLINE_S - 0.001) == []
    actions = r.on_timer(DEADLINE_S)
    # Assert
    assert actions == [Reduce(round=1, parent=D0, partials=(p1,))]


def test_short_round_is_replanned_with_a_new_amendment_and_deadline() -> None:
    # Prepare: one client reported (min 2); a fifth client joined meanwhile
    r = started()
    r.on_partial(part(r, C1, 1), 1.0)
    r.on_peers([*CLIENTS, REDUCER], loads(3))
    # Execute
    (action,) = r.on_timer(DEADLINE_S)
    # Assert
    assert isinstance(action, PublishPlan)
    plan = action.plan
    assert (plan.round, plan.amendment, plan.parent) == (1, 1, D0)
    assert plan.deadline_ms == 2 * int(DEADLINE_S * 1000)
    assert sum(len(a.clients) for a in plan.assignments) == 5
    stats = r.statistics()
    assert (stats.retries, stats.partials, stats.covered) == (1, 0, 0)
    assert r.next_deadline() == 2 * DEADLINE_S


def test_partials_of_the_failed_attempt_do_not_count_in_the_retry() -> None:
    # Prepare
    r = started()
    first = part(r, C1, 1)
    r.on_partial(first, 1.0)
    r.on_timer(DEADLINE_S)
    # Execute: the retry's C1 partial counts both clients now
    actions = r.on_partial(part(r, C1), DEADLINE_S + 1)
    # Assert
    assert kinds(actions) == ["FetchPartial"]
    assert r.statistics().covered == 2


def test_session_fails_after_max_retries_with_a_clear_message() -> None:
    # Prepare: max_retries=1, nobody reports
    r = started(max_retries=1)
    r.on_timer(DEADLINE_S)
    # Execute
    (failed,) = r.on_timer(2 * DEADLINE_S)
    # Assert
    assert isinstance(failed, SessionFailed)
    assert failed.reason == (
        "round 1 fell short after 1 retries: 0 client update(s) counted by the deadline, "
        "2 needed (4 client(s) planned over 2 combiner(s); 4 eligible client(s) and "
        "2 combiner(s) known)"
    )
    assert (failed.ended.outcome, failed.ended.reason, failed.ended.rounds) == (
        "failed",
        failed.reason,
        0,
    )
    assert (failed.ended.model, failed.ended.reducer) == (D0, REDUCER_KEY.public_key)
    assert r.state is State.FAILED
    assert r.next_deadline() is None
    assert r.on_timer(10 * DEADLINE_S) == []


def test_missing_partial_blobs_are_reduced_without() -> None:
    # Prepare
    r = reducing()
    assert r.plan is not None
    p1 = part(r, C1)
    # Execute
    actions = missing(r)
    # Assert
    assert actions == [Reduce(round=1, parent=D0, partials=(p1,))]


def test_naming_no_partial_being_reduced_is_a_local_error() -> None:
    r = reducing()
    with pytest.raises(LocalProtocolError):
        r.on_partials_missing([digest(b"nothing")], 4.0)
    with pytest.raises(LocalProtocolError):
        started().on_partials_missing([digest(b"nothing")], 4.0)


# ------------------------------------------------------------------------- results


def test_result_counts_every_contribution_and_commits_to_each_partial() -> None:
    # Prepare
    r = reducing()
    assert r.plan is not None
    p1, p2 = part(r, C1), part(r, C2)
    # Execute
    published, planned = r.on_reduced(digest(b"g1"), 123, {"loss": 0.5}, 5.0)
    # Assert
    assert isinstance(published, PublishResult) and isinstance(planned, PublishPlan)
    result = published.result
    assert (result.round, result.amendment, result.parent, result.model, result.size) == (
        1,
        0,
        D0,
        digest(b"g1"),
        123,
    )
    assert [c.signer for c in result.included] == sorted(KEY_OF[c].public_key for c in CLIENTS)
    assert result.num_examples == 40
    assert result.metrics == {"loss": 0.5}
    refs = {ref.combiner: ref for ref in result.partials}
    for p in (p1, p2):
        assert refs[p.combiner].contributions == contributions_digest(p.contributions)
        assert refs[p.combiner].partial == p.partial
    assert result.global_model().partials == result.partials
    # The next round trains from the new model, held by the reducer
    assert (planned.plan.round, planned.plan.amendment) == (2, 0)
    assert (planned.plan.parent, planned.plan.parent_size) == (digest(b"g1"), 123)
    assert planned.plan.holders == (REDUCER,)


def test_evaluation_runs_every_k_rounds_and_after_the_last() -> None:
    # Prepare
    r = started(rounds=5, eval_every=2)
    evaluated_rounds = []
    # Execute
    for round_ in range(1, 6):
        assert r.plan is not None
        parent = r.plan.parent
        r.on_partial(part(r, C1, round=round_, parent=parent), round_)
        actions = r.on_partial(part(r, C2, round=round_, parent=parent), round_)
        assert isinstance(actions[-1], Reduce)
        done = r.on_reduced(digest(f"g{round_}".encode()), 100, {"loss": 1.0}, round_)
        if isinstance(done[0], Evaluate):
            evaluated_rounds.append(done[0].round)
            assert done[0].model == digest(f"g{round_}".encode())
            done = r.on_evaluated({"eval_loss": 0.5}, round_)
            assert done[0].result.metrics == {"loss": 1.0, "eval_loss": 0.5}  # type: ignore[union-attr]
    # Assert
    assert evaluated_rounds == [2, 4, 5]
    assert isinstance(done[-1], SessionCompleted)
    assert (done[-1].ended.outcome, done[-1].ended.rounds) == ("completed", 5)
    assert r.state is State.COMPLETED


def test_evaluation_metrics_may_not_shadow_training_metrics() -> None:
    r = evaluating()
    with pytest.raises(LocalProtocolError, match="clash"):
        r.on_evaluated({"loss": 0.1}, 4.0)


def test_driver_reports_out_of_turn_are_local_errors() -> None:
    r = started()
    with pytest.raises(LocalProtocolError):
        r.on_reduced(digest(b"g"), 1, {}, 1.0)
    with pytest.raises(LocalProtocolError):
        r.on_evaluated({}, 1.0)


# ------------------------------------------------------------------------- peers


def test_a_dead_combiner_without_a_partial_is_reported_once() -> None:
    # Prepare: C2 is full, so C1's clients wait for a combiner with room
    r = started()
    assert r.plan is not None
    orphans = r.plan.clients_of(C1)
    # Execute
    first = r.on_peer_dead(C1, 5.0)
    again = r.on_peer_dead(C1, 6.0)
    # Assert
    assert first == [CombinerLost(round=1, combiner=C1, clients=orphans, waiting=orphans)]
    assert again == []


def test_a_dead_peer_is_left_out_of_the_next_plan() -> None:
    # Prepare
    r = started()
    r.on_peer_dead(K1, 5.0)
    r.on_peer_dead(C2, 5.0)
    # Execute
    (replan,) = r.on_timer(DEADLINE_S)
    # Assert
    assert isinstance(replan, PublishPlan)
    assert replan.plan.assignments == (Assignment(combiner=C1, clients=(K2, K3)),)


def test_a_dead_combiner_whose_partial_is_in_is_not_lost() -> None:
    r = started()
    r.on_partial(part(r, C1), 1.0)
    assert r.on_peer_dead(C1, 5.0) == []


# ------------------------------------------------------------------------- election


def test_candidates_elect_by_load_and_an_overloaded_combiner_sheds_clients() -> None:
    # Prepare: two explicit combiners with room for every client; a retry re-plans the round
    r = reducer(config(min_clients=4, max_retries=3))
    healthy = [Candidate(peer=c, role="combiner", capacity=8) for c in (C1, C2)]
    clients = [Candidate(peer=k, role="client") for k in CLIENTS]
    (first,) = r.start(10.0, candidates=[*healthy, *clients])
    assert isinstance(first, PublishPlan)
    # Execute: C1 reports a saturated CPU; the deadline passes short and the round is re-planned
    hot = Candidate(peer=C1, role="combiner", capacity=8, cpu=0.97)
    r.on_candidates([hot, healthy[1], *clients])
    retry = [a for a in r.on_timer(10.0 + DEADLINE_S) if isinstance(a, PublishPlan)]
    steady = [a for a in r.on_timer(10.0 + 2 * DEADLINE_S) if isinstance(a, PublishPlan)]
    # Assert
    before = {a.combiner: len(a.clients) for a in first.plan.assignments}
    after = {a.combiner: len(a.clients) for a in retry[0].plan.assignments}
    assert before == {C1: 2, C2: 2}
    assert after[C1] < before[C1] and sum(after.values()) == 4
    again = {a.combiner: len(a.clients) for a in steady[0].plan.assignments}
    assert again.get(C1, 0) <= after[C1]  # while it stays hot it does not get them back


def test_a_successor_elects_its_first_tree_near_its_predecessors_last_plan() -> None:
    # Prepare: the old reducer's last plan put three clients under C1 and one under C2 (within
    # the incumbents' skew); a fresh election would split them two and two
    last = plan(round=2, term=1, assignments={C1: (K1, K2, K3), C2: (K4,)})
    candidates = [
        *(Candidate(peer=c, role="combiner", capacity=8) for c in (C1, C2)),
        *(Candidate(peer=k, role="client") for k in CLIENTS),
    ]
    fresh = reducer(config(min_clients=4), term=2, first_round=2)
    successor = reducer(config(min_clients=4), term=2, first_round=2, previous=last)
    # Execute
    (cold,) = fresh.start(10.0, candidates=candidates)
    (warm,) = successor.start(10.0, candidates=candidates)
    # Assert: the successor keeps every client where it was; without the plan they move
    assert isinstance(cold, PublishPlan) and isinstance(warm, PublishPlan)
    assert warm.plan.assignments == last.assignments
    assert cold.plan.assignments != last.assignments
