"""Wire layer: the status a node reports on ``/fednode/status/1.0.0`` (``fednode peers``).

The server sends one :class:`NodeStatus` frame and closes. It is a local view, unsigned: it tells
an operator what one node sees, and is never used as evidence by other nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fednode.wire.control import Role
from fednode.wire.schema import FederationId, PeerId, message, record

MemberState = Literal["alive", "suspect", "dead"]


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerStatus:
    """One member of the reporting node's membership view."""

    peer: PeerId
    state: MemberState
    role: Role
    region: str
    capacity: int
    attached: int
    cpu: float
    memory: float
    bandwidth: float
    rtt_ms: float | None  #: last measured round trip, None if never measured
    last_seen_ms: int  #: milliseconds since the last sign of life
    connected: bool
    round: int
    addrs: tuple[str, ...]


@message("node-status")
@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStatus:
    """A node's own identity and its view of the federation."""

    peer: PeerId
    federation: FederationId
    role: Role
    addrs: tuple[str, ...]
    uptime_ms: int
    connected: int  #: peers it holds a connection to
    heartbeats_accepted: int
    heartbeats_rejected: int
    peers: tuple[PeerStatus, ...]
