"""Protocol layer: reducer election and failover, as a sans-IO state machine.

Every reducer-eligible node (role ``reducer`` or ``auto``) runs a :class:`LeaderMachine` for the
session; any other node may run one with ``role`` ``client`` or ``combiner`` as a *keeper* that
never leads but tracks the newest checkpoint and corrects peers that lag (:class:`Announce`). The
driver feeds it verified session checkpoints (:func:`open_session_checkpoint`), the plans, results
and session ends it opens, its membership view (:func:`peers_seen`) and timer ticks, each with
``now``; the machine answers with actions: :class:`TakeOver` (become the reducer),
:class:`StepDown`, :class:`Renew` (publish a fresh checkpoint: the lease), :class:`Suspend` and
:class:`Resume` (stop and restart closing rounds), :class:`Announce` (re-gossip the newest
checkpoint). Its transitions are :data:`TRANSITIONS`, drawn in ``protocols/rounds.md`` ("Reducer
election"), where the rules are argued; in short:

- a term has at most one reducer, terms only grow (a takeover claims the highest term seen + 1,
  or more when a standby ranked before it may have claimed unheard), and a message of a lower
  term than the highest seen is rejected;
- a successor takes over only after the old lease ended on its clock plus ``margin``, once the
  failure detector calls the old reducer dead (or it stayed silent a whole lease longer), and
  only the first of the alive eligible standbys by rank (explicit reducers first, then best
  score, then lowest peer ID); the next waits ``stagger`` more per rank;
- a reducer closes rounds, renews its lease and a candidate takes over only while it *sees* a
  strict majority of the checkpoint's ``members``: itself, and members ALIVE in its view; a new
  reducer closes rounds only ``detection`` seconds after taking over, or sooner once a majority
  of the members were heard from after it took over.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType

from fednode.errors import ConfigError
from fednode.protocol.leader_actions import (
    ELIGIBLE_ROLES,
    Announce,
    Input,
    LeaderAction,
    LeaderStatistics,
    PeerSeen,
    Rejected,
    Rejection,
    Renew,
    Resume,
    State,
    StepDown,
    Suspend,
    TakeOver,
)
from fednode.protocol.leader_view import ElectionView
from fednode.protocol.membership import PeerState
from fednode.protocol.rounds import (
    Table,
    describe_diagram,
    describe_table,
    emits,
    local_time,
    maybe,
    peer_of,
    step,
    wall_ms,
)
from fednode.wire import (
    FederationId,
    PeerId,
    PublicKey,
    Role,
    RoundPlan,
    RoundResult,
    SessionCheckpoint,
    SessionEnded,
    SessionId,
    is_federation_id,
)
from fednode.wire.rounds import MAX_LEASE_MS

_S, _I = State, Input
_LEADER_STATES = (State.LEADING, State.STALLED, State.RESUMING)

#: (state, input) -> (next state, actions). Drawn in ``protocols/rounds.md``.
TRANSITIONS: Table = MappingProxyType(
    {
        (_S.WAITING, _I.START): (_S.WAITING, emits()),
        (_S.WAITING, _I.START_EXPLICIT): (_S.LEADING, emits(TakeOver)),
        (_S.WAITING, _I.ELECTED): (_S.LEADING, emits(TakeOver)),
        (_S.WAITING, _I.NEWER): (_S.FOLLOWING, emits()),
        (_S.WAITING, _I.STALE): (_S.WAITING, emits()),
        (_S.WAITING, _I.ENDED): (_S.ENDED, emits()),
        (_S.FOLLOWING, _I.NEWER): (_S.FOLLOWING, emits()),
        (_S.FOLLOWING, _I.LEASE_EXPIRED): (_S.CANDIDATE, emits(Announce)),
        (_S.FOLLOWING, _I.STALE): (_S.FOLLOWING, emits(maybe(Announce))),
        (_S.FOLLOWING, _I.ENDED): (_S.ENDED, emits()),
        (_S.CANDIDATE, _I.NEWER): (_S.FOLLOWING, emits()),
        (_S.CANDIDATE, _I.CLAIM): (_S.LEADING, emits(TakeOver)),
        (_S.CANDIDATE, _I.ABORT): (_S.FOLLOWING, emits()),
        (_S.CANDIDATE, _I.STALE): (_S.CANDIDATE, emits(maybe(Announce))),
        (_S.CANDIDATE, _I.ENDED): (_S.ENDED, emits()),
        (_S.LEADING, _I.OWN): (_S.LEADING, emits()),
        (_S.LEADING, _I.RENEW): (_S.LEADING, emits(Renew)),
        (_S.LEADING, _I.QUORUM_LOST): (_S.STALLED, emits(Suspend)),
        (_S.LEADING, _I.LEASE_LAPSED): (_S.FOLLOWING, emits(StepDown)),
        (_S.LEADING, _I.SUPERSEDED): (_S.FOLLOWING, emits(StepDown)),
        (_S.LEADING, _I.STALE): (_S.LEADING, emits(maybe(Announce))),
        (_S.LEADING, _I.ENDED): (_S.ENDED, emits()),
        (_S.STALLED, _I.OWN): (_S.STALLED, emits()),
        (_S.STALLED, _I.QUORUM_REGAINED): (_S.RESUMING, emits(Renew)),
        (_S.STALLED, _I.LEASE_LAPSED): (_S.FOLLOWING, emits(StepDown)),
        (_S.STALLED, _I.SUPERSEDED): (_S.FOLLOWING, emits(StepDown)),
        (_S.STALLED, _I.STALE): (_S.STALLED, emits(maybe(Announce))),
        (_S.STALLED, _I.ENDED): (_S.ENDED, emits()),
        (_S.RESUMING, _I.OWN): (_S.RESUMING, emits()),
        (_S.RESUMING, _I.RESUMED): (_S.LEADING, emits(Resume)),
        (_S.RESUMING, _I.QUORUM_LOST): (_S.STALLED, emits()),
        (_S.RESUMING, _I.LEASE_LAPSED): (_S.FOLLOWING, emits(StepDown)),
        (_S.RESUMING, _I.SUPERSEDED): (_S.FOLLOWING, emits(StepDown)),
        (_S.RESUMING, _I.STALE): (_S.RESUMING, emits(maybe(Announce))),
        (_S.RESUMING, _I.ENDED): (_S.ENDED, emits()),
    }
)


def describe_transitions() -> str:
    """:data:`TRANSITIONS` as the Markdown table in ``protocols/rounds.md``."""
    return describe_table(TRANSITIONS)


def describe_states() -> str:
    """:data:`TRANSITIONS` as the Mermaid state diagram in ``protocols/rounds.md``."""
    return describe_diagram(TRANSITIONS, State.WAITING)


class LeaderMachine:
    """One node's part in electing the session's reducer.

    Args:
        peer, public_key: who we are (checkpoints and plans name reducers by key).
        federation: our federation. session: the session, or None to follow the first seen.
        role: ``reducer`` (explicit: leads the initial election at once), ``auto`` (leads it
            after ``grace`` if best-ranked and no explicit reducer is around), anything else: a
            keeper that never leads.
        lease: the lease we grant ourselves when we lead, seconds (``lease_ms`` of our
            checkpoints); we renew it every ``lease / 3``.
        margin: how long after another reducer's lease ends on our clock (and it failed) we
            wait before announcing a takeover: clock-rate drift and scheduling.
        stagger: the extra wait per standby ranked before us; must exceed ``settle`` plus a
            gossip delivery.
        settle: how long a candidate (or a reducer resuming) waits after announcing itself for
            a correction to arrive; must exceed a gossip round trip.
        grace: how long after :meth:`start` an ``auto`` node waits before an initial election.
        detection: how long the failure detector may take to stop calling a lost peer alive
            (its suspicion timeout): a new reducer closes rounds only that long after taking
            over, once its view can no longer count a majority it just lost.
        max_clock_skew_ms: a checkpoint created further in our future than this is rejected.
        wall_offset_ms: the driver's wall clock minus ``now``, in ms (``rounds`` module).
        score: our own score, as peers compute it from our heartbeats.
    """

    def __init__(
        self,
        *,
        peer: PeerId,
        public_key: PublicKey,
        federation: str,
        session: str | None = None,
        role: Role = "auto",
        lease: float = 15.0,
        margin: float = 2.0,
        stagger: float = 5.0,
        settle: float = 1.0,
        grace: float = 10.0,
        detection: float = 3.0,
        max_clock_skew_ms: int = 30_000,
        wall_offset_ms: float = 0.0,
        score: float = 0.0,
    ) -> None:
        if not is_federation_id(federation):
            raise ConfigError(f"invalid federation ID {federation!r}")
        if peer_of(public_key) != peer:
            raise ConfigError("public_key is not the key of peer")
        if not 0 < lease * 1000 <= MAX_LEASE_MS:
            raise ConfigError(f"lease must be within 0..{MAX_LEASE_MS / 1000:g} s")
        if not (settle > 0 and stagger > settle and min(margin, grace, detection) >= 0):
            raise ConfigError("need settle > 0, stagger > settle; margin, grace, detection >= 0")
        if max_clock_skew_ms < 0:
            raise ConfigError("max_clock_skew_ms must be non-negative")
        self.peer, self.public_key = peer, public_key
        self.federation = FederationId(federation)
        self.session = None if session is None else SessionId(session)
        self.role: Role = role
        self.lease, self.margin, self.stagger = lease, margin, stagger
        self.settle, self.grace, self.detection = settle, grace, detection
        self.max_clock_skew_ms = max_clock_skew_ms
        self.wall_offset_ms = wall_offset_ms
        self.score = score
        self._state = State.WAITING
        self._now = float("-inf")  # the latest ``now`` seen: deadlines before it are not due
        self._checkpoint: SessionCheckpoint | None = None  # the newest accepted
        self._highest = 0  # the highest term seen
        self._holder: PublicKey | None = None  # that term's reducer, if known
        self._lease_end = float("-inf")  # when the holder's lease ends on our clock
        self._lease_s = lease  # the holder's lease length, seconds
        self._term = 0  # the term we lead (LEADING, STALLED, RESUMING)
        self._own_lease_end = float("-inf")
        self._closing_from = float("inf")  # a new reducer's first closing time
        self._led_since = float("inf")  # when we took our term
        self._renew_at = self._claim_at = self._resume_at = float("inf")
        self._grace_end: float | None = None
        self._announced_at = float("-inf")
        self._view = ElectionView(peer)
        self._rejected = dict.fromkeys(Rejection, 0)

    @property
    def state(self) -> State:
        return self._state

    @property
    def term(self) -> int:
        """The highest term seen; ours while we lead."""
        return self._highest

    @property
    def checkpoint(self) -> SessionCheckpoint | None:
        """The newest checkpoint accepted: what a successor would resume from."""
        return self._checkpoint

    @property
    def lease_ms(self) -> int:
        """The ``lease_ms`` our checkpoints carry."""
        return round(self.lease * 1000)

    @property
    def closing_from(self) -> float:
        """When a new reducer's probation ends (``detection`` after taking over); +inf when
        we do not lead."""
        return self._closing_from if self._state in _LEADER_STATES else float("inf")

    @property
    def eligible(self) -> bool:
        return self.role in ELIGIBLE_ROLES

    # --- inputs ---

    def start(self, now: float) -> list[LeaderAction]:
        """The driver starts the session: an explicit reducer leads term 1 (or the highest term
        seen + 1) at once; an ``auto`` node starts its grace period. Feed what was persisted
        (the newest checkpoint) first: a node that knows a reducer is a standby, and this does
        nothing."""
        self._now = max(self._now, now)
        if self._state is not State.WAITING or self._grace_end is not None:
            return []
        if self.role == "reducer":
            return self._take_over(now, Input.START_EXPLICIT, self._highest + 1)
        self._grace_end = now + self.grace
        return self._go(Input.START, []) + self._evaluate(now)

    def on_checkpoint(self, checkpoint: SessionCheckpoint, now: float) -> list[LeaderAction]:
        """Take a checkpoint whose envelope the driver opened (``open_session_checkpoint``):
        from the network, from disk after a restart, or our own once published."""
        self._now = max(self._now, now)
        reason = self._check_session(checkpoint.federation, checkpoint.session)
        if reason is None and checkpoint.created_ms > self._wall(now) + self.max_clock_skew_ms:
            reason = Rejection.FROM_FUTURE
        if reason is None:
            reason = self._check_term(checkpoint.term, checkpoint.reducer)
        current = self._checkpoint
        same_holder = (
            current is not None
            and current.term == checkpoint.term
            and current.reducer == checkpoint.reducer
        )
        if reason is None and same_holder and current is not None:
            if checkpoint == current:
                reason = Rejection.DUPLICATE
            elif _age(checkpoint) <= _age(current):
                reason = Rejection.STALE
        if reason is not None:
            return self._reject(checkpoint.term, reason, now)
        own = (
            self._state in _LEADER_STATES
            and checkpoint.reducer == self.public_key
            and checkpoint.term == self._term
        )
        self._checkpoint = checkpoint
        self.session = checkpoint.session
        self._accept_term(checkpoint.term, checkpoint.reducer, now)
        self._lease_s = checkpoint.lease_ms / 1000
        created = local_time(checkpoint.created_ms, self.wall_offset_ms)
        if own:
            # Our lease runs from when we made the checkpoint, never from when it came back.
            self._lease_end = self._own_lease_end = created + self._lease_s
            self._renew_at = created + self._lease_s / 3
            return self._go(Input.OWN, []) + self._evaluate(now)
        # Another's lease runs from when we received it, or later if its clock is ahead.
        lease_end = max(now, created) + self._lease_s
        self._lease_end = max(self._lease_end, lease_end) if same_holder else lease_end
        return self._newer(now)

    def on_round_message(self, message: RoundPlan | RoundResult, now: float) -> list[LeaderAction]:
        """The term and reducer of a verified plan or result. Returns a :class:`Rejected` (and
        perhaps an :class:`Announce`) when it is of a lower term than the highest seen; a
        higher term makes a leader step down and holds off takeovers for a lease."""
        self._now = max(self._now, now)
        term, reducer = message.term, message.reducer
        reason = self._check_session(message.federation, message.session)
        if reason is None:
            reason = self._check_term(term, reducer)
        if reason is not None:
            return self._reject(term, reason, now)
        if term == self._highest and reducer == self._holder:
            return []
        self._accept_term(term, reducer, now)
        if self._checkpoint is None or term > self._checkpoint.term:
            # A reducer whose checkpoint we have not seen is alive: give it a lease.
            self._lease_end = max(self._lease_end, now + self._lease_s)
        return self._newer(now)

    def on_session_ended(self, ended: SessionEnded, now: float) -> list[LeaderAction]:
        """A verified session end (ours too): no more elections for this session."""
        self._now = max(self._now, now)
        reason = self._check_session(ended.federation, ended.session)
        if reason is None:
            reason = self._check_term(ended.term, ended.reducer)
        if reason is not None:
            return self._reject(ended.term, reason, now)
        return self._go(Input.ENDED, [])

    def on_view(
        self, peers: Iterable[PeerSeen], now: float, *, score: float | None = None
    ) -> list[LeaderAction]:
        """The membership view changed: every peer it holds, with its state (``peers_seen``)."""
        self._now = max(self._now, now)
        self._view.update(peers, now)
        if score is not None:
            self.score = score
        return self._evaluate(now)

    def on_timer(self, now: float) -> list[LeaderAction]:
        """Act on whatever came due by ``now``."""
        self._now = max(self._now, now)
        return self._evaluate(now)

    def next_deadline(self) -> float | None:
        """When the driver must next call :meth:`on_timer`, or None."""
        due: list[float] = []
        if self._state is State.WAITING and self._grace_end is not None and self.eligible:
            due.append(self._grace_end + self._initial_rank() * self.stagger)
        elif self._state is State.FOLLOWING:
            at = self._takeover_at()
            due += [] if at is None else [at]
        elif self._state is State.CANDIDATE:
            due.append(self._claim_at)
        elif self._state is State.LEADING:
            due += [self._renew_at, self._own_lease_end]
        elif self._state is State.RESUMING:
            due += [self._resume_at, self._own_lease_end]
        elif self._state is State.STALLED:
            due.append(self._own_lease_end)
        future = [t for t in due if t > self._now]
        return min(future) if future else None

    # --- queries ---

    def closing_allowed(self, now: float) -> bool:
        """Whether we may close a round now: we lead, past our probation, our lease runs and we
        see a majority. The probation after a takeover ends ``detection`` later, or as soon as a
        majority of the members gave fresh evidence they are up (the view's ``heard``, after
        the takeover): a partition that cut us off before we took over keeps that majority
        silent, so the view needs no time to catch up."""
        return (
            self._state is State.LEADING
            and now < self._own_lease_end
            and (self._closing_from <= now or self._heard_since(self._led_since))
            and self._quorum()
        )

    def quorum(self) -> bool:
        """Whether we see a strict majority of the newest checkpoint's members: ourselves and
        the members ALIVE in our view (suspect ones do not count). True with no checkpoint."""
        return self._quorum()

    def statistics(self) -> LeaderStatistics:
        checkpoint = self._checkpoint
        members = () if checkpoint is None else checkpoint.members
        return LeaderStatistics(
            state=self._state,
            term=self._highest,
            reducer=self._holder_peer(),
            round=None if checkpoint is None else checkpoint.round,
            lease_end=None if self._holder is None else self._lease_end,
            members=len(members),
            seen=sum(1 for m in members if self._view.sees(m)),
            quorum=self._quorum(),
            rank=self._rank() if self.eligible else None,
            rejected=MappingProxyType(dict(self._rejected)),
        )

    # --- internals: messages ---

    def _go(self, inp: Input, actions: list[LeaderAction]) -> list[LeaderAction]:
        self._state = step(TRANSITIONS, "leader", self._state, inp, actions)
        return actions

    def _wall(self, now: float) -> int:
        return wall_ms(now, self.wall_offset_ms)

    def _check_session(self, federation: str, session: str) -> Rejection | None:
        if federation != self.federation or (self.session is not None and session != self.session):
            return Rejection.OTHER_SESSION
        if self._state is State.ENDED:
            return Rejection.ENDED
        return None

    def _check_term(self, term: int, reducer: PublicKey) -> Rejection | None:
        if term < self._highest:
            return Rejection.STALE_TERM
        if term == self._highest and self._holder is not None and reducer != self._holder:
            # Two reducers claim one term (views disagreed): the smaller key keeps it.
            if not reducer < self._holder:
                return Rejection.RIVAL
        return None

    def _accept_term(self, term: int, reducer: PublicKey, now: float) -> None:
        self._highest, self._holder = term, reducer
        holder = peer_of(reducer)
        if holder != self.peer and not self._view.standing(holder):
            self._view.down_since.setdefault(holder, now)

    def _reject(self, term: int, reason: Rejection, now: float) -> list[LeaderAction]:
        self._rejected[reason] += 1
        rejected: list[LeaderAction] = [Rejected(term=term, reason=reason)]
        lagging = reason in (Rejection.STALE_TERM, Rejection.RIVAL, Rejection.STALE)
        if not lagging or self._state is State.ENDED:
            return rejected
        announce: list[LeaderAction] = []
        if self._checkpoint is not None and now >= self._announced_at + self.settle:
            # The sender lags: tell it (once per settle period) what we know.
            self._announced_at = now
            announce.append(Announce(checkpoint=self._checkpoint))
        return rejected + self._go(Input.STALE, announce)

    def _newer(self, now: float) -> list[LeaderAction]:
        if self._state in _LEADER_STATES:
            if self._holder == self.public_key and self._highest == self._term:
                return []
            return self._step_down(Input.SUPERSEDED) + self._evaluate(now)
        if self._state is State.ENDED:
            return []
        return self._go(Input.NEWER, []) + self._evaluate(now)

    def _step_down(self, inp: Input) -> list[LeaderAction]:
        term, self._term = self._term, 0
        return self._go(inp, [StepDown(term=term)])

    def _take_over(self, now: float, inp: Input, term: int) -> list[LeaderAction]:
        self._term = term
        self._accept_term(term, self.public_key, now)
        self._own_lease_end = self._lease_end = now + self.lease
        self._renew_at = now + self.lease / 3
        self._closing_from = now + self.detection
        self._led_since = now
        return self._go(inp, [TakeOver(term=term, checkpoint=self._checkpoint)])

    # --- internals: time ---

    def _evaluate(self, now: float) -> list[LeaderAction]:
        actions: list[LeaderAction] = []
        for _ in range(4):  # a few transitions may cascade at one instant
            more = self._due(now)
            if not more:
                break
            actions += more
        return actions

    def _due(self, now: float) -> list[LeaderAction]:
        state = self._state
        if state is State.WAITING and self._elected(now):
            return self._take_over(now, Input.ELECTED, self._highest + 1)
        checkpoint = self._checkpoint
        if state is State.FOLLOWING and checkpoint is not None and self._may_take_over(now):
            self._claim_at = now + self.settle
            self._announced_at = now
            return self._go(Input.LEASE_EXPIRED, [Announce(checkpoint=checkpoint)])
        if state is State.CANDIDATE:
            if not self._may_take_over(now):
                return self._go(Input.ABORT, [])
            if now >= self._claim_at:
                return self._take_over(now, Input.CLAIM, self._claim_term())
        if state in _LEADER_STATES and now >= self._own_lease_end:
            return self._step_down(Input.LEASE_LAPSED)
        if state in (State.LEADING, State.RESUMING) and not self._quorum():
            suspend = [Suspend(term=self._term)] if state is State.LEADING else []
            return self._go(Input.QUORUM_LOST, list(suspend))
        if state is State.LEADING and now >= self._renew_at:
            self._renew_at = now + self.lease / 3  # until the renewal comes back
            return self._go(Input.RENEW, [Renew(term=self._term)])
        if state is State.STALLED and self._quorum():
            self._resume_at = now + self.settle
            self._renew_at = now + self.lease / 3
            return self._go(Input.QUORUM_REGAINED, [Renew(term=self._term)])
        if state is State.RESUMING and now >= self._resume_at:
            return self._go(Input.RESUMED, [Resume(term=self._term)])
        return []

    # --- internals: the view ---

    def _quorum(self) -> bool:
        return self._checkpoint is None or self._view.majority(self._checkpoint.members)

    def _heard_since(self, since: float) -> bool:
        """Whether a strict majority of the newest checkpoint's members (we count) were heard
        from after ``since``, and are seen now."""
        checkpoint = self._checkpoint
        return checkpoint is not None and self._view.heard_since(checkpoint.members, since)

    def _me(self) -> PeerSeen:
        return PeerSeen(peer=self.peer, state=PeerState.ALIVE, role=self.role, score=self.score)

    def _holder_peer(self) -> PeerId | None:
        return None if self._holder is None else peer_of(self._holder)

    def _rank(self) -> int:
        """Our place among the standbys, the lease holder left out (:meth:`ElectionView.rank`)."""
        return self._view.rank(self._me(), self._holder_peer())

    def _initial_rank(self) -> int:
        return self._view.initial_rank(self._me())

    def _elected(self, now: float) -> bool:
        if self.role != "auto" or self._grace_end is None or self._highest > 0:
            return False
        if self._view.explicit_reducer():
            return False  # an explicit reducer is around: it starts the session
        return now >= self._grace_end + self._initial_rank() * self.stagger

    def _failed_at(self) -> float:
        """When the lease holder counts as failed: when the failure detector called it dead;
        while it is alive (or it is us, stepped down), a whole lease after its lease ended."""
        holder = self._holder_peer()
        if holder is not None and holder != self.peer and not self._view.standing(holder):
            return self._view.down_since.get(holder, self._now)
        return self._lease_end + self._lease_s

    def _base(self) -> float:
        """When the takeover race starts: the lease ended and the holder failed."""
        return max(self._lease_end, self._failed_at())

    def _takeover_at(self) -> float | None:
        """When we may announce a takeover: ``margin`` after the race starts, plus ``stagger``
        per standby ranked before us."""
        if not self.eligible or self._checkpoint is None or self._holder is None:
            return None
        return self._base() + self.margin + self._rank() * self.stagger

    def _may_take_over(self, now: float) -> bool:
        at = self._takeover_at()
        return at is not None and now >= at and self._quorum()

    def _claim_term(self) -> int:
        """The highest term seen + 1, + 1 more for every standby ranked before us that was still
        standing once the lease ended (less ``margin``, for delivery): it may have claimed a term
        we never heard of. (Not from the race's start: a holder that comes back moves the race
        later, after a rival cut off by a partition may have claimed already.)"""
        holder = self._holder_peer()
        since = min(self._base(), self._lease_end - self.margin)
        return self._highest + 1 + self._view.ahead(self._me(), holder, since)


def _age(checkpoint: SessionCheckpoint) -> tuple[int, int]:
    return checkpoint.round, checkpoint.created_ms


__all__ = [
    "TRANSITIONS",
    "LeaderMachine",
    "describe_states",
    "describe_transitions",
]
