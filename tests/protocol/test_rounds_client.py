"""The client's round machine, stepped by hand: every transition, backoff and the deadline,
keeping an update until its result, re-pushing it on an amended plan without retraining, and
abandoning a round for a newer one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rounds_kit import (
    C1,
    C2,
    CLIENT_KEYS,
    D0,
    DEADLINE_S,
    FED,
    K1,
    K2,
    OUTSIDER_KEY,
    REDUCER,
    SESSION,
    config,
    ended,
    kinds,
    plan,
    replace,
    result,
)

from fednode.crypto import digest
from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol import client as mod
from fednode.protocol.client import (
    TRANSITIONS,
    Cancel,
    ClientMachine,
    FetchModel,
    ForgetUpdate,
    Input,
    PushUpdate,
    State,
    Train,
)
from fednode.protocol.rounds import PlanRejected, PlanRejection, ResultRejected, ResultRejection
from fednode.wire import ModelUpdate, Nonce

ME = CLIENT_KEYS[0]
D1 = digest(b"global model 1")
BLOB = digest(b"K1 trained")
NONCE = Nonce(bytes(range(16)))


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    real = mod.step

    def spy(table: Any, machine: str, state: Any, inp: Any, actions: list[Any]) -> Any:
        seen.append((state, inp))
        return real(table, machine, state, inp, actions)

    monkeypatch.setattr(mod, "step", spy)
    return seen


def client(**kwargs: Any) -> ClientMachine:
    return ClientMachine(peer=K1, public_key=ME.public_key, federation=FED, **kwargs)


def round2() -> Any:
    return plan(round=2, parent=D1, created_ms=70_000)


def trained(c: ClientMachine, job: Train, now: float = 2.0, blob: Any = BLOB) -> list[Any]:
    return c.on_trained(
        job,
        update=blob,
        size=50,
        num_examples=10,
        metrics={"loss": 1.0},
        nonce=NONCE,
        now=now,
    )


# Builders: a client in a given state for round 1 (or, with ``p``, for that plan's round).


def fetching(c: ClientMachine | None = None, p: Any = None) -> ClientMachine:
    c = c or client()
    c.on_plan(p or plan(), 0.0 if p is None else 70.0)
    assert c.state is State.FETCHING
    return c


def training(c: ClientMachine | None = None, p: Any = None) -> tuple[ClientMachine, Train]:
    c = fetching(c, p)
    assert c.plan is not None
    (job,) = c.on_model_fetched(c.plan.parent, 1.0 if p is None else 71.0)
    assert isinstance(job, Train) and c.state is State.TRAINING
    return c, job


def pushing(c: ClientMachine | None = None, p: Any = None) -> ClientMachine:
    c, job = training(c, p)
    trained(c, job, 2.0 if p is None else 72.0, BLOB if p is None else digest(b"K1 round 2"))
    assert c.state is State.PUSHING
    return c


def waiting(c: ClientMachine | None = None, p: Any = None) -> ClientMachine:
    c = pushing(c, p)
    assert c.plan is not None
    made = _current(c)
    c.on_push_acked(made.update, 3.0 if p is None else 73.0)
    assert c.state is State.WAITING
    return c


def idle_known() -> ClientMachine:
    c = client()
    c.on_plan(plan(assignments={C1: (K2,)}), 0.0)
    assert c.state is State.IDLE
    return c


def kept_round1(then: Callable[..., Any]) -> Callable[[], ClientMachine]:
    """A client with its round-1 update kept (no result seen), then in a round-2 state."""

    def build() -> ClientMachine:
        c = waiting()
        built = then(c, round2())
        return built[0] if isinstance(built, tuple) else built

    return build


def _current(c: ClientMachine) -> ModelUpdate:
    plan_ = c.plan
    assert plan_ is not None
    return c._kept[plan_.round]


def mine(c: ClientMachine) -> Any:
    """The result of the current round, counting our update."""
    assert c.plan is not None
    return result(c.plan.round, [_current(c)], parent=c.plan.parent)


Scenario = Callable[[], tuple[ClientMachine, Callable[[], list[Any]]]]


def _scenarios() -> dict[tuple[State, Input], Scenario]:
    S, I_ = State, Input
    amended = plan(amendment=1, assignments={C2: (K1, K2)}, created_ms=30_000)
    amended_out = plan(amendment=1, assignments={C2: (K2,)}, created_ms=30_000)
    new_out = plan(round=2, parent=D1, assignments={C2: (K2,)}, created_ms=70_000)
    r1 = result(1)

    def on(build: Callable[[], Any], act: Callable[[ClientMachine], Any]) -> Scenario:
        def scenario() -> Any:
            built = build()
            c = built[0] if isinstance(built, tuple) else built
            return c, lambda: act(c)

        return scenario

    def job_of(c: ClientMachine) -> Train:
        assert c._job is not None
        return c._job

    plan_rows: dict[Input, Callable[[ClientMachine], Any]] = {
        I_.PLAN: lambda c: c.on_plan(round2(), 70.0),
        I_.PLAN_UNASSIGNED: lambda c: c.on_plan(new_out, 70.0),
        I_.AMENDED: lambda c: c.on_plan(amended, 30.0),
        I_.AMENDED_UNASSIGNED: lambda c: c.on_plan(amended_out, 30.0),
        I_.SESSION_ENDED: lambda c: c.on_session_ended(ended(), 9.0),
    }
    builders: dict[State, Callable[[], Any]] = {
        S.FETCHING: fetching,
        S.TRAINING: training,
        S.PUSHING: pushing,
        S.WAITING: waiting,
    }
    rows: dict[tuple[State, Input], Scenario] = {
        (S.IDLE, I_.PLAN): on(client, lambda c: c.on_plan(plan(), 0.0)),
        (S.IDLE, I_.PLAN_UNASSIGNED): on(client, lambda c: c.on_plan(amended_out, 0.0)),
        (S.IDLE, I_.AMENDED): on(idle_known, lambda c: c.on_plan(amended, 30.0)),
        (S.IDLE, I_.AMENDED_UNASSIGNED): on(idle_known, lambda c: c.on_plan(amended_out, 30.0)),
        (S.IDLE, I_.OLD_RESULT): on(idle_known, lambda c: c.on_result(r1, 61.0)),
        (S.IDLE, I_.SESSION_ENDED): on(idle_known, lambda c: c.on_session_ended(ended(), 9.0)),
        (S.FETCHING, I_.FETCHED): on(fetching, lambda c: c.on_model_fetched(D0, 1.0)),
        (S.FETCHING, I_.FETCH_FAILED): on(fetching, lambda c: c.on_fetch_failed(D0, 1.0)),
        (S.FETCHING, I_.RETRY): on(lambda: _failed_fetch(fetching()), lambda c: c.on_timer(1.5)),
        (S.FETCHING, I_.DEADLINE): on(fetching, lambda c: c.on_timer(DEADLINE_S)),
        (S.TRAINING, I_.TRAINED): on(training, lambda c: trained(c, job_of(c))),
        (S.TRAINING, I_.TRAINED_LATE): on(training, lambda c: trained(c, job_of(c), DEADLINE_S)),
        (S.TRAINING, I_.TRAIN_FAILED): on(training, lambda c: c.on_train_failed(job_of(c), 2.0)),
        (S.PUSHING, I_.ACKED): on(pushing, lambda c: c.on_push_acked(BLOB, 3.0)),
        (S.PUSHING, I_.PUSH_FAILED): on(pushing, lambda c: c.on_push_failed(BLOB, 3.0)),
        (S.PUSHING, I_.REFUSED): on(pushing, lambda c: c.on_push_refused(BLOB, "duplicate", 3.0)),
        (S.PUSHING, I_.RETRY): on(lambda: _failed_push(pushing()), lambda c: c.on_timer(3.5)),
        (S.PUSHING, I_.DEADLINE): on(
            lambda: _failed_push(pushing()), lambda c: c.on_timer(DEADLINE_S)
        ),
    }
    # A new reducer (term 1) resumes at round 1, whose update we kept while round 2 ran
    resume = plan(term=1, created_ms=80_000)
    rows[S.IDLE, I_.RESUMED] = on(
        kept_round1(lambda c, _: _out_of(c, new_out)), lambda c: c.on_plan(resume, 80.0)
    )
    for state, build in builders.items():
        for inp, act in plan_rows.items():
            rows[state, inp] = on(build, act)
        rows[state, I_.RESUMED] = on(kept_round1(build), lambda c: c.on_plan(resume, 80.0))
        rows[state, I_.RESULT] = on(build, lambda c: c.on_result(mine(c) if c._kept else r1, 9))
        rows[state, I_.OLD_RESULT] = on(kept_round1(build), lambda c: c.on_result(r1, 75.0))
    return rows


def _out_of(c: ClientMachine, p: Any) -> ClientMachine:
    c.on_plan(p, 70.0)
    assert c.state is State.IDLE
    return c


def _failed_fetch(c: ClientMachine) -> ClientMachine:
    c.on_fetch_failed(D0, 1.0)
    return c


def _failed_push(c: ClientMachine) -> ClientMachine:
    c.on_push_failed(BLOB, 3.0)
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
    assert not any(isinstance(a, (PlanRejected, ResultRejected)) for a in actions)


# ------------------------------------------------------------------------- one round


def test_a_round_from_plan_to_result() -> None:
    # Prepare
    c = client()
    # Execute
    fetch = c.on_plan(plan(), 0.0)
    train = c.on_model_fetched(D0, 1.0)
    push = trained(c, train[0], 2.0)
    acked = c.on_push_acked(BLOB, 3.0)
    settled = c.on_result(mine(c), 61.0)
    # Assert
    assert fetch == [FetchModel(round=1, model=D0, size=100, holders=(C1, REDUCER))]
    assert train == [Train(round=1, parent=D0, config=config())]
    (action,) = push
    assert isinstance(action, PushUpdate) and action.combiner == C1
    made = action.update
    assert (made.federation, made.session, made.round, made.parent) == (FED, SESSION, 1, D0)
    assert (made.update, made.size, made.num_examples, made.metrics) == (
        BLOB,
        50,
        10,
        {"loss": 1.0},
    )
    assert (made.signer, made.created_ms, made.nonce) == (ME.public_key, 2000, NONCE)
    assert acked == []
    assert settled == [ForgetUpdate(update=made, included=True)]
    assert c.state is State.IDLE
    assert c.statistics().included == 1


def test_a_result_that_leaves_the_update_out_forgets_it_as_not_included() -> None:
    # Prepare
    c = waiting()
    # Execute
    actions = c.on_result(result(1), 61.0)  # counts K2's update only
    # Assert
    assert kinds(actions) == ["ForgetUpdate"]
    assert actions[0].included is False
    assert c.statistics().left_out == 1


def test_a_result_counting_another_update_of_ours_is_not_ours() -> None:
    c = waiting()
    ours = _current(c)
    other = replace(ours, update=digest(b"forged"))
    assert c.on_result(result(1, [other]), 61.0) == [ForgetUpdate(update=ours, included=False)]


# ------------------------------------------------------------------------- retries, deadline


def test_failed_pushes_back_off_exponentially_up_to_the_cap() -> None:
    # Prepare
    c = pushing(client(backoff=0.5, max_backoff=2.0))
    retries = []
    now = 3.0
    # Execute
    for _ in range(4):
        c.on_push_failed(BLOB, now)
        due = c.next_deadline()
        assert due is not None
        retries.append(due - now)
        assert c.on_timer(due - 0.01) == []
        (again,) = c.on_timer(due)
        assert isinstance(again, PushUpdate)
        now = due
    # Assert
    assert retries == [0.5, 1.0, 2.0, 2.0]
    assert c.statistics().attempts == 4


def test_an_ack_resets_the_backoff() -> None:
    c = pushing()
    c.on_push_failed(BLOB, 3.0)
    c.on_timer(3.5)
    c.on_push_acked(BLOB, 3.6)
    assert c.statistics().attempts == 0
    assert c.next_deadline() is None


def test_retries_stop_at_the_deadline_and_the_update_stays_kept() -> None:
    # Prepare: the push fails just before the deadline; the retry would fall after it
    c = pushing()
    c.on_push_failed(BLOB, DEADLINE_S - 0.25)
    # Execute
    assert c.next_deadline() == DEADLINE_S
    actions = c.on_timer(DEADLINE_S)
    # Assert
    assert actions == []
    assert c.state is State.WAITING
    assert c.statistics().kept == (1,)


def test_an_early_refusal_is_retried_like_a_failure() -> None:
    c = pushing()
    assert c.on_push_refused(BLOB, "early", 3.0) == []
    assert c.state is State.PUSHING
    assert c.next_deadline() == 3.5


def test_a_failed_fetch_is_retried_then_given_up_at_the_deadline() -> None:
    # Prepare
    c = fetching()
    c.on_fetch_failed(D0, 1.0)
    # Execute
    (retry,) = c.on_timer(1.5)
    given_up = c.on_timer(DEADLINE_S)
    # Assert: the retry is in flight when the deadline passes: it is cancelled
    assert isinstance(retry, FetchModel)
    assert given_up == [Cancel(what="fetch", round=1)]
    assert c.state is State.IDLE


def test_an_update_trained_after_the_deadline_is_kept_not_pushed() -> None:
    c, job = training()
    assert trained(c, job, DEADLINE_S + 5) == []
    assert c.state is State.WAITING
    assert c.statistics().kept == (1,)


# ------------------------------------------------------------------------- amended plans


def test_an_amended_plan_moving_us_re_pushes_the_kept_update_without_retraining() -> None:
    # Prepare: pushed and acked to C1, which then died; the reducer moves us to C2
    c = waiting()
    made = _current(c)
    moved = plan(amendment=1, assignments={C2: (K1, K2)}, created_ms=30_000)
    # Execute
    actions = c.on_plan(moved, 30.0)
    # Assert
    assert actions == [PushUpdate(combiner=C2, update=made)]
    assert c.state is State.PUSHING
    assert c.next_deadline() is None  # in flight


def test_a_retry_of_the_round_re_pushes_to_the_same_combiner() -> None:
    c = waiting()
    actions = c.on_plan(plan(amendment=1, created_ms=60_000), 60.0)
    assert actions == [PushUpdate(combiner=C1, update=_current(c))]


def test_an_amendment_while_training_only_changes_where_the_update_goes() -> None:
    # Prepare
    c, job = training()
    # Execute
    assert c.on_plan(plan(amendment=1, assignments={C2: (K1,)}, created_ms=1_000), 1.5) == []
    (push,) = trained(c, job, 2.0)
    # Assert
    assert push == PushUpdate(combiner=C2, update=_current(c))


def test_an_amendment_leaving_us_out_keeps_the_update_for_a_later_one() -> None:
    # Prepare
    c = pushing()
    # Execute
    out = c.on_plan(plan(amendment=1, assignments={C2: (K2,)}, created_ms=10_000), 10.0)
    back = c.on_plan(plan(amendment=2, created_ms=20_000), 20.0)
    # Assert
    assert out == [Cancel(what="push", round=1)]
    assert back == [PushUpdate(combiner=C1, update=_current(c))]


def test_a_plan_for_a_newer_round_abandons_training() -> None:
    # Prepare
    c, _ = training()
    # Execute
    actions = c.on_plan(round2(), 70.0)
    # Assert
    assert actions == [
        Cancel(what="train", round=1),
        FetchModel(round=2, model=D1, size=100, holders=(C1, REDUCER)),
    ]


def test_reports_about_cancelled_work_are_ignored() -> None:
    # Prepare: training round 1, then round 2 is planned
    c, job = training()
    c.on_plan(round2(), 70.0)
    # Execute / Assert
    assert trained(c, job, 71.0) == []
    assert c.on_model_fetched(D0, 71.0) == []
    assert c.on_push_acked(BLOB, 71.0) == []
    assert c.on_train_failed(job, 71.0) == []
    assert c.state is State.FETCHING


def test_an_old_update_is_kept_while_the_next_round_runs_until_its_result() -> None:
    # Prepare
    c = waiting()
    old = _current(c)
    fetching(c, round2())
    # Execute
    actions = c.on_result(result(1, [old]), 75.0)
    # Assert
    assert actions == [ForgetUpdate(update=old, included=True)]
    assert c.state is State.FETCHING


def test_session_end_forgets_everything() -> None:
    c = pushing()
    made = _current(c)
    actions = c.on_session_ended(ended(), 9.0)
    assert actions == [Cancel(what="push", round=1), ForgetUpdate(update=made, included=False)]
    assert c.state is State.DONE
    assert c.on_plan(round2(), 70.0)[0].reason is PlanRejection.ENDED  # type: ignore[union-attr]
    assert c.on_result(result(1), 70.0) == []


# ------------------------------------------------------------------------- following


def test_results_from_an_unknown_term_or_another_reducer_are_ignored() -> None:
    c = waiting()
    assert c.on_result(result(1, term=3), 9.0) == [
        ResultRejected(round=1, reason=ResultRejection.UNKNOWN_TERM)
    ]
    assert c.on_result(result(1, key=OUTSIDER_KEY), 9.0) == [
        ResultRejected(round=1, reason=ResultRejection.WRONG_REDUCER)
    ]
    assert c.on_result(result(1, session="s2"), 9.0) == [
        ResultRejected(round=1, reason=ResultRejection.OTHER_SESSION)
    ]
    assert c.state is State.WAITING


def test_a_duplicate_plan_is_ignored() -> None:
    c = fetching()
    assert c.on_plan(plan(), 0.5) == [
        PlanRejected(term=0, round=1, amendment=0, reason=PlanRejection.DUPLICATE)
    ]


def test_driver_misuse_is_a_local_error() -> None:
    c, job = training()
    with pytest.raises(LocalProtocolError):
        c.on_trained(job, update=BLOB, size=1, num_examples=0, metrics={}, nonce=NONCE, now=2.0)
    with pytest.raises(ConfigError):
        client(backoff=0.0)
    with pytest.raises(ConfigError):
        ClientMachine(peer=K1, public_key=ME.public_key, federation="no spaces")
