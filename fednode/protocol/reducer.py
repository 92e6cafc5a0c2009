"""Protocol layer: the reducer's side of a round, as a sans-IO state machine.

The :class:`ReducerMachine` plans each round, checks the partial aggregates the combiners push,
closes the round, asks the driver to reduce the partials (numpy FedAvg and the server optimiser
live in ``fednode.aggregation``, the blobs in the driver's store), and announces the result. The
driver feeds it verified messages, peer changes and timer ticks with ``now``; it returns actions
(:data:`ReducerAction`). Its transitions are :data:`TRANSITIONS`, drawn in ``protocols/rounds.md``.

A round closes as soon as every assigned combiner's partial is in and they cover at least
``min_clients`` clients, or else at its deadline if they cover ``min_clients``. A round that falls
short at its deadline is planned again (the same round, ``amendment`` + 1, a fresh assignment from
the peers known then and a new deadline), at most ``config.max_retries`` times; then the session
fails, saying why. A partial that breaks the plan is a :class:`PartialRejected`, never an
exception; misuse by the driver is a ``LocalProtocolError``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from fednode.crypto import contributions_digest
from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol.rounds import (
    CombinerLoad,
    Table,
    assign_clients,
    describe_diagram,
    describe_table,
    emits,
    local_time,
    peer_of,
    step,
    wall_ms,
)
from fednode.wire import (
    Contribution,
    Digest,
    FederationId,
    PartialAggregate,
    PartialRef,
    PeerId,
    PublicKey,
    RoundPlan,
    RoundResult,
    SessionConfig,
    SessionEnded,
    SessionId,
    is_federation_id,
)
from fednode.wire.rounds import MAX_HOLDERS, SessionOutcome


class State(enum.StrEnum):
    IDLE = "idle"  #: not started
    COLLECTING = "collecting"  #: a plan is out; partials come in
    REDUCING = "reducing"  #: the round closed; the driver reduces the partials
    EVALUATING = "evaluating"  #: the driver evaluates the new global model
    COMPLETED = "completed"  #: every round done
    FAILED = "failed"  #: a round fell short once too often


class Input(enum.StrEnum):
    START = "start"  #: :meth:`ReducerMachine.start`
    PARTIAL = "partial"  #: a partial accepted, the round still open
    LAST_PARTIAL = "last-partial"  #: a partial accepted: every combiner in, min_clients covered
    DEADLINE = "deadline"  #: the deadline passed with min_clients covered
    DEADLINE_SHORT = "deadline-short"  #: the deadline passed short of min_clients; retries left
    DEADLINE_FAILED = "deadline-failed"  #: the deadline passed short; no retries left
    COMBINER_DEAD = "combiner-dead"  #: an assigned combiner died before its partial came
    REDUCED = "reduced"  #: the driver reduced; more rounds follow, no evaluation due
    REDUCED_EVAL = "reduced-eval"  #: the driver reduced; an evaluation is due
    REDUCED_FINAL = "reduced-final"  #: the driver reduced the last round; no evaluation due
    MISSING = "missing"  #: partial blobs could not be fetched; the rest still cover min_clients
    MISSING_SHORT = "missing-short"  #: ... the rest fall short; retries left
    MISSING_FAILED = "missing-failed"  #: ... the rest fall short; no retries left
    EVALUATED = "evaluated"  #: the driver evaluated; more rounds follow
    EVALUATED_FINAL = "evaluated-final"  #: the driver evaluated the last round's model


class PartialRejection(enum.StrEnum):
    """Why a partial aggregate was not accepted, in the order the checks run."""

    WRONG_SESSION = "wrong-session"  #: another federation or session
    WRONG_ROUND = "wrong-round"  #: a round not planned yet
    STALE = "stale"  #: an earlier round, or this round already closed
    WRONG_PARENT = "wrong-parent"  #: not trained from the plan's parent
    NOT_ASSIGNED = "not-assigned"  #: its combiner has no clients in the plan
    DUPLICATE = "duplicate"  #: its combiner already has a partial in, not a subset of this one
    DOUBLE_COUNT = "double-count"  #: a client already counted in another combiner's partial
    FOREIGN_CLIENT = "foreign-client"  #: a client not assigned to its combiner


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
    """An assigned combiner died before its partial came. Its clients go uncounted this attempt
    (moving them to another combiner is the next step of the protocol)."""

    round: int
    combiner: PeerId
    clients: tuple[PeerId, ...]


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
    | PartialRejected
)

_S, _I = State, Input

#: (state, input) -> (next state, actions). Drawn in ``protocols/rounds.md``.
TRANSITIONS: Table = MappingProxyType(
    {
        (_S.IDLE, _I.START): (_S.COLLECTING, emits(PublishPlan)),
        (_S.COLLECTING, _I.PARTIAL): (_S.COLLECTING, emits(FetchPartial)),
        (_S.COLLECTING, _I.LAST_PARTIAL): (_S.REDUCING, emits(FetchPartial, Reduce)),
        (_S.COLLECTING, _I.DEADLINE): (_S.REDUCING, emits(Reduce)),
        (_S.COLLECTING, _I.DEADLINE_SHORT): (_S.COLLECTING, emits(PublishPlan)),
        (_S.COLLECTING, _I.DEADLINE_FAILED): (_S.FAILED, emits(SessionFailed)),
        (_S.COLLECTING, _I.COMBINER_DEAD): (_S.COLLECTING, emits(CombinerLost)),
        (_S.REDUCING, _I.REDUCED): (_S.COLLECTING, emits(PublishResult, PublishPlan)),
        (_S.REDUCING, _I.REDUCED_EVAL): (_S.EVALUATING, emits(Evaluate)),
        (_S.REDUCING, _I.REDUCED_FINAL): (_S.COMPLETED, emits(PublishResult, SessionCompleted)),
        (_S.REDUCING, _I.MISSING): (_S.REDUCING, emits(Reduce)),
        (_S.REDUCING, _I.MISSING_SHORT): (_S.COLLECTING, emits(PublishPlan)),
        (_S.REDUCING, _I.MISSING_FAILED): (_S.FAILED, emits(SessionFailed)),
        (_S.EVALUATING, _I.EVALUATED): (_S.COLLECTING, emits(PublishResult, PublishPlan)),
        (_S.EVALUATING, _I.EVALUATED_FINAL): (
            _S.COMPLETED,
            emits(PublishResult, SessionCompleted),
        ),
    }
)


def describe_transitions() -> str:
    """:data:`TRANSITIONS` as the Markdown table in ``protocols/rounds.md``."""
    return describe_table(TRANSITIONS)


def describe_states() -> str:
    """:data:`TRANSITIONS` as the Mermaid state diagram in ``protocols/rounds.md``."""
    return describe_diagram(TRANSITIONS, State.IDLE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReducerStatistics:
    """A snapshot of the reducer."""

    state: State
    round: int
    amendment: int
    retries: int  #: re-plans of the current round so far
    deadline: float | None  #: when the current attempt closes (driver's clock)
    partials: int  #: partials accepted in the current attempt
    covered: int  #: clients they count
    rejected: Mapping[PartialRejection, int]  #: every reason, zero if never seen


class ReducerMachine:
    """Plans rounds, checks partials, closes rounds and announces results.

    Args:
        config: the session's settings.
        peer: our peer ID. public_key: our signing key's public half (plans name it).
        federation, session: what we run.
        initial_model, initial_size: the global model round ``first_round`` trains from.
        term: our reducer term (fixed here; elections will hand it out).
        holders: peers besides us known to hold ``initial_model``.
        first_round: the round to start at (1, or later when taking over a session).
        wall_offset_ms: the driver's wall clock minus ``now``, in ms (``rounds`` module).
    """

    def __init__(
        self,
        *,
        config: SessionConfig,
        peer: PeerId,
        public_key: PublicKey,
        federation: str,
        session: str,
        initial_model: Digest,
        initial_size: int,
        term: int = 0,
        holders: Sequence[PeerId] = (),
        first_round: int = 1,
        wall_offset_ms: float = 0.0,
    ) -> None:
        if not is_federation_id(federation):
            raise ConfigError(f"invalid federation ID {federation!r}")
        if not 1 <= first_round <= config.rounds:
            raise ConfigError(f"first_round must be within 1..{config.rounds}")
        if term < 0 or initial_size < 0:
            raise ConfigError("term and initial_size must be non-negative")
        if peer_of(public_key) != peer:
            raise ConfigError("public_key is not the key of peer")
        self.config = config
        self.peer = peer
        self.public_key = public_key
        self.federation = FederationId(federation)
        self.session = SessionId(session)
        self.term = term
        self.wall_offset_ms = wall_offset_ms
        self._state = State.IDLE
        self._round = first_round
        self._amendment = -1
        self._retries = 0
        self._model, self._size = initial_model, initial_size
        self._holders = tuple(dict.fromkeys([peer, *holders]))[:MAX_HOLDERS]
        self._completed = first_round - 1  # rounds with a published result
        self._clients: set[PeerId] = set()
        self._combiners: dict[PeerId, CombinerLoad] = {}
        self._plan: RoundPlan | None = None
        self._deadline: float | None = None
        self._assigned: dict[PeerId, frozenset[PeerId]] = {}  # combiner -> its clients
        self._partials: dict[PeerId, PartialAggregate] = {}  # combiner -> accepted partial
        self._counted: dict[PublicKey, PeerId] = {}  # client key -> combiner that counted it
        self._lost: set[PeerId] = set()
        self._reducing: tuple[PartialAggregate, ...] = ()
        self._new_model: tuple[Digest, int] | None = None
        self._metrics: dict[str, float] = {}
        self._rejected = dict.fromkeys(PartialRejection, 0)

    @property
    def state(self) -> State:
        return self._state

    @property
    def plan(self) -> RoundPlan | None:
        """The plan of the current attempt (None before :meth:`start`)."""
        return self._plan

    # --- inputs ---

    def start(
        self, now: float, clients: Iterable[PeerId], combiners: Iterable[CombinerLoad]
    ) -> list[ReducerAction]:
        """Plan the first round among the eligible ``clients`` and ``combiners``."""
        if self._state is not State.IDLE:
            raise LocalProtocolError(f"start() in state {self._state}")
        self.on_peers(clients, combiners)
        return self._go(Input.START, [self._new_plan(now)])

    def on_peers(self, clients: Iterable[PeerId], combiners: Iterable[CombinerLoad]) -> None:
        """The eligible peers changed (from membership). Used by the next plan or re-plan; the
        current plan stands."""
        self._clients = set(clients)
        self._combiners = {c.peer: c for c in combiners}

    def on_peer_dead(self, peer: PeerId, now: float) -> list[ReducerAction]:
        """``peer`` died: no longer eligible; an assigned combiner without a partial is lost."""
        self._clients.discard(peer)
        self._combiners.pop(peer, None)
        if (
            self._state is not State.COLLECTING
            or peer not in self._assigned
            or peer in self._partials
            or peer in self._lost
        ):
            return []
        self._lost.add(peer)
        lost = CombinerLost(
            round=self._round, combiner=peer, clients=tuple(sorted(self._assigned[peer]))
        )
        return self._go(Input.COMBINER_DEAD, [lost])

    def on_partial(self, partial: PartialAggregate, now: float) -> list[ReducerAction]:
        """Take a partial whose envelope the driver opened (signature and author checked)."""
        reason = self._check_partial(partial)
        if reason is not None:
            self._rejected[reason] += 1
            return [
                PartialRejected(
                    round=partial.round,
                    combiner=partial.combiner,
                    partial=partial.partial,
                    reason=reason,
                )
            ]
        combiner = peer_of(partial.combiner)
        previous = self._partials.get(combiner)
        if previous is not None:
            for c in previous.contributions:
                del self._counted[c.signer]
        self._partials[combiner] = partial
        for c in partial.contributions:
            self._counted[c.signer] = combiner
        fetch = FetchPartial(partial=partial.partial, size=partial.size, peer=combiner)
        complete = all(c in self._partials for c in self._assigned)
        if complete and len(self._counted) >= self.config.min_clients:
            return self._go(Input.LAST_PARTIAL, [fetch, self._close()])
        return self._go(Input.PARTIAL, [fetch])

    def on_timer(self, now: float) -> list[ReducerAction]:
        """Close the current attempt if its deadline passed."""
        if self._state is not State.COLLECTING or self._deadline is None or now < self._deadline:
            return []
        if len(self._counted) >= self.config.min_clients:
            return self._go(Input.DEADLINE, [self._close()])
        return self._fall_short(now, Input.DEADLINE_SHORT, Input.DEADLINE_FAILED, "by the deadline")

    def next_deadline(self) -> float | None:
        """When the driver must next call :meth:`on_timer`, or None."""
        return self._deadline if self._state is State.COLLECTING else None

    def on_reduced(
        self, model: Digest, size: int, metrics: Mapping[str, float], now: float
    ) -> list[ReducerAction]:
        """The driver stored the reduced model ``model`` (``size`` bytes). ``metrics`` are the
        round's weighted training metrics."""
        if self._state is not State.REDUCING:
            raise LocalProtocolError(f"on_reduced() in state {self._state}")
        self._new_model = (model, size)
        self._metrics = {k: float(v) for k, v in metrics.items()}
        final = self._round >= self.config.rounds
        every = self.config.eval_every
        if every > 0 and (final or self._round % every == 0):
            evaluate = Evaluate(round=self._round, model=model, size=size)
            return self._go(Input.REDUCED_EVAL, [evaluate])
        return self._finish(now, Input.REDUCED_FINAL if final else Input.REDUCED)

    def on_evaluated(self, metrics: Mapping[str, float], now: float) -> list[ReducerAction]:
        """The driver evaluated the new model. Metric names must differ from the training ones
        (``eval_loss`` beside ``loss``)."""
        if self._state is not State.EVALUATING:
            raise LocalProtocolError(f"on_evaluated() in state {self._state}")
        clash = sorted(set(metrics) & set(self._metrics))
        if clash:
            raise LocalProtocolError(f"evaluation metrics {clash} clash with training metrics")
        self._metrics.update({k: float(v) for k, v in metrics.items()})
        final = self._round >= self.config.rounds
        return self._finish(now, Input.EVALUATED_FINAL if final else Input.EVALUATED)

    def on_partials_missing(self, partials: Iterable[Digest], now: float) -> list[ReducerAction]:
        """The blobs of ``partials`` could not be fetched: reduce without them, or re-plan."""
        if self._state is not State.REDUCING:
            raise LocalProtocolError(f"on_partials_missing() in state {self._state}")
        missing = set(partials)
        kept = tuple(p for p in self._reducing if p.partial not in missing)
        if len(kept) == len(self._reducing):
            raise LocalProtocolError("on_partials_missing() names no partial being reduced")
        self._reducing = kept
        if sum(len(p.contributions) for p in kept) >= self.config.min_clients:
            return self._go(Input.MISSING, [self._reduce()])
        return self._fall_short(
            now, Input.MISSING_SHORT, Input.MISSING_FAILED, "with fetchable partials"
        )

    def statistics(self) -> ReducerStatistics:
        return ReducerStatistics(
            state=self._state,
            round=self._round,
            amendment=self._amendment,
            retries=self._retries,
            deadline=self.next_deadline(),
            partials=len(self._partials),
            covered=len(self._counted),
            rejected=MappingProxyType(dict(self._rejected)),
        )

    # --- internals ---

    def _go(self, inp: Input, actions: list[ReducerAction]) -> list[ReducerAction]:
        self._state = step(TRANSITIONS, "reducer", self._state, inp, actions)
        return actions

    def _check_partial(self, partial: PartialAggregate) -> PartialRejection | None:
        plan = self._plan
        if partial.federation != self.federation or partial.session != self.session:
            return PartialRejection.WRONG_SESSION
        if plan is None or partial.round > self._round:
            return PartialRejection.WRONG_ROUND
        if partial.round < self._round or self._state is not State.COLLECTING:
            return PartialRejection.STALE
        if partial.parent != plan.parent:
            return PartialRejection.WRONG_PARENT
        combiner = peer_of(partial.combiner)
        assigned = self._assigned.get(combiner)
        if assigned is None:
            return PartialRejection.NOT_ASSIGNED
        previous = self._partials.get(combiner)
        signers = {c.signer for c in partial.contributions}
        if previous is not None and not (
            {c.signer for c in previous.contributions} < signers
            and set(previous.contributions) <= set(partial.contributions)
        ):
            return PartialRejection.DUPLICATE
        if any(self._counted.get(s, combiner) != combiner for s in signers):
            return PartialRejection.DOUBLE_COUNT
        if any(peer_of(s) not in assigned for s in signers):
            return PartialRejection.FOREIGN_CLIENT
        return None

    def _new_plan(self, now: float) -> PublishPlan:
        self._amendment += 1
        created = wall_ms(now, self.wall_offset_ms)
        assignments = assign_clients(self._clients, self._combiners.values())
        plan = RoundPlan(
            federation=self.federation,
            session=self.session,
            term=self.term,
            round=self._round,
            amendment=self._amendment,
            parent=self._model,
            parent_size=self._size,
            holders=self._holders,
            assignments=assignments,
            min_clients=self.config.min_clients,
            deadline_ms=created + self.config.round_deadline_ms,
            config=self.config,
            reducer=self.public_key,
            created_ms=created,
        )
        self._plan = plan
        self._deadline = local_time(plan.deadline_ms, self.wall_offset_ms)
        self._assigned = {a.combiner: frozenset(a.clients) for a in assignments}
        self._partials.clear()
        self._counted.clear()
        self._lost.clear()
        self._reducing = ()
        return PublishPlan(plan=plan)

    def _close(self) -> Reduce:
        self._reducing = tuple(self._partials[c] for c in sorted(self._partials))
        return self._reduce()

    def _reduce(self) -> Reduce:
        return Reduce(round=self._round, parent=self._model, partials=self._reducing)

    def _fall_short(self, now: float, retry: Input, fail: Input, when: str) -> list[ReducerAction]:
        covered = (
            sum(len(p.contributions) for p in self._reducing)
            if self._state is State.REDUCING
            else len(self._counted)
        )
        if self._retries < self.config.max_retries:
            self._retries += 1
            return self._go(retry, [self._new_plan(now)])
        plan = self._plan
        assert plan is not None
        planned = sum(len(a.clients) for a in plan.assignments)
        reason = (
            f"round {self._round} fell short after {self._retries} retries: "
            f"{covered} client update(s) counted {when}, {self.config.min_clients} needed "
            f"({planned} client(s) planned over {len(plan.assignments)} combiner(s); "
            f"{len(self._clients)} eligible client(s) and {len(self._combiners)} combiner(s) known)"
        )
        ended = self._ended(now, "failed", reason)
        return self._go(fail, [SessionFailed(reason=reason, ended=ended)])

    def _finish(self, now: float, inp: Input) -> list[ReducerAction]:
        assert self._new_model is not None and self._plan is not None
        model, size = self._new_model
        partials = tuple(
            PartialRef(
                combiner=p.combiner,
                partial=p.partial,
                total_weight=p.total_weight,
                contributions=contributions_digest(p.contributions),
            )
            for p in sorted(self._reducing, key=lambda p: p.combiner)
        )
        included: list[Contribution] = sorted(
            (c for p in self._reducing for c in p.contributions), key=lambda c: c.signer
        )
        result = RoundResult(
            federation=self.federation,
            session=self.session,
            term=self.term,
            round=self._round,
            amendment=self._amendment,
            parent=self._model,
            model=model,
            size=size,
            partials=partials,
            included=tuple(included),
            num_examples=sum(p.total_weight for p in partials),
            metrics=dict(self._metrics),
            reducer=self.public_key,
            created_ms=wall_ms(now, self.wall_offset_ms),
        )
        self._completed = self._round
        self._model, self._size = model, size
        self._holders = (self.peer,)
        self._reducing, self._new_model, self._metrics = (), None, {}
        if inp in (Input.REDUCED_FINAL, Input.EVALUATED_FINAL):
            self._deadline = None
            done = SessionCompleted(ended=self._ended(now, "completed", ""))
            return self._go(inp, [PublishResult(result=result), done])
        self._round += 1
        self._amendment, self._retries = -1, 0
        return self._go(inp, [PublishResult(result=result), self._new_plan(now)])

    def _ended(self, now: float, outcome: SessionOutcome, reason: str) -> SessionEnded:
        return SessionEnded(
            federation=self.federation,
            session=self.session,
            term=self.term,
            outcome=outcome,
            rounds=self._completed,
            model=self._model,
            reason=reason,
            reducer=self.public_key,
            created_ms=wall_ms(now, self.wall_offset_ms),
        )


__all__ = [
    "TRANSITIONS",
    "CombinerLost",
    "Evaluate",
    "FetchPartial",
    "Input",
    "PartialRejected",
    "PartialRejection",
    "PublishPlan",
    "PublishResult",
    "Reduce",
    "ReducerAction",
    "ReducerMachine",
    "ReducerStatistics",
    "SessionCompleted",
    "SessionFailed",
    "State",
    "describe_states",
    "describe_transitions",
]
