"""Net layer: the narrow interface the rest of fednode talks to.

Two implementations stand behind it and pass one contract suite (``tests/net/test_contract.py``):
the libp2p adapter (``fednode.net.libp2p_host``, real TCP + Noise + yamux) and the in-memory
transport (``fednode.net.memory``, deterministic, for protocol tests on trio's MockClock).

Rules every implementation keeps:
- stream handlers run in the host's nursery; an exception escaping one is logged and the stream
  reset, never propagated (a bad peer cannot crash a node);
- ``receive_some`` returns ``b""`` only at a clean end of stream; a reset raises
  :class:`~fednode.errors.TransportError`;
- every foreign exception is translated to a :class:`~fednode.errors.TransportError`;
- gossip delivery is best effort; a node never receives its own publishes;
- discovery (mDNS on a LAN, opt-in) reports only peers with a valid ``/p2p/`` ID other than our
  own, each with full multiaddrs; a malformed announcement is dropped, never raised.

Hosts are opened by async context managers that own their tasks: ``open_libp2p_host(key, ...)``
and ``MemoryNetwork.open_host(key)``; leaving the block closes everything (``aclose``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from fednode.wire import PeerId


class Stream(Protocol):
    """A bidirectional byte stream to one peer, for one protocol."""

    @property
    def protocol(self) -> str: ...

    @property
    def remote_peer(self) -> PeerId: ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; blocks while the peer is not reading (backpressure)."""

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at a clean end of stream."""

    async def send_eof(self) -> None:
        """Close our sending side; the peer's ``receive_some`` then returns ``b""``."""

    async def aclose(self) -> None:
        """Close both directions gracefully."""

    async def reset(self) -> None:
        """Abort the stream; the peer sees a :class:`TransportError`."""


StreamHandler = Callable[[Stream], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """A connection to ``peer`` opened (either direction)."""

    peer: PeerId


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """The last connection to ``peer`` closed."""

    peer: PeerId


PeerEvent = PeerConnected | PeerDisconnected


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    """``peer`` announced itself on the local network, dialable at ``addrs`` (full multiaddrs,
    each ending in ``/p2p/<peer>``). Nothing is dialled: whom to dial is the node's decision."""

    peer: PeerId
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """One message received on a subscribed topic. ``source`` is the originating peer."""

    topic: str
    source: PeerId
    data: bytes


class Host(Protocol):
    """One node's presence on the network."""

    @property
    def peer_id(self) -> PeerId: ...

    def listen_addrs(self) -> list[str]:
        """Full multiaddrs others can dial, each ending in ``/p2p/<peer id>``."""

    async def connect(self, addr: str) -> PeerId:
        """Dial a full multiaddr (``/ip4/…/tcp/…/p2p/12D3…``); returns the peer's ID."""

    async def disconnect(self, peer: PeerId) -> None: ...

    def connected_peers(self) -> list[PeerId]: ...

    def peer_addrs(self, peer: PeerId) -> list[str]:
        """Addresses known for ``peer`` (from identify or a previous dial), possibly empty."""

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    async def open_stream(self, peer: PeerId, protocol: str) -> Stream:
        """Open a stream to a connected (or dialable) peer."""

    async def ping(self, peer: PeerId) -> float:
        """Round-trip time to ``peer`` in seconds."""

    async def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[GossipMessage]:
        """Start receiving a topic's messages (each subscription gets its own channel)."""

    async def publish(self, topic: str, data: bytes) -> None: ...

    def peer_events(self) -> trio.MemoryReceiveChannel[PeerEvent]:
        """A new channel of connection events from now on."""

    def discoveries(self) -> trio.MemoryReceiveChannel[PeerDiscovered]:
        """A new channel of peers found on the local network: first those found so far (and not
        gone since), then each new or changed announcement. It stays empty unless the host was
        opened with mDNS, and ends when the host closes."""

    async def aclose(self) -> None:
        """Close the listener, every connection and every task; idempotent."""
