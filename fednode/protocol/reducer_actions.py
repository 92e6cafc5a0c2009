"""Protocol layer: the reducer's round machine (``reducer``) as data: its states and inputs, the
actions it asks its driver to do, and the snapshot it gives of itself. The machine re-exports
every name."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from fednode.protocol.partials import PartialRejection
from fednode.protocol.rounds import PlanRejected, ResultRejected
from fednode.wire import (
    Digest,
    PartialAggregate,
    PeerId,
    PublicKey,
    RoundPlan,
    RoundResult,
    SessionEnded,
)


class State(enum.StrEnum):
    IDLE = "idle"  #: not started
    COLLECTING = "collecting"  #: a plan is out; partials come in
    REDUCING = "reducing"  #: the round closed; the driver reduces the partials
    EVALUATING = "evaluating"  #: the driver evaluates the new global model
    COMPLETED = "completed"  #: every round done
    FAILED = "failed"  #: a round fell short once too often
    SUPERSEDED = "superseded"  #: a reducer of a higher term took the session over


class Input(enum.StrEnum):
    START = "start"  #: :meth:`ReducerMachine.start`
    PARTIAL = "partial"  #: a partial accepted, the round still open
    LAST_PARTIAL = "last-partial"  #: a partial accepted: every combiner in, min_clients covered
    DEADLINE = "deadline"  #: the deadline passed with min_clients covered
    DEADLINE_SHORT = "deadline-short"  #: the deadline passed short of min_clients; retries left
    DEADLINE_FAILED = "deadline-failed"  #: the deadline passed short; no retries left
    COMBINER_DEAD = "combiner-dead"  #: an assigned combiner died with orphans; some moved
    COMBINER_DEAD_STUCK = "combiner-dead-stuck"  #: ... none could be moved: they wait
    COMBINER_DEAD_LAST = "combiner-dead-last"  #: ... none to move; every other combiner is in
    ORPHANS_MOVED = "orphans-moved"  #: a combiner with room appeared for waiting orphans
    REDUCED = "reduced"  #: the driver reduced; more rounds follow, no evaluation due
    REDUCED_EVAL = "reduced-eval"  #: the driver reduced; an evaluation is due
    REDUCED_FINAL = "reduced-final"  #: the driver reduced the last round; no evaluation due
    MISSING = "missing"  #: partial blobs could not be fetched; the rest still cover min_clients
    MISSING_SHORT = "missing-short"  #: ... the rest fall short; retries left
    MISSING_FAILED = "missing-failed"  #: ... the rest fall short; no retries left
    EVALUATED = "evaluated"  #: the driver evaluated; more rounds follow
    EVALUATED_FINAL = "evaluated-final"  #: the driver evaluated the last round's model
    SUPERSEDED = "superseded"  #: a plan or result of this session from a higher term


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishPlan:
    """Seal ``plan`` and gossip it."""

    plan: RoundPlan


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchPartial:
    """Fetch the blob of an accepted partial (from its combiner, or any holder), ahead of
    :class:`Reduce`."""

    partial: Digest
    size: int
    peer: PeerId


@dataclass(frozen=True, slots=True, kw_only=True)
class Reduce:
    """Reduce: the mean of the partials' blobs weighted by their ``total_weight``, applied to
    ``parent`` through the session's server optimiser. Store the new model, then call
    :meth:`ReducerMachine.on_reduced`; if a partial's blob cannot be had,
    :meth:`ReducerMachine.on_partials_missing`."""

    round: int
    parent: Digest
    partials: tuple[PartialAggregate, ...]  #: sorted by combiner

    @property
    def weights(self) -> tuple[int, ...]:
        return tuple(p.total_weight for p in self.partials)


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluate:
    """Evaluate the global model ``model``, then call :meth:`ReducerMachine.on_evaluated`."""

    round: int
    model: Digest
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishResult:
    """Seal ``result`` and gossip it (``result.global_model()`` is the model's own record)."""

    result: RoundResult


@dataclass(frozen=True, slots=True, kw_only=True)
class CombinerLost:
    """An assigned combiner died before a partial counted all its clients (a notice for the
    driver's log and events). ``clients``: those orphans; the :class:`PublishPlan` that follows,
    if any, moves them; ``waiting``: the orphans of this round no combiner has room for yet."""

    round: int
    combiner: PeerId
    clients: tuple[PeerId, ...]
    waiting: tuple[PeerId, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCompleted:
    """Every round is done: seal and gossip ``ended``, and stop."""

    ended: SessionEnded


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionFailed:
    """The session cannot go on: seal and gossip ``ended``, report ``reason``, and stop."""

    reason: str
    ended: SessionEnded


@dataclass(frozen=True, slots=True, kw_only=True)
class SteppedDown:
    """A reducer of a higher term took the session over: stop publishing for it (plans, results,
    the session end); work still under way (a reduce, an evaluation) is ignored when it reports.
    """

    round: int  #: the round we were at
    term: int  #: ours
    by_term: int  #: the newer reducer's
    by: PublicKey  #: the newer reducer


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialRejected:
    """A partial was not accepted; the machine is unchanged. Log it and score the combiner."""

    round: int
    combiner: PublicKey
    partial: Digest
    reason: PartialRejection


ReducerAction = (
    PublishPlan
    | FetchPartial
    | Reduce
    | Evaluate
    | PublishResult
    | CombinerLost
    | SessionCompleted
    | SessionFailed
    | SteppedDown
    | PartialRejected
    | PlanRejected
    | ResultRejected
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReducerStatistics:
    """A snapshot of the reducer."""

    state: State
    term: int  #: ours
    round: int
    amendment: int
    retries: int  #: re-plans of the current round so far
    deadline: float | None  #: when the current attempt closes (driver's clock)
    partials: int  #: partials accepted in the current attempt
    covered: int  #: clients they count
    waiting: int  #: orphans of a dead combiner waiting for one with room
    rejected: Mapping[PartialRejection, int]  #: every reason, zero if never seen


__all__ = [
    "CombinerLost",
    "Evaluate",
    "FetchPartial",
    "Input",
    "PartialRejected",
    "PublishPlan",
    "PublishResult",
    "Reduce",
    "ReducerAction",
    "ReducerStatistics",
    "SessionCompleted",
    "SessionFailed",
    "State",
    "SteppedDown",
]
