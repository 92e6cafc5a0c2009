"""Protocol layer: the membership view (``membership``) as data: the states a peer is in, the
inputs that move it, why a heartbeat is rejected, the events the view emits and the snapshots it
gives of its members and of itself. The view re-exports every name."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from fednode.wire import Heartbeat, PeerId, Role


class PeerState(enum.StrEnum):
    ABSENT = "absent"  #: not in the view: never seen, or forgotten (never in a PeerInfo)
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


class Input(enum.StrEnum):
    HEARTBEAT = "heartbeat"  #: a fresh heartbeat of the incarnation we know (or a first one)
    RESTART = "restart"  #: a fresh heartbeat of a newer incarnation
    TIMEOUT = "timeout"  #: the state's deadline passed
    DISCONNECT = "disconnect"  #: the last connection to the peer closed


class Rejection(enum.StrEnum):
    """Why a heartbeat was not accepted, in the order the checks run."""

    OTHER_FEDERATION = "other-federation"  #: not for our federation
    OWN = "own"  #: our own heartbeat, echoed back
    FROM_FUTURE = "from-future"  #: sent_ms later than our wall clock plus the allowed skew
    TOO_OLD = "too-old"  #: sent_ms earlier than our wall clock minus the allowed skew
    STALE = "stale"  #: (incarnation, seq) not newer than the last accepted: replay or reorder


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipEvent:
    """A peer changed state. ``at`` is when (a deadline for timeouts); ``cause`` the input."""

    peer: PeerId
    at: float
    cause: Input


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerJoined(MembershipEvent):
    """First heartbeat from a peer not in the view."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSuspected(MembershipEvent):
    """Missed heartbeats (``cause`` timeout) or a closed connection (``cause`` disconnect)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerDied(MembershipEvent):
    """A suspect peer stayed silent for ``dead_after_missed`` intervals."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRecovered(MembershipEvent):
    """A suspect or dead peer sent a fresh heartbeat."""

    @property
    def restarted(self) -> bool:
        """Whether it came back as a new incarnation (its in-memory state is gone)."""
        return self.cause is Input.RESTART


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRestarted(MembershipEvent):
    """An alive peer restarted fast enough not to be suspected: its in-memory state is gone."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerForgotten(MembershipEvent):
    """A dead peer left the view after ``forget_after`` seconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatRejected:
    """A heartbeat the view did not accept; the view is unchanged."""

    peer: PeerId
    at: float
    reason: Rejection


Event = MembershipEvent | HeartbeatRejected


# --- snapshots ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """One member as the view sees it at snapshot time.

    Attributes:
        peer: its peer ID.
        state: alive, suspect or dead.
        since: when it entered ``state``.
        heartbeat: the last heartbeat accepted from it (role, load, addresses, round).
        last_heartbeat_at: when that heartbeat was accepted.
        last_seen_at: latest evidence it was up: a heartbeat, a connection or an RTT sample.
        deadline: when it moves on (suspect, dead or forgotten) if nothing else happens.
        connected: whether we hold a connection to it.
        rtt: the last round-trip time recorded for it, seconds, or None.
    """

    peer: PeerId
    state: PeerState
    since: float
    heartbeat: Heartbeat
    last_heartbeat_at: float
    last_seen_at: float
    deadline: float
    connected: bool
    rtt: float | None

    @property
    def role(self) -> Role:
        return self.heartbeat.role

    @property
    def capacity(self) -> int:
        return self.heartbeat.capacity

    @property
    def attached(self) -> int:
        return self.heartbeat.attached

    @property
    def cpu(self) -> float:
        return self.heartbeat.cpu

    @property
    def memory(self) -> float:
        return self.heartbeat.memory

    @property
    def bandwidth(self) -> float:
        return self.heartbeat.bandwidth

    @property
    def region(self) -> str:
        return self.heartbeat.region


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipStatistics:
    """Counters since the view was created, and the current population."""

    accepted: int
    rejected: Mapping[Rejection, int]  #: every reason, zero if never seen
    joins: int
    suspicions: int
    deaths: int
    recoveries: int
    restarts: int
    forgotten: int
    alive: int
    suspect: int
    dead: int

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


__all__ = [
    "Event",
    "HeartbeatRejected",
    "Input",
    "MembershipEvent",
    "MembershipStatistics",
    "PeerDied",
    "PeerForgotten",
    "PeerInfo",
    "PeerJoined",
    "PeerRecovered",
    "PeerRestarted",
    "PeerState",
    "PeerSuspected",
    "Rejection",
]
