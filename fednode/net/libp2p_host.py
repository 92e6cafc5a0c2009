"""Net layer: fednode's :class:`~fednode.net.interface.Host` on py-libp2p 0.8.1 (TCP, Noise, yamux,
identify, ping, GossipSub), with a workaround for each sharp edge of that release measured in
``notes/py-libp2p-0.8.1.md``. This docstring is the one place they are listed; each has a test in
``tests/net/test_libp2p_workarounds.py`` that fails without it.

(a) Security: Noise only. Stock hosts also accept plaintext, secio and TLS (plaintext lets a peer
    claim any peer ID); ours offers and accepts ``/noise`` alone.
(b) Dial delay: ``max_connections_per_peer=1``, so ``connect`` returns when the dial succeeds
    instead of after a fixed 250 ms happy-eyeballs wait.
(c) GossipSub: 1 s heartbeat (stock 120 s), its "adaptive" mode off (it stretches the heartbeat
    to 30-60 s when the mesh looks thin), spam limit off (10 msg/s/topic, our own publishes
    included), ``publish`` paced (at most one per ``publish_interval``, and waits while a peer's
    32-RPC outbound queue is half full, since a full queue drops silently, but at most
    ``publish_queue_wait`` for a peer that does not read: then it is skipped), messages of
    ``gossip_max_message`` (512 KiB) or more refused with TransportError (libp2p drops RPCs over
    1 MiB without a word).
(d) Inbound leak: each inbound connection held its task and a limiter slot until the swarm
    stopped (dead after 250); our Swarm releases both when the connection closes, and the
    connection limits are concurrent and far out of the way (no watermark dialing or pruning).
(e) Shutdown: leaving ``host.run()`` left the listener accepting and connections open; we close
    connections concurrently (aborting the ones that will not close) and call ``host.close()``
    inside ``run()``.
(f) Handler exceptions crashed the host or wedged the connection; the swarm's stream entry point
    is guarded (ours and libp2p's own handlers), and our handlers log and reset.
(g) A reader waiting on a stream when its peer is killed wakes to a clean end of stream. yamux
    marks such streams reset, so ``receive_some`` raises TransportError for them and returns
    ``b""`` only after the peer's FIN. A peer that dies just after its FIN still looks clean:
    framing above must check lengths (and ack what matters).
(h) Frozen peer: writes blocked forever and ``disconnect`` hung behind them. Every write has a
    ``send_timeout`` and a ``stall_timeout``; on expiry the socket is closed under the stream
    (which unblocks every writer), the stream reset and the peer disconnected, all bounded.
(i) Slow reader: yamux failed a write after 5 s without window credit. We wait for credit
    ourselves, bounded by ``stall_timeout``. Nothing in this adapter blocks the trio loop;
    callers must keep CPU work off it (``trio.to_thread``).
(j) Muxer: yamux only; mplex (24 MB/s, resets unread streams after 5 s) is never negotiated.
(k) Dialing: libp2p retried 3 times with backoff and then refused every dial to that peer for
    60 s; we dial once and forget the failure, retries being the dial planner's job.
(l) ``connect(addr)`` dials that address: stale peerstore addresses are cleared first (libp2p
    tries one address per transport, preferring non-loopback ones it remembers).
(m) Listening: a requested port already in use raises TransportError (libp2p's SO_REUSEPORT
    socket would share the port with the other node); wildcard addresses are announced as the
    concrete interface addresses.
(n) The peerstore evicted our own key first once it held 1000 peers, breaking identify and
    gossip; ours never evicts it.
(o) Logging: libp2p's loggers are set to ERROR unless ``FEDNODE_LIBP2P_DEBUG`` is set, and the
    ERROR records it writes for routine churn (a stream opened as its connection closes) dropped.
(p) Auto-connector: libp2p dialled every peerstore peer, every 30 s and after each disconnection,
    while below (low + high watermark) / 2 connections, so a dropped peer came back; ours never
    dials on its own.
(q) Closing: yamux cannot close a read side; a peer still sending to a stream we closed (or whose
    handler returned) is never told: its writes stall or vanish. Like TCP, we reset such a
    stream if its data sits unread, or when more arrives (within ``stall_timeout``).
(r) Errors: whatever leaves the ``open_libp2p_host`` block comes out of libp2p's five nested
    nurseries; the caller gets its own exception back unwrapped, libp2p's own as TransportError.
(s) Cancellation: a write cancelled halfway through a socket send left half a Noise frame on the
    wire and killed the connection with every stream on it. Our writes go out in chunks of at
    most 1 MiB under a cancel shield (bounded by ``stall_timeout``); a cancellation lands between
    chunks and resets only its stream.
(t) mDNS, opt-in (``mdns=True``; tested in ``test_libp2p_mdns.py`` and, over real multicast, in
    network namespaces): 0.8.1's MDNSDiscovery emits no event and binds every interface; ours
    binds our listen interfaces, announces those addresses, and feeds ``discoveries()`` on trio.
(u) Throughput: stock Noise + yamux moved ~150 MB/s (one socket call per Noise message, two
    messages per 64 KiB frame, a window update per read). Ours batch messages per socket write
    and per read, size frames to fill a message and grow windows to 16 MiB, on the same Noise
    session with standard frames on the wire (``libp2p_fastpath``, which
    ``FEDNODE_LIBP2P_FASTPATH=0`` turns off; measured by ``benchmarks/transfer.py``, checked
    against a stock host in ``test_libp2p_fastpath.py``). A forged message or an overrun window
    closes the connection (stock could first end the stream as if cleanly after a forged
    message, and buffers whatever a peer sends past its window).

Internals are split: ``libp2p_workarounds`` (everything touching libp2p's private parts, and the
host builder), ``libp2p_stream`` (Stream), ``libp2p_gossip`` (subscribe and publish),
``libp2p_mdns`` (LAN discovery), ``libp2p_fastpath`` (the batched Noise session and yamux).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INotifee
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from fednode.crypto.keys import NodeKey
from fednode.errors import FednodeError, LocalProtocolError, TransportError
from fednode.net.discovery import DiscoveryFeed
from fednode.net.interface import (
    GossipMessage,
    PeerConnected,
    PeerDisconnected,
    PeerDiscovered,
    PeerEvent,
    StreamHandler,
)
from fednode.net.libp2p_gossip import GOSSIP_MAX_MESSAGE, Gossip, gossip_router
from fednode.net.libp2p_stream import Libp2pStream, StreamLimits
from fednode.net.libp2p_workarounds import (
    CLOSE_TIMEOUT,
    abort_connection,
    build_host,
    check_port_free,
    close_network,
    forget_failed_dial,
    quiet_libp2p_logging,
)
from fednode.wire import PeerId

if TYPE_CHECKING:
    from fednode.net.libp2p_mdns import MdnsService, MdnsStatistics

logger = logging.getLogger("fednode.net.libp2p")

__all__ = ["GOSSIP_MAX_MESSAGE", "Libp2pHost", "open_libp2p_host"]

_EVENT_BUFFER = 1024
_PING_SIZE = 32
_DISCOVERED_ADDR_TTL = 120  # seconds libp2p's peerstore keeps an mDNS address (0.8.1's default)


class Libp2pHost:
    """fednode's Host on a running libp2p host. Made by :func:`open_libp2p_host`."""

    def __init__(
        self,
        lhost: Any,
        pubsub: Any,
        router: Any,
        gossip: Gossip,
        nursery: trio.Nursery,
        *,
        limits: StreamLimits,
        dial_timeout: float,
    ) -> None:
        self._lhost = lhost
        self._pubsub = pubsub
        self._router = router
        self._gossip = gossip
        self._nursery = nursery
        self._limits = limits
        self._dial_timeout = dial_timeout
        self._own_id: ID = lhost.get_id()
        self._peer_id = PeerId(str(self._own_id))
        self._event_senders: list[trio.MemorySendChannel[PeerEvent]] = []
        self._reported: set[PeerId] = set()
        self._discovery = DiscoveryFeed(self._peer_id)
        self._mdns: MdnsService | None = None
        self._closed = False
        self._closed_event = trio.Event()
        lhost.get_network().register_notifee(_PeerEventNotifee(self))

    # -- identity and addresses --------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    def listen_addrs(self) -> list[str]:
        return [str(addr) for addr in self._lhost.get_addrs()]

    def peer_addrs(self, peer: PeerId) -> list[str]:
        try:
            addrs = self._lhost.get_peerstore().addrs(_to_id(peer))
        except Exception:  # PeerStoreError (a KeyError), or a malformed ID
            return []
        return [_with_peer(addr, peer) for addr in addrs]

    # -- connections -------------------------------------------------------------------------

    async def connect(self, addr: str) -> PeerId:
        self._check_open()
        try:
            info = info_from_p2p_addr(Multiaddr(addr))
        except Exception as exc:
            raise TransportError(f"not a dialable multiaddr: {addr!r}") from exc
        if info.peer_id == self._own_id:
            raise TransportError(f"{addr} is this node's own address")
        peer = PeerId(str(info.peer_id))
        if peer not in self.connected_peers():
            # (l) dial exactly this address, (k) even if a dial to this peer just failed.
            with contextlib.suppress(Exception):
                self._lhost.get_peerstore().clear_addrs(info.peer_id)
            forget_failed_dial(self._lhost, info.peer_id)
        try:
            with trio.fail_after(self._dial_timeout):
                await self._lhost.connect(info)
        except trio.TooSlowError as exc:
            raise TransportError(f"dialling {addr} timed out") from exc
        except Exception as exc:
            raise TransportError(f"dialling {addr} failed: {exc}") from exc
        return peer

    async def disconnect(self, peer: PeerId) -> None:
        pid = _to_id(peer)
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
            await self._lhost.disconnect(pid)
        for conn in self._lhost.get_network().get_connections(pid):
            abort_connection(conn)  # (h) it would not close: a frozen peer

    def connected_peers(self) -> list[PeerId]:
        network = self._lhost.get_network()
        return [PeerId(str(pid)) for pid, conns in network.connections.items() if conns]

    def peer_events(self) -> trio.MemoryReceiveChannel[PeerEvent]:
        send, receive = trio.open_memory_channel[PeerEvent](_EVENT_BUFFER)
        if self._closed:
            send.close()
        else:
            self._event_senders.append(send)
        return receive

    def discoveries(self) -> trio.MemoryReceiveChannel[PeerDiscovered]:
        return self._discovery.open_channel()

    def mdns_statistics(self) -> MdnsStatistics | None:
        """mDNS counters, or None when the host was opened without mDNS."""
        return None if self._mdns is None else self._mdns.statistics()

    async def _start_mdns(self) -> None:
        from fednode.net.libp2p_mdns import MdnsService  # zeroconf only when asked for

        self._mdns = await MdnsService.start(
            self._peer_id,
            self.listen_addrs(),
            on_discovered=self._discovered,
            on_gone=self._discovery.forget,
        )

    def _discovered(self, event: PeerDiscovered) -> bool:
        if not self._discovery.report(event):
            return False
        addrs = [info_from_p2p_addr(Multiaddr(addr)).addrs[0] for addr in event.addrs]
        self._lhost.get_peerstore().add_addrs(_to_id(event.peer), addrs, _DISCOVERED_ADDR_TTL)
        return True

    def _peer_connected(self, pid: ID) -> None:
        peer = PeerId(str(pid))
        if peer not in self._reported:
            self._reported.add(peer)
            self._emit(PeerConnected(peer=peer))

    def _peer_disconnected(self, pid: ID) -> None:
        peer = PeerId(str(pid))
        if peer in self._reported and not self._lhost.get_network().get_connections(pid):
            self._reported.discard(peer)
            self._emit(PeerDisconnected(peer=peer))

    def _emit(self, event: PeerEvent) -> None:
        for send in list(self._event_senders):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                logger.warning("peer event consumer is not keeping up; dropped %s", event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._event_senders.remove(send)

    # -- streams -----------------------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def on_stream(net_stream: Any) -> None:
            stream = self._wrap(net_stream, protocol)
            try:
                await handler(stream)
            except Exception as exc:
                _log_handler_failure(protocol, stream.remote_peer, exc)
                await stream.reset()
                return
            await stream.aclose()

        self._lhost.set_stream_handler(TProtocol(protocol), on_stream)

    async def open_stream(self, peer: PeerId, protocol: str) -> Libp2pStream:
        self._check_open()
        pid = _to_id(peer)
        try:
            with trio.fail_after(self._dial_timeout):
                net_stream = await self._lhost.new_stream(pid, [TProtocol(protocol)])
        except trio.TooSlowError as exc:
            raise TransportError(f"opening {protocol} to {peer} timed out") from exc
        except Exception as exc:
            raise TransportError(f"opening {protocol} to {peer} failed: {exc}") from exc
        return self._wrap(net_stream, protocol)

    def _wrap(self, net_stream: Any, protocol: str) -> Libp2pStream:
        peer = PeerId(str(net_stream.muxed_conn.peer_id))
        return Libp2pStream(
            net_stream,
            protocol=protocol,
            remote_peer=peer,
            limits=self._limits,
            on_stall=self._on_stall,
            spawn=self._nursery.start_soon,
        )

    async def _on_stall(self, peer: PeerId, reason: str) -> None:
        pid = _to_id(peer)
        for conn in self._lhost.get_network().get_connections(pid):
            abort_connection(conn)
        await self.disconnect(peer)

    async def ping(self, peer: PeerId) -> float:
        self._check_open()
        pid = _to_id(peer)
        payload = os.urandom(_PING_SIZE)
        try:
            with trio.fail_after(self._limits.stall_timeout):
                net_stream = await self._lhost.new_stream(pid, [PING_PROTOCOL_ID])
                try:
                    start = trio.current_time()
                    await net_stream.write(payload)
                    echo = await read_exactly(net_stream, _PING_SIZE)
                    rtt = trio.current_time() - start
                finally:
                    with contextlib.suppress(Exception):
                        await net_stream.close()
        except trio.TooSlowError as exc:
            raise TransportError(f"ping to {peer} timed out") from exc
        except Exception as exc:
            raise TransportError(f"ping to {peer} failed: {exc}") from exc
        if echo != payload:
            raise TransportError(f"ping to {peer}: wrong echo")
        return rtt

    # -- gossip ------------------------------------------------------------------------------

    async def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[GossipMessage]:
        self._check_open()
        return await self._gossip.subscribe(topic, self._nursery)

    async def publish(self, topic: str, data: bytes) -> None:
        self._check_open()
        await self._gossip.publish(topic, data)

    # -- shutdown ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the listener, every connection and every task; idempotent."""
        if self._closed:
            await self._closed_event.wait()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            self._nursery.cancel_scope.cancel()
            if self._mdns is not None:
                await self._mdns.aclose()
            self._discovery.close()
            for manager in (self._router.manager, self._pubsub.manager):
                with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
                    await manager.stop()
            await close_network(self._lhost)
            for event_send in self._event_senders:
                event_send.close()
            self._gossip.close()
            self._closed_event.set()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("host is closed")


class _PeerEventNotifee(INotifee):
    """Turns swarm notifications into PeerConnected / PeerDisconnected, one per peer."""

    def __init__(self, host: Libp2pHost) -> None:
        self._host = host

    async def connected(self, network: Any, conn: Any) -> None:
        self._host._peer_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._host._peer_disconnected(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


def _with_peer(addr: Multiaddr, peer: PeerId) -> str:
    """``addr`` ending in ``/p2p/<peer>`` exactly once."""
    text = str(addr)
    marker = text.find("/p2p/")
    return f"{text[:marker] if marker >= 0 else text}/p2p/{peer}"


def _to_id(peer: PeerId) -> ID:
    try:
        return ID.from_base58(peer)
    except Exception as exc:
        raise TransportError(f"not a peer ID: {peer!r}") from exc


def _log_handler_failure(protocol: str, peer: PeerId, exc: Exception) -> None:
    if isinstance(exc, FednodeError) and not isinstance(exc, LocalProtocolError):
        logger.info("%s handler for %s: %s; stream reset", protocol, peer, exc)
    else:
        logger.error("%s handler for %s crashed; stream reset", protocol, peer, exc_info=exc)


def _parse_listen_addrs(listen_addrs: Sequence[str]) -> list[Multiaddr]:
    maddrs: list[Multiaddr] = []
    for text in dict.fromkeys(listen_addrs):  # libp2p keys listeners by address: no duplicates
        try:
            maddr = Multiaddr(text)
            host = maddr.value_for_protocol("ip4") or maddr.value_for_protocol("ip6")
            port = int(maddr.value_for_protocol("tcp"))
        except Exception as exc:
            raise TransportError(f"cannot listen on {text!r}: not /ip4|ip6/…/tcp/…") from exc
        try:
            check_port_free(str(host), port)
        except OSError as exc:
            raise TransportError(f"cannot listen on {text}: {exc.strerror}") from exc
        maddrs.append(maddr)
    return maddrs


@asynccontextmanager
async def open_libp2p_host(
    key: NodeKey,
    listen_addrs: Sequence[str] = (),
    *,
    gossip_heartbeat: float = 1.0,
    gossip_max_message: int = GOSSIP_MAX_MESSAGE,
    publish_interval: float = 0.02,
    publish_queue_wait: float = 1.0,
    send_timeout: float = 30.0,
    stall_timeout: float = 15.0,
    dial_timeout: float = 10.0,
    subscription_buffer: int = 256,
    mdns: bool = False,
) -> AsyncIterator[Libp2pHost]:
    """Run a libp2p host with ``key`` as its identity, listening on ``listen_addrs``
    (``/ip4/0.0.0.0/tcp/0`` style; port 0 picks a free port). Leaving the block closes it.

    Args:
        gossip_heartbeat: GossipSub heartbeat, seconds.
        gossip_max_message: ``publish`` refuses payloads of this many bytes or more; at most
            :data:`GOSSIP_MAX_MESSAGE` (libp2p's 1 MiB RPC limit must also hold the envelope).
        publish_interval: minimum spacing of our publishes, seconds (50/s by default).
        publish_queue_wait: longest a publish waits for a peer's half-full outbound queue to
            drain; a peer still half full then is stuck and no longer waited for (until its
            queue drains), so one slow peer does not delay every heartbeat.
        send_timeout: deadline of one ``send_all``; stall_timeout: longest time a write may
            make no progress. Either expiring disconnects the peer.
        dial_timeout: deadline of ``connect`` and ``open_stream``.
        subscription_buffer: messages held per subscriber before new ones are dropped.
        mdns: find peers on the LAN with mDNS (``discoveries()``): announce our listen
            addresses (not loopback) on their interfaces, or only listen if there are none.
            Off by default: nothing is bound or sent for mDNS unless asked.
    """
    if not 0 < gossip_max_message <= GOSSIP_MAX_MESSAGE:
        raise ValueError(f"gossip_max_message must be in (0, {GOSSIP_MAX_MESSAGE}]")
    quiet_libp2p_logging()
    maddrs = _parse_listen_addrs(listen_addrs)
    lhost = build_host(key.seed, dial_timeout=dial_timeout)
    router = gossip_router(gossip_heartbeat)
    pubsub = Pubsub(lhost, router, strict_signing=True)
    gossip = Gossip(
        pubsub,
        lhost.get_id(),
        max_message=gossip_max_message,
        publish_interval=publish_interval,
        queue_wait=publish_queue_wait,
        subscription_buffer=subscription_buffer,
    )
    limits = StreamLimits(send_timeout=send_timeout, stall_timeout=stall_timeout)
    body_error: BaseException | None = None
    try:
        async with lhost.run(maddrs):
            try:
                if len(lhost.get_transport_addrs()) < len(maddrs):
                    raise TransportError(f"could not listen on all of {list(listen_addrs)}")
                async with (
                    background_trio_service(pubsub),
                    background_trio_service(router),
                    trio.open_nursery() as nursery,
                ):
                    # Our tasks get a nursery of their own, so that closing the host cancels
                    # them and not the caller's code inside this block.
                    tasks: trio.Nursery = await nursery.start(_task_nursery)
                    host = Libp2pHost(
                        lhost,
                        pubsub,
                        router,
                        gossip,
                        tasks,
                        limits=limits,
                        dial_timeout=dial_timeout,
                    )
                    try:
                        if mdns:
                            await host._start_mdns()
                        yield host
                    except BaseException as exc:
                        body_error = exc
                        raise
                    finally:
                        await host.aclose()
            finally:
                with trio.CancelScope(shield=True):
                    await close_network(lhost)
    except BaseExceptionGroup as group:
        # libp2p's five nested nurseries wrap whatever comes out of this block. Give the
        # caller back its own exception (or our TransportError, or a cancellation) unwrapped,
        # and anything libp2p raised itself as a TransportError.
        error = _unwrap(group, body_error)
    else:
        return
    raise error


def _unwrap(group: BaseExceptionGroup[Any], body_error: BaseException | None) -> BaseException:
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1:
        (sole,) = leaves
        if sole is body_error or isinstance(sole, (trio.Cancelled, TransportError)):
            return sole
    if body_error is None and all(isinstance(leaf, Exception) for leaf in leaves):
        error = TransportError(f"the libp2p host failed: {leaves[0]!r}")
        error.__cause__ = group
        return error
    return group


async def _task_nursery(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    # (Any: libp2p pulls in trio-typing, whose stubs shadow trio's own TaskStatus for mypy.)
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
