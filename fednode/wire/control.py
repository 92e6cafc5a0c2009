"""Wire layer: control-plane messages gossiped on a federation's control topic.

A :class:`Heartbeat` is a node's signed "I am here, and this is my load". It travels sealed in an
:class:`~fednode.wire.messages.Envelope` on :func:`control_topic`; the membership view
(``fednode.protocol.membership``) turns a stream of them into alive / suspect / dead peers.
Spec'd in ``protocols/wire.md`` and ``protocols/messages.cddl``. No crypto, no trio, no libp2p.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from fednode.errors import ConfigError
from fednode.wire.schema import FederationId, PeerId, SessionId, message

Role = Literal["client", "combiner", "reducer", "bootstrap", "auto"]

_FEDERATION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,128}")  # base58btc alphabet
MAX_REGION = 64
MAX_SESSION = 128
MAX_ADDRS = 16
MAX_ADDR = 256
MAX_INTERVAL_MS = 600_000  #: ten minutes; a longer period is not a heartbeat


def is_federation_id(value: str) -> bool:
    """Whether ``value`` is a valid federation ID: 1 to 64 characters of ``[A-Za-z0-9._-]``."""
    return _FEDERATION_ID.fullmatch(value) is not None


def control_topic(federation: str) -> str:
    """The gossipsub topic a federation's control messages travel on.

    Raises:
        ConfigError: ``federation`` is not a valid federation ID.
    """
    if not is_federation_id(federation):
        raise ConfigError(f"a federation ID is 1 to 64 of A-Z a-z 0-9 . _ -, got {federation!r}")
    return f"/fednode/{federation}/control/1"


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ValueError(reason)


@message("heartbeat")
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """A node's periodic, signed announcement of its presence, role and load.

    ``peer`` must be the peer ID of the envelope's signer (``open_heartbeat`` checks it). A sender
    picks ``incarnation`` once per process start (its wall clock in milliseconds at start) and
    counts ``seq`` up from 0 with every heartbeat, so a receiver orders heartbeats by
    ``(incarnation, seq)``: anything not greater than the last one accepted is a replay or a
    reordering, and a restarted node (a fresh incarnation, seq back at 0) is still recognised as
    newer. ``interval_ms`` is the sender's heartbeat period; receivers scale their failure
    timeouts to it.
    """

    federation: FederationId
    peer: PeerId
    incarnation: int  #: sender's wall clock (ms since the epoch) when its process started
    seq: int  #: 0, 1, 2, ... within one incarnation
    sent_ms: int  #: sender's wall clock (ms since the epoch) when it sent this heartbeat
    interval_ms: int  #: sender's heartbeat period
    role: Role
    capacity: int  #: how many clients it can take as a combiner (0 if none)
    attached: int  #: how many clients are attached to it now
    cpu: float  #: CPU load, 0 (idle) to 1 (saturated)
    memory: float  #: memory in use, 0 to 1
    bandwidth: float  #: estimated bandwidth, bytes per second
    region: str  #: operator-chosen region label, may be empty
    addrs: tuple[str, ...]  #: multiaddrs it can be dialled on
    session: SessionId  #: the session it takes part in, or "" for none
    round: int  #: the latest round it knows of, or -1 before the first

    def __post_init__(self) -> None:
        # A local caller may pass ints for the floats; the wire needs CBOR floats.
        for name in ("cpu", "memory", "bandwidth"):
            value = getattr(self, name)
            if type(value) is int:
                object.__setattr__(self, name, float(value))
        _require(is_federation_id(self.federation), "federation must be 1 to 64 of [A-Za-z0-9._-]")
        _require(_PEER_ID.fullmatch(self.peer) is not None, "peer must be a base58 peer ID")
        _require(self.incarnation >= 0, "incarnation must be non-negative")
        _require(self.seq >= 0, "seq must be non-negative")
        _require(self.sent_ms >= 0, "sent_ms must be non-negative")
        _require(0 < self.interval_ms <= MAX_INTERVAL_MS, f"interval_ms not 1..{MAX_INTERVAL_MS}")
        _require(self.capacity >= 0, "capacity must be non-negative")
        _require(self.attached >= 0, "attached must be non-negative")
        _require(0.0 <= self.cpu <= 1.0, "cpu must be within 0 and 1")
        _require(0.0 <= self.memory <= 1.0, "memory must be within 0 and 1")
        _require(
            math.isfinite(self.bandwidth) and self.bandwidth >= 0.0,
            "bandwidth must be finite and non-negative",
        )
        _require(len(self.region) <= MAX_REGION, f"region must be at most {MAX_REGION} chars")
        _require(len(self.addrs) <= MAX_ADDRS, f"at most {MAX_ADDRS} addrs")
        _require(
            all(0 < len(a) <= MAX_ADDR and a.startswith("/") for a in self.addrs),
            f"each addr must be a multiaddr of at most {MAX_ADDR} characters",
        )
        _require(len(self.session) <= MAX_SESSION, f"session must be at most {MAX_SESSION} chars")
        _require(self.round >= -1, "round must be -1 or more")


__all__ = ["Heartbeat", "Role", "control_topic", "is_federation_id"]
