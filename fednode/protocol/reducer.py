"""Protocol layer: the reducer's side of a round, as a sans-IO state machine.

The :class:`ReducerMachine` plans each round, checks the partial aggregates the combiners push
(the tally of an attempt is :mod:`fednode.protocol.partials`), closes the round, asks the driver
to reduce the partials (numpy FedAvg and the server optimiser live in ``fednode.aggregation``,
the blobs in the driver's store), and announces the result. The driver feeds it verified
messages, peer changes and timer ticks with ``now``; it returns actions (:data:`ReducerAction`).
Its transitions are :data:`TRANSITIONS`, drawn in ``protocols/rounds.md``.

A round closes as soon as every assigned combiner's partial is in and they cover at least
``min_clients`` clients, or else at its deadline if they cover ``min_clients``. A round that falls
short at its deadline is planned again (the same round, ``amendment`` + 1, a fresh assignment from
the peers known then and a new deadline), at most ``config.max_retries`` times; then the session
fails, saying why.

Healing (``protocols/rounds.md``, Healing). An assigned combiner that dies before a partial counts
all its clients leaves orphans: an amended plan (``amendment`` + 1, same round and parent) moves
them to the combiners with room, what was counted staying counted, the deadline kept unless less
than :data:`ORPHAN_GRACE` of a round is left; orphans with nowhere to go wait for room
(:meth:`ReducerMachine.on_peers`), the round closing only at its deadline meanwhile. A plan,
result or session end of this session from a higher reducer term makes the machine step down
(:class:`SteppedDown`); one from a lower term is ``stale-term``. A reducer taking a session over
is built with its ``term``, ``first_round`` and the last result's model as ``initial_model``.

A partial that breaks the plan is a :class:`PartialRejected`, never an exception; misuse by the
driver is a ``LocalProtocolError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from fednode.crypto import contributions_digest
from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol.election import DEFAULT_POLICY, Candidate, Policy
from fednode.protocol.partials import PartialRejection, Tally
from fednode.protocol.reducer_actions import (
    CombinerLost,
    Evaluate,
    FetchPartial,
    Input,
    PartialRejected,
    PublishPlan,
    PublishResult,
    Reduce,
    ReducerAction,
    ReducerStatistics,
    SessionCompleted,
    SessionFailed,
    State,
    SteppedDown,
)
from fednode.protocol.reducer_plans import ORPHAN_GRACE, Roster, amended_deadline
from fednode.protocol.rounds import (
    CombinerLoad,
    PlanRejected,
    PlanRejection,
    ResultRejected,
    ResultRejection,
    Table,
    describe_diagram,
    describe_table,
    emits,
    local_time,
    peer_of,
    step,
    wall_ms,
)
from fednode.wire import (
    Assignment,
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

_S, _I = State, Input
_RUNNING = (_S.IDLE, _S.COLLECTING, _S.REDUCING, _S.EVALUATING)

#: (state, input) -> (next state, actions). Drawn in ``protocols/rounds.md``.
TRANSITIONS: Table = MappingProxyType(
    {
        (_S.IDLE, _I.START): (_S.COLLECTING, emits(PublishPlan)),
        (_S.COLLECTING, _I.PARTIAL): (_S.COLLECTING, emits(FetchPartial)),
        (_S.COLLECTING, _I.LAST_PARTIAL): (_S.REDUCING, emits(FetchPartial, Reduce)),
        (_S.COLLECTING, _I.DEADLINE): (_S.REDUCING, emits(Reduce)),
        (_S.COLLECTING, _I.DEADLINE_SHORT): (_S.COLLECTING, emits(PublishPlan)),
        (_S.COLLECTING, _I.DEADLINE_FAILED): (_S.FAILED, emits(SessionFailed)),
        (_S.COLLECTING, _I.COMBINER_DEAD): (_S.COLLECTING, emits(CombinerLost, PublishPlan)),
        (_S.COLLECTING, _I.COMBINER_DEAD_STUCK): (_S.COLLECTING, emits(CombinerLost)),
        (_S.COLLECTING, _I.COMBINER_DEAD_LAST): (_S.REDUCING, emits(CombinerLost, Reduce)),
        (_S.COLLECTING, _I.ORPHANS_MOVED): (_S.COLLECTING, emits(PublishPlan)),
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
        **{(s, _I.SUPERSEDED): (_S.SUPERSEDED, emits(SteppedDown)) for s in _RUNNING},
    }
)


def describe_transitions() -> str:
    """:data:`TRANSITIONS` as the Markdown table in ``protocols/rounds.md``."""
    return describe_table(TRANSITIONS)


def describe_states() -> str:
    """:data:`TRANSITIONS` as the Mermaid state diagram in ``protocols/rounds.md``."""
    return describe_diagram(TRANSITIONS, State.IDLE)


class ReducerMachine:
    """Plans rounds, checks partials, closes rounds and announces results.

    Args:
        config: the session's settings.
        peer: our peer ID. public_key: our signing key's public half (plans name it).
        federation, session: what we run.
        initial_model, initial_size: the global model round ``first_round`` trains from.
        term: our reducer term (the election hands it out); plans and results name it.
        holders: peers besides us known to hold ``initial_model``.
        first_round: the round to start at: 1, or, taking a session over, the round after the
            last result's (with that result's model as ``initial_model``).
        wall_offset_ms: the driver's wall clock minus ``now``, in ms (``rounds`` module).
        election_policy: the tree election's thresholds (``election``).
        previous: taking a session over, the last plan heard from the predecessor: the first
            tree is elected with it as the previous tree (hysteresis), so a failover does not
            reshuffle the clients.
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
        election_policy: Policy = DEFAULT_POLICY,
        previous: RoundPlan | None = None,
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
        self.election_policy = election_policy
        self.wall_offset_ms = wall_offset_ms
        self._state = State.IDLE
        self._round = first_round
        self._amendment = -1
        self._retries = 0
        self._model, self._size = initial_model, initial_size
        self._holders = tuple(dict.fromkeys([peer, *holders]))[:MAX_HOLDERS]
        self._completed = first_round - 1  # rounds with a published result
        self._roster = Roster(peer)  # the eligible peers, and the orphans waiting for room
        self._plan: RoundPlan | None = None
        self._previous = previous  # a predecessor's last plan: the first tree stays near it
        self._deadline: float | None = None
        self._tally = Tally()
        self._successor: tuple[int, PublicKey] | None = None  # the higher term that took over
        self._reducing: tuple[PartialAggregate, ...] = ()
        self._new_model: tuple[Digest, int] | None = None
        self._metrics: dict[str, float] = {}
        self._rejected = dict.fromkeys(PartialRejection, 0)

    @property
    def state(self) -> State:
        return self._state

    @property
    def progress(self) -> tuple[int, Digest, int, tuple[PeerId, ...]]:
        """What a checkpoint carries: the last round with a result (``first_round`` - 1 before
        any), the global model after it, its size and the peers known to hold it."""
        return self._completed, self._model, self._size, self._holders

    @property
    def plan(self) -> RoundPlan | None:
        """The plan of the current attempt (None before :meth:`start`)."""
        return self._plan

    # --- inputs ---

    def start(
        self,
        now: float,
        clients: Iterable[PeerId] = (),
        combiners: Iterable[CombinerLoad] = (),
        *,
        candidates: Iterable[Candidate] | None = None,
    ) -> list[ReducerAction]:
        """Plan the first round among the eligible ``clients`` and ``combiners`` (or, given
        ``candidates``, as :meth:`on_candidates`). Nothing if a newer reducer took over
        meanwhile."""
        if self._state is State.SUPERSEDED:
            return []
        if self._state is not State.IDLE:
            raise LocalProtocolError(f"start() in state {self._state}")
        if candidates is not None:
            self.on_candidates(candidates)
        else:
            self.on_peers(clients, combiners)
        return self._go(Input.START, [self._new_plan(now)])

    def on_peers(
        self, clients: Iterable[PeerId], combiners: Iterable[CombinerLoad], now: float | None = None
    ) -> list[ReducerAction]:
        """The eligible peers changed (from membership). The next plan or re-plan uses them; the
        current plan stands, except that orphans waiting for a combiner move to one with room
        now (given ``now``; else at the next :meth:`on_timer`)."""
        self._roster.set_peers(clients, combiners)
        return [] if now is None else self._move_waiting(now)

    def on_candidates(
        self, candidates: Iterable[Candidate], now: float | None = None
    ) -> list[ReducerAction]:
        """The live members as the election sees them (:func:`~fednode.protocol.election.
        candidates_of`): like :meth:`on_peers`, but the next plan elects its combiners and
        places its clients by load (:func:`~fednode.protocol.election.build_tree`)."""
        self._roster.set_candidates(candidates)
        return [] if now is None else self._move_waiting(now)

    def on_peer_dead(self, peer: PeerId, now: float) -> list[ReducerAction]:
        """``peer`` died: no longer eligible. An assigned combiner whose clients no partial
        counts yet leaves orphans, moved by an amended plan (module docstring)."""
        self._roster.drop(peer)
        tally = self._tally
        if self._state is not State.COLLECTING or peer not in tally.assigned:
            return []
        if not tally.uncounted(peer):
            return []  # its partial counts every client it had: nothing changes
        orphans = tally.drop(peer)
        placed = self._roster.place(orphans, tally)
        lost = CombinerLost(
            round=self._round,
            combiner=peer,
            clients=tuple(sorted(orphans)),
            waiting=tuple(sorted(self._roster.waiting)),
        )
        if placed:
            return self._go(Input.COMBINER_DEAD, [lost, self._amend(now)])
        if self._closable():
            return self._go(Input.COMBINER_DEAD_LAST, [lost, self._close()])
        return self._go(Input.COMBINER_DEAD_STUCK, [lost])

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
        self._tally.accept(partial)
        combiner = peer_of(partial.combiner)
        fetch = FetchPartial(partial=partial.partial, size=partial.size, peer=combiner)
        if self._closable():
            return self._go(Input.LAST_PARTIAL, [fetch, self._close()])
        return self._go(Input.PARTIAL, [fetch])

    def on_timer(self, now: float) -> list[ReducerAction]:
        """Close the current attempt if its deadline passed; else move waiting orphans to a
        combiner with room, if one has appeared."""
        if self._state is not State.COLLECTING or self._deadline is None:
            return []
        if now < self._deadline:
            return self._move_waiting(now)
        if self._tally.covered >= self.config.min_clients:
            return self._go(Input.DEADLINE, [self._close()])
        return self._fall_short(now, Input.DEADLINE_SHORT, Input.DEADLINE_FAILED, "by the deadline")

    def next_deadline(self) -> float | None:
        """When the driver must next call :meth:`on_timer`, or None."""
        return self._deadline if self._state is State.COLLECTING else None

    def on_reduced(
        self, model: Digest, size: int, metrics: Mapping[str, float], now: float
    ) -> list[ReducerAction]:
        """The driver stored the reduced model ``model`` (``size`` bytes). ``metrics`` are the
        round's weighted training metrics. Ignored once superseded."""
        if self._state is State.SUPERSEDED:
            return []
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
        (``eval_loss`` beside ``loss``). Ignored once superseded."""
        if self._state is State.SUPERSEDED:
            return []
        if self._state is not State.EVALUATING:
            raise LocalProtocolError(f"on_evaluated() in state {self._state}")
        clash = sorted(set(metrics) & set(self._metrics))
        if clash:
            raise LocalProtocolError(f"evaluation metrics {clash} clash with training metrics")
        self._metrics.update({k: float(v) for k, v in metrics.items()})
        final = self._round >= self.config.rounds
        return self._finish(now, Input.EVALUATED_FINAL if final else Input.EVALUATED)

    def on_partials_missing(self, partials: Iterable[Digest], now: float) -> list[ReducerAction]:
        """The blobs of ``partials`` could not be fetched: reduce without them, or re-plan.
        Ignored once superseded."""
        if self._state is State.SUPERSEDED:
            return []
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

    def on_plan(self, plan: RoundPlan, now: float) -> list[ReducerAction]:
        """A plan another node published (the driver opened it). One of this session from a
        higher term makes us step down; one from a lower term is ``stale-term``."""
        reason = self._check_term(plan.federation, plan.session, plan.term, plan.reducer)
        if reason is not None:
            rejection = PlanRejection(reason.value)
            return [
                PlanRejected(
                    term=plan.term, round=plan.round, amendment=plan.amendment, reason=rejection
                )
            ]
        return self._supersede(plan.term, plan.reducer)

    def on_result(self, result: RoundResult, now: float) -> list[ReducerAction]:
        """A round result another node published: as :meth:`on_plan`."""
        reason = self._check_term(result.federation, result.session, result.term, result.reducer)
        if reason is not None:
            return [ResultRejected(round=result.round, reason=reason)]
        return self._supersede(result.term, result.reducer)

    def on_session_ended(self, ended: SessionEnded, now: float) -> list[ReducerAction]:
        """A session end another node published: as :meth:`on_plan`."""
        reason = self._check_term(ended.federation, ended.session, ended.term, ended.reducer)
        if reason is not None:
            return [ResultRejected(round=ended.rounds, reason=reason)]
        return self._supersede(ended.term, ended.reducer)

    def statistics(self) -> ReducerStatistics:
        return ReducerStatistics(
            state=self._state,
            term=self.term,
            round=self._round,
            amendment=self._amendment,
            retries=self._retries,
            deadline=self.next_deadline(),
            partials=len(self._tally.partials),
            covered=self._tally.covered,
            waiting=len(self._roster.waiting),
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
        return self._tally.check(partial)

    def _check_term(
        self, federation: str, session: str, term: int, reducer: PublicKey
    ) -> ResultRejection | None:
        """Whether another reducer's plan, result or session end is news: None for a newer term
        (or the one already stepped down for, or our own)."""
        if federation != self.federation or session != self.session:
            return ResultRejection.OTHER_SESSION
        newest, by = self._successor or (self.term, self.public_key)
        if term < newest:
            return ResultRejection.STALE_TERM
        if term == newest and reducer != by:
            return ResultRejection.WRONG_REDUCER
        return None

    def _supersede(self, term: int, reducer: PublicKey) -> list[ReducerAction]:
        if term <= (self._successor or (self.term, reducer))[0]:
            return []  # our own, or the takeover we already stepped down for
        self._successor = (term, reducer)
        if self._state not in _RUNNING:
            return []  # the session is over for us anyway
        self._deadline, self._roster.waiting = None, set()
        stepped = SteppedDown(round=self._round, term=self.term, by_term=term, by=reducer)
        return self._go(Input.SUPERSEDED, [stepped])

    def _closable(self) -> bool:
        tally, waiting = self._tally, self._roster.waiting
        return tally.complete and not waiting and tally.covered >= self.config.min_clients

    def _move_waiting(self, now: float) -> list[ReducerAction]:
        if self._state is not State.COLLECTING or not self._roster.waiting:
            return []
        if not self._roster.place_waiting(self._tally):
            return []
        return self._go(Input.ORPHANS_MOVED, [self._amend(now)])

    def _new_plan(self, now: float) -> PublishPlan:
        """A fresh attempt: a new assignment and deadline, nothing counted."""
        created = wall_ms(now, self.wall_offset_ms)
        assignments = self._roster.tree(self._plan or self._previous, self.election_policy)
        self._tally.reset(assignments)
        self._roster.waiting.clear()
        self._reducing = ()
        return self._publish(created, assignments, created + self.config.round_deadline_ms)

    def _amend(self, now: float) -> PublishPlan:
        """The attempt in force with its orphans moved: what was counted stays counted."""
        assert self._plan is not None
        created = wall_ms(now, self.wall_offset_ms)
        deadline = amended_deadline(self._plan, created, self.config.round_deadline_ms)
        return self._publish(created, self._tally.assignments(), deadline)

    def _publish(
        self, created: int, assignments: tuple[Assignment, ...], deadline_ms: int
    ) -> PublishPlan:
        self._amendment += 1
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
            deadline_ms=deadline_ms,
            config=self.config,
            reducer=self.public_key,
            created_ms=created,
        )
        self._plan = plan
        self._deadline = local_time(plan.deadline_ms, self.wall_offset_ms)
        return PublishPlan(plan=plan)

    def _close(self) -> Reduce:
        partials = self._tally.partials
        self._reducing = tuple(partials[c] for c in sorted(partials))
        return self._reduce()

    def _reduce(self) -> Reduce:
        return Reduce(round=self._round, parent=self._model, partials=self._reducing)

    def _fall_short(self, now: float, retry: Input, fail: Input, when: str) -> list[ReducerAction]:
        covered = (
            sum(len(p.contributions) for p in self._reducing)
            if self._state is State.REDUCING
            else self._tally.covered
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
            f"{len(self._roster.clients)} eligible client(s) and {len(self._roster.combiners)} "
            "combiner(s) known)"
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
    "ORPHAN_GRACE",
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
    "SteppedDown",
    "describe_states",
    "describe_transitions",
]
