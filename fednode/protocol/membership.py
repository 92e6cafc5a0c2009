"""Protocol layer: the membership view, a sans-IO failure detector fed by signed heartbeats.

A :class:`MembershipView` is a pure state machine: the driver feeds it verified heartbeats
(:func:`open_heartbeat`), connection events and timer ticks, each with the current time ``now``
(seconds on the driver's monotonic clock, e.g. ``trio.current_time()``), and gets events back.
It asks for its next tick with :meth:`MembershipView.next_deadline`. No trio, no libp2p, no clock
reads, no I/O.

Every peer is in one state (``absent`` means not in the view: never seen, or forgotten). Inputs
are a fresh heartbeat of the incarnation we know (``heartbeat``), a fresh heartbeat of a newer
incarnation (``restart``), the state's deadline passing (``timeout``) and the last connection to
the peer closing (``disconnect``). The transitions, as :data:`TRANSITIONS` holds them (a test
checks this table against it)::

    state    input       next     event
    -------  ----------  -------  -------------
    absent   heartbeat   alive    PeerJoined
    absent   disconnect  absent   -
    alive    heartbeat   alive    -
    alive    restart     alive    PeerRestarted
    alive    timeout     suspect  PeerSuspected
    alive    disconnect  suspect  PeerSuspected
    suspect  heartbeat   alive    PeerRecovered
    suspect  restart     alive    PeerRecovered
    suspect  timeout     dead     PeerDied
    suspect  disconnect  suspect  -
    dead     heartbeat   alive    PeerRecovered
    dead     restart     alive    PeerRecovered
    dead     timeout     absent   PeerForgotten
    dead     disconnect  dead     -

Deadlines, with ``I`` the peer's advertised ``interval_ms`` in seconds (clamped to
``[min_interval, max_interval]``) and ``c`` the :class:`DetectorConfig`:

- ``alive``: suspected at *last accepted heartbeat* + ``c.suspect_after_missed`` * I;
- ``suspect``: dead at *suspicion* + ``c.dead_after_missed`` * I, the suspicion counted from when
  the view applied it (see "Late ticks");
- ``dead``: forgotten at *death* + ``c.forget_after``.

Late ticks. A driver ticks at each deadline; a tick that comes late means our own process was
not running (a loaded machine starves it), and heartbeats sent meanwhile may be waiting in our
queues, unread. So silence we were not there to hear never kills: a tick applies each missed
deadline at its own time (the events say when), but a suspicion it applies counts its
``dead_after_missed`` intervals from the tick, not from the missed deadline, leaving the queued
heartbeats time to be read. Without this, one late tick took every peer from alive to dead at
once, and a reducer planning right then planned with nobody. A peer that is really gone is
declared dead at most ``dead_after_missed`` * I after we woke.

Detection time. A peer that crashes at time ``t`` sent its last heartbeat at most one period
before, which reached us after a delivery delay ``d``; so it is suspected no later than
``t + d + suspect_after_missed * I`` and declared dead no later than
``t + d + (suspect_after_missed + dead_after_missed) * I``. With the defaults and the default
1 s heartbeat: suspected within 3 s + d, dead within 5 s + d, forgotten 300 s after that. A closed
connection makes the peer suspect at once, and dead 2 s later unless a heartbeat arrives. A live
peer is falsely suspected only after 3 s without a heartbeat: two consecutive heartbeats lost,
plus jitter.

Ordering. Heartbeats are ordered by ``(incarnation, seq)``: a sender picks ``incarnation`` at
process start (its wall clock in ms) and counts ``seq`` from 0, so a heartbeat not greater than
the last one accepted is a replay or a reordering (rejected as ``stale``), while a restarted node
(newer incarnation, seq back at 0) is accepted and reported. If a node's clock went backwards
across a restart, its new heartbeats stay stale until the view forgets the old incarnation.

Rejections (:class:`Rejection`) are returned as :class:`HeartbeatRejected` events and counted in
:meth:`MembershipView.statistics`. The wall-clock checks (``from-future``, ``too-old``) run only
when the view is given ``wall_offset_ms``; then ``forget_after`` must exceed twice the allowed
skew, so a replayed heartbeat of a forgotten peer is always too old to rejoin it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fednode.crypto import open_envelope
from fednode.errors import ConfigError, LocalProtocolError
from fednode.protocol.membership_events import (
    Event,
    HeartbeatRejected,
    Input,
    MembershipEvent,
    MembershipStatistics,
    PeerDied,
    PeerForgotten,
    PeerInfo,
    PeerJoined,
    PeerRecovered,
    PeerRestarted,
    PeerState,
    PeerSuspected,
    Rejection,
)
from fednode.wire import Envelope, FederationId, Heartbeat, PeerId, is_federation_id

#: The heartbeat period fednode nodes use unless configured otherwise, in seconds.
DEFAULT_HEARTBEAT_INTERVAL = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorConfig:
    """Failure-detector timing. Multiples of "intervals" scale with each sender's heartbeat period.

    Attributes:
        suspect_after_missed: silence, in the peer's intervals, before an alive peer is suspect.
        dead_after_missed: further intervals before a suspect peer is dead.
        forget_after: seconds a dead peer stays in the view before it is forgotten.
        max_clock_skew_ms: how far ``sent_ms`` may be from our wall clock (if we know it).
        min_interval: the shortest advertised period honoured, seconds.
        max_interval: the longest advertised period honoured, seconds (a peer cannot buy itself
            an unbounded timeout).
    """

    suspect_after_missed: float = 3.0
    dead_after_missed: float = 2.0
    forget_after: float = 300.0
    max_clock_skew_ms: int = 30_000
    min_interval: float = 0.1
    max_interval: float = 60.0

    def __post_init__(self) -> None:
        if not self.suspect_after_missed > 1.0:
            raise ConfigError("suspect_after_missed must exceed one interval")
        if not self.dead_after_missed >= 0.0:
            raise ConfigError("dead_after_missed must be non-negative")
        if not 0.0 < self.min_interval <= self.max_interval:
            raise ConfigError("need 0 < min_interval <= max_interval")
        if self.max_clock_skew_ms < 0:
            raise ConfigError("max_clock_skew_ms must be non-negative")
        if not self.forget_after * 1000 > 2 * self.max_clock_skew_ms:
            raise ConfigError("forget_after must exceed twice max_clock_skew_ms")

    def interval_of(self, hb: Heartbeat) -> float:
        """The heartbeat period, in seconds, used for ``hb``'s sender."""
        return min(max(hb.interval_ms / 1000, self.min_interval), self.max_interval)


_S, _I = PeerState, Input

#: (state, input) -> (next state, event emitted or None). Drawn in the module docstring.
TRANSITIONS: Mapping[tuple[PeerState, Input], tuple[PeerState, type[MembershipEvent] | None]] = (
    MappingProxyType(
        {
            (_S.ABSENT, _I.HEARTBEAT): (_S.ALIVE, PeerJoined),
            (_S.ABSENT, _I.DISCONNECT): (_S.ABSENT, None),
            (_S.ALIVE, _I.HEARTBEAT): (_S.ALIVE, None),
            (_S.ALIVE, _I.RESTART): (_S.ALIVE, PeerRestarted),
            (_S.ALIVE, _I.TIMEOUT): (_S.SUSPECT, PeerSuspected),
            (_S.ALIVE, _I.DISCONNECT): (_S.SUSPECT, PeerSuspected),
            (_S.SUSPECT, _I.HEARTBEAT): (_S.ALIVE, PeerRecovered),
            (_S.SUSPECT, _I.RESTART): (_S.ALIVE, PeerRecovered),
            (_S.SUSPECT, _I.TIMEOUT): (_S.DEAD, PeerDied),
            (_S.SUSPECT, _I.DISCONNECT): (_S.SUSPECT, None),
            (_S.DEAD, _I.HEARTBEAT): (_S.ALIVE, PeerRecovered),
            (_S.DEAD, _I.RESTART): (_S.ALIVE, PeerRecovered),
            (_S.DEAD, _I.TIMEOUT): (_S.ABSENT, PeerForgotten),
            (_S.DEAD, _I.DISCONNECT): (_S.DEAD, None),
        }
    )
)


def describe_transitions() -> str:
    """:data:`TRANSITIONS` as the text table the module docstring shows."""
    rows = [("state", "input", "next", "event"), ("-" * 7, "-" * 10, "-" * 7, "-" * 13)]
    for (state, inp), (next_state, event) in TRANSITIONS.items():
        rows.append((state, inp, next_state, event.__name__ if event else "-"))
    return "\n".join(f"{a:<7}  {b:<10}  {c:<7}  {d}".rstrip() for a, b, c, d in rows)


# --- the machine ----------------------------------------------------------------------------


class _Member:
    """Mutable per-peer record; the outside world only sees :class:`PeerInfo` copies."""

    __slots__ = (
        "deadline",
        "generation",
        "heartbeat",
        "interval",
        "last_heartbeat_at",
        "last_seen_at",
        "since",
        "state",
    )

    def __init__(self, heartbeat: Heartbeat, interval: float, now: float) -> None:
        self.state = PeerState.ABSENT
        self.since = now
        self.heartbeat = heartbeat
        self.interval = interval
        self.last_heartbeat_at = now
        self.last_seen_at = now
        self.deadline = now
        self.generation = 0


_EVENT_COUNTERS: Mapping[type[MembershipEvent], str] = MappingProxyType(
    {
        PeerJoined: "joins",
        PeerSuspected: "suspicions",
        PeerDied: "deaths",
        PeerRecovered: "recoveries",
        PeerRestarted: "restarts",
        PeerForgotten: "forgotten",
    }
)


class MembershipView:
    """One node's view of its federation's members, driven by heartbeats and time.

    Args:
        self_peer: our own peer ID (our heartbeats, echoed back, are ignored).
        federation: the federation we belong to.
        config: failure-detector timing.
        wall_offset_ms: our wall clock minus ``now``, in ms (``time.time() * 1000 -
            trio.current_time() * 1000``), to check ``sent_ms`` against; None skips that check.
    """

    def __init__(
        self,
        self_peer: PeerId,
        federation: str,
        config: DetectorConfig | None = None,
        *,
        wall_offset_ms: float | None = None,
    ) -> None:
        if not is_federation_id(federation):
            raise ConfigError(f"invalid federation ID {federation!r}")
        self.self_peer = self_peer
        self.federation = FederationId(federation)
        self.config = config if config is not None else DetectorConfig()
        self.wall_offset_ms = wall_offset_ms
        self._members: dict[PeerId, _Member] = {}
        self._connected: set[PeerId] = set()
        self._rtt: dict[PeerId, float] = {}
        # (deadline, peer, generation); entries whose generation is stale are skipped lazily.
        self._timers: list[tuple[float, PeerId, int]] = []
        self._accepted = 0
        self._rejected = dict.fromkeys(Rejection, 0)
        self._counts = dict.fromkeys(_EVENT_COUNTERS.values(), 0)

    # --- inputs ---

    def on_heartbeat(self, hb: Heartbeat, now: float) -> list[Event]:
        """Take a heartbeat whose signature the caller verified (:func:`open_heartbeat`)."""
        member = self._members.get(hb.peer)
        reason = self._rejection(hb, member, now)
        if reason is not None:
            self._rejected[reason] += 1
            return [HeartbeatRejected(peer=hb.peer, at=now, reason=reason)]
        self._accepted += 1
        if member is None:
            member = self._members[hb.peer] = _Member(hb, self.config.interval_of(hb), now)
            inp = Input.HEARTBEAT
        else:
            inp = (
                Input.RESTART if hb.incarnation > member.heartbeat.incarnation else Input.HEARTBEAT
            )
            member.heartbeat = hb
            member.interval = self.config.interval_of(hb)
            member.last_heartbeat_at = member.last_seen_at = now
        return self._step(hb.peer, member, inp, now)

    def on_connected(self, peer: PeerId, now: float) -> None:
        """A connection to ``peer`` opened. Evidence it is up, but not a heartbeat: no recovery."""
        if peer == self.self_peer:
            return
        self._connected.add(peer)
        member = self._members.get(peer)
        if member is not None:
            member.last_seen_at = max(member.last_seen_at, now)

    def on_disconnected(self, peer: PeerId, now: float) -> list[Event]:
        """The last connection to ``peer`` closed: an alive member becomes suspect at once."""
        self._connected.discard(peer)
        member = self._members.get(peer)
        if member is None:
            self._rtt.pop(peer, None)
            return []
        return self._step(peer, member, Input.DISCONNECT, now)

    def record_rtt(self, peer: PeerId, rtt: float, now: float | None = None) -> None:
        """Remember a measured round-trip time (seconds); with ``now``, also as a sighting."""
        if rtt < 0:
            raise LocalProtocolError(f"negative RTT {rtt}")
        if peer not in self._members and peer not in self._connected:
            return  # nothing to attach it to; do not let strangers grow the table
        self._rtt[peer] = rtt
        member = self._members.get(peer)
        if member is not None and now is not None:
            member.last_seen_at = max(member.last_seen_at, now)

    def on_timer(self, now: float) -> list[Event]:
        """Apply every deadline at or before ``now``, in deadline order, each at its own time; a
        suspicion applied late counts its way to death from ``now`` (module docstring)."""
        events: list[Event] = []
        while self._timers and self._timers[0][0] <= now:
            deadline, peer, generation = heapq.heappop(self._timers)
            member = self._members.get(peer)
            if member is not None and member.generation == generation:
                events += self._step(peer, member, Input.TIMEOUT, deadline, noticed=now)
        return events

    def next_deadline(self) -> float | None:
        """When the driver must next call :meth:`on_timer`, or None if no peer is tracked."""
        timers = self._timers
        while timers:
            _, peer, generation = timers[0]
            member = self._members.get(peer)
            if member is not None and member.generation == generation:
                return timers[0][0]
            heapq.heappop(timers)
        return None

    # --- snapshots ---

    def member(self, peer: PeerId) -> PeerInfo | None:
        """A snapshot of one member, or None if it is not in the view."""
        member = self._members.get(peer)
        return None if member is None else self._info(peer, member)

    def members(self) -> tuple[PeerInfo, ...]:
        """A snapshot of every member (alive, suspect and dead), sorted by peer ID."""
        return tuple(self._info(peer, self._members[peer]) for peer in sorted(self._members))

    def statistics(self) -> MembershipStatistics:
        states = [m.state for m in self._members.values()]
        return MembershipStatistics(
            accepted=self._accepted,
            rejected=MappingProxyType(dict(self._rejected)),
            alive=states.count(PeerState.ALIVE),
            suspect=states.count(PeerState.SUSPECT),
            dead=states.count(PeerState.DEAD),
            **self._counts,
        )

    # --- internals ---

    def _rejection(self, hb: Heartbeat, member: _Member | None, now: float) -> Rejection | None:
        if hb.federation != self.federation:
            return Rejection.OTHER_FEDERATION
        if hb.peer == self.self_peer:
            return Rejection.OWN
        if self.wall_offset_ms is not None:
            wall_ms = now * 1000 + self.wall_offset_ms
            if hb.sent_ms > wall_ms + self.config.max_clock_skew_ms:
                return Rejection.FROM_FUTURE
            if hb.sent_ms < wall_ms - self.config.max_clock_skew_ms:
                return Rejection.TOO_OLD
        if member is not None:
            last = member.heartbeat
            if (hb.incarnation, hb.seq) <= (last.incarnation, last.seq):
                return Rejection.STALE
            if (
                member.state is PeerState.DEAD
                and hb.incarnation == last.incarnation
                and member.last_heartbeat_at + (hb.sent_ms - last.sent_ms) / 1000 < member.since
            ):
                # Sent before we declared it dead, on its own clock set against ours by its last
                # heartbeat: a late copy (gossip re-delivers from its message cache), not a sign
                # of life. A peer that was only stalled sends newer ones, which revive it.
                return Rejection.STALE
        return None

    def _step(
        self, peer: PeerId, member: _Member, inp: Input, at: float, noticed: float | None = None
    ) -> list[Event]:
        """Apply ``inp`` as of ``at``; ``noticed`` is when the view learnt of it (a late tick),
        from which a new suspicion counts."""
        try:
            next_state, event_type = TRANSITIONS[member.state, inp]
        except KeyError:
            raise LocalProtocolError(f"no transition from {member.state} on {inp}") from None
        changed = next_state is not member.state
        if changed:
            member.state = next_state
            member.since = at
        if next_state is PeerState.ABSENT:
            del self._members[peer]
            if peer not in self._connected:
                self._rtt.pop(peer, None)
        elif changed or inp is not Input.DISCONNECT:  # a heartbeat moves the deadline too
            self._schedule(peer, member, max(at, noticed if noticed is not None else at))
        if event_type is None:
            return []
        self._counts[_EVENT_COUNTERS[event_type]] += 1
        return [event_type(peer=peer, at=at, cause=inp)]

    def _schedule(self, peer: PeerId, member: _Member, noticed: float) -> None:
        config = self.config
        if member.state is PeerState.ALIVE:
            deadline = member.last_heartbeat_at + config.suspect_after_missed * member.interval
        elif member.state is PeerState.SUSPECT:
            # From when we noticed: time we were not running to hear heartbeats does not count.
            deadline = max(member.since, noticed) + config.dead_after_missed * member.interval
        else:
            deadline = member.since + config.forget_after
        member.deadline = deadline
        member.generation += 1
        heapq.heappush(self._timers, (deadline, peer, member.generation))
        if len(self._timers) > 4 * len(self._members) + 64:
            self._timers = [e for e in self._timers if self._is_current(e[1], e[2])]
            heapq.heapify(self._timers)

    def _is_current(self, peer: PeerId, generation: int) -> bool:
        member = self._members.get(peer)
        return member is not None and member.generation == generation

    def _info(self, peer: PeerId, member: _Member) -> PeerInfo:
        return PeerInfo(
            peer=peer,
            state=member.state,
            since=member.since,
            heartbeat=member.heartbeat,
            last_heartbeat_at=member.last_heartbeat_at,
            last_seen_at=member.last_seen_at,
            deadline=member.deadline,
            connected=peer in self._connected,
            rtt=self._rtt.get(peer),
        )


def open_heartbeat(data: bytes | Envelope) -> Heartbeat:
    """Verify a sealed heartbeat and decode it; its ``peer`` must be its signer's peer ID.

    That author rule is ``open_envelope``'s (``AUTHOR_FIELDS``). Federation, clock skew and
    ordering are policy, checked (and counted) by :meth:`MembershipView.on_heartbeat`.

    Raises:
        WireError: the envelope or the heartbeat is malformed.
        BadSignatureError: the signature does not verify, or ``peer`` is not the signer.
    """
    hb, _ = open_envelope(data, Heartbeat)
    return hb


__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "TRANSITIONS",
    "DetectorConfig",
    "Event",
    "HeartbeatRejected",
    "Input",
    "MembershipEvent",
    "MembershipStatistics",
    "MembershipView",
    "PeerDied",
    "PeerForgotten",
    "PeerInfo",
    "PeerJoined",
    "PeerRecovered",
    "PeerRestarted",
    "PeerState",
    "PeerSuspected",
    "Rejection",
    "describe_transitions",
    "open_heartbeat",
]
