"""Net layer: an in-memory transport behind the :class:`~fednode.net.interface.Host` interface.

Deterministic and clock-free: no sockets, no wall clock, delays are ``trio.sleep`` so tests run on
``MockClock``. Faults (per-link latency, loss, duplication, partitions, kills) come from random
streams seeded by the network's seed, one per link, so traffic on one link never shifts another's.
This module is the network (hosts, addresses, links and faults, gossip flooding, the LAN); a host
is in ``memory_host``, its streams in ``memory_stream``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from fednode.crypto.keys import NodeKey, public_key_from_peer_id
from fednode.errors import TransportError
from fednode.net.interface import (
    GossipMessage,
    PeerConnected,
    PeerDisconnected,
    PeerDiscovered,
)
from fednode.net.memory_host import MemoryHost
from fednode.net.memory_stream import MemoryStream, _Connection
from fednode.wire import PeerId

if TYPE_CHECKING:
    from fednode.net.interface import Host, Stream

DEFAULT_STREAM_BUFFER = 64 * 1024
DEFAULT_GOSSIP_BUFFER = 128
GOSSIP_MAX_MESSAGE = 512 * 1024
"""Like the libp2p adapter, refuse gossip this large: big data belongs on streams."""


@dataclass(frozen=True, slots=True)
class NetworkStatistics:
    """A snapshot of a :class:`MemoryNetwork`'s counters."""

    hosts: int
    connections: int
    gossip_delivered: int
    gossip_lost: int
    """Copies not delivered because a faulty link dropped them."""
    gossip_overflowed: int
    """Copies not delivered because the subscriber's channel was full."""
    gossip_duplicated: int


@dataclass(slots=True)
class _Link:
    latency: float
    drop: float
    duplicate: float
    rng: random.Random

    def chance(self, probability: float) -> bool:
        # Draw only when a fault is configured, so fault-free links consume no randomness.
        return probability > 0 and self.rng.random() < probability


_PERFECT_LINK = _Link(latency=0.0, drop=0.0, duplicate=0.0, rng=random.Random(0))


class MemoryNetwork:
    """A deterministic network of in-memory hosts, with fault injection for protocol tests.

    Link faults are set per unordered pair of peers with :meth:`set_link`: ``latency`` is the
    one-way delay (a gossip hop costs one ``latency``; ``connect``, ``open_stream`` and ``ping``
    cost one round trip, ``2 * latency``), ``drop`` and ``duplicate`` are probabilities per gossip
    copy crossing the link. Stream bytes are reliable and not delayed, like TCP without a rate cap.

    The network is also one LAN segment: hosts opened with ``mdns=True`` hear each other's
    announcements (see :meth:`open_host`), at once and in the order they opened.

    Args:
        seed: seeds every link's random stream.
        stream_buffer: bytes each direction of a stream buffers before ``send_all`` blocks.
        gossip_buffer: messages each subscription channel holds; further ones are dropped and
            counted, as real gossip does.
        gossip_max_message: ``publish`` refuses payloads of this many bytes or more.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
        gossip_buffer: int = DEFAULT_GOSSIP_BUFFER,
        gossip_max_message: int = GOSSIP_MAX_MESSAGE,
    ) -> None:
        if stream_buffer < 1 or gossip_buffer < 1 or gossip_max_message < 1:
            raise ValueError("buffers and the gossip size limit must be positive")
        self.seed = seed
        self.stream_buffer = stream_buffer
        self.gossip_buffer = gossip_buffer
        self.gossip_max_message = gossip_max_message
        self._hosts: dict[PeerId, MemoryHost] = {}
        self._starting: set[PeerId] = set()
        # Stable per peer, so a restarted peer listens at its old address.
        self._ports: dict[PeerId, int] = {}
        self._port_owner: dict[int, PeerId] = {}
        self._connections: dict[frozenset[PeerId], _Connection] = {}
        self._links: dict[frozenset[PeerId], _Link] = {}
        self._group_of: dict[PeerId, int] | None = None
        self._lan: dict[PeerId, MemoryHost] = {}  # hosts opened with mdns=True
        self._sequence = 0
        self._delivered = 0
        self._lost = 0
        self._overflowed = 0
        self._duplicated = 0

    # -- hosts --------------------------------------------------------------------------------

    @asynccontextmanager
    async def open_host(
        self, key: NodeKey, listen: bool = True, *, mdns: bool = False
    ) -> AsyncIterator[MemoryHost]:
        """Open a host for ``key``. With ``listen=False`` it has no address: it can dial out
        but cannot be dialled, like a client with no inbound port.

        With ``mdns=True`` it joins the LAN: its ``discoveries()`` report every listening mDNS
        host already open, and those hear it (if it listens) as it opens. A host that closes or
        is killed leaves the LAN: new ``discoveries()`` channels no longer report it."""
        peer = key.peer_id
        if peer in self._hosts or peer in self._starting:
            raise TransportError(f"{peer} already has an open host on this network")
        host = MemoryHost(self, peer, self._address_of(peer) if listen else None)
        escaped: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    self._starting.add(peer)
                    try:
                        running = trio.Event()
                        nursery.start_soon(host._serve, running)
                        await running.wait()
                    finally:
                        self._starting.discard(peer)
                    self._hosts[peer] = host  # reachable only once its nursery runs
                    if mdns:
                        self._join_lan(host)
                    yield host
                finally:
                    host._shut_down()
        except BaseExceptionGroup as group:
            # The host's own tasks never raise, so a group only wraps what the body raised: hand
            # that back unwrapped, as if no nursery stood in between.
            if len(group.exceptions) != 1:
                raise
            escaped = group.exceptions[0]
        if escaped is not None:
            raise escaped

    def kill(self, peer: PeerId) -> None:
        """End ``peer``'s host abruptly: its connections vanish (peers see resets and
        :class:`PeerDisconnected`), its tasks are cancelled and every later call on it raises
        :class:`TransportError`. The same key may then open a new host at the same address."""
        host = self._hosts.get(peer)
        if host is None:
            raise ValueError(f"no open host for {peer}")
        host._shut_down()

    def peers(self) -> list[PeerId]:
        """The peers whose hosts are open, in the order they opened."""
        return list(self._hosts)

    # -- faults -------------------------------------------------------------------------------

    def set_link(
        self,
        a: PeerId,
        b: PeerId,
        *,
        latency: float = 0.0,
        drop: float = 0.0,
        duplicate: float = 0.0,
    ) -> None:
        """Set the link between ``a`` and ``b`` (both directions), replacing earlier settings."""
        if a == b:
            raise ValueError("a link joins two different peers")
        if latency < 0 or not math.isfinite(latency):
            raise ValueError(f"latency must be a finite non-negative number, got {latency}")
        for name, probability in (("drop", drop), ("duplicate", duplicate)):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{name} is a probability, got {probability}")
        pair = frozenset((a, b))
        existing = self._links.get(pair)
        rng = existing.rng if existing else random.Random(f"{self.seed}:{min(a, b)}:{max(a, b)}")
        self._links[pair] = _Link(latency=latency, drop=drop, duplicate=duplicate, rng=rng)

    def partition(self, groups: Iterable[Iterable[PeerId]]) -> None:
        """Split the network: peers in different groups (a peer in no group is alone) lose their
        connections at once and cannot dial each other until :meth:`heal`."""
        group_of: dict[PeerId, int] = {}
        for index, group in enumerate(groups):
            for peer in group:
                if peer in group_of:
                    raise ValueError(f"{peer} is in two groups")
                group_of[peer] = index
        self._group_of = group_of
        for connection in list(self._connections.values()):
            a, b = connection.hosts
            if not self._reachable(a.peer_id, b.peer_id):
                self._drop_connection(connection, "network partitioned")

    def heal(self) -> None:
        """End the partition. Connections it cut stay closed: peers redial, as for real."""
        self._group_of = None

    def statistics(self) -> NetworkStatistics:
        return NetworkStatistics(
            hosts=len(self._hosts),
            connections=len(self._connections),
            gossip_delivered=self._delivered,
            gossip_lost=self._lost,
            gossip_overflowed=self._overflowed,
            gossip_duplicated=self._duplicated,
        )

    # -- internals used by MemoryHost --------------------------------------------------------

    def _address_of(self, peer: PeerId) -> str:
        port = self._ports.get(peer)
        if port is None:
            port = len(self._ports) + 1
            self._ports[peer] = port
            self._port_owner[port] = peer
        return f"/memory/{port}/p2p/{peer}"

    def _link(self, a: PeerId, b: PeerId) -> _Link:
        return self._links.get(frozenset((a, b)), _PERFECT_LINK)

    def _reachable(self, a: PeerId, b: PeerId) -> bool:
        if self._group_of is None:
            return True
        group = self._group_of.get(a)
        return group is not None and group == self._group_of.get(b)

    async def _round_trip(self, a: PeerId, b: PeerId) -> None:
        latency = self._link(a, b).latency
        if latency > 0:
            await trio.sleep(2 * latency)
        else:
            await trio.lowlevel.checkpoint()

    def _listener(self, addr: str) -> tuple[PeerId, MemoryHost | None]:
        """The peer an address names and the host listening there now (``None`` if none)."""
        parts = addr.split("/")
        if len(parts) != 5 or parts[0] or parts[1] != "memory" or parts[3] != "p2p":
            raise TransportError(f"not a memory multiaddr ending in /p2p/<peer id>: {addr!r}")
        try:
            port = int(parts[2])
            peer = PeerId(parts[4])
            public_key_from_peer_id(peer)
        except ValueError as exc:
            raise TransportError(f"malformed address {addr!r}: {exc}") from exc
        owner = self._port_owner.get(port)
        host = self._hosts.get(owner) if owner is not None else None
        if host is None or host._address is None:
            return peer, None
        return peer, host

    def _join_lan(self, host: MemoryHost) -> None:
        for other in self._lan.values():
            _hear(other, host)
            _hear(host, other)
        self._lan[host.peer_id] = host

    def _leave_lan(self, host: MemoryHost) -> None:
        if self._lan.get(host.peer_id) is host:
            del self._lan[host.peer_id]
            for other in self._lan.values():
                other._discovery.forget(host.peer_id)

    def _connect(self, a: MemoryHost, b: MemoryHost) -> _Connection:
        connection = _Connection(a, b)
        self._connections[frozenset((a.peer_id, b.peer_id))] = connection
        a._connections[b.peer_id] = connection
        b._connections[a.peer_id] = connection
        # What identify would tell each side.
        a._learn_addrs(b.peer_id, b.listen_addrs())
        b._learn_addrs(a.peer_id, a.listen_addrs())
        a._emit(PeerConnected(peer=b.peer_id))
        b._emit(PeerConnected(peer=a.peer_id))
        return connection

    def _drop_connection(self, connection: _Connection, reason: str) -> None:
        a, b = connection.hosts
        if self._connections.pop(frozenset((a.peer_id, b.peer_id)), None) is None:
            return
        for stream in list(connection.streams):
            stream._abort(f"connection closed: {reason}")
        for host in (a, b):
            other = connection.other(host)
            del host._connections[other.peer_id]
            if not host._closed:
                host._emit(PeerDisconnected(peer=other.peer_id))

    def _publish(self, source: MemoryHost, topic: str, data: bytes) -> None:
        """Flood along the cheapest paths of the connection graph; a copy lost on one hop is lost
        for everyone downstream of it."""
        now = trio.current_time()
        message = GossipMessage(topic=topic, source=source.peer_id, data=data)
        arrived = {source.peer_id: True}
        for peer, parent, delay in self._flood_tree(source.peer_id):
            link = self._link(parent, peer)
            arrived[peer] = arrived[parent] and not link.chance(link.drop)
            host = self._hosts[peer]
            if not host._subscriptions.get(topic):
                continue
            if not arrived[peer]:
                self._lost += 1
                continue
            copies = 1
            if link.chance(link.duplicate):
                copies = 2
                self._duplicated += 1
            for _ in range(copies):
                self._sequence += 1
                host._receive_gossip(now + delay, self._sequence, message)

    def _flood_tree(self, source: PeerId) -> list[tuple[PeerId, PeerId, float]]:
        """``(peer, parent, delay)`` for every peer reachable from ``source``, nearest first
        (Dijkstra over link latencies; ties broken by peer ID, so the order is reproducible)."""
        best = {source: 0.0}
        parent: dict[PeerId, PeerId] = {}
        done: set[PeerId] = set()
        queue: list[tuple[float, PeerId]] = [(0.0, source)]
        tree: list[tuple[PeerId, PeerId, float]] = []
        while queue:
            delay, peer = heapq.heappop(queue)
            if peer in done:
                continue
            done.add(peer)
            if peer != source:
                tree.append((peer, parent[peer], delay))
            for neighbour in self._hosts[peer]._connections:
                candidate = delay + self._link(peer, neighbour).latency
                if neighbour not in done and candidate < best.get(neighbour, math.inf):
                    best[neighbour] = candidate
                    parent[neighbour] = peer
                    heapq.heappush(queue, (candidate, neighbour))
        return tree


def _hear(listener: MemoryHost, announcer: MemoryHost) -> None:
    """``announcer``'s mDNS announcement reaches ``listener``; a host without an address has
    nothing to announce."""
    addrs = announcer.listen_addrs()
    event = PeerDiscovered(peer=announcer.peer_id, addrs=tuple(addrs))
    if addrs and listener._discovery.report(event):
        listener._learn_addrs(announcer.peer_id, addrs)


if TYPE_CHECKING:

    def _implements_the_interface(host: MemoryHost, stream: MemoryStream) -> tuple[Host, Stream]:
        return host, stream


__all__ = [
    "DEFAULT_GOSSIP_BUFFER",
    "DEFAULT_STREAM_BUFFER",
    "GOSSIP_MAX_MESSAGE",
    "MemoryHost",
    "MemoryNetwork",
    "MemoryStream",
    "NetworkStatistics",
]
