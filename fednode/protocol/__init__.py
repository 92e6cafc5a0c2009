"""Protocol layer: sans-IO state machines (membership, election, rounds). Events in, events out;
time is passed in as ``now``; no trio, no libp2p, no clock reads, no I/O. Imports wire and
crypto only."""

from __future__ import annotations

from fednode.protocol.membership import (
    DEFAULT_HEARTBEAT_INTERVAL,
    TRANSITIONS,
    DetectorConfig,
    Event,
    HeartbeatRejected,
    Input,
    MembershipEvent,
    MembershipStatistics,
    MembershipView,
    PeerDied,
    PeerForgotten,
    PeerInfo,
    PeerJoined,
    PeerRecovered,
    PeerRestarted,
    PeerState,
    PeerSuspected,
    Rejection,
    describe_transitions,
    open_heartbeat,
)

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
