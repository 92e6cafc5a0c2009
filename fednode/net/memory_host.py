"""Net layer: a host of the in-memory transport (``memory``), one peer's end of the network.

Implements the :class:`~fednode.net.interface.Host` interface on a
:class:`~fednode.net.memory.MemoryNetwork`, which does the dialling, the gossip flooding and the
faults; the host keeps its connections, stream handlers, subscriptions and event channels, and
delivers delayed gossip on time (``trio.sleep``, so tests run on ``MockClock``).
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import TYPE_CHECKING

import trio

from fednode.errors import TransportError
from fednode.net.discovery import DiscoveryFeed
from fednode.net.interface import (
    GossipMessage,
    PeerDiscovered,
    PeerEvent,
    StreamHandler,
)
from fednode.net.memory_stream import MemoryStream, _Connection, _Pipe
from fednode.wire import PeerId

if TYPE_CHECKING:
    from fednode.net.memory import MemoryNetwork

# The transport's one logger, whichever of its modules logs.
logger = logging.getLogger("fednode.net.memory")


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
