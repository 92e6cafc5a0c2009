"""Net layer, libp2p adapter internals: how we build a py-libp2p 0.8.1 host, and the targeted fixes
that reach into libp2p's internals (listed one line each in :mod:`fednode.net.libp2p_host`).

Everything that depends on libp2p's private names lives here, so that an upgrade of libp2p is
reviewed in one file; the tests also use these pieces to set the stock and the fixed behaviour
side by side.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from libp2p.abc import IMuxedConn
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from libp2p.rcmgr import new_resource_manager
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader
from multiaddr import Multiaddr
from multiaddr.utils import get_thin_waist_addresses

from fednode.net.libp2p_fastpath import FastNoiseTransport, use_fast_yamux

logger = logging.getLogger("fednode.net.libp2p")

DEBUG_ENV = "FEDNODE_LIBP2P_DEBUG"
"""Set this environment variable to see libp2p's own log output below ERROR."""
FASTPATH_ENV = "FEDNODE_LIBP2P_FASTPATH"
"""Set to ``0`` to build hosts with stock py-libp2p Noise and yamux (for A/B measurements)."""

# Concurrent connections. With the inbound leak fixed (FednodeSwarm) this is a real cap on open
# connections, not the cumulative count it was in 0.8.1; far above what one Python node serves.
MAX_CONNECTIONS = 100_000
MAX_PEERSTORE_PEERS = 10_000
_NEGOTIATE_TIMEOUT = 10  # seconds; libp2p's 30 s default hides dead peers for too long


# -- logging -----------------------------------------------------------------------------------


class _DropLibp2pRootRecords(logging.Filter):
    """Drops records that libp2p code logs straight to the root logger (``logging.warning(...)``
    in ``swarm_connection.py`` and others) below ERROR. Attached to the root logger, it sees
    only records created there, so the application's own propagated records pass untouched."""

    def __init__(self, package_dir: str) -> None:
        super().__init__()
        self._package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self._package_dir)


class _DropRoutineErrors(logging.Filter):
    """Drops the ERROR records libp2p writes for routine churn: a stream (identify, pubsub) being
    opened while its connection closes, a connection reset or closed under yamux's reader. The
    failure reaches us as an exception or a disconnection anyway."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self._prefixes))


_ROUTINE_ERRORS = {
    "libp2p.host.basic_host": ("Failed to open stream to peer",),
    "libp2p.protocol_muxer.multiselect_client": ("MultiselectClient handshake",),
    "libp2p.stream_muxer.yamux.yamux": ("Error in handle_incoming",),
    "libp2p.transport.tcp.tcp": ("Failed to open TCP stream",),  # a refused dial: we raise
}
_quieted = False


def quiet_libp2p_logging() -> None:
    """Set libp2p's loggers to ERROR and drop its routine-churn errors, unless
    ``FEDNODE_LIBP2P_DEBUG`` is set. Idempotent."""
    global _quieted
    if _quieted or os.environ.get(DEBUG_ENV):
        return
    _quieted = True
    import libp2p

    for name in ("libp2p", "multiaddr"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, prefixes in _ROUTINE_ERRORS.items():
        logging.getLogger(name).addFilter(_DropRoutineErrors(prefixes))
    logging.getLogger().addFilter(_DropLibp2pRootRecords(os.path.dirname(libp2p.__file__)))


# -- identity ----------------------------------------------------------------------------------


def key_pair_from_seed(seed: bytes) -> Any:
    """libp2p's Ed25519 key pair for a fednode seed (same key, same peer ID)."""
    return create_new_key_pair(seed)


# -- (d) inbound connection leak, (p) auto-connector ----------------------------------------


class _DialsNobody(AutoConnector):
    """An auto-connector that never dials: 0.8.1's dials peerstore peers whenever the swarm holds
    fewer than (low + high watermark) / 2 connections, every 30 s and after each disconnection,
    so a peer we dropped (a frozen one, say) comes back. fednode's dial planner decides."""

    async def maybe_connect(self) -> None:
        return None


class FednodeSwarm(Swarm):
    """A Swarm whose inbound-connection task ends when its connection closes, and which does not
    dial on its own (see ``_DialsNobody``).

    In 0.8.1 ``_do_handle_inbound_connection`` ends with ``await self.manager.wait_finished()``,
    so every inbound connection keeps its listener task and its ``_inbound_limiter`` slot until
    the swarm stops. Here the task waits for the muxed connection's ``event_closed`` instead.
    The connection itself runs in the swarm's manager either way; this task only owns the socket
    (trio's ``serve_listeners`` closes it when the task returns), which is why it must wait.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auto_connector = _DialsNobody(self, self.connection_config.auto_connect_interval)

    async def _do_handle_inbound_connection(
        self, read_write_closer: Any, maddr: Multiaddr, failure_event: Any
    ) -> None:
        if isinstance(read_write_closer, IMuxedConn):  # QUIC & co: not used by fednode
            await super()._do_handle_inbound_connection(
                cast(Any, read_write_closer), maddr, failure_event
            )
            return
        remote = self._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await self.connection_gate.is_allowed(remote):
            with contextlib.suppress(Exception):
                await read_write_closer.close()
            return
        raw_conn = RawConnection(read_write_closer, False)
        try:
            muxed_conn = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        except Exception as exc:
            logger.debug("inbound connection on %s failed to upgrade: %r", maddr, exc)
            with contextlib.suppress(Exception):
                await raw_conn.close()
            return
        closed = getattr(muxed_conn, "event_closed", None)
        if isinstance(closed, trio.Event):
            await closed.wait()
        else:  # a muxer without the event: fall back to libp2p's own barrier
            await self.manager.wait_finished()


# -- peerstore eviction of our own key ---------------------------------------------------------


class FednodePeerStore(PeerStore):
    """A PeerStore that never evicts our own entry.

    0.8.1 evicts entries without addresses first once it holds more than ``max_peers`` peers; our
    own entry (the key pair, no addresses) goes first, after which ``host.get_private_key()``,
    identify and signed peer records fail for every later peer.
    """

    def __init__(self, own_id: ID, max_peers: int = MAX_PEERSTORE_PEERS) -> None:
        super().__init__(max_peers=max_peers)
        self._own_id = own_id

    def _enforce_peer_limit(self) -> None:
        own = self.peer_data_map.pop(self._own_id, None)
        try:
            super()._enforce_peer_limit()
        finally:
            if own is not None:
                self.peer_data_map[self._own_id] = own


# -- (f) handler exceptions --------------------------------------------------------------------


def guard_swarm_stream_handler(swarm: Any) -> None:
    """Wrap the swarm's one stream entry point (BasicHost's multistream dispatcher) so that an
    exception escaping any protocol handler, ours or libp2p's (identify, ping, pubsub), is logged
    and the stream reset. In 0.8.1 such an exception crashes the whole host (``ValueError``) or
    kills the connection's stream-accept loop (``StreamEOF``), wedging the connection."""
    dispatch: Callable[[Any], Awaitable[None]] = swarm.common_stream_handler

    async def guarded(net_stream: Any) -> None:
        try:
            await dispatch(net_stream)
        except Exception as exc:
            protocol = net_stream.get_protocol()
            logger.debug("stream handler for %s failed: %r", protocol, exc)
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await net_stream.reset()

    swarm.set_stream_handler(guarded)


# -- (h) frozen peers: tearing a connection down without writing to it --------------------------

_LAYER_ATTRS = ("muxed_conn", "secured_conn", "conn", "read_writer", "read_write_closer", "stream")


def find_socket_stream(conn: Any, max_depth: int = 8) -> trio.SocketStream | None:
    """The trio socket stream under a libp2p connection (Yamux → Noise session → msgio →
    RawConnection → TrioTCPStream → SocketStream), found by walking the layer attributes."""
    queue = collections.deque([(conn, 0)])
    seen: set[int] = set()
    while queue:
        obj, depth = queue.popleft()
        if isinstance(obj, trio.SocketStream):
            return obj
        if id(obj) in seen or depth >= max_depth:
            continue
        seen.add(id(obj))
        for name in _LAYER_ATTRS:
            child = getattr(obj, name, None)
            if child is not None and child is not obj:
                queue.append((child, depth + 1))
    return None


def abort_connection(conn: Any) -> bool:
    """Close the TCP socket under ``conn`` at once. Every task blocked writing to it (a frozen
    peer's full send buffer) wakes up, and libp2p's reader sees the error and tears the connection
    down. A graceful close would first queue a GO_AWAY frame behind those blocked writes and hang.
    Returns whether a socket was found."""
    sock = find_socket_stream(conn)
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.socket.close()
    return True


# -- (e) shutdown ------------------------------------------------------------------------------

CLOSE_TIMEOUT = 2.0
"""Seconds a graceful close may take before we abort (per step: connections, then the host)."""


async def close_network(lhost: Any) -> None:
    """(e) Close every connection (concurrently; 0.8.1 closes them one by one with two 100 ms
    sleeps each), abort the sockets of those that did not close (a frozen peer blocks the
    GO_AWAY write), then ``host.close()`` for the listeners and the swarm's tasks."""
    network = lhost.get_network()
    conns = [conn for peer_conns in network.connections.values() for conn in peer_conns]
    with trio.move_on_after(CLOSE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(_close_quietly, conn)
    for conn in conns:
        if not conn.is_closed:
            abort_connection(conn)
    with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(Exception):
        await lhost.close()


async def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


# -- listening ---------------------------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Raise ``OSError(EADDRINUSE)`` if someone listens on ``host:port``.

    libp2p's TCP listener sets SO_REUSEPORT (for hole punching, which fednode does not use), so
    it binds happily beside a live listener and the kernel then splits incoming connections
    between the two nodes. A probe socket without SO_REUSEPORT fails to bind in that case.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def announce_addrs(candidates: list[Multiaddr]) -> list[Multiaddr]:
    """Replace wildcard listen addresses (0.0.0.0, ::) by the concrete interface addresses,
    loopback last. Used as BasicHost's ``addrs_factory`` so identify advertises dialable ones."""
    result: list[Multiaddr] = []
    for addr in candidates:
        text = str(addr)
        if not (text.startswith("/ip4/0.0.0.0/") or text.startswith("/ip6/::/")):
            result.append(addr)
            continue
        port = addr.value_for_protocol("tcp")
        expanded = list(get_thin_waist_addresses(addr))
        loopback = "/ip6/::1" if text.startswith("/ip6/") else "/ip4/127.0.0.1"
        expanded.append(Multiaddr(f"{loopback}/tcp/{port}"))
        for concrete in expanded:
            if concrete not in result:
                result.append(concrete)
    return result


# -- the host ----------------------------------------------------------------------------------


def connection_config(dial_timeout: float) -> ConnectionConfig:
    """(b) one connection per peer, so a dial returns as soon as it succeeds instead of waiting
    out the 250 ms happy-eyeballs delay for more; (d) no watermark-driven auto-connecting or
    pruning (the node's dial planner decides whom to dial) and a concurrent, not cumulative, cap."""
    return ConnectionConfig(
        max_connections_per_peer=1,
        max_connections=MAX_CONNECTIONS,
        min_connections=0,
        low_watermark=0,
        high_watermark=MAX_CONNECTIONS,
        dial_timeout=dial_timeout,
        outbound_stream_protocol_negotiation_timeout=_NEGOTIATE_TIMEOUT,
        inbound_stream_protocol_negotiation_timeout=_NEGOTIATE_TIMEOUT,
    )


def build_host(seed: bytes, *, dial_timeout: float) -> Any:
    """A BasicHost with TCP + Noise (only) + yamux (only), identify and ping, and the fixes above;
    Noise and yamux run on :mod:`fednode.net.libp2p_fastpath` unless ``FEDNODE_LIBP2P_FASTPATH=0``.

    Built by hand rather than with ``libp2p.new_host`` so that the fixed Swarm and PeerStore are
    constructed, not patched in, and so that nothing else (plaintext, secio, TLS, mplex, QUIC) is
    ever offered or accepted.
    """
    key_pair = key_pair_from_seed(seed)
    own_id = ID.from_pubkey(key_pair.public_key)
    fast = os.environ.get(FASTPATH_ENV, "1") != "0"  # see fednode.net.libp2p_fastpath
    noise = (FastNoiseTransport if fast else NoiseTransport)(
        key_pair, noise_privkey=create_new_x25519_key_pair().private_key
    )
    upgrader = TransportUpgrader(
        secure_transports_by_protocol={NOISE_PROTOCOL_ID: noise},
        muxer_transports_by_protocol={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        negotiate_timeout=_NEGOTIATE_TIMEOUT,
    )
    if fast:
        use_fast_yamux(upgrader, _NEGOTIATE_TIMEOUT)
    peerstore = FednodePeerStore(own_id)
    peerstore.add_key_pair(own_id, key_pair)
    swarm = FednodeSwarm(
        own_id,
        peerstore,
        upgrader,
        transports=[TCP()],
        # One attempt per dial: retries with backoff are the dial planner's job
        # (fednode.protocol.dialing), and libp2p's 3 retries only delay the answer.
        retry_config=RetryConfig(max_retries=0),
        connection_config=connection_config(dial_timeout),
    )
    host = BasicHost(
        network=swarm,
        resource_manager=new_resource_manager(),
        negotiate_timeout=_NEGOTIATE_TIMEOUT,
        addrs_factory=announce_addrs,
        disable_identify_address_discovery=True,
    )
    guard_swarm_stream_handler(swarm)
    return host


def forget_failed_dial(host: Any, peer_id: ID) -> None:
    """Lift libp2p's 60 s negative dial cache for ``peer_id``: after one failed dial, 0.8.1 fails
    every dial to that peer for a minute without trying. Our caller asked to dial now."""
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is not None:
        cache.evict(str(peer_id))
