"""The membership view and its failure detector, stepped by hand (no clock, no network), and the
signed heartbeat it is fed."""

from __future__ import annotations

import dataclasses
import random
import textwrap
from typing import Any

import cbor2
import pytest

from fednode.crypto import NodeKey, open_envelope, seal, seal_bytes
from fednode.errors import BadSignatureError, ConfigError, WireError
from fednode.protocol import membership
from fednode.protocol.membership import (
    DetectorConfig,
    Event,
    HeartbeatRejected,
    Input,
    MembershipView,
    PeerDied,
    PeerForgotten,
    PeerJoined,
    PeerRecovered,
    PeerRestarted,
    PeerState,
    PeerSuspected,
    Rejection,
    describe_transitions,
    open_heartbeat,
)
from fednode.wire import (
    Envelope,
    FederationId,
    Heartbeat,
    PeerId,
    SessionId,
    Signature,
    control_topic,
    decode,
    encode,
)

FED = "demo"
INC = 1_700_000_000_000  # an incarnation: the sender's start time in ms
KEYS = [NodeKey(bytes([i + 1]) * 32) for i in range(3)]
ME, A, B = (key.peer_id for key in KEYS)


def heartbeat(peer: PeerId = A, seq: int = 0, **changes: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "federation": FederationId(FED),
        "peer": peer,
        "incarnation": INC,
        "seq": seq,
        "sent_ms": INC + 1000 * seq,
        "interval_ms": 1000,
        "role": "combiner",
        "capacity": 50,
        "attached": 12,
        "cpu": 0.37,
        "memory": 0.52,
        "bandwidth": 12_500_000.0,
        "region": "eu-north-1",
        "addrs": (
            f"/ip4/192.168.10.23/tcp/4001/p2p/{peer}",
            f"/ip6/2001:db8::23/tcp/4001/p2p/{peer}",
            f"/dns4/node-23.example.org/tcp/4001/p2p/{peer}",
        ),
        "session": SessionId("session-2024-01"),
        "round": 41,
    }
    fields.update(changes)
    return Heartbeat(**fields)


def view(**config: Any) -> MembershipView:
    return MembershipView(ME, FED, DetectorConfig(**config))


def join(peer: PeerId, at: float) -> PeerJoined:
    return PeerJoined(peer=peer, at=at, cause=Input.HEARTBEAT)


def joined(at: float = 10.0, peer: PeerId = A) -> MembershipView:
    v = view()
    assert v.on_heartbeat(heartbeat(peer), at) == [join(peer, at)]
    return v


def state_of(v: MembershipView, peer: PeerId = A) -> PeerState:
    info = v.member(peer)
    return PeerState.ABSENT if info is None else info.state


# ----------------------------------------------------------------------------- the table


def test_docstring_draws_the_transition_table() -> None:
    assert textwrap.indent(describe_transitions(), "    ") in (membership.__doc__ or "")
    assert describe_transitions().count("\n") == len(membership.TRANSITIONS) + 1


# ----------------------------------------------------------------------------- joining


def test_first_heartbeat_joins_with_its_role_and_load() -> None:
    # Prepare
    v = view()
    hb = heartbeat(A, capacity=7, cpu=0.5)
    # Execute
    events = v.on_heartbeat(hb, 10.0)
    # Assert
    assert events == [PeerJoined(peer=A, at=10.0, cause=Input.HEARTBEAT)]
    (info,) = v.members()
    assert (info.peer, info.state, info.since, info.heartbeat) == (A, PeerState.ALIVE, 10.0, hb)
    assert (info.role, info.capacity, info.cpu, info.region) == ("combiner", 7, 0.5, "eu-north-1")
    assert (info.last_heartbeat_at, info.last_seen_at) == (10.0, 10.0)
    assert (info.rtt, info.connected) == (None, False)
    stats = v.statistics()
    assert (stats.accepted, stats.joins, stats.alive, stats.rejected_total) == (1, 1, 1, 0)


def test_members_is_a_sorted_snapshot() -> None:
    # Prepare
    v = view()
    v.on_heartbeat(heartbeat(B), 1.0)
    v.on_heartbeat(heartbeat(A), 1.0)
    snapshot = v.members()
    # Execute
    v.on_timer(100.0)
    # Assert: the snapshot taken before did not change
    assert [info.peer for info in snapshot] == sorted([A, B])
    assert {info.state for info in snapshot} == {PeerState.ALIVE}
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot[0].state = PeerState.DEAD  # type: ignore[misc]


# ----------------------------------------------------------------------------- timing


def test_suspected_exactly_three_intervals_after_the_last_heartbeat() -> None:
    # Prepare
    v = joined(at=10.0)
    v.on_heartbeat(heartbeat(A, 1), 11.0)
    # Execute / Assert
    assert v.next_deadline() == 14.0
    assert v.on_timer(13.999) == []
    assert state_of(v) is PeerState.ALIVE
    assert v.on_timer(14.0) == [PeerSuspected(peer=A, at=14.0, cause=Input.TIMEOUT)]
    assert state_of(v) is PeerState.SUSPECT


def test_dead_exactly_two_intervals_after_suspicion() -> None:
    # Prepare
    v = joined(at=10.0)
    v.on_timer(13.0)
    # Execute / Assert
    assert v.next_deadline() == 15.0
    assert v.on_timer(14.999) == []
    assert v.on_timer(15.0) == [PeerDied(peer=A, at=15.0, cause=Input.TIMEOUT)]
    assert state_of(v) is PeerState.DEAD
    assert v.next_deadline() == 315.0  # forgotten forget_after = 300 s later


def test_forgotten_exactly_forget_after_death_then_may_rejoin() -> None:
    # Prepare
    v = joined(at=0.0)
    v.on_timer(3.0)  # suspect at 3
    v.on_timer(5.0)  # dead at 5
    # Execute / Assert
    assert v.on_timer(304.999) == []
    assert v.on_timer(305.0) == [PeerForgotten(peer=A, at=305.0, cause=Input.TIMEOUT)]
    assert v.member(A) is None and v.members() == ()
    assert v.next_deadline() is None
    assert v.on_heartbeat(heartbeat(A, 400), 400.0) == [join(A, 400.0)]


def test_a_late_tick_suspects_at_the_missed_deadline_but_never_kills_at_once() -> None:
    # Prepare
    v = joined(at=0.0)
    # Execute: our process was stalled from 0 to 1000 s; the first tick comes then
    events = v.on_timer(1000.0)
    # Assert: suspected as of its deadline, and dead only if silent two intervals after the tick
    assert events == [PeerSuspected(peer=A, at=3.0, cause=Input.TIMEOUT)]
    assert state_of(v) is PeerState.SUSPECT
    assert v.next_deadline() == 1002.0
    assert v.on_timer(1002.0) == [PeerDied(peer=A, at=1002.0, cause=Input.TIMEOUT)]
    assert v.on_timer(1302.0) == [PeerForgotten(peer=A, at=1302.0, cause=Input.TIMEOUT)]


def test_later_deadlines_of_a_late_tick_still_apply_in_order_at_their_own_time() -> None:
    # Prepare: A was suspected on time at 3 s (dead due at 5 s); B joined at 1 s
    v = joined(at=0.0)
    v.on_heartbeat(heartbeat(B), 1.0)
    v.on_timer(3.0)
    # Execute: the next tick comes at 400 s
    events = v.on_timer(400.0)
    # Assert: A's death and forgetting were due while it was already suspect; B is only suspect
    assert events == [
        PeerSuspected(peer=B, at=4.0, cause=Input.TIMEOUT),
        PeerDied(peer=A, at=5.0, cause=Input.TIMEOUT),
        PeerForgotten(peer=A, at=305.0, cause=Input.TIMEOUT),
    ]
    assert (state_of(v, A), state_of(v, B)) == (PeerState.ABSENT, PeerState.SUSPECT)


def test_a_stalled_view_hears_the_queued_heartbeats_and_keeps_every_peer() -> None:
    """The false deaths seen under CPU load: the node's loop stalled for 6 s while its peers kept
    beating; when it ran again, its timer task came first and took them all to dead at once,
    and a plan made then had nobody in it. The silence was ours: the heartbeats sat in our queue."""
    # Prepare: A and B beat every second; we read them until 10 s, then stall
    v = view()
    for seq in range(11):
        v.on_heartbeat(heartbeat(A, seq), float(seq))
        v.on_heartbeat(heartbeat(B, seq), float(seq) + 0.5)
    # Execute: at 16.2 s the timer task runs first, then the six queued beats of each are read
    events = v.on_timer(16.2)
    for seq in range(11, 17):
        events += v.on_heartbeat(heartbeat(A, seq), 16.3)
        events += v.on_heartbeat(heartbeat(B, seq), 16.3)
    events += v.on_timer(16.4)
    # Assert: suspected for a moment, never dead, alive again
    assert not [e for e in events if isinstance(e, PeerDied)]
    assert [type(e) for e in events] == [PeerSuspected] * 2 + [PeerRecovered] * 2
    assert (state_of(v, A), state_of(v, B)) == (PeerState.ALIVE, PeerState.ALIVE)
    assert v.statistics().deaths == 0


@pytest.mark.parametrize(
    ("interval_ms", "suspect_at", "dead_at"),
    [(500, 11.5, 12.5), (10, 10.375, 10.625), (600_000, 250.0, 410.0)],
    ids=["half-second", "clamped-to-min", "clamped-to-max"],
)
def test_deadlines_scale_with_the_senders_interval_within_bounds(
    interval_ms: int, suspect_at: float, dead_at: float
) -> None:
    # Prepare: min_interval 0.125 s, max_interval 80 s (binary fractions keep times exact)
    v = view(min_interval=0.125, max_interval=80.0)
    v.on_heartbeat(heartbeat(A, interval_ms=interval_ms), 10.0)
    # Execute / Assert
    assert v.next_deadline() == suspect_at
    v.on_timer(suspect_at)
    assert v.next_deadline() == dead_at


def test_config_changes_the_thresholds() -> None:
    # Prepare
    v = view(suspect_after_missed=5.0, dead_after_missed=0.0)
    v.on_heartbeat(heartbeat(A), 0.0)
    # Execute
    events = v.on_timer(5.0)
    # Assert: with dead_after_missed=0 a suspect peer dies at the same instant
    assert [type(e) for e in events] == [PeerSuspected, PeerDied]
    assert [e.at for e in events] == [5.0, 5.0]


def test_next_deadline_is_the_earliest_over_all_peers() -> None:
    # Prepare
    v = view()
    assert v.next_deadline() is None
    v.on_heartbeat(heartbeat(A), 10.0)
    v.on_heartbeat(heartbeat(B), 10.5)
    # Execute / Assert
    assert v.next_deadline() == 13.0
    v.on_heartbeat(heartbeat(A, 1), 11.0)  # A now due at 14.0, B still at 13.5
    assert v.next_deadline() == 13.5
    assert v.on_timer(13.5) == [PeerSuspected(peer=B, at=13.5, cause=Input.TIMEOUT)]
    assert v.next_deadline() == 14.0


def test_heartbeats_keep_a_peer_alive_indefinitely() -> None:
    # Prepare
    v = joined(at=0.0)
    # Execute: one heartbeat every 2.5 s (two lost in between), ticking at every deadline
    events: list[Event] = []
    for seq in range(1, 100):
        deadline = v.next_deadline()
        assert deadline is not None
        events += v.on_timer(min(deadline, seq * 2.5))
        events += v.on_heartbeat(heartbeat(A, seq), seq * 2.5)
    # Assert
    assert events == []
    assert v.next_deadline() == 99 * 2.5 + 3.0


# ----------------------------------------------------------------------------- recovery


def test_fresh_heartbeat_recovers_a_suspect_peer() -> None:
    # Prepare
    v = joined(at=10.0)
    v.on_timer(13.0)
    # Execute
    events = v.on_heartbeat(heartbeat(A, 1), 13.5)
    # Assert
    assert events == [PeerRecovered(peer=A, at=13.5, cause=Input.HEARTBEAT)]
    assert not events[0].restarted  # type: ignore[union-attr]
    assert state_of(v) is PeerState.ALIVE
    assert v.next_deadline() == 16.5


def test_fresh_heartbeat_recovers_a_dead_peer() -> None:
    # Prepare
    v = joined(at=10.0)
    v.on_timer(13.0)
    v.on_timer(15.0)  # same incarnation, only silent for a while (a loaded machine)
    assert state_of(v) is PeerState.DEAD
    # Execute
    events = v.on_heartbeat(heartbeat(A, 9), 20.0)
    # Assert
    assert events == [PeerRecovered(peer=A, at=20.0, cause=Input.HEARTBEAT)]
    assert v.member(A).since == 20.0  # type: ignore[union-attr]
    assert v.statistics().recoveries == 1


def test_a_late_copy_of_a_heartbeat_sent_before_the_death_does_not_revive() -> None:
    # Prepare: A's heartbeat 0 (sent at its time 0) came at 10.0; silent since, dead at 15.0
    v = joined(at=10.0)
    v.on_timer(13.0)
    v.on_timer(15.0)
    assert state_of(v) is PeerState.DEAD
    # Execute: heartbeat 1, sent one period after 0 (our 11.0), arrives late from a gossip cache;
    # then heartbeat 6, sent after the death (our 16.0), arrives
    late = v.on_heartbeat(heartbeat(A, 1), 17.0)
    fresh = v.on_heartbeat(heartbeat(A, 6), 17.5)
    # Assert
    assert late == [HeartbeatRejected(peer=A, at=17.0, reason=Rejection.STALE)]
    assert fresh == [PeerRecovered(peer=A, at=17.5, cause=Input.HEARTBEAT)]


def test_restarted_peer_with_a_new_incarnation_recovers_and_its_old_one_is_stale() -> None:
    # Prepare: A ran to seq 100, crashed, was declared dead
    v = joined(at=0.0)
    v.on_heartbeat(heartbeat(A, 100), 1.0)
    v.on_timer(4.0)
    v.on_timer(6.0)
    assert state_of(v) is PeerState.DEAD
    # Execute: it restarts, seq back at 0, then an old heartbeat of its previous life arrives
    restarted = v.on_heartbeat(heartbeat(A, 0, incarnation=INC + 7000), 7.0)
    old = v.on_heartbeat(heartbeat(A, 101), 7.1)
    # Assert
    assert restarted == [PeerRecovered(peer=A, at=7.0, cause=Input.RESTART)]
    assert restarted[0].restarted  # type: ignore[union-attr]
    assert old == [HeartbeatRejected(peer=A, at=7.1, reason=Rejection.STALE)]
    assert v.member(A).heartbeat.incarnation == INC + 7000  # type: ignore[union-attr]


def test_fast_restart_of_an_alive_peer_is_reported() -> None:
    # Prepare
    v = joined(at=0.0)
    v.on_heartbeat(heartbeat(A, 50), 1.0)
    # Execute
    events = v.on_heartbeat(heartbeat(A, 0, incarnation=INC + 1500), 1.5)
    # Assert
    assert events == [PeerRestarted(peer=A, at=1.5, cause=Input.RESTART)]
    assert state_of(v) is PeerState.ALIVE
    assert v.statistics().restarts == 1


# ----------------------------------------------------------------------------- connections


def test_disconnect_suspects_at_once_and_dead_follows() -> None:
    # Prepare
    v = joined(at=10.0)
    v.on_connected(A, 10.2)
    assert v.member(A).connected  # type: ignore[union-attr]
    # Execute
    events = v.on_disconnected(A, 12.5)
    # Assert
    assert events == [PeerSuspected(peer=A, at=12.5, cause=Input.DISCONNECT)]
    assert not v.member(A).connected  # type: ignore[union-attr]
    assert v.next_deadline() == 14.5
    assert v.on_disconnected(A, 13.0) == []  # again: no event, deadline kept
    assert v.next_deadline() == 14.5
    assert v.on_timer(14.5) == [PeerDied(peer=A, at=14.5, cause=Input.TIMEOUT)]


def test_a_connection_alone_does_not_recover_a_suspect_peer() -> None:
    # Prepare
    v = joined(at=10.0)
    v.on_disconnected(A, 11.0)
    # Execute
    v.on_connected(A, 11.5)
    # Assert
    info = v.member(A)
    assert info is not None
    assert (info.state, info.connected, info.last_seen_at) == (PeerState.SUSPECT, True, 11.5)
    recovered = PeerRecovered(peer=A, at=12.0, cause=Input.HEARTBEAT)
    assert v.on_heartbeat(heartbeat(A, 1), 12.0) == [recovered]


def test_disconnect_of_a_stranger_changes_nothing() -> None:
    v = view()
    v.on_connected(B, 1.0)
    assert v.on_disconnected(B, 2.0) == []
    assert v.members() == () and v.next_deadline() is None


def test_rtt_is_recorded_for_known_peers_only() -> None:
    # Prepare
    v = joined(at=10.0)
    # Execute
    v.record_rtt(A, 0.042, now=11.0)
    v.record_rtt(B, 0.010)  # neither a member nor connected
    # Assert
    info = v.member(A)
    assert info is not None and (info.rtt, info.last_seen_at) == (0.042, 11.0)
    v.on_heartbeat(heartbeat(B), 12.0)
    assert v.member(B).rtt is None  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- rejections


def test_replayed_and_reordered_heartbeats_are_rejected_counted_and_do_not_extend_life() -> None:
    # Prepare
    v = joined(at=10.0)
    v.on_heartbeat(heartbeat(A, 5), 11.0)
    # Execute
    replay = v.on_heartbeat(heartbeat(A, 5), 12.0)
    reordered = v.on_heartbeat(heartbeat(A, 4), 12.5)
    # Assert
    assert replay == [HeartbeatRejected(peer=A, at=12.0, reason=Rejection.STALE)]
    assert reordered == [HeartbeatRejected(peer=A, at=12.5, reason=Rejection.STALE)]
    assert v.next_deadline() == 14.0  # still three intervals after seq 5, not after the replay
    assert v.member(A).heartbeat.seq == 5  # type: ignore[union-attr]
    stats = v.statistics()
    assert (stats.accepted, stats.rejected[Rejection.STALE], stats.rejected_total) == (2, 2, 2)


def test_heartbeat_for_another_federation_is_rejected_and_counted() -> None:
    v = view()
    events = v.on_heartbeat(heartbeat(A, federation=FederationId("other")), 1.0)
    assert events == [HeartbeatRejected(peer=A, at=1.0, reason=Rejection.OTHER_FEDERATION)]
    assert v.members() == ()
    assert v.statistics().rejected[Rejection.OTHER_FEDERATION] == 1


def test_own_heartbeat_is_ignored() -> None:
    v = view()
    events = v.on_heartbeat(heartbeat(ME), 1.0)
    assert events == [HeartbeatRejected(peer=ME, at=1.0, reason=Rejection.OWN)]
    assert v.members() == () and v.next_deadline() is None
    assert v.statistics().rejected[Rejection.OWN] == 1


def test_sent_ms_is_checked_against_the_wall_clock_when_known() -> None:
    # Prepare: at now = 100 s the wall clock reads INC + 100 000 ms; 30 s of skew allowed
    v = MembershipView(ME, FED, DetectorConfig(max_clock_skew_ms=30_000), wall_offset_ms=INC)
    wall = INC + 100_000
    # Execute
    future = v.on_heartbeat(heartbeat(A, 1, sent_ms=wall + 30_001), 100.0)
    old = v.on_heartbeat(heartbeat(A, 2, sent_ms=wall - 30_001), 100.0)
    edge = v.on_heartbeat(heartbeat(A, 3, sent_ms=wall + 30_000), 100.0)
    # Assert
    assert future == [HeartbeatRejected(peer=A, at=100.0, reason=Rejection.FROM_FUTURE)]
    assert old == [HeartbeatRejected(peer=A, at=100.0, reason=Rejection.TOO_OLD)]
    assert edge == [join(A, 100.0)]
    stats = v.statistics()
    assert (stats.rejected[Rejection.FROM_FUTURE], stats.rejected[Rejection.TOO_OLD]) == (1, 1)


def test_without_a_wall_clock_sent_ms_is_not_judged() -> None:
    v = view()
    assert v.on_heartbeat(heartbeat(A, sent_ms=0), 5.0) == [join(A, 5.0)]


def test_statistics_count_every_transition() -> None:
    # Prepare / Execute: join, suspect, recover, restart, die, forget; B joins and stays
    v = joined(at=0.0)
    v.on_heartbeat(heartbeat(B), 0.0)
    v.on_disconnected(A, 1.0)
    v.on_heartbeat(heartbeat(A, 1), 1.5)
    v.on_heartbeat(heartbeat(A, 0, incarnation=INC + 1), 2.0)
    v.on_heartbeat(heartbeat(B, 1), 2.5)
    v.on_timer(5.5)  # B due at 5.5 too
    # Assert
    stats = v.statistics()
    assert (stats.joins, stats.suspicions, stats.recoveries, stats.restarts) == (2, 3, 1, 1)
    assert (stats.deaths, stats.forgotten, stats.accepted) == (0, 0, 5)
    assert (stats.alive, stats.suspect, stats.dead) == (0, 2, 0)
    v.on_timer(400.0)
    stats = v.statistics()
    assert (stats.deaths, stats.forgotten) == (2, 2)
    assert (stats.alive, stats.suspect, stats.dead) == (0, 0, 0)


# ----------------------------------------------------------------------------- at scale


def test_many_peers_with_jitter_loss_and_duplicates_are_detected_within_the_bound() -> None:
    # Prepare: 40 peers beat every 1 s +-20 %, delivery takes 0-100 ms, a tenth of heartbeats
    # are lost (never two in a row), some arrive twice; 12 peers crash at random times.
    rng = random.Random(20240611)
    keys = [NodeKey(rng.randbytes(32)) for _ in range(40)]
    crash_at = {k.peer_id: rng.uniform(5.0, 40.0) for k in rng.sample(keys, 12)}
    max_delay, horizon = 0.1, 60.0
    deliveries: list[tuple[float, int, Heartbeat]] = []
    for key in keys:
        t, seq, lost_last = rng.uniform(0.0, 1.0), 0, False
        while t < min(crash_at.get(key.peer_id, horizon), horizon):
            lost = not lost_last and rng.random() < 0.1
            if not lost:
                beat = heartbeat(key.peer_id, seq, sent_ms=INC + int(t * 1000))
                for _ in range(2 if rng.random() < 0.05 else 1):
                    deliveries.append((t + rng.uniform(0.0, max_delay), len(deliveries), beat))
            lost_last, seq, t = lost, seq + 1, t + rng.uniform(0.8, 1.2)
    deliveries.sort()
    v = view()
    seen: list[Event] = []

    def tick_until(now: float) -> None:
        while (deadline := v.next_deadline()) is not None and deadline <= now:
            seen.extend(v.on_timer(deadline))

    # Execute: a driver that ticks exactly at each deadline between deliveries
    for at, _, beat in deliveries:
        tick_until(at)
        seen += v.on_heartbeat(beat, at)
    tick_until(horizon)
    # Assert
    suspected = {e.peer: e.at for e in seen if isinstance(e, PeerSuspected)}
    died = {e.peer: e.at for e in seen if isinstance(e, PeerDied)}
    assert set(suspected) == set(died) == set(crash_at), "exactly the crashed peers, no false alarm"
    for peer, crash in crash_at.items():
        assert crash < suspected[peer] <= crash + max_delay + 3.0
        assert died[peer] == suspected[peer] + 2.0 <= crash + max_delay + 5.0
    stats = v.statistics()
    assert (stats.joins, stats.alive, stats.dead) == (40, 28, 12)
    assert stats.rejected[Rejection.STALE] == len(deliveries) - stats.accepted > 0


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        {"suspect_after_missed": 1.0},
        {"dead_after_missed": -1.0},
        {"min_interval": 0.0},
        {"min_interval": 2.0, "max_interval": 1.0},
        {"max_clock_skew_ms": -1},
        {"forget_after": 10.0, "max_clock_skew_ms": 5_000},
    ],
)
def test_bad_detector_config_is_a_config_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        DetectorConfig(**bad)


def test_view_refuses_an_invalid_federation() -> None:
    with pytest.raises(ConfigError):
        MembershipView(ME, "no spaces allowed")


# ----------------------------------------------------------------------------- the heartbeat


def test_sealed_realistic_heartbeat_is_under_one_kib_and_opens() -> None:
    # Prepare
    hb = heartbeat(KEYS[1].peer_id, 123_456)
    # Execute
    data = seal_bytes(KEYS[1], hb)
    # Assert
    assert len(data) < 1024, len(data)
    assert open_heartbeat(data) == hb
    assert decode(encode(hb), Heartbeat) == hb


def test_heartbeat_with_a_bad_signature_is_rejected() -> None:
    # Prepare
    envelope = seal(KEYS[1], heartbeat(A))
    bad = bytearray(envelope.signature)
    bad[0] ^= 1
    forged = dataclasses.replace(envelope, signature=Signature(bytes(bad)))
    altered = dataclasses.replace(envelope, payload=encode(heartbeat(A, seq=999)))
    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_heartbeat(encode(forged))
    with pytest.raises(BadSignatureError):
        open_heartbeat(encode(altered))


def test_heartbeat_naming_a_peer_other_than_its_signer_is_rejected() -> None:
    # Prepare: B's key signs a heartbeat that claims to be from A
    data = seal_bytes(KEYS[2], heartbeat(A))
    # Execute / Assert: by open_heartbeat, and by open_envelope for drivers that use it directly
    with pytest.raises(BadSignatureError, match="other than its signer"):
        open_heartbeat(data)
    with pytest.raises(BadSignatureError, match="other than its signer"):
        open_envelope(data, Heartbeat)


def test_open_heartbeat_refuses_other_messages_and_garbage() -> None:
    from fednode.wire import BlobHeader

    other = BlobHeader(digest=bytes(32), size=0, kind="model", tensors=())
    with pytest.raises(BadSignatureError):
        open_heartbeat(seal_bytes(KEYS[1], other))
    with pytest.raises(WireError):
        open_heartbeat(b"\xa0")
    assert isinstance(seal(KEYS[1], heartbeat(A)), Envelope)


@pytest.mark.parametrize(
    "change",
    [
        {"federation": ""},
        {"federation": "x" * 65},
        {"federation": "a/b"},
        {"peer": "not base58 0OIl"},
        {"incarnation": -1},
        {"seq": -1},
        {"sent_ms": -1},
        {"interval_ms": 0},
        {"interval_ms": 600_001},
        {"capacity": -1},
        {"attached": -1},
        {"cpu": 1.01},
        {"cpu": float("nan")},
        {"memory": -0.01},
        {"bandwidth": -1.0},
        {"bandwidth": float("inf")},
        {"region": "r" * 65},
        {"addrs": ("/ip4/1.2.3.4/tcp/1",) * 17},
        {"addrs": ("ip4/1.2.3.4",)},
        {"addrs": ("/" + "a" * 256,)},
        {"session": "s" * 129},
        {"round": -2},
    ],
    ids=lambda change: "-".join(f"{k}={str(v)[:12]}" for k, v in change.items()),
)
def test_heartbeat_invariants_hold_locally_and_on_the_wire(change: dict[str, Any]) -> None:
    # Prepare
    good = cbor2.loads(encode(heartbeat(A)))
    bad_map = {**good, **{k: list(v) if isinstance(v, tuple) else v for k, v in change.items()}}
    # Execute / Assert
    with pytest.raises(ValueError):
        heartbeat(**{"peer": A, **change})
    with pytest.raises(WireError):
        decode(cbor2.dumps(bad_map, canonical=True), Heartbeat)


def test_heartbeat_accepts_ints_for_its_float_fields() -> None:
    hb = heartbeat(A, cpu=0, memory=1, bandwidth=0)
    assert decode(encode(hb), Heartbeat) == hb
    assert type(hb.cpu) is float


def test_control_topic_names_the_federation_and_refuses_bad_ids() -> None:
    assert control_topic("demo.eu-1_x") == "/fednode/demo.eu-1_x/control/1"
    assert control_topic("x" * 64) == f"/fednode/{'x' * 64}/control/1"
    for bad in ("", "x" * 65, "a/b", "fed ération", "a b"):
        with pytest.raises(ConfigError):
            control_topic(bad)
