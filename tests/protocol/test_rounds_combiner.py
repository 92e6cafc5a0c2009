"""The combiner's round machine, stepped by hand: every transition, the cut-off, every update
rejection, ``have`` without double counting, amended plans, and following plans."""

from __future__ import annotations

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
    ended,
    kinds,
    plan,
    update,
)

from fednode.crypto import digest
from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol import combiner as mod
from fednode.protocol.combiner import (
    TRANSITIONS,
    Accumulate,
    CombinerMachine,
    DiscardAccumulator,
    FetchModel,
    Input,
    PushPartial,
    ResetAccumulator,
    State,
    UpdateRejected,
    UpdateRejection,
)
from fednode.protocol.rounds import PlanRejected, PlanRejection, ResultRejected, ResultRejection
from fednode.wire import Contribution, ModelUpdate, PeerId

D1 = digest(b"global model 1")
#: The default cut-off: 10 % of the 60 s round before its deadline.
CUTOFF = DEADLINE_S - 6.0


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    real = mod.step

    def spy(table: Any, machine: str, state: Any, inp: Any, actions: list[Any]) -> Any:
        seen.append((state, inp))
        return real(table, machine, state, inp, actions)

    monkeypatch.setattr(mod, "step", spy)
    return seen


def combiner(capacity: int = 4, **kwargs: Any) -> CombinerMachine:
    return CombinerMachine(peer=C1, capacity=capacity, federation=FED, **kwargs)


def collecting(**kwargs: Any) -> CombinerMachine:
    c = combiner(**kwargs)
    c.on_plan(plan(), 0.0)
    assert c.state is State.COLLECTING
    return c


def store(c: CombinerMachine, u: ModelUpdate, now: float = 1.0) -> list[Any]:
    assert c.admit(u, KEY_OF_PEER[u.signer], now) is None
    return c.on_update_stored(u, now)


KEY_OF_PEER = {k.public_key: p for p, k in KEY_OF.items()}


def closed_by_cutoff() -> CombinerMachine:
    c = collecting()
    store(c, update(K1))
    c.on_timer(CUTOFF)
    assert c.state is State.CLOSED
    return c


def closed_complete() -> CombinerMachine:
    c = collecting()
    store(c, update(K1))
    store(c, update(K2))
    assert c.state is State.CLOSED
    return c


Scenario = Callable[[], tuple[CombinerMachine, Callable[[], list[Any]]]]


def _scenarios() -> dict[tuple[State, Input], Scenario]:
    S, I_ = State, Input
    round2 = plan(round=2, parent=D1, created_ms=70_000)
    unassigned = plan(round=2, parent=D1, assignments={C2: (K1, K2)})
    retry = plan(amendment=1, created_ms=60_000)

    def from_(build: Callable[[], CombinerMachine], act: Callable[[CombinerMachine], Any]) -> Any:
        def scenario() -> Any:
            c = build()
            return c, lambda: act(c)

        return scenario

    def idle_known() -> CombinerMachine:
        c = combiner()
        c.on_plan(plan(assignments={C2: (K1,)}), 0.0)
        assert c.state is State.IDLE
        return c

    return {
        (S.IDLE, I_.PLAN): from_(combiner, lambda c: c.on_plan(plan(), 0.0)),
        (S.IDLE, I_.PLAN_UNASSIGNED): from_(combiner, lambda c: c.on_plan(unassigned, 0.0)),
        (S.IDLE, I_.SESSION_ENDED): from_(idle_known, lambda c: c.on_session_ended(ended(), 9)),
        (S.COLLECTING, I_.UPDATE): from_(collecting, lambda c: store(c, update(K1))),
        (S.COLLECTING, I_.LAST_UPDATE): from_(
            lambda: _with(collecting(), K1), lambda c: store(c, update(K2))
        ),
        (S.COLLECTING, I_.CUTOFF): from_(
            lambda: _with(collecting(), K1), lambda c: c.on_timer(CUTOFF)
        ),
        (S.COLLECTING, I_.CUTOFF_EMPTY): from_(collecting, lambda c: c.on_timer(CUTOFF)),
        (S.COLLECTING, I_.PLAN): from_(collecting, lambda c: c.on_plan(round2, 61.0)),
        (S.COLLECTING, I_.PLAN_UNASSIGNED): from_(
            collecting, lambda c: c.on_plan(unassigned, 61.0)
        ),
        (S.COLLECTING, I_.AMENDED): from_(collecting, lambda c: c.on_plan(retry, 60.0)),
        (S.COLLECTING, I_.AMENDED_COMPLETE): from_(
            lambda: _with(collecting(), K1),
            lambda c: c.on_plan(plan(amendment=1, assignments={C1: (K1,), C2: (K2,)}), 9.0),
        ),
        (S.COLLECTING, I_.SESSION_ENDED): from_(
            collecting, lambda c: c.on_session_ended(ended(), 9.0)
        ),
        (S.CLOSED, I_.PLAN): from_(closed_complete, lambda c: c.on_plan(round2, 61.0)),
        (S.CLOSED, I_.PLAN_UNASSIGNED): from_(
            closed_complete, lambda c: c.on_plan(unassigned, 61.0)
        ),
        (S.CLOSED, I_.AMENDED): from_(closed_by_cutoff, lambda c: c.on_plan(retry, 60.0)),
        (S.CLOSED, I_.AMENDED_COMPLETE): from_(closed_complete, lambda c: c.on_plan(retry, 60.0)),
        (S.CLOSED, I_.SESSION_ENDED): from_(
            closed_complete, lambda c: c.on_session_ended(ended(), 61.0)
        ),
    }


def _with(c: CombinerMachine, *clients: PeerId) -> CombinerMachine:
    for client in clients:
        store(c, update(client))
    return c


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
    # Assert
    assert taken == [row]
    assert machine.state is TRANSITIONS[row][0]
    assert not any(isinstance(a, (PlanRejected, ResultRejected, UpdateRejected)) for a in actions)


# ------------------------------------------------------------------------- collecting, pushing


def test_plan_assigning_us_fetches_the_parent_and_starts_a_running_sum() -> None:
    # Prepare
    c = combiner()
    # Execute
    actions = c.on_plan(plan(), 0.0)
    # Assert
    assert actions == [
        FetchModel(model=D0, size=100, holders=(REDUCER,)),
        ResetAccumulator(round=1, parent=D0),
    ]
    assert c.next_deadline() == CUTOFF


def test_partial_goes_out_once_every_assigned_update_is_in() -> None:
    # Prepare
    c = collecting()
    u1 = update(K1, num_examples=10, metrics={"loss": 1.0, "acc": 0.5})
    u2 = update(K2, num_examples=30, metrics={"loss": 2.0})
    # Execute
    first = store(c, u1)
    second = store(c, u2)
    # Assert
    assert first == [Accumulate(update=u1)]
    assert second[0] == Accumulate(update=u2)
    push = second[1]
    assert isinstance(push, PushPartial)
    assert (push.federation, push.session, push.round, push.parent) == (FED, SESSION, 1, D0)
    assert push.reducer == REDUCER_KEY.public_key
    expected = sorted(
        [
            Contribution(signer=u1.signer, update=u1.update, weight=10),
            Contribution(signer=u2.signer, update=u2.update, weight=30),
        ],
        key=lambda x: x.signer,
    )
    assert push.contributions == tuple(expected)
    assert push.total_weight == 40
    assert push.metrics == {"acc": 0.5, "loss": 1.75}  # each weighted over its reporters
    assert c.next_deadline() is None
    assert c.statistics().partials_pushed == 1


def test_partial_goes_out_at_the_cutoff_with_what_arrived() -> None:
    # Prepare
    c = collecting()
    u1 = update(K1)
    store(c, u1)
    # Execute
    early = c.on_timer(CUTOFF - 0.001)
    due = c.on_timer(CUTOFF)
    later = c.on_timer(CUTOFF + 1)
    # Assert
    assert early == [] and later == []
    (push,) = due
    assert isinstance(push, PushPartial)
    assert [x.signer for x in push.contributions] == [u1.signer]


def test_push_margin_is_a_tenth_of_the_round_at_most_ten_seconds() -> None:
    # Prepare
    long_round = plan(cfg=config(round_deadline_ms=600_000))
    # Execute
    c = combiner()
    c.on_plan(long_round, 0.0)
    tuned = combiner(margin_fraction=0.25, max_margin=100.0)
    tuned.on_plan(plan(), 0.0)
    # Assert
    assert c.next_deadline() == 590.0
    assert tuned.next_deadline() == 45.0


def test_wall_offset_maps_the_plans_deadline_onto_the_drivers_clock() -> None:
    # Prepare: the driver's clock reads 0 at wall time 1_700_000_000_000 ms
    c = combiner(wall_offset_ms=1_700_000_000_000)
    # Execute
    c.on_plan(plan(created_ms=1_700_000_000_000), 0.0)
    # Assert
    assert c.next_deadline() == CUTOFF


# ------------------------------------------------------------------------- admission


def test_admit_and_store_check_the_same_rules() -> None:
    c = collecting()
    assert c.admit(update(K1), K1, 1.0) is None
    with pytest.raises(LocalProtocolError):
        c.admit(update(K1), K2, 1.0)  # the driver passed another peer than the signer


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: update(K1, session="s2"), UpdateRejection.WRONG_SESSION),
        (lambda: update(K1, federation="other"), UpdateRejection.WRONG_SESSION),
        (lambda: update(K1, round=2), UpdateRejection.EARLY),
        (lambda: update(K1, round=0), UpdateRejection.STALE),
        (lambda: update(K1, parent=digest(b"not the parent")), UpdateRejection.WRONG_PARENT),
        (lambda: update(K3), UpdateRejection.NOT_ASSIGNED),  # assigned to C2
        (lambda: update(K4), UpdateRejection.NOT_ASSIGNED),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_update_rejection(make: Callable[[], ModelUpdate], reason: UpdateRejection) -> None:
    # Prepare
    c = collecting()
    u = make()
    signer = KEY_OF_PEER[u.signer]
    # Execute
    verdict = c.admit(u, signer, 1.0)
    stored = c.on_update_stored(u, 1.0)
    # Assert: refused before the bytes, and again if the driver stored it anyway
    assert verdict is reason
    assert stored == [UpdateRejected(signer=u.signer, round=u.round, reason=reason)]
    assert c.statistics().counted == 0
    assert c.statistics().rejected[reason] == 2


def test_update_signed_by_a_client_outside_the_plan_is_not_assigned() -> None:
    c = collecting()
    u = update(K1, signer=OUTSIDER_KEY.public_key)
    assert c.admit(u, OUTSIDER_KEY.peer_id, 1.0) is UpdateRejection.NOT_ASSIGNED


def test_an_update_before_any_plan_is_early() -> None:
    c = combiner()
    assert c.admit(update(K1), K1, 1.0) is UpdateRejection.EARLY
    assert c.admit(update(K1, federation="other"), K1, 1.0) is UpdateRejection.WRONG_SESSION


def test_the_identical_update_again_is_have_and_counts_once() -> None:
    # Prepare
    c = collecting()
    u1 = update(K1)
    store(c, u1)
    # Execute
    verdict = c.admit(u1, K1, 2.0)
    stored_again = c.on_update_stored(u1, 2.0)
    # Assert
    assert verdict is UpdateRejection.HAVE
    assert stored_again == []
    assert c.statistics().counted == 1


def test_a_different_update_from_the_same_client_is_a_duplicate() -> None:
    # Prepare
    c = collecting()
    store(c, update(K1))
    other = update(K1, blob=b"retrained")
    # Execute / Assert
    assert c.admit(other, K1, 2.0) is UpdateRejection.DUPLICATE
    assert c.on_update_stored(other, 2.0) == [
        UpdateRejected(signer=other.signer, round=1, reason=UpdateRejection.DUPLICATE)
    ]


def test_updates_after_the_partial_went_out_are_stale() -> None:
    # Prepare: closed at the cut-off with K1 only
    c = closed_by_cutoff()
    # Execute / Assert: K2 is late; K1's re-push is still "have"
    assert c.admit(update(K2), K2, CUTOFF + 1) is UpdateRejection.STALE
    assert c.admit(update(K1), K1, CUTOFF + 1) is UpdateRejection.HAVE


def test_an_update_stored_while_the_round_closed_is_rejected_at_store_time() -> None:
    # Prepare: K2 admitted, then the cut-off passes while its bytes flow
    c = collecting()
    store(c, update(K1))
    assert c.admit(update(K2), K2, CUTOFF - 1) is None
    c.on_timer(CUTOFF)
    # Execute
    actions = c.on_update_stored(update(K2), CUTOFF + 1)
    # Assert
    assert kinds(actions) == ["UpdateRejected"]
    assert actions[0].reason is UpdateRejection.STALE


def test_over_capacity_is_refused() -> None:
    # Prepare
    c = combiner(capacity=1)
    c.on_plan(plan(assignments={C1: (K1, K2, K3)}), 0.0)
    store(c, update(K1))
    # Execute / Assert
    assert c.admit(update(K2), K2, 1.0) is UpdateRejection.OVER_CAPACITY


def test_after_the_session_ended_updates_are_stale() -> None:
    c = collecting()
    c.on_session_ended(ended(), 5.0)
    assert c.admit(update(K1), K1, 6.0) is UpdateRejection.STALE


# ------------------------------------------------------------------------- amended plans


def test_a_retry_keeps_the_updates_in_and_pushes_again_for_the_new_attempt() -> None:
    # Prepare: closed at the cut-off with K1; the reducer retries the round
    c = closed_by_cutoff()
    u1, u2 = update(K1), update(K2)
    # Execute
    reopened = c.on_plan(plan(amendment=1, created_ms=60_000), 60.0)
    have = c.admit(u1, K1, 61.0)
    completed = store(c, u2, 62.0)
    # Assert: nothing to rebuild; K1 counted once; the new partial counts both
    assert reopened == []
    assert have is UpdateRejection.HAVE
    assert kinds(completed) == ["Accumulate", "PushPartial"]
    assert {x.signer for x in completed[1].contributions} == {u1.signer, u2.signer}
    assert c.statistics().partials_pushed == 2


def test_a_retry_with_every_client_already_in_pushes_at_once() -> None:
    c = closed_complete()
    actions = c.on_plan(plan(amendment=1, created_ms=60_000), 60.0)
    assert kinds(actions) == ["PushPartial"]
    assert actions[0].total_weight == 20


def test_a_client_moved_away_is_dropped_and_the_sum_rebuilt_from_the_rest() -> None:
    # Prepare: K1 and K2 in; the amendment moves K1 to C2 and gives us K3
    c = collecting(capacity=4)
    c.on_plan(plan(assignments={C1: (K1, K2, K4)}), 0.0)
    store(c, update(K1))
    u2 = update(K2)
    store(c, u2)
    moved = plan(amendment=1, assignments={C1: (K2, K3), C2: (K1, K4)})
    # Execute
    actions = c.on_plan(moved, 10.0)
    # Assert
    assert actions == [ResetAccumulator(round=1, parent=D0), Accumulate(update=u2)]
    assert c.admit(update(K1), K1, 11.0) is UpdateRejection.NOT_ASSIGNED
    assert c.statistics().counted == 1


def test_a_plan_dropping_us_discards_the_running_sum() -> None:
    c = collecting()
    store(c, update(K1))
    actions = c.on_plan(plan(amendment=1, assignments={C2: (K1, K2)}), 10.0)
    assert actions == [DiscardAccumulator(round=1)]
    assert c.next_deadline() is None


def test_a_plan_of_a_new_round_starts_afresh() -> None:
    # Prepare
    c = closed_complete()
    # Execute
    actions = c.on_plan(plan(round=2, parent=D1, created_ms=70_000), 70.0)
    # Assert
    assert actions == [
        FetchModel(model=D1, size=100, holders=(REDUCER,)),
        ResetAccumulator(round=2, parent=D1),
    ]
    assert c.admit(update(K1, round=1), K1, 71.0) is UpdateRejection.STALE
    assert c.admit(update(K1, round=2, parent=D1), K1, 71.0) is None


# ------------------------------------------------------------------------- following plans


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        (lambda: plan(), PlanRejection.DUPLICATE),
        (lambda: plan(session="s2"), PlanRejection.OTHER_SESSION),
        (lambda: plan(federation="other"), PlanRejection.OTHER_SESSION),
    ],
    ids=["duplicate", "other-session", "other-federation"],
)
def test_plans_not_followed(second: Callable[[], Any], reason: PlanRejection) -> None:
    # Prepare
    c = collecting()
    # Execute
    actions = c.on_plan(second(), 1.0)
    # Assert
    assert actions == [PlanRejected(term=0, round=1, amendment=0, reason=reason)]
    assert c.state is State.COLLECTING


def test_an_older_plan_is_stale_and_an_older_term_is_ignored() -> None:
    # Prepare: following term 1, round 2
    c = combiner()
    c.on_plan(plan(term=1, round=2, parent=D1), 0.0)
    # Execute / Assert
    assert c.on_plan(plan(term=1, round=1), 1.0)[0].reason is PlanRejection.STALE
    assert c.on_plan(plan(term=0, round=3), 1.0)[0].reason is PlanRejection.STALE_TERM


def test_another_reducer_in_the_same_term_is_ignored_and_a_newer_term_is_followed() -> None:
    # Prepare
    c = collecting()
    # Execute
    rival = c.on_plan(plan(amendment=1, key=OUTSIDER_KEY), 1.0)
    newer = c.on_plan(plan(term=1, key=OUTSIDER_KEY, amendment=0), 2.0)
    # Assert: a new term from the same round and parent amends what we hold
    assert rival[0].reason is PlanRejection.WRONG_REDUCER  # type: ignore[union-attr]
    assert newer == []
    assert c.plan is not None and c.plan.term == 1


def test_a_session_end_from_an_unknown_term_or_reducer_is_ignored() -> None:
    c = collecting()
    assert c.on_session_ended(ended(term=5), 1.0) == [
        ResultRejected(round=1, reason=ResultRejection.UNKNOWN_TERM)
    ]
    assert c.on_session_ended(ended(key=OUTSIDER_KEY), 1.0) == [
        ResultRejected(round=1, reason=ResultRejection.WRONG_REDUCER)
    ]
    assert c.state is State.COLLECTING
    c.on_session_ended(ended(), 2.0)
    assert c.on_session_ended(ended(), 3.0) == []
    assert c.on_plan(plan(round=2, parent=D1), 4.0)[0].reason is PlanRejection.ENDED  # type: ignore[union-attr]


def test_a_fixed_session_ignores_plans_of_another() -> None:
    c = combiner(session="s9")
    assert c.on_plan(plan(), 0.0)[0].reason is PlanRejection.OTHER_SESSION  # type: ignore[union-attr]


def test_bad_construction_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        combiner(capacity=-1)
    with pytest.raises(ConfigError):
        combiner(margin_fraction=1.0)
    with pytest.raises(ConfigError):
        CombinerMachine(peer=C1, capacity=1, federation="bad id!")
