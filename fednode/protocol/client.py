"""Protocol layer: the client's side of a round, as a sans-IO state machine.

A :class:`ClientMachine` follows the reducer's plans. When a plan assigns it to a combiner it
fetches the parent model (from that combiner first, then the plan's holders), has the driver
train (:class:`Train`: the plan gives the round and the session settings; which share of the data
the client holds is the node's own configuration), and pushes the signed update to its combiner,
retrying with backoff until the deadline. It keeps every update it made until a round result
shows whether it was counted (:class:`ForgetUpdate`), and pushes the kept update again, without
retraining, when an amended plan of the same round assigns it (to the same combiner, which
answers ``have``, or to another: its combiner died), or when any plan (a new reducer's, of a
higher term) names a round and parent it kept an update for. A plan of a new round abandons
unfinished work (:class:`Cancel`). Its transitions are :data:`TRANSITIONS`, drawn in
``protocols/rounds.md``.

A combiner refusing an update as ``early`` or ``not-assigned`` is retried like a failed push:
either says the combiner follows an older plan than ours (the amended plan that moved us to it
has not reached it yet).

Reports about work that was cancelled meanwhile (a fetch, a training or a push finishing after a
new plan) are ignored: they return no actions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol.combiner import UpdateRejection
from fednode.protocol.rounds import (
    PlanFollower,
    PlanRejected,
    ResultRejected,
    Table,
    describe_diagram,
    describe_table,
    emits,
    local_time,
    many,
    maybe,
    step,
    wall_ms,
)
from fednode.wire import (
    Digest,
    FederationId,
    ModelUpdate,
    Nonce,
    PeerId,
    PublicKey,
    RoundPlan,
    RoundResult,
    SessionConfig,
    SessionEnded,
    SessionId,
    is_federation_id,
)


class State(enum.StrEnum):
    IDLE = "idle"  #: no work for the current round
    FETCHING = "fetching"  #: fetching the parent model
    TRAINING = "training"  #: the driver trains
    PUSHING = "pushing"  #: pushing the update to our combiner (or waiting to retry)
    WAITING = "waiting"  #: the update is pushed (or could not be); kept until the result
    DONE = "done"  #: the session ended


class Input(enum.StrEnum):
    PLAN = "plan"  #: a plan of a new round (or parent) assigning us a combiner
    PLAN_UNASSIGNED = "plan-unassigned"  #: a plan of a new round leaving us out
    AMENDED = "amended"  #: an amended plan of our round assigning us a combiner
    AMENDED_UNASSIGNED = "amended-unassigned"  #: an amended plan of our round leaving us out
    RESUMED = "resumed"  #: a plan assigning us a round and parent we kept an update for
    FETCHED = "fetched"  #: the parent model is here
    FETCH_FAILED = "fetch-failed"  #: no holder could serve it; retry after a backoff
    TRAINED = "trained"  #: the update is made, before the deadline
    TRAINED_LATE = "trained-late"  #: the update is made, after the deadline
    TRAIN_FAILED = "train-failed"  #: the task failed
    ACKED = "acked"  #: the combiner stored the update (or had it)
    PUSH_FAILED = "push-failed"  #: the push broke, or the combiner's plan is behind: retry later
    REFUSED = "refused"  #: the combiner refused the update for this round
    RETRY = "retry"  #: the backoff after a failed fetch or push passed
    DEADLINE = "deadline"  #: the round's deadline passed with no fetch or push in flight
    RESULT = "result"  #: the result of the round we work on
    OLD_RESULT = "old-result"  #: the result of an earlier round
    SESSION_ENDED = "session-ended"  #: the reducer ended the session


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchModel:
    """Fetch the global model ``model`` from the first of ``holders`` that serves it, then call
    :meth:`ClientMachine.on_model_fetched` (or :meth:`ClientMachine.on_fetch_failed`)."""

    round: int
    model: Digest
    size: int
    holders: tuple[PeerId, ...]  #: our combiner first, then the plan's holders


@dataclass(frozen=True, slots=True, kw_only=True)
class Train:
    """Train ``parent`` on our data share for ``round`` with ``config``'s settings (epochs,
    batch size, learning rate, FedProx mu, the session seed, the task), store the trained model's
    blob, then call :meth:`ClientMachine.on_trained` with this action."""

    round: int
    parent: Digest
    config: SessionConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class PushUpdate:
    """Seal ``update`` (sealing is deterministic: the same bytes every time) and push it with its
    blob to ``combiner``. It replaces any push of the same update still in flight."""

    combiner: PeerId
    update: ModelUpdate


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Stop the fetch, training or push for ``round``: its outcome no longer matters."""

    what: Literal["fetch", "train", "push"]
    round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgetUpdate:
    """Drop the kept ``update`` (unpin its blob). ``included``: the round's result counted it;
    False if it was left out (late or lost) or if its round's result was never seen."""

    update: ModelUpdate
    included: bool


ClientAction = (
    FetchModel | Train | PushUpdate | Cancel | ForgetUpdate | PlanRejected | ResultRejected
)

_S, _I = State, Input
_NONE = emits()

#: (state, input) -> (next state, actions). Drawn in ``protocols/rounds.md``.
TRANSITIONS: Table = MappingProxyType(
    {
        (_S.IDLE, _I.PLAN): (_S.FETCHING, emits(FetchModel)),
        (_S.IDLE, _I.PLAN_UNASSIGNED): (_S.IDLE, _NONE),
        (_S.IDLE, _I.AMENDED): (_S.FETCHING, emits(FetchModel)),
        (_S.IDLE, _I.AMENDED_UNASSIGNED): (_S.IDLE, _NONE),
        (_S.IDLE, _I.RESUMED): (_S.PUSHING, emits(PushUpdate)),
        (_S.IDLE, _I.OLD_RESULT): (_S.IDLE, emits(many(ForgetUpdate))),
        (_S.IDLE, _I.SESSION_ENDED): (_S.DONE, emits(many(ForgetUpdate))),
        (_S.FETCHING, _I.FETCHED): (_S.TRAINING, emits(Train)),
        (_S.FETCHING, _I.FETCH_FAILED): (_S.FETCHING, _NONE),
        (_S.FETCHING, _I.RETRY): (_S.FETCHING, emits(FetchModel)),
        (_S.FETCHING, _I.DEADLINE): (_S.IDLE, emits(maybe(Cancel))),
        (_S.FETCHING, _I.PLAN): (_S.FETCHING, emits(maybe(Cancel), FetchModel)),
        (_S.FETCHING, _I.PLAN_UNASSIGNED): (_S.IDLE, emits(maybe(Cancel))),
        (_S.FETCHING, _I.AMENDED): (_S.FETCHING, _NONE),
        (_S.FETCHING, _I.AMENDED_UNASSIGNED): (_S.IDLE, emits(maybe(Cancel))),
        (_S.FETCHING, _I.RESUMED): (_S.PUSHING, emits(maybe(Cancel), PushUpdate)),
        (_S.FETCHING, _I.RESULT): (_S.IDLE, emits(maybe(Cancel), many(ForgetUpdate))),
        (_S.FETCHING, _I.OLD_RESULT): (_S.FETCHING, emits(many(ForgetUpdate))),
        (_S.FETCHING, _I.SESSION_ENDED): (_S.DONE, emits(maybe(Cancel), many(ForgetUpdate))),
        (_S.TRAINING, _I.TRAINED): (_S.PUSHING, emits(PushUpdate)),
        (_S.TRAINING, _I.TRAINED_LATE): (_S.WAITING, _NONE),
        (_S.TRAINING, _I.TRAIN_FAILED): (_S.IDLE, _NONE),
        (_S.TRAINING, _I.PLAN): (_S.FETCHING, emits(Cancel, FetchModel)),
        (_S.TRAINING, _I.PLAN_UNASSIGNED): (_S.IDLE, emits(Cancel)),
        (_S.TRAINING, _I.AMENDED): (_S.TRAINING, _NONE),
        (_S.TRAINING, _I.AMENDED_UNASSIGNED): (_S.IDLE, emits(Cancel)),
        (_S.TRAINING, _I.RESUMED): (_S.PUSHING, emits(Cancel, PushUpdate)),
        (_S.TRAINING, _I.RESULT): (_S.IDLE, emits(Cancel, many(ForgetUpdate))),
        (_S.TRAINING, _I.OLD_RESULT): (_S.TRAINING, emits(many(ForgetUpdate))),
        (_S.TRAINING, _I.SESSION_ENDED): (_S.DONE, emits(Cancel, many(ForgetUpdate))),
        (_S.PUSHING, _I.ACKED): (_S.WAITING, _NONE),
        (_S.PUSHING, _I.PUSH_FAILED): (_S.PUSHING, _NONE),
        (_S.PUSHING, _I.REFUSED): (_S.WAITING, _NONE),
        (_S.PUSHING, _I.RETRY): (_S.PUSHING, emits(PushUpdate)),
        (_S.PUSHING, _I.DEADLINE): (_S.WAITING, _NONE),
        (_S.PUSHING, _I.PLAN): (_S.FETCHING, emits(maybe(Cancel), FetchModel)),
        (_S.PUSHING, _I.PLAN_UNASSIGNED): (_S.IDLE, emits(maybe(Cancel))),
        (_S.PUSHING, _I.AMENDED): (_S.PUSHING, emits(PushUpdate)),
        (_S.PUSHING, _I.AMENDED_UNASSIGNED): (_S.WAITING, emits(maybe(Cancel))),
        (_S.PUSHING, _I.RESUMED): (_S.PUSHING, emits(maybe(Cancel), PushUpdate)),
        (_S.PUSHING, _I.RESULT): (_S.IDLE, emits(maybe(Cancel), many(ForgetUpdate))),
        (_S.PUSHING, _I.OLD_RESULT): (_S.PUSHING, emits(many(ForgetUpdate))),
        (_S.PUSHING, _I.SESSION_ENDED): (_S.DONE, emits(maybe(Cancel), many(ForgetUpdate))),
        (_S.WAITING, _I.PLAN): (_S.FETCHING, emits(FetchModel)),
        (_S.WAITING, _I.PLAN_UNASSIGNED): (_S.IDLE, _NONE),
        (_S.WAITING, _I.AMENDED): (_S.PUSHING, emits(PushUpdate)),
        (_S.WAITING, _I.AMENDED_UNASSIGNED): (_S.WAITING, _NONE),
        (_S.WAITING, _I.RESUMED): (_S.PUSHING, emits(PushUpdate)),
        (_S.WAITING, _I.RESULT): (_S.IDLE, emits(many(ForgetUpdate))),
        (_S.WAITING, _I.OLD_RESULT): (_S.WAITING, emits(many(ForgetUpdate))),
        (_S.WAITING, _I.SESSION_ENDED): (_S.DONE, emits(many(ForgetUpdate))),
    }
)


def describe_transitions() -> str:
    """:data:`TRANSITIONS` as the Markdown table in ``protocols/rounds.md``."""
    return describe_table(TRANSITIONS)


def describe_states() -> str:
    """:data:`TRANSITIONS` as the Mermaid state diagram in ``protocols/rounds.md``."""
    return describe_diagram(TRANSITIONS, State.IDLE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStatistics:
    """A snapshot of the client."""

    state: State
    round: int | None  #: the round of the plan followed, None before the first
    combiner: PeerId | None  #: our combiner in it
    kept: tuple[int, ...]  #: rounds of the updates kept until their result
    attempts: int  #: failed fetches or pushes in a row
    included: int  #: updates a result counted
    left_out: int  #: updates forgotten without being counted


class ClientMachine:
    """Trains for the rounds that assign it and delivers its updates to its combiner.

    Args:
        peer: our peer ID. public_key: our signing key's public half (updates name it).
        federation: ours. session: the session to follow, or None to follow the first planned.
        wall_offset_ms: the driver's wall clock minus ``now``, in ms (``rounds`` module).
        backoff, max_backoff: the wait after the first failed fetch or push, doubling after each
            further failure up to ``max_backoff``, seconds. Retries stop at the deadline.
    """

    def __init__(
        self,
        *,
        peer: PeerId,
        public_key: PublicKey,
        federation: str,
        session: str | None = None,
        wall_offset_ms: float = 0.0,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
    ) -> None:
        if not is_federation_id(federation):
            raise ConfigError(f"invalid federation ID {federation!r}")
        if not 0.0 < backoff <= max_backoff:
            raise ConfigError("need 0 < backoff <= max_backoff")
        self.peer = peer
        self.public_key = public_key
        self.wall_offset_ms = wall_offset_ms
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._follower = PlanFollower(
            FederationId(federation), None if session is None else SessionId(session)
        )
        self._state = State.IDLE
        self._combiner: PeerId | None = None
        self._deadline: float | None = None
        self._job: Train | None = None  # the training asked for the current round
        self._update: ModelUpdate | None = None  # the update made for the current round
        self._kept: dict[int, ModelUpdate] = {}  # by round, until a result settles it
        self._in_flight = False  # a fetch or push is under way (not waiting for a retry)
        self._retry_at: float | None = None
        self._attempts = 0
        self._included = 0
        self._left_out = 0

    @property
    def state(self) -> State:
        return self._state

    @property
    def plan(self) -> RoundPlan | None:
        return self._follower.plan

    # --- inputs ---

    def on_plan(self, plan: RoundPlan, now: float) -> list[ClientAction]:
        """Take a plan whose envelope the driver opened (``open_round_plan``)."""
        follower = self._follower
        reason = follower.check(plan)
        if reason is not None:
            return [follower.rejected(plan, reason)]
        previous, amends = follower.follow(plan)
        self._combiner = plan.combiner_of(self.peer)
        self._deadline = local_time(plan.deadline_ms, self.wall_offset_ms)
        state = self._state
        kept = self._kept.get(plan.round)
        if kept is not None and kept.parent != plan.parent:
            kept = None
        if amends:
            if self._combiner is None:
                return self._go(Input.AMENDED_UNASSIGNED, self._stop(previous))
            if state in (State.PUSHING, State.WAITING):
                return self._go(Input.AMENDED, [self._push()])
            if state is not State.IDLE:
                return self._go(Input.AMENDED, [])  # fetching or training: carry on, new combiner
            if kept is None:
                return self._go(Input.AMENDED, [self._fetch(plan)])
        actions = self._stop(previous)
        self._update, self._job = kept, None
        if self._combiner is None:
            return self._go(Input.PLAN_UNASSIGNED, actions)
        if kept is not None:  # a new reducer's plan of a round we trained for: no retraining
            return self._go(Input.RESUMED, [*actions, self._push()])
        return self._go(Input.PLAN, [*actions, self._fetch(plan)])

    def on_model_fetched(self, model: Digest, now: float) -> list[ClientAction]:
        """The model a :class:`FetchModel` asked for is stored."""
        plan = self._follower.plan
        if not self._fetching(model) or plan is None:
            return []
        self._in_flight, self._attempts = False, 0
        self._job = Train(round=plan.round, parent=plan.parent, config=plan.config)
        return self._go(Input.FETCHED, [self._job])

    def on_fetch_failed(self, model: Digest, now: float) -> list[ClientAction]:
        """No holder could serve the model: try again after a backoff."""
        if not self._fetching(model):
            return []
        self._schedule_retry(now)
        return self._go(Input.FETCH_FAILED, [])

    def on_trained(
        self,
        job: Train,
        *,
        update: Digest,
        size: int,
        num_examples: int,
        metrics: Mapping[str, float],
        nonce: Nonce,
        now: float,
    ) -> list[ClientAction]:
        """The driver trained ``job`` and stored the result as blob ``update`` (``size`` bytes).
        ``nonce`` is 16 random bytes for the signed update."""
        if num_examples <= 0:
            raise LocalProtocolError(
                f"on_trained(): num_examples must be positive, got {num_examples}"
            )
        plan = self._follower.plan
        if self._state is not State.TRAINING or job != self._job or plan is None:
            return []
        made = ModelUpdate(
            federation=plan.federation,
            session=plan.session,
            round=job.round,
            parent=job.parent,
            update=update,
            size=size,
            num_examples=num_examples,
            metrics=dict(metrics),
            signer=self.public_key,
            created_ms=wall_ms(now, self.wall_offset_ms),
            nonce=nonce,
        )
        self._update = self._kept[job.round] = made
        self._job = None
        if self._deadline is not None and now >= self._deadline:
            return self._go(Input.TRAINED_LATE, [])
        return self._go(Input.TRAINED, [self._push()])

    def on_train_failed(self, job: Train, now: float) -> list[ClientAction]:
        """The task raised while training ``job``: give this round up (a re-plan retries)."""
        if self._state is not State.TRAINING or job != self._job:
            return []
        self._job = None
        return self._go(Input.TRAIN_FAILED, [])

    def on_push_acked(self, update: Digest, now: float) -> list[ClientAction]:
        """The combiner acked ``stored`` (or replied ``have``): the update is counted there."""
        if not self._pushing(update):
            return []
        self._in_flight, self._attempts = False, 0
        return self._go(Input.ACKED, [])

    def on_push_failed(self, update: Digest, now: float) -> list[ClientAction]:
        """The push broke (no connection, a reset, no ack): try again after a backoff."""
        if not self._pushing(update):
            return []
        self._schedule_retry(now)
        return self._go(Input.PUSH_FAILED, [])

    def on_push_refused(self, update: Digest, reason: str, now: float) -> list[ClientAction]:
        """The combiner refused the update (its ``push-reply`` or ``push-ack`` reason). ``early``
        and ``not-assigned`` (its plan is older than ours) are retried like a failure; any other
        reason stops the pushes for this plan, and the update stays kept for an amended one."""
        if not self._pushing(update):
            return []
        if reason in (UpdateRejection.EARLY, UpdateRejection.NOT_ASSIGNED):
            return self.on_push_failed(update, now)
        self._in_flight, self._retry_at = False, None
        return self._go(Input.REFUSED, [])

    def on_timer(self, now: float) -> list[ClientAction]:
        """Retry a failed fetch or push, or give up at the deadline."""
        state, plan = self._state, self._follower.plan
        if state not in (State.FETCHING, State.PUSHING) or plan is None:
            return []
        past_deadline = self._deadline is not None and now >= self._deadline
        if state is State.FETCHING and past_deadline:
            actions = self._stop()
            return self._go(Input.DEADLINE, actions)
        if self._in_flight or self._retry_at is None:
            return []
        if past_deadline:  # pushing, nothing in flight
            self._retry_at = None
            return self._go(Input.DEADLINE, [])
        if now < self._retry_at:
            return []
        self._retry_at = None
        retry = self._fetch(plan) if state is State.FETCHING else self._push()
        return self._go(Input.RETRY, [retry])

    def next_deadline(self) -> float | None:
        """When the driver must next call :meth:`on_timer`, or None."""
        if self._state is State.FETCHING:
            times = [self._deadline, None if self._in_flight else self._retry_at]
        elif self._state is State.PUSHING and not self._in_flight:
            times = [self._deadline, self._retry_at]
        else:
            return None
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def on_result(self, result: RoundResult, now: float) -> list[ClientAction]:
        """Take a round result whose envelope the driver opened (``open_round_result``)."""
        reason = self._follower.check_signed(
            result.federation, result.session, result.term, result.reducer
        )
        if reason is not None:
            return [ResultRejected(round=result.round, reason=reason)]
        if self._state is State.DONE:
            return []
        forgets = self._forget(result.round, result)
        plan = self._follower.plan
        busy = self._state not in (State.IDLE, State.DONE)
        if busy and plan is not None and result.round >= plan.round:
            actions = self._stop()
            self._update = self._job = None
            return self._go(Input.RESULT, [*actions, *forgets])
        return self._go(Input.OLD_RESULT, forgets)

    def on_session_ended(self, ended: SessionEnded, now: float) -> list[ClientAction]:
        """The reducer ended the session (the driver opened the envelope)."""
        reason = self._follower.check_signed(
            ended.federation, ended.session, ended.term, ended.reducer
        )
        if reason is not None:
            return [ResultRejected(round=ended.rounds, reason=reason)]
        if self._state is State.DONE:
            return []
        self._follower.ended = True
        actions = self._stop()
        forgets = self._forget(max(self._kept, default=0), None)
        self._update = self._job = None
        self._deadline = None
        return self._go(Input.SESSION_ENDED, [*actions, *forgets])

    def statistics(self) -> ClientStatistics:
        plan = self._follower.plan
        return ClientStatistics(
            state=self._state,
            round=None if plan is None else plan.round,
            combiner=self._combiner,
            kept=tuple(sorted(self._kept)),
            attempts=self._attempts,
            included=self._included,
            left_out=self._left_out,
        )

    # --- internals ---

    def _go(self, inp: Input, actions: list[ClientAction]) -> list[ClientAction]:
        self._state = step(TRANSITIONS, "client", self._state, inp, actions)
        return actions

    def _fetching(self, model: Digest) -> bool:
        plan = self._follower.plan
        return (
            self._state is State.FETCHING
            and self._in_flight
            and plan is not None
            and plan.parent == model
        )

    def _pushing(self, update: Digest) -> bool:
        return (
            self._state is State.PUSHING
            and self._in_flight
            and self._update is not None
            and self._update.update == update
        )

    def _fetch(self, plan: RoundPlan) -> FetchModel:
        self._in_flight, self._retry_at = True, None
        combiner = plan.combiner_of(self.peer)
        holders = tuple(dict.fromkeys([*([combiner] if combiner else []), *plan.holders]))
        return FetchModel(
            round=plan.round, model=plan.parent, size=plan.parent_size, holders=holders
        )

    def _push(self) -> PushUpdate:
        assert self._update is not None and self._combiner is not None
        self._in_flight, self._retry_at = True, None
        return PushUpdate(combiner=self._combiner, update=self._update)

    def _stop(self, plan: RoundPlan | None = None) -> list[ClientAction]:
        """Cancel what is under way for ``plan`` (the plan followed), if anything."""
        plan = plan or self._follower.plan
        round_ = 0 if plan is None else plan.round
        state, in_flight = self._state, self._in_flight
        self._in_flight, self._retry_at, self._attempts = False, None, 0
        if state is State.TRAINING:
            return [Cancel(what="train", round=self._job.round if self._job else round_)]
        if state is State.FETCHING and in_flight:
            return [Cancel(what="fetch", round=round_)]
        if state is State.PUSHING and in_flight and self._update is not None:
            return [Cancel(what="push", round=self._update.round)]
        return []

    def _schedule_retry(self, now: float) -> None:
        self._in_flight = False
        self._attempts += 1
        wait = min(self.backoff * 2 ** (self._attempts - 1), self.max_backoff)
        self._retry_at = now + wait

    def _forget(self, up_to: int, result: RoundResult | None) -> list[ClientAction]:
        """Forget every kept update of a round up to ``up_to``; ``result`` settles its own."""
        actions: list[ClientAction] = []
        for round_ in sorted(r for r in self._kept if r <= up_to):
            update = self._kept.pop(round_)
            counted = None if result is None else result.contribution_of(self.public_key)
            included = (
                result is not None
                and result.round == round_
                and counted is not None
                and counted.update == update.update
            )
            if included:
                self._included += 1
            else:
                self._left_out += 1
            actions.append(ForgetUpdate(update=update, included=included))
        return actions


__all__ = [
    "TRANSITIONS",
    "Cancel",
    "ClientAction",
    "ClientMachine",
    "ClientStatistics",
    "FetchModel",
    "ForgetUpdate",
    "Input",
    "PushUpdate",
    "State",
    "Train",
    "describe_states",
    "describe_transitions",
]
