"""Net layer: an in-memory transport behind the :class:`~fednode.net.interface.Host` interface.

Deterministic and clock-free: no sockets, no wall clock, delays are ``trio.sleep`` so tests run on
``MockClock``. Faults (per-link latency, loss, duplication, partitions, kills) come from random
streams seeded by the network's seed, one per link, so traffic on one link never shifts another's.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from fednode.crypto.keys import NodeKey, public_key_from_peer_id
from fednode.errors import TransportError
from fednode.net.discovery import DiscoveryFeed
from fednode.net.interface import (
    GossipMessage,
    PeerConnected,
    PeerDisconnected,
    PeerDiscovered,
    PeerEvent,
    StreamHandler,
)
from fednode.wire import PeerId

if TYPE_CHECKING:
    from fednode.net.interface import Host, Stream

logger = logging.getLogger(__name__)

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


class _Pipe:
    """One direction of a stream: a byte buffer holding at most ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self._buffer = bytearray()
        self._capacity = capacity
        self._eof = False
        self._reader_gone = False
        self._error: str | None = None
        self._waiters = trio.lowlevel.ParkingLot()

    @property
    def error(self) -> str | None:
        return self._error

    def _wake(self) -> None:
        self._waiters.unpark_all()

    async def write(self, data: memoryview) -> None:
        offset = 0
        while True:
            if self._error is not None:
                raise TransportError(self._error)
            if self._eof:
                raise TransportError("stream is closed for sending")
            if self._reader_gone:
                raise TransportError("the peer closed the stream")
            if offset == len(data):
                return
            space = self._capacity - len(self._buffer)
            if space == 0:
                await self._waiters.park()
                continue
            taken = min(space, len(data) - offset)
            self._buffer += data[offset : offset + taken]
            offset += taken
            self._wake()

    async def read(self, max_bytes: int) -> bytes:
        while True:
            if self._error is not None:
                raise TransportError(self._error)
            if self._buffer:
                chunk = bytes(self._buffer[:max_bytes])
                del self._buffer[:max_bytes]
                self._wake()
                return chunk
            if self._eof:
                return b""
            await self._waiters.park()

    def close_write(self) -> None:
        self._eof = True
        self._wake()

    def close_read(self) -> None:
        self._reader_gone = True
        self._buffer.clear()
        self._wake()

    def abort(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._buffer.clear()
        self._wake()


class MemoryStream:
    """One end of an in-memory stream. Implements :class:`~fednode.net.interface.Stream`."""

    def __init__(
        self,
        *,
        protocol: str,
        remote_peer: PeerId,
        incoming: _Pipe,
        outgoing: _Pipe,
        connection: _Connection,
    ) -> None:
        self._protocol = protocol
        self._remote_peer = remote_peer
        self._incoming = incoming
        self._outgoing = outgoing
        self._connection = connection
        self._closed = False

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def remote_peer(self) -> PeerId:
        return self._remote_peer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise TransportError("stream is closed")
        await self._outgoing.write(memoryview(data).cast("B"))

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise TransportError("stream is closed")
        return await self._incoming.read(max_bytes)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            return
        if self._outgoing.error is not None:
            raise TransportError(self._outgoing.error)
        self._outgoing.close_write()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._outgoing.close_write()
            self._incoming.close_read()
            self._connection.forget(self)
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        self._abort("stream reset")
        await trio.lowlevel.checkpoint()

    def _abort(self, reason: str) -> None:
        self._incoming.abort(reason)
        self._outgoing.abort(reason)
        self._connection.forget(self)

    def __repr__(self) -> str:
        return f"MemoryStream({self._protocol!r}, remote={self._remote_peer})"


class _Connection:
    """A connection between two hosts, with the streams opened over it."""

    def __init__(self, a: MemoryHost, b: MemoryHost) -> None:
        self.hosts = (a, b)
        self.streams: dict[MemoryStream, None] = {}  # an ordered set

    def forget(self, stream: MemoryStream) -> None:
        self.streams.pop(stream, None)

    def other(self, host: MemoryHost) -> MemoryHost:
        a, b = self.hosts
        return b if host is a else a


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


class MemoryHost:
    """A host on a :class:`MemoryNetwork`. Implements :class:`~fednode.net.interface.Host`.

    Open one with :meth:`MemoryNetwork.open_host`. Stream handlers run in the host's nursery; the
    stream is closed when the handler returns (as ``trio.serve_listeners`` does) and reset if it
    raises. Close a subscription by closing its channel.
    """

    def __init__(self, network: MemoryNetwork, peer: PeerId, address: str | None) -> None:
        self._network = network
        self._peer_id = peer
        self._address = address
        self._connections: dict[PeerId, _Connection] = {}
        self._known_addrs: dict[PeerId, list[str]] = {}
        self._handlers: dict[str, StreamHandler] = {}
        self._subscriptions: dict[str, list[trio.MemorySendChannel[GossipMessage]]] = {}
        self._event_channels: list[trio.MemorySendChannel[PeerEvent]] = []
        self._discovery = DiscoveryFeed(peer)
        self._delayed: list[tuple[float, int, GossipMessage]] = []
        self._delayed_changed = trio.lowlevel.ParkingLot()
        self._tasks: trio.Nursery | None = None
        self._closed = False

    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    @property
    def closed(self) -> bool:
        return self._closed

    def listen_addrs(self) -> list[str]:
        return [self._address] if self._address is not None and not self._closed else []

    async def connect(self, addr: str) -> PeerId:
        await trio.lowlevel.checkpoint()
        self._check_open()
        peer, remote = self._network._listener(addr)
        if peer == self._peer_id:
            raise TransportError("cannot dial ourselves")
        if peer not in self._connections:
            if remote is None:
                raise TransportError(f"connection refused: nothing listens at {addr}")
            if remote.peer_id != peer:
                raise TransportError(f"{addr} answered as {remote.peer_id}, not {peer}")
            await self._network._round_trip(self._peer_id, peer)
            self._check_open()
            if peer not in self._connections:  # the peer may have dialled us meanwhile
                if remote._closed:
                    raise TransportError(f"connection to {peer} refused: its host closed")
                if not self._network._reachable(self._peer_id, peer):
                    raise TransportError(f"{peer} is unreachable (network partitioned)")
                self._network._connect(self, remote)
        self._learn_addrs(peer, [addr])
        return peer

    async def disconnect(self, peer: PeerId) -> None:
        connection = self._connections.get(peer)
        if connection is not None:
            self._network._drop_connection(connection, "disconnected")
        await trio.lowlevel.checkpoint()

    def connected_peers(self) -> list[PeerId]:
        return list(self._connections)

    def peer_addrs(self, peer: PeerId) -> list[str]:
        return list(self._known_addrs.get(peer, []))

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    async def open_stream(self, peer: PeerId, protocol: str) -> MemoryStream:
        connection = await self._connection_to(peer)
        await self._network._round_trip(self._peer_id, peer)  # protocol negotiation
        self._check_open()
        if self._connections.get(peer) is not connection:
            raise TransportError(f"connection to {peer} closed while opening a stream")
        remote = connection.other(self)
        handler = remote._handlers.get(protocol)
        if handler is None:
            raise TransportError(f"{peer} does not support protocol {protocol!r}")
        capacity = self._network.stream_buffer
        forward, backward = _Pipe(capacity), _Pipe(capacity)
        ours = MemoryStream(
            protocol=protocol,
            remote_peer=peer,
            incoming=backward,
            outgoing=forward,
            connection=connection,
        )
        theirs = MemoryStream(
            protocol=protocol,
            remote_peer=self._peer_id,
            incoming=forward,
            outgoing=backward,
            connection=connection,
        )
        connection.streams[ours] = None
        connection.streams[theirs] = None
        remote._spawn_handler(handler, theirs)
        return ours

    async def ping(self, peer: PeerId) -> float:
        connection = await self._connection_to(peer)
        started = trio.current_time()
        await self._network._round_trip(self._peer_id, peer)
        if self._connections.get(peer) is not connection:
            raise TransportError(f"connection to {peer} closed during ping")
        return trio.current_time() - started

    async def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[GossipMessage]:
        await trio.lowlevel.checkpoint()
        self._check_open()
        send, receive = trio.open_memory_channel[GossipMessage](self._network.gossip_buffer)
        self._subscriptions.setdefault(topic, []).append(send)
        return receive

    async def publish(self, topic: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._check_open()
        limit = self._network.gossip_max_message
        if len(data) >= limit:
            raise TransportError(
                f"gossip message of {len(data)} bytes; the limit is {limit} (use a stream)"
            )
        self._network._publish(self, topic, bytes(data))

    def peer_events(self) -> trio.MemoryReceiveChannel[PeerEvent]:
        # Unbounded: connection events are few, and losing a PeerDisconnected would be worse.
        send, receive = trio.open_memory_channel[PeerEvent](math.inf)
        if self._closed:
            send.close()  # a closed host has no more events: the channel ends at once
        else:
            self._event_channels.append(send)
        return receive

    def discoveries(self) -> trio.MemoryReceiveChannel[PeerDiscovered]:
        return self._discovery.open_channel()

    async def aclose(self) -> None:
        self._shut_down()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._connections)} connections"
        return f"MemoryHost({self._peer_id}, {state})"

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"host {self._peer_id} is closed")

    async def _connection_to(self, peer: PeerId) -> _Connection:
        """The connection to ``peer``, dialling a known address if there is none yet."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        if peer == self._peer_id:
            raise TransportError("cannot open a connection to ourselves")
        connection = self._connections.get(peer)
        if connection is not None:
            return connection
        addrs = self._known_addrs.get(peer)
        if not addrs:
            raise TransportError(f"not connected to {peer} and no address known for it")
        failures = []
        for addr in list(addrs):
            try:
                await self.connect(addr)
            except TransportError as exc:
                failures.append(str(exc))
                continue
            connection = self._connections.get(peer)
            if connection is not None:
                return connection
        raise TransportError(f"cannot reach {peer}: {'; '.join(failures) or 'connection lost'}")

    def _learn_addrs(self, peer: PeerId, addrs: list[str]) -> None:
        known = self._known_addrs.setdefault(peer, [])
        known.extend(addr for addr in addrs if addr not in known)

    def _emit(self, event: PeerEvent) -> None:
        for channel in list(self._event_channels):
            try:
                channel.send_nowait(event)
            except trio.BrokenResourceError:  # the consumer closed its end
                self._event_channels.remove(channel)

    def _receive_gossip(self, due: float, sequence: int, message: GossipMessage) -> None:
        if due <= trio.current_time():
            self._deliver(message)
        else:
            heapq.heappush(self._delayed, (due, sequence, message))
            self._delayed_changed.unpark_all()

    def _deliver(self, message: GossipMessage) -> None:
        channels = self._subscriptions.get(message.topic, [])
        for channel in list(channels):
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:
                self._network._overflowed += 1
                logger.debug("%s: %r subscription full, dropped", self._peer_id, message.topic)
            except trio.BrokenResourceError:  # unsubscribed
                channels.remove(channel)
            else:
                self._network._delivered += 1
        if not channels:
            self._subscriptions.pop(message.topic, None)

    async def _deliver_delayed_gossip(self) -> None:
        while True:
            now = trio.current_time()
            while self._delayed and self._delayed[0][0] <= now:
                _, _, message = heapq.heappop(self._delayed)
                self._deliver(message)
            with trio.move_on_at(self._delayed[0][0] if self._delayed else math.inf):
                await self._delayed_changed.park()

    async def _serve(self, running: trio.Event) -> None:
        # An inner nursery, so shutting down cancels the host's tasks but not the caller's block.
        async with trio.open_nursery() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._deliver_delayed_gossip)
            running.set()

    def _spawn_handler(self, handler: StreamHandler, stream: MemoryStream) -> None:
        assert self._tasks is not None and not self._closed
        self._tasks.start_soon(self._run_handler, handler, stream, name=stream.protocol)

    async def _run_handler(self, handler: StreamHandler, stream: MemoryStream) -> None:
        try:
            await handler(stream)
        except TransportError as exc:
            logger.info("%s handler for %s ended: %s", stream.protocol, stream.remote_peer, exc)
            await stream.reset()
        except Exception:
            peer = stream.remote_peer
            logger.exception("%s handler for %s failed; stream reset", stream.protocol, peer)
            await stream.reset()
        else:
            await stream.aclose()

    def _shut_down(self) -> None:
        """Close everything at once; used by both ``aclose`` and :meth:`MemoryNetwork.kill`."""
        if self._closed:
            return
        self._closed = True
        network = self._network
        if network._hosts.get(self._peer_id) is self:
            del network._hosts[self._peer_id]
        network._leave_lan(self)
        for connection in list(self._connections.values()):
            network._drop_connection(connection, f"{self._peer_id} went away")
        for channels in self._subscriptions.values():
            for channel in channels:
                channel.close()
        self._subscriptions.clear()
        for events in self._event_channels:
            events.close()
        self._event_channels.clear()
        self._discovery.close()
        self._delayed.clear()
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()


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
