"""Protocol layer: the reducer election's vocabulary, shared by :mod:`fednode.protocol.leader`
and its drivers: the states and inputs of the :class:`~fednode.protocol.leader.LeaderMachine`,
the actions it emits, the view of the membership it ranks standbys and counts the quorum from,
and the helpers a reducer builds its checkpoints with. Sans-IO: no trio, no libp2p, no clock
reads.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fednode.crypto import open_envelope
from fednode.protocol.membership import MembershipView, PeerInfo, PeerState
from fednode.wire import Envelope, Heartbeat, PeerId, Role, SessionCheckpoint
from fednode.wire.rounds import MAX_MEMBERS

#: The roles that may become reducer: ``reducer`` (explicit) and ``auto``.
ELIGIBLE_ROLES: frozenset[Role] = frozenset({"reducer", "auto"})


class State(enum.StrEnum):
    WAITING = "waiting"  #: no reducer known yet: the initial election is pending
    FOLLOWING = "following"  #: another reducer holds the session (or held it: its lease may end)
    CANDIDATE = "candidate"  #: the lease ended and we are next: announced, taking over soon
    LEADING = "leading"  #: we are the reducer and may close rounds
    STALLED = "stalled"  #: we are the reducer but see no majority: no closing, no renewal
    RESUMING = "resuming"  #: a majority is back: renewed, waiting ``settle`` for corrections
    ENDED = "ended"  #: the session ended


class Input(enum.StrEnum):
    START = "start"  #: :meth:`LeaderMachine.start` on an ``auto`` node or a keeper
    START_EXPLICIT = "start-explicit"  #: :meth:`LeaderMachine.start` on a ``--role reducer`` node
    ELECTED = "elected"  #: the start-up grace passed and we rank first among the auto nodes
    NEWER = "newer"  #: a newer checkpoint, or a message of a higher term, from another reducer
    OWN = "own"  #: our own checkpoint, fed back once published
    SUPERSEDED = "superseded"  #: while we lead: a higher term, or a rival that wins our term
    LEASE_EXPIRED = "lease-expired"  #: the lease ended, the reducer failed, we are next, quorum
    CLAIM = "claim"  #: ``settle`` after announcing, still next: take over
    ABORT = "abort"  #: no longer next (quorum lost, the reducer came back, a better standby)
    RENEW = "renew"  #: a third of our lease since the last renewal
    QUORUM_LOST = "quorum-lost"  #: we lead and see no majority of the members any more
    QUORUM_REGAINED = "quorum-regained"  #: ... see a majority again, our lease still running
    RESUMED = "resumed"  #: ``settle`` after renewing, no correction came: close rounds again
    LEASE_LAPSED = "lease-lapsed"  #: our own lease ran out without a renewal
    STALE = "stale"  #: a message of an older term or an older checkpoint (rejected)
    ENDED = "ended"  #: the session ended


class Rejection(enum.StrEnum):
    """Why a checkpoint, or the term of a plan, result or session end, was not accepted."""

    OTHER_SESSION = "other-session"  #: another federation or session
    ENDED = "ended"  #: the session already ended
    FROM_FUTURE = "from-future"  #: ``created_ms`` beyond our wall clock plus the allowed skew
    STALE_TERM = "stale-term"  #: a lower term than the highest seen
    RIVAL = "rival"  #: the term's reducer is another, which wins the tie (smaller key)
    STALE = "stale"  #: the same reducer and term, but an older checkpoint
    DUPLICATE = "duplicate"  #: the newest checkpoint, delivered again


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TakeOver:
    """Become the reducer at ``term``. Publish at once a checkpoint of ``term`` carrying the state
    of ``checkpoint`` (its round, model, optimiser state; the initial model when None) and feed
    it back (:meth:`LeaderMachine.on_checkpoint`); then run a ``ReducerMachine(term=term,
    first_round=checkpoint.round + 1, initial_model=checkpoint.model, ...)`` with the optimiser
    state loaded, fetching the blobs from ``checkpoint.holders`` (or any peer). Close rounds
    only while :meth:`LeaderMachine.closing_allowed`: from ``detection`` seconds on."""

    term: int
    checkpoint: SessionCheckpoint | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepDown:
    """Stop leading ``term`` at once: publish nothing more for it, stop the ``ReducerMachine``."""

    term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Renew:
    """Publish a fresh checkpoint of ``term`` (the current state, ``created_ms`` now,
    ``lease_ms`` = :attr:`LeaderMachine.lease_ms`) and feed it back: it renews the lease."""

    term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspend:
    """Stop closing rounds (no majority seen); keep collecting. :class:`Resume` undoes it."""

    term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    """Closing rounds is allowed again."""

    term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Announce:
    """Re-gossip ``checkpoint`` exactly as received (its original sealed envelope, not
    re-signed), so peers that lag learn it."""

    checkpoint: SessionCheckpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A checkpoint or a term was not accepted; the machine is unchanged."""

    term: int
    reason: Rejection


LeaderAction = TakeOver | StepDown | Renew | Suspend | Resume | Announce | Rejected


# --- the view -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSeen:
    """One peer of the membership view, as the election needs it."""

    peer: PeerId
    state: PeerState
    role: Role  #: the role it last announced: ``reducer`` and ``auto`` are eligible
    score: float = 0.0  #: higher ranks first among eligible peers of the same kind
    heard: float | None = None  #: when the latest evidence it is up arrived (None: unknown)

    @property
    def eligible(self) -> bool:
        return self.role in ELIGIBLE_ROLES

    @property
    def standing(self) -> bool:
        """Whether it may still be acting: alive or suspect, not yet called dead."""
        return self.state in (PeerState.ALIVE, PeerState.SUSPECT)


def rank_key(peer: PeerSeen) -> tuple[bool, float, str]:
    """The order standbys take over in: explicit reducers first, then the best score, then the
    lowest peer ID."""
    return peer.role != "reducer", -peer.score, peer.peer


def reducer_score(heartbeat: Heartbeat) -> float:
    """The default score of a reducer candidate: idle CPU times free memory, in tenths, so that
    load jitter between heartbeats does not reorder the ranking."""
    return round((1.0 - heartbeat.cpu) * (1.0 - heartbeat.memory), 1)


def peers_seen(
    view: MembershipView, score: Callable[[Heartbeat], float] = reducer_score
) -> list[PeerSeen]:
    """Every member of ``view`` as :meth:`LeaderMachine.on_view` takes them."""

    def seen(info: PeerInfo) -> PeerSeen:
        return PeerSeen(
            peer=info.peer,
            state=info.state,
            role=info.role,
            score=score(info.heartbeat),
            heard=info.last_seen_at,
        )

    return [seen(info) for info in view.members()]


def choose_members(*groups: Iterable[PeerId], limit: int = MAX_MEMBERS) -> tuple[PeerId, ...]:
    """The quorum a reducer names in its checkpoint: ``groups`` in priority order (by convention
    the reducer and the eligible standbys, then the combiners, then the clients), each in
    peer-ID order, up to ``limit`` peers; sorted."""
    chosen: dict[PeerId, None] = {}
    for group in groups:
        for peer in sorted(set(group)):
            if len(chosen) >= limit:
                return tuple(sorted(chosen))
            chosen.setdefault(peer)
    return tuple(sorted(chosen))


def open_session_checkpoint(data: bytes | Envelope) -> SessionCheckpoint:
    """Verify and decode a sealed checkpoint; its ``reducer`` must be its signer.

    Raises:
        WireError: malformed. BadSignatureError: the signature or the author does not check out.
    """
    checkpoint, _ = open_envelope(data, SessionCheckpoint)
    return checkpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaderStatistics:
    """A snapshot of the election as one node sees it."""

    state: State
    term: int  #: the highest term seen (ours, when leading)
    reducer: PeerId | None  #: the reducer of that term, if known
    round: int | None  #: the newest checkpoint's round
    lease_end: float | None  #: when the reducer's lease ends on our clock
    members: int  #: the newest checkpoint's members
    seen: int  #: how many of them we see (ourselves included)
    quorum: bool
    rank: int | None  #: our place among the standbys (0: next), None if not eligible
    rejected: Mapping[Rejection, int]


__all__ = [
    "ELIGIBLE_ROLES",
    "Announce",
    "Input",
    "LeaderAction",
    "LeaderStatistics",
    "PeerSeen",
    "Rejected",
    "Rejection",
    "Renew",
    "Resume",
    "State",
    "StepDown",
    "Suspend",
    "TakeOver",
    "choose_members",
    "open_session_checkpoint",
    "peers_seen",
    "rank_key",
    "reducer_score",
]
