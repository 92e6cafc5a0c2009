"""Protocol layer: the combiner's side of a round, as a sans-IO state machine.

A :class:`CombinerMachine` follows the reducer's plans, decides which pushed updates to take
(:meth:`CombinerMachine.admit`, asked before any blob byte flows), has the driver fold each stored
update into a weighted running sum (:class:`Accumulate`: O(model) memory, never the list of
updates) and says when to push the signed partial aggregate (:class:`PushPartial`). Its
transitions are :data:`TRANSITIONS`, drawn in ``protocols/rounds.md``.

The partial goes out once per plan attempt: at once when every assigned client's update is in,
else at the *cut-off*, the plan's deadline minus a push margin of
``min(margin_fraction * round_deadline, max_margin)`` (by default 10 % of the round, at most
10 s). The margin is the time the partial has to be built, sealed, sent and checked by the
reducer before the reducer's own deadline: a combiner that pushed at the deadline would always be
late. Updates after the cut-off are ``stale``. A combiner with no update at the cut-off pushes
nothing (a partial counts at least one update).

An amended plan of the same round (same parent: a retry, the clients of a dead combiner moved,
or a new reducer's plan of a higher term) keeps the updates of clients still assigned here, so a
client that re-pushes the identical update is answered ``have`` and counted once; if a counted
client moved away, the running sum is rebuilt from the stored updates that remain
(:class:`ResetAccumulator` then :class:`Accumulate` for each). The combiner then pushes again for
the new attempt, to the plan's reducer: at once if every client it assigns is in, else as above.
An amendment that gives more clients to a combiner that already pushed reopens it: it takes their
updates until its new cut-off and pushes a partial counting them too, which the reducer takes in
place of the first (it counts strictly more, the first included).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fednode.errors import ConfigError, LocalProtocolError
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
    peer_of,
    step,
)
from fednode.wire import (
    Contribution,
    Digest,
    FederationId,
    ModelUpdate,
    PeerId,
    PublicKey,
    RoundPlan,
    SessionEnded,
    SessionId,
    is_federation_id,
)


class State(enum.StrEnum):
    IDLE = "idle"  #: no plan assigns us clients
    COLLECTING = "collecting"  #: taking updates until all are in or the cut-off
    CLOSED = "closed"  #: partial pushed (or nothing to push); later updates are stale
    DONE = "done"  #: the session ended


class Input(enum.StrEnum):
    PLAN = "plan"  #: a plan of a new round (or parent) assigning us clients
    PLAN_UNASSIGNED = "plan-unassigned"  #: a newer plan assigning us none
    AMENDED = "amended"  #: an amended plan of our round, still assigning us clients
    AMENDED_COMPLETE = "amended-complete"  #: ... every client it assigns us already in
    UPDATE = "update"  #: an update stored and taken; more expected
    LAST_UPDATE = "last-update"  #: the update that completes the assigned clients
    CUTOFF = "cutoff"  #: the cut-off passed with updates in
    CUTOFF_EMPTY = "cutoff-empty"  #: the cut-off passed with none
    SESSION_ENDED = "session-ended"  #: the reducer ended the session


class UpdateRejection(enum.StrEnum):
    """What :meth:`CombinerMachine.admit` says instead of "send it", in the order the checks run.

    ``have`` is not an error: the identical update is already counted (a client's re-push after
    a lost ack or a re-plan); reply ``have``, ack ``stored``, and it still counts once. Every other
    value is a refusal; only ``early`` is worth retrying soon (the plan has not reached us yet).
    """

    WRONG_SESSION = "wrong-session"  #: another federation or session
    EARLY = "early"  #: a round we have no plan for yet
    STALE = "stale"  #: an earlier round, the round closed here (partial pushed), or session over
    WRONG_PARENT = "wrong-parent"  #: not trained from the plan's parent model
    NOT_ASSIGNED = "not-assigned"  #: the signer is not assigned to us in the plan
    HAVE = "have"  #: the identical update is already counted
    DUPLICATE = "duplicate"  #: the signer already has a different update counted this round
    OVER_CAPACITY = "over-capacity"  #: we already hold as many updates as we can take


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchModel:
    """Fetch the round's parent model from ``holders``, to serve it to our clients."""

    model: Digest
    size: int
    holders: tuple[PeerId, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetAccumulator:
    """Start an empty weighted running sum for ``round`` from ``parent``; drop any other."""

    round: int
    parent: Digest


@dataclass(frozen=True, slots=True, kw_only=True)
class Accumulate:
    """Add the stored blob of ``update`` to the running sum, weighted by its ``num_examples``."""

    update: ModelUpdate


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscardAccumulator:
    """Drop the running sum of ``round``: no partial will be pushed from it."""

    round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPartial:
    """Turn the running sum into the partial's blob (the weighted mean), build the
    ``PartialAggregate`` from these fields, seal it and send it to ``reducer``.

    ``metrics`` are the contributions' training metrics, each averaged over the updates that
    report it, weighted by ``num_examples`` (``PartialAggregate`` v1 has no field for them yet).
    """

    federation: FederationId
    session: SessionId
    round: int
    parent: Digest
    reducer: PublicKey
    contributions: tuple[Contribution, ...]  #: sorted by signer
    total_weight: int
    metrics: Mapping[str, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateRejected:
    """An update stored meanwhile is not taken after all (the round closed while its bytes were
    in flight, say): ack it ``rejected`` with ``reason``."""

    signer: PublicKey
    round: int
    reason: UpdateRejection


CombinerAction = (
    FetchModel
    | ResetAccumulator
    | Accumulate
    | DiscardAccumulator
    | PushPartial
    | UpdateRejected
    | PlanRejected
    | ResultRejected
)

_S, _I = State, Input
_REPLAN = {
    _I.PLAN: (_S.COLLECTING, emits(FetchModel, ResetAccumulator)),
    _I.PLAN_UNASSIGNED: (_S.IDLE, emits(DiscardAccumulator)),
    _I.AMENDED: (_S.COLLECTING, emits(maybe(ResetAccumulator), many(Accumulate))),
    _I.AMENDED_COMPLETE: (
        _S.CLOSED,
        emits(maybe(ResetAccumulator), many(Accumulate), PushPartial),
    ),
    _I.SESSION_ENDED: (_S.DONE, emits(DiscardAccumulator)),
}

#: (state, input) -> (next state, actions). Drawn in ``protocols/rounds.md``.
TRANSITIONS: Table = MappingProxyType(
    {
        (_S.IDLE, _I.PLAN): (_S.COLLECTING, emits(FetchModel, ResetAccumulator)),
        (_S.IDLE, _I.PLAN_UNASSIGNED): (_S.IDLE, emits()),
        (_S.IDLE, _I.SESSION_ENDED): (_S.DONE, emits()),
        (_S.COLLECTING, _I.UPDATE): (_S.COLLECTING, emits(Accumulate)),
        (_S.COLLECTING, _I.LAST_UPDATE): (_S.CLOSED, emits(Accumulate, PushPartial)),
        (_S.COLLECTING, _I.CUTOFF): (_S.CLOSED, emits(PushPartial)),
        (_S.COLLECTING, _I.CUTOFF_EMPTY): (_S.CLOSED, emits()),
        **{(_S.COLLECTING, inp): outcome for inp, outcome in _REPLAN.items()},
        **{(_S.CLOSED, inp): outcome for inp, outcome in _REPLAN.items()},
    }
)


def describe_transitions() -> str:
    """:data:`TRANSITIONS` as the Markdown table in ``protocols/rounds.md``."""
    return describe_table(TRANSITIONS)


def describe_states() -> str:
    """:data:`TRANSITIONS` as the Mermaid state diagram in ``protocols/rounds.md``."""
    return describe_diagram(TRANSITIONS, State.IDLE)


@dataclass(frozen=True, slots=True, kw_only=True)
class CombinerStatistics:
    """A snapshot of the combiner."""

    state: State
    round: int | None  #: the round of the plan followed, None before the first
    assigned: int  #: clients assigned to us in it
    counted: int  #: their updates taken so far
    cutoff: float | None  #: when the partial goes out at the latest (driver's clock)
    partials_pushed: int
    rejected: Mapping[UpdateRejection, int]  #: every reason, zero if never seen (``have`` too)


class CombinerMachine:
    """Takes the updates of the clients a plan assigns to this combiner and pushes a partial.

    Args:
        peer: our peer ID. capacity: the most updates we take in one round.
        federation: ours. session: the session to follow, or None to follow the first planned.
        wall_offset_ms: the driver's wall clock minus ``now``, in ms (``rounds`` module).
        margin_fraction, max_margin: the push margin (module docstring), in seconds for the max.
    """

    def __init__(
        self,
        *,
        peer: PeerId,
        capacity: int,
        federation: str,
        session: str | None = None,
        wall_offset_ms: float = 0.0,
        margin_fraction: float = 0.1,
        max_margin: float = 10.0,
    ) -> None:
        if not is_federation_id(federation):
            raise ConfigError(f"invalid federation ID {federation!r}")
        if capacity < 0:
            raise ConfigError("capacity must be non-negative")
        if not 0.0 <= margin_fraction < 1.0 or max_margin < 0.0:
            raise ConfigError("need 0 <= margin_fraction < 1 and max_margin >= 0")
        self.peer = peer
        self.capacity = capacity
        self.wall_offset_ms = wall_offset_ms
        self.margin_fraction = margin_fraction
        self.max_margin = max_margin
        self._follower = PlanFollower(
            FederationId(federation), None if session is None else SessionId(session)
        )
        self._state = State.IDLE
        self._assigned: frozenset[PeerId] = frozenset()
        self._updates: dict[PeerId, ModelUpdate] = {}  # counted this round, by signer's peer
        self._cutoff: float | None = None
        self._pushed = 0
        self._rejected = dict.fromkeys(UpdateRejection, 0)

    @property
    def state(self) -> State:
        return self._state

    @property
    def plan(self) -> RoundPlan | None:
        return self._follower.plan

    # --- inputs ---

    def on_plan(self, plan: RoundPlan, now: float) -> list[CombinerAction]:
        """Take a plan whose envelope the driver opened (``open_round_plan``)."""
        follower = self._follower
        reason = follower.check(plan)
        if reason is not None:
            return [follower.rejected(plan, reason)]
        previous, amends = follower.follow(plan)
        assigned = frozenset(plan.clients_of(self.peer))
        self._assigned = assigned
        if not assigned:
            busy = self._state in (State.COLLECTING, State.CLOSED)
            self._updates.clear()
            self._cutoff = None
            actions: list[CombinerAction] = (
                [DiscardAccumulator(round=previous.round)] if busy and previous else []
            )
            return self._go(Input.PLAN_UNASSIGNED, actions)
        margin = min(plan.config.round_deadline_ms / 1000 * self.margin_fraction, self.max_margin)
        self._cutoff = local_time(plan.deadline_ms, self.wall_offset_ms) - margin
        if not amends or self._state is State.IDLE:
            self._updates.clear()
            fetch = FetchModel(model=plan.parent, size=plan.parent_size, holders=plan.holders)
            return self._go(
                Input.PLAN, [fetch, ResetAccumulator(round=plan.round, parent=plan.parent)]
            )
        actions = []
        moved = [peer for peer in self._updates if peer not in assigned]
        if moved:
            for peer in moved:
                del self._updates[peer]
            actions.append(ResetAccumulator(round=plan.round, parent=plan.parent))
            actions += [Accumulate(update=self._updates[p]) for p in sorted(self._updates)]
        if assigned <= self._updates.keys():
            actions.append(self._push())
            return self._go(Input.AMENDED_COMPLETE, actions)
        return self._go(Input.AMENDED, actions)

    def admit(self, update: ModelUpdate, signer: PeerId, now: float) -> UpdateRejection | None:
        """Whether to take a pushed update, asked before its blob's bytes flow: None means send
        them. ``signer`` is the envelope signer's peer ID (the driver opened the envelope)."""
        if signer != peer_of(update.signer):
            raise LocalProtocolError("admit(): signer is not the update's signer")
        reason = self._check(update, signer)
        if reason is not None:
            self._rejected[reason] += 1
        return reason

    def on_update_stored(self, update: ModelUpdate, now: float) -> list[CombinerAction]:
        """The driver stored and verified an admitted update's blob: take it (checked again:
        the round may have closed while its bytes flowed). Ack ``stored`` unless the actions
        hold an :class:`UpdateRejected`."""
        signer = peer_of(update.signer)
        reason = self._check(update, signer)
        if reason is UpdateRejection.HAVE:
            return []
        if reason is not None:
            self._rejected[reason] += 1
            return [UpdateRejected(signer=update.signer, round=update.round, reason=reason)]
        self._updates[signer] = update
        accumulate = Accumulate(update=update)
        if self._assigned <= self._updates.keys():
            return self._go(Input.LAST_UPDATE, [accumulate, self._push()])
        return self._go(Input.UPDATE, [accumulate])

    def on_timer(self, now: float) -> list[CombinerAction]:
        """Push the partial if the cut-off passed."""
        if self._state is not State.COLLECTING or self._cutoff is None or now < self._cutoff:
            return []
        if not self._updates:
            return self._go(Input.CUTOFF_EMPTY, [])
        return self._go(Input.CUTOFF, [self._push()])

    def next_deadline(self) -> float | None:
        """When the driver must next call :meth:`on_timer`, or None."""
        return self._cutoff if self._state is State.COLLECTING else None

    def on_session_ended(self, ended: SessionEnded, now: float) -> list[CombinerAction]:
        """The reducer ended the session (the driver opened the envelope)."""
        reason = self._follower.check_signed(
            ended.federation, ended.session, ended.term, ended.reducer
        )
        if reason is not None:
            return [ResultRejected(round=ended.rounds, reason=reason)]
        if self._state is State.DONE:
            return []
        plan = self._follower.plan
        self._follower.ended = True
        self._updates.clear()
        self._cutoff = None
        busy = self._state in (State.COLLECTING, State.CLOSED) and plan is not None
        actions: list[CombinerAction] = (
            [DiscardAccumulator(round=plan.round)] if busy and plan is not None else []
        )
        return self._go(Input.SESSION_ENDED, actions)

    def statistics(self) -> CombinerStatistics:
        plan = self._follower.plan
        return CombinerStatistics(
            state=self._state,
            round=None if plan is None else plan.round,
            assigned=len(self._assigned),
            counted=len(self._updates),
            cutoff=self.next_deadline(),
            partials_pushed=self._pushed,
            rejected=MappingProxyType(dict(self._rejected)),
        )

    # --- internals ---

    def _go(self, inp: Input, actions: list[CombinerAction]) -> list[CombinerAction]:
        self._state = step(TRANSITIONS, "combiner", self._state, inp, actions)
        return actions

    def _check(self, update: ModelUpdate, signer: PeerId) -> UpdateRejection | None:
        follower, plan = self._follower, self._follower.plan
        if plan is None:
            session_known = follower.session is not None
            if update.federation != follower.federation or (
                session_known and update.session != follower.session
            ):
                return UpdateRejection.WRONG_SESSION
            return UpdateRejection.EARLY
        if update.federation != plan.federation or update.session != plan.session:
            return UpdateRejection.WRONG_SESSION
        if self._state is State.DONE or update.round < plan.round:
            return UpdateRejection.STALE
        if update.round > plan.round:
            return UpdateRejection.EARLY
        if update.parent != plan.parent:
            return UpdateRejection.WRONG_PARENT
        if signer not in self._assigned:
            return UpdateRejection.NOT_ASSIGNED
        counted = self._updates.get(signer)
        if counted is not None:
            return UpdateRejection.HAVE if counted == update else UpdateRejection.DUPLICATE
        if self._state is not State.COLLECTING:
            return UpdateRejection.STALE
        if len(self._updates) >= self.capacity:
            return UpdateRejection.OVER_CAPACITY
        return None

    def _push(self) -> PushPartial:
        plan = self._follower.plan
        assert plan is not None and self._updates
        updates = sorted(self._updates.values(), key=lambda u: u.signer)
        contributions = tuple(
            Contribution(signer=u.signer, update=u.update, weight=u.num_examples) for u in updates
        )
        sums: dict[str, float] = {}
        weights: dict[str, int] = {}
        for u in updates:
            for name, value in u.metrics.items():
                sums[name] = sums.get(name, 0.0) + value * u.num_examples
                weights[name] = weights.get(name, 0) + u.num_examples
        self._pushed += 1
        return PushPartial(
            federation=plan.federation,
            session=plan.session,
            round=plan.round,
            parent=plan.parent,
            reducer=plan.reducer,
            contributions=contributions,
            total_weight=sum(c.weight for c in contributions),
            metrics={k: sums[k] / weights[k] for k in sorted(sums)},
        )


__all__ = [
    "TRANSITIONS",
    "Accumulate",
    "CombinerAction",
    "CombinerMachine",
    "CombinerStatistics",
    "DiscardAccumulator",
    "FetchModel",
    "Input",
    "PushPartial",
    "ResetAccumulator",
    "State",
    "UpdateRejected",
    "UpdateRejection",
    "describe_states",
    "describe_transitions",
]
