"""Each py-libp2p 0.8.1 workaround listed in ``fednode.net.libp2p_host`` against the stock
behaviour it fixes: every test shows the stock library doing the wrong thing, then ours doing the
right one, so it fails if the workaround goes (or if a libp2p upgrade makes it unnecessary).

Real sockets on loopback under a hard timeout. ``FEDNODE_SLOW=1`` runs the leak test at full
size (1,000 connections instead of 300).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStore, PeerStoreError
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import DefaultMaxMessageSize
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr
from multiaddr.utils import get_thin_waist_addresses

from fednode.crypto.keys import NodeKey
from fednode.errors import TransportError
from fednode.net.interface import GossipMessage, PeerConnected, PeerDisconnected, PeerEvent, Stream
from fednode.net.libp2p_host import GOSSIP_MAX_MESSAGE, Libp2pHost, open_libp2p_host
from fednode.net.libp2p_workarounds import (
    FednodePeerStore,
    build_host,
    close_network,
    connection_config,
    find_socket_stream,
    quiet_libp2p_logging,
)

pytestmark = pytest.mark.libp2p

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
HELPER = Path(__file__).with_name("libp2p_peer.py")
SINK = "/fednode/test/sink/1.0.0"
TRICKLE = "/fednode/test/trickle/1.0.0"
ECHO = "/fednode/test/echo/1.0.0"
HOLD = "/fednode/test/hold/1.0.0"
BOOM = "/fednode/test/boom/1.0.0"
TOPIC = "fednode/test/workarounds"
MiB = 1024 * 1024
SLOW = os.environ.get("FEDNODE_SLOW") == "1"


# -- helpers ------------------------------------------------------------------------------------


def open_host(**options: Any) -> Any:
    return open_libp2p_host(NodeKey.generate(), [LOOPBACK], **options)


def stock_host(**options: Any) -> Any:
    """``libp2p.new_host`` as the notes' scripts build it; Noise-only unless told otherwise, so
    that each test isolates the one behaviour it is about."""
    key_pair = create_new_key_pair()
    if "sec_opt" not in options:
        noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
        options["sec_opt"] = {NOISE_PROTOCOL_ID: noise}
    return new_host(key_pair=key_pair, **options)


@asynccontextmanager
async def running(lhost: Any, listen: tuple[str, ...] = (LOOPBACK,)) -> AsyncIterator[Any]:
    """Run a raw libp2p host, and close it properly on the way out (our close, inside run)."""
    async with lhost.run([Multiaddr(addr) for addr in listen]):
        try:
            yield lhost
        finally:
            with trio.CancelScope(shield=True):
                await close_network(lhost)


def addr_of(lhost: Any) -> str:
    return str(lhost.get_addrs()[0])


def info(addr: str) -> PeerInfo:
    return info_from_p2p_addr(Multiaddr(addr))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_of(addr: str) -> int:
    return int(Multiaddr(addr).value_for_protocol("tcp"))


def all_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        tasks.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return tasks


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


async def echo(stream: Stream) -> None:
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)


async def read_all(stream: Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def exchange(stream: Stream, payload: bytes) -> bytes:
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        return await read_all(stream)


async def next_event(events: trio.MemoryReceiveChannel[PeerEvent], peer: str) -> PeerEvent:
    async for event in events:
        if event.peer == peer:
            return event
    raise AssertionError("the event channel closed")


async def publish_until_received(
    publisher: Libp2pHost, subscription: trio.MemoryReceiveChannel[GossipMessage], label: str
) -> None:
    """Publish until one ``label`` message arrives: the mesh takes a heartbeat or two to form."""
    for attempt in range(100):
        await publisher.publish(TOPIC, f"{label}/{attempt}".encode())
        with trio.move_on_after(0.25):
            async for message in subscription:
                if message.data.startswith(label.encode()):
                    return
    raise AssertionError(f"no {label} message arrived")


@asynccontextmanager
async def peer_process() -> AsyncIterator[tuple[trio.Process, str]]:
    """A fednode host in another process (``libp2p_peer.py``), killed on the way out."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(HELPER)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):  # importing libp2p takes seconds on a loaded machine
            while b"\n" not in line:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the peer process exited before printing its address"
                line += chunk
        yield proc, line.split(b"\n", 1)[0].decode()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()  # SIGKILL: also ends a SIGSTOPped process
            await proc.wait()


# -- (a) Noise only -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_plaintext_only_dialer_is_refused() -> None:
    # Prepare
    key_pair = create_new_key_pair()
    plaintext_only = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)}
    plaintext = new_host(key_pair=key_pair, sec_opt=plaintext_only)
    with trio.fail_after(40):
        async with (
            open_host() as ours,
            running(new_host()) as stock,
            running(plaintext, listen=()) as dialer,
        ):
            # Execute
            await dialer.connect(info(addr_of(stock)))
            with pytest.raises(SwarmException):
                await dialer.connect(info(ours.listen_addrs()[0]))
            # Assert: stock talks in clear; ours refuses
            (conn,) = dialer.get_network().get_connections(stock.get_id())
            assert conn.get_negotiated_security_protocol() == PLAINTEXT_PROTOCOL_ID
            assert str(dialer.get_id()) not in ours.connected_peers()


# -- (j) yamux only -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_j_an_mplex_only_dialer_cannot_connect_and_ours_speak_noise_and_yamux() -> None:
    # Prepare
    mplex_only = stock_host(muxer_opt={MPLEX_PROTOCOL_ID: Mplex})
    with trio.fail_after(40):
        async with (
            open_host() as ours,
            open_host() as other,
            running(stock_host()) as stock,
            running(mplex_only, listen=()) as dialer,
        ):
            # Execute
            await dialer.connect(info(addr_of(stock)))
            with pytest.raises(SwarmException):
                await dialer.connect(info(ours.listen_addrs()[0]))
            await other.connect(ours.listen_addrs()[0])
            # Assert
            (stock_conn,) = dialer.get_network().get_connections(stock.get_id())
            assert stock_conn.get_negotiated_muxer_protocol() == MPLEX_PROTOCOL_ID
            assert str(dialer.get_id()) not in ours.connected_peers()
            network = other._lhost.get_network()
            (conn,) = network.get_connections(ID.from_base58(ours.peer_id))
            assert conn.get_negotiated_security_protocol() == NOISE_PROTOCOL_ID
            assert conn.get_negotiated_muxer_protocol() == "/yamux/1.0.0"


# -- (b) no 250 ms dial delay -------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_b_connect_does_not_wait_out_the_happy_eyeballs_delay() -> None:
    rounds = 5
    with trio.fail_after(40):
        async with open_host() as target, open_host() as ours, running(stock_host(), ()) as stock:
            addr = target.listen_addrs()[0]
            events = target.peer_events()
            ours_times, stock_times = [], []
            for _ in range(rounds):
                # Execute
                start = trio.current_time()
                await ours.connect(addr)
                ours_times.append(trio.current_time() - start)
                await ours.disconnect(target.peer_id)
                start = trio.current_time()
                await stock.connect(info(addr))
                stock_times.append(trio.current_time() - start)
                await stock.disconnect(ID.from_base58(target.peer_id))
                for _peer in (ours.peer_id, str(stock.get_id())):  # both gone at the target
                    while not isinstance(await events.receive(), PeerDisconnected):
                        pass
    # Assert
    print(
        f"connect median: ours {statistics.median(ours_times) * 1000:.1f} ms, "
        f"stock {statistics.median(stock_times) * 1000:.1f} ms"
    )
    assert statistics.median(stock_times) >= 0.25
    assert statistics.median(ours_times) < 0.125


# -- (c) gossip ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_c_the_gossip_heartbeat_is_one_second_and_stays_so() -> None:
    # Prepare
    stock_default = GossipSub([PROTOCOL_ID_V12], 6, 4, 12)
    stock_tuned = GossipSub([PROTOCOL_ID_V12], 6, 4, 12, heartbeat_interval=1)
    with trio.fail_after(20):
        async with open_host() as ours:
            router = ours._router
            assert router.heartbeat_interval == 1.0
            # Execute: the mesh looks poor (as it does for any federation below D=6 peers)
            for gossip in (router, stock_tuned):
                gossip.network_health_score = 0.1
                gossip._adapt_gossip_parameters()
            # Assert
            assert stock_default.heartbeat_interval == 120
            assert stock_tuned.heartbeat_interval >= 30
            assert router.heartbeat_interval == 1.0
            assert not router.spam_protection_enabled


@pytest.mark.timeout(90)
async def test_c_fifty_quick_publishes_all_arrive() -> None:
    burst = 50
    with trio.fail_after(70):
        # Stock: 1 s heartbeat, otherwise defaults (spam limit on, no pacing)
        stock_received = await _stock_gossip_burst(burst)
        # Ours: A - B - C, B relays
        async with open_host() as a, open_host() as b, open_host() as c:
            await a.connect(b.listen_addrs()[0])
            await c.connect(b.listen_addrs()[0])
            at_b, at_c = await b.subscribe(TOPIC), await c.subscribe(TOPIC)
            await a.subscribe(TOPIC)
            await publish_until_received(a, at_c, "warm")
            # Execute
            for i in range(burst):
                await a.publish(TOPIC, f"burst/{i}".encode())
            # Assert
            expected = {f"burst/{i}".encode() for i in range(burst)}
            for subscription in (at_b, at_c):
                seen: set[bytes] = set()
                with trio.fail_after(20):
                    async for message in subscription:
                        if message.data.startswith(b"burst/"):
                            seen.add(message.data)
                            if seen == expected:
                                break
    print(f"stock delivered {stock_received} of {burst}")
    assert stock_received < burst


async def _stock_gossip_burst(burst: int) -> int:
    """Publish ``burst`` messages back to back between two stock gossipsub hosts; how many
    arrive within 3 s of the last publish (a deadline is the only way to see drops)."""
    hosts = [stock_host(), stock_host()]
    routers = [GossipSub([PROTOCOL_ID_V12], 6, 4, 12, heartbeat_interval=1) for _ in hosts]
    pubsubs = [Pubsub(h, r) for h, r in zip(hosts, routers, strict=True)]
    async with running(hosts[0]) as a, running(hosts[1]) as b:
        async with (
            background_trio_service(pubsubs[0]),
            background_trio_service(routers[0]),
            background_trio_service(pubsubs[1]),
            background_trio_service(routers[1]),
        ):
            await b.connect(info(addr_of(a)))
            await pubsubs[0].subscribe(TOPIC)
            subscription = await pubsubs[1].subscribe(TOPIC)
            for attempt in range(100):  # wait for the mesh, as for ours
                await pubsubs[0].publish(TOPIC, f"warm/{attempt}".encode())
                with trio.move_on_after(0.25):
                    if (await subscription.get()).data.startswith(b"warm/"):
                        break
            for i in range(burst):
                await pubsubs[0].publish(TOPIC, f"burst/{i}".encode())
            received = 0
            with trio.move_on_after(3):
                while received < burst:
                    if (await subscription.get()).data.startswith(b"burst/"):
                        received += 1
            return received


@pytest.mark.timeout(60)
async def test_c_publish_refuses_oversized_messages_instead_of_dropping_them() -> None:
    with trio.fail_after(40):
        async with open_host() as a, open_host() as b:
            await a.connect(b.listen_addrs()[0])
            at_b = await b.subscribe(TOPIC)
            await publish_until_received(a, at_b, "warm")
            largest = b"L" * (GOSSIP_MAX_MESSAGE - 1)
            # Execute
            with pytest.raises(TransportError):
                await a.publish(TOPIC, b"x" * GOSSIP_MAX_MESSAGE)
            await a.publish(TOPIC, largest)
            # Assert: the largest allowed one arrives (libp2p drops RPCs over 1 MiB silently)
            async for message in at_b:
                if message.data.startswith(b"L"):
                    assert message.data == largest
                    break
    assert GOSSIP_MAX_MESSAGE < DefaultMaxMessageSize


# -- (d) inbound connection leak ----------------------------------------------------------------


async def _dial_and_leave(addr: str) -> None:
    """One connect/disconnect cycle from a fresh dialer (a hardened libp2p host, no gossip)."""
    dialer = build_host(NodeKey.generate().seed, dial_timeout=20)
    async with running(dialer, listen=()):
        await dialer.connect(info(addr))


async def _cycles(addr: str, count: int, concurrency: int = 10) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            await _dial_and_leave(addr)

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, count // concurrency + (i < count % concurrency))


async def _wait_until_idle(lhost: Any) -> None:
    """Until the listener holds no connection and no inbound slot (closes finish asynchronously)."""
    network = lhost.get_network()
    while network.connections or network._inbound_limiter.borrowed_tokens:
        await trio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(600 if SLOW else 120)
async def test_d_inbound_connections_release_their_task_and_slot() -> None:
    cycles = 1000 if SLOW else 300
    with trio.fail_after(500 if SLOW else 100):
        # Stock: every inbound connection keeps a limiter slot (and a task) for good
        stock = stock_host(connection_config=connection_config(dial_timeout=20))
        async with running(stock) as listener:
            await _cycles(addr_of(listener), 20)
            stock_slots = listener.get_network()._inbound_limiter.borrowed_tokens
        # Ours
        async with open_host() as ours:
            addr, lhost = ours.listen_addrs()[0], ours._lhost
            await _cycles(addr, 200 if SLOW else 20)  # warm up the allocator and caches
            await _wait_until_idle(lhost)
            gc.collect()
            tasks_before, rss_before = len(all_tasks()), rss_mb()
            # Execute
            await _cycles(addr, cycles)
            with trio.fail_after(20):
                await _wait_until_idle(lhost)
            gc.collect()
            task_growth, rss_growth = len(all_tasks()) - tasks_before, rss_mb() - rss_before
            # Assert: still accepting, nothing held
            await _dial_and_leave(addr)
    print(f"{cycles} cycles: task growth {task_growth}, RSS growth {rss_growth:.1f} MB")
    assert stock_slots == 20
    assert task_growth <= 5
    if SLOW:  # memory needs the full size to say anything (stock leaked ~6 KB per connection)
        assert rss_growth < 4.0


# -- (e) shutdown -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_e_leaving_the_block_closes_the_listener_connections_and_tasks() -> None:
    with trio.fail_after(40):
        # Stock: after leaving run(), the port still accepts
        stock = stock_host()
        async with stock.run([Multiaddr(LOOPBACK)]):
            stock_port = port_of(addr_of(stock))
        try:
            zombie = await trio.open_tcp_stream("127.0.0.1", stock_port)
            await zombie.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await close_network(stock)
        # Ours
        before = all_tasks()
        async with open_host() as b:
            events = b.peer_events()
            async with open_host() as a:
                await b.connect(a.listen_addrs()[0])
                await a.subscribe(TOPIC)
                port, a_peer = port_of(a.listen_addrs()[0]), a.peer_id
            # Assert
            assert isinstance(await next_event(events, a_peer), PeerConnected)
            assert await next_event(events, a_peer) == PeerDisconnected(peer=a_peer)
            assert a_peer not in b.connected_peers()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
        assert {task.name for task in all_tasks() - before} == set()


# -- (f) handler exceptions ---------------------------------------------------------------------


async def _raise_value_error(net_stream: Any) -> None:
    await net_stream.read(1)
    raise ValueError("handler bug")


async def _read_past_eof(net_stream: Any) -> None:
    while True:
        await net_stream.read(1024)  # StreamEOF escapes at the end, as in handler_eof.py


@pytest.mark.timeout(60)
async def test_f_a_handler_exception_neither_kills_the_host_nor_wedges_the_connection() -> None:
    with trio.fail_after(40):
        # Stock: the exception takes the whole host down
        stock = stock_host()
        stock.set_stream_handler(TProtocol(BOOM), _raise_value_error)
        with pytest.raises(BaseException) as crash:  # an ExceptionGroup
            async with open_host() as dialer, running(stock) as listener:
                stream = await dialer.open_stream((await dialer.connect(addr_of(listener))), BOOM)
                await stream.send_all(b"x")
                await trio.sleep_forever()  # until the crash cancels us
        assert isinstance(crash.value, BaseExceptionGroup)
        assert crash.group_contains(ValueError)
        # Ours, with the same raw libp2p handlers installed below our adapter
        async with open_host() as dialer, open_host() as ours:
            ours._lhost.set_stream_handler(TProtocol(BOOM), _raise_value_error)
            ours._lhost.set_stream_handler(TProtocol(HOLD), _read_past_eof)
            ours.set_stream_handler(ECHO, echo)
            await dialer.connect(ours.listen_addrs()[0])
            # Execute
            boom = await dialer.open_stream(ours.peer_id, BOOM)
            await boom.send_all(b"x")
            with pytest.raises(TransportError):
                await read_all(boom)
            eof = await dialer.open_stream(ours.peer_id, HOLD)
            await eof.send_all(b"data")
            await eof.send_eof()
            with pytest.raises(TransportError):
                await read_all(eof)
            # Assert: the same connection still opens streams
            working = await dialer.open_stream(ours.peer_id, ECHO)
            assert await exchange(working, b"still alive") == b"still alive"
            assert dialer.peer_id in ours.connected_peers()


# -- (g) killed peer ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_g_a_killed_peer_is_an_error_not_a_clean_end_of_stream() -> None:
    outcomes: dict[str, BaseException | None] = {}
    with trio.fail_after(45):
        async with peer_process() as (proc, addr), open_host() as ours:
            peer = await ours.connect(addr)
            stream = await ours.open_stream(peer, TRICKLE)
            raw = await ours._lhost.new_stream(ID.from_base58(peer), [TProtocol(TRICKLE)])
            reading = trio.Event()

            async def read_ours() -> None:
                try:
                    while await stream.receive_some():
                        reading.set()
                    outcomes["ours"] = None
                except TransportError as exc:
                    outcomes["ours"] = exc

            async def read_stock() -> None:
                try:
                    while await raw.read(65536):
                        pass
                except StreamEOF as exc:
                    outcomes["stock"] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_ours)
                nursery.start_soon(read_stock)
                await reading.wait()
                # Execute: both readers are waiting for the next trickle when the peer dies
                proc.send_signal(signal.SIGKILL)
    # Assert: stock reads it as a clean end of stream, ours as an error
    assert isinstance(outcomes["stock"], StreamEOF)
    assert isinstance(outcomes["ours"], TransportError)


# -- (h) frozen peer ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_h_a_frozen_peer_fails_the_write_and_is_disconnected_without_hanging() -> None:
    stall = 2.0
    with trio.fail_after(45):
        async with (
            peer_process() as (proc, addr),
            open_host(stall_timeout=stall) as ours,
            running(stock_host(), ()) as stock,
        ):
            peer = await ours.connect(addr)
            await stock.connect(info(addr))
            events = ours.peer_events()
            stream = await ours.open_stream(peer, SINK)
            raw = await stock.new_stream(ID.from_base58(peer), [TProtocol(SINK)])
            # Warm up: the yamux window grows to 16 MiB, so a frozen reader's socket fills first
            # and writes block in the kernel, not in yamux's window wait.
            await stream.send_all(bytes(16 * MiB))
            await raw.write(bytes(16 * MiB))
            proc.send_signal(signal.SIGSTOP)
            stock_write_done = trio.Event()

            async def stock_write() -> None:
                with pytest.raises(StreamError):
                    await raw.write(bytes(64 * MiB))
                stock_write_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stock_write)
                # Execute
                start = trio.current_time()
                with pytest.raises(TransportError):
                    await stream.send_all(bytes(64 * MiB))
                failed_after = trio.current_time() - start
                # Assert: ours gave up after the stall timeout and dropped the peer
                assert stall <= failed_after < stall + 6.0
                assert await next_event(events, peer) == PeerDisconnected(peer=peer)
                assert peer not in ours.connected_peers()
                # Stock: still "connected", its write still blocked, and disconnect hangs
                assert ID.from_base58(peer) in stock.get_connected_peers()
                assert not stock_write_done.is_set()
                with trio.move_on_after(1.5) as hung:
                    await stock.disconnect(ID.from_base58(peer))
                assert hung.cancelled_caught
                proc.kill()  # releases the stock write


# -- (i) slow reader ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_i_a_reader_pausing_past_five_seconds_does_not_fail_our_write() -> None:
    pause, size = 6.0, 20 * MiB
    with trio.fail_after(45):
        async with open_host() as a, open_host() as b:
            release = trio.Event()
            received: list[int] = []

            async def read_later(stream: Stream) -> None:
                await release.wait()
                received.append(len(await read_all(stream)))

            b.set_stream_handler(HOLD, read_later)
            await a.connect(b.listen_addrs()[0])
            ours = await a.open_stream(b.peer_id, HOLD)
            raw = await a._lhost.new_stream(ID.from_base58(b.peer_id), [TProtocol(HOLD)])
            lags: list[float] = []

            async def stock_write() -> None:
                with pytest.raises(StreamError):  # yamux: no window credit for 5 s
                    await raw.write(bytes(size))

            async def watch_the_loop() -> None:
                while not release.is_set():
                    start = trio.current_time()
                    await trio.sleep(0.01)
                    lags.append(trio.current_time() - start - 0.01)

            async def slow_reader() -> None:
                await trio.sleep(pause)  # the fault: nobody reads for 6 s
                release.set()

            # Execute
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                nursery.start_soon(stock_write)
                nursery.start_soon(watch_the_loop)
                await ours.send_all(bytes(size))
                await ours.send_eof()
            # Assert
            with trio.fail_after(20):
                while size not in received:
                    await trio.sleep(0.05)
            assert max(lags) < 1.0  # waiting for window credit never blocks the loop


# -- (k) dial retries and the negative dial cache ------------------------------------------------


@pytest.mark.timeout(60)
async def test_k_a_failed_dial_does_not_block_the_next_one() -> None:
    key, port = NodeKey.generate(), free_port()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{key.peer_id}"
    with trio.fail_after(40):
        async with open_host() as ours, running(stock_host(), ()) as stock:
            with pytest.raises(TransportError):
                await ours.connect(addr)
            with pytest.raises(SwarmException):
                await stock.connect(info(addr))
            async with open_libp2p_host(key, [f"/ip4/127.0.0.1/tcp/{port}"]):
                # Execute / Assert: the peer is up now; stock still refuses to try for 60 s
                assert await ours.connect(addr) == key.peer_id
                with pytest.raises(SwarmException, match="negative cache"):
                    await stock.connect(info(addr))


# -- (l) connect dials the address it is given ----------------------------------------------------


@pytest.mark.timeout(60)
async def test_l_connect_dials_the_given_address_despite_a_stale_one() -> None:
    lan = get_thin_waist_addresses(Multiaddr("/ip4/0.0.0.0/tcp/1"))  # (port 0 lists nothing)
    if not lan:
        pytest.skip("no non-loopback IPv4 interface to make a stale address on")
    stale = Multiaddr(f"/ip4/{lan[0].value_for_protocol('ip4')}/tcp/{free_port()}")
    with trio.fail_after(40):
        async with open_host() as target, open_host() as ours, running(stock_host(), ()) as stock:
            addr = target.listen_addrs()[0]
            target_id = ID.from_base58(target.peer_id)
            for lhost in (ours._lhost, stock):  # e.g. from an identify before a restart
                lhost.get_peerstore().add_addrs(target_id, [stale], 3600)
            # Execute / Assert
            with pytest.raises(SwarmException):
                await stock.connect(info(addr))
            assert await ours.connect(addr) == target.peer_id


# -- (m) listening ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_m_a_port_in_use_is_refused_and_wildcards_are_announced_concretely() -> None:
    port = free_port()
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    with trio.fail_after(40):
        async with open_libp2p_host(NodeKey.generate(), [listen]) as first:
            # Stock binds beside us (SO_REUSEPORT): two nodes, one port
            async with running(stock_host(), (listen,)) as stock:
                assert port_of(addr_of(stock)) == port
            # Ours refuses
            with pytest.raises(TransportError):
                async with open_libp2p_host(NodeKey.generate(), [listen]):
                    pass
            assert port_of(first.listen_addrs()[0]) == port
        async with open_libp2p_host(NodeKey.generate(), ["/ip4/0.0.0.0/tcp/0"]) as wild:
            addrs = wild.listen_addrs()
            assert addrs and not any("/0.0.0.0/" in addr for addr in addrs)
            assert any(addr.startswith("/ip4/127.0.0.1/") for addr in addrs)


# -- (n) our own key stays in the peerstore -----------------------------------------------------


def _fill(peerstore: Any, count: int) -> None:
    for i in range(count):
        addr = Multiaddr(f"/ip4/10.0.{i // 250}.{i % 250}/tcp/1")
        peerstore.add_addrs(ID(os.urandom(34)), [addr], 3600)


@pytest.mark.timeout(60)
async def test_n_a_full_peerstore_never_evicts_our_own_key() -> None:
    # Prepare
    key_pair = create_new_key_pair()
    own = ID.from_pubkey(key_pair.public_key)
    stock, ours = PeerStore(max_peers=1000), FednodePeerStore(own, max_peers=1000)
    for peerstore in (stock, ours):
        peerstore.add_key_pair(own, key_pair)
        # Execute: more peers than it holds (identify adds every peer met)
        _fill(peerstore, 1100)
    # Assert
    with pytest.raises(PeerStoreError):
        stock.privkey(own)
    assert ours.privkey(own) == key_pair.private_key
    assert len(ours.peer_ids()) <= 1001
    with trio.fail_after(30):
        async with open_host() as host:  # the host is built on it
            assert isinstance(host._lhost.get_peerstore(), FednodePeerStore)


# -- (o) logging --------------------------------------------------------------------------------


def test_o_libp2p_logs_only_errors_and_not_routine_churn() -> None:
    # Prepare
    import libp2p

    quiet_libp2p_logging()
    inside = os.path.join(os.path.dirname(libp2p.__file__), "network", "swarm.py")

    def record(name: str, level: int, msg: str, path: str = inside) -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1, msg, None, None)

    # Assert
    if os.environ.get("FEDNODE_LIBP2P_DEBUG"):
        pytest.skip("FEDNODE_LIBP2P_DEBUG is set")
    assert logging.getLogger("libp2p.network.swarm").getEffectiveLevel() == logging.ERROR
    root = logging.getLogger()
    assert not root.filter(record("root", logging.WARNING, "Error getting transport addresses"))
    assert root.filter(record("root", logging.ERROR, "a real libp2p error"))
    assert root.filter(record("root", logging.WARNING, "ours", path=__file__))
    basic_host = logging.getLogger("libp2p.host.basic_host")
    churn = record(basic_host.name, logging.ERROR, "Failed to open stream to peer x")
    assert not basic_host.filter(churn)
    assert basic_host.filter(record(basic_host.name, logging.ERROR, "something else"))


# -- (p) no auto-connecting --------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_p_the_swarm_does_not_dial_peerstore_peers_on_its_own() -> None:
    stock = stock_host(connection_config=connection_config(dial_timeout=20))
    with trio.fail_after(40):
        async with open_host() as target, open_host() as ours, running(stock, ()):
            addr = Multiaddr(target.listen_addrs()[0])
            target_id = ID.from_base58(target.peer_id)
            for lhost in (ours._lhost, stock):  # known, e.g. from identify, but not wanted now
                lhost.get_peerstore().add_addrs(target_id, [addr], 3600)
            # Execute: one round of what the auto-connector runs every 30 s
            for lhost in (ours._lhost, stock):
                await lhost.get_network().auto_connector.maybe_connect()
            # Assert
            assert target_id in stock.get_connected_peers()
            assert target.peer_id not in ours.connected_peers()


# -- (q) closing a stream the peer is still sending on -------------------------------------------


async def _read_one_and_close(net_stream: Any) -> None:
    await net_stream.read(1)
    await net_stream.close()


@pytest.mark.timeout(60)
async def test_q_writing_to_a_stream_whose_handler_returned_fails_promptly() -> None:
    size, prompt = 8 * MiB, 2.0
    with trio.fail_after(40):
        # Stock: the handler's close is only a half close. The writer is not told: its write
        # stalls on the window or (as 0.8.1 mostly does) "succeeds" into a stream nobody reads.
        stock_listener = stock_host()
        stock_listener.set_stream_handler(TProtocol(HOLD), _read_one_and_close)
        async with running(stock_listener) as listener, running(stock_host(), ()) as dialer:
            await dialer.connect(info(addr_of(listener)))
            raw = await dialer.new_stream(listener.get_id(), [TProtocol(HOLD)])
            with trio.move_on_after(prompt):
                await raw.write(bytes(size))  # no error either way
        # Ours
        async with open_host() as a, open_host() as b:

            async def take_one_byte(stream: Stream) -> None:
                await stream.receive_some(1)  # and return

            b.set_stream_handler(HOLD, take_one_byte)
            await a.connect(b.listen_addrs()[0])
            stream = await a.open_stream(b.peer_id, HOLD)
            with trio.fail_after(prompt), pytest.raises(TransportError):
                await stream.send_all(bytes(size))
            assert b.peer_id in a.connected_peers()  # only the stream failed


# -- (r) exceptions leave the host block unwrapped ----------------------------------------------


@pytest.mark.timeout(30)
async def test_r_the_callers_exception_leaves_the_block_as_it_was_raised() -> None:
    with trio.fail_after(20):
        with pytest.raises(ExceptionGroup):  # stock: wrapped, several levels deep
            async with stock_host().run([Multiaddr(LOOPBACK)]):
                raise KeyError("mine")
        with pytest.raises(KeyError, match="mine"):
            async with open_host():
                raise KeyError("mine")
        with pytest.raises(TransportError):
            async with open_host() as host:
                await host.connect("/ip4/127.0.0.1/tcp/1/p2p/" + NodeKey.generate().peer_id)


# -- (s) a cancelled write leaves the connection whole -------------------------------------------


async def _cancel_a_write_blocked_on_a_frozen_peer(proc: trio.Process, write: Any) -> None:
    """Freeze the peer, start ``write`` (it fills the socket), cancel it after 1 s, thaw the
    peer at 1.5 s: the cancellation hits a write that is blocked in the kernel."""

    async def thaw_later() -> None:
        await trio.sleep(1.5)
        proc.send_signal(signal.SIGCONT)

    proc.send_signal(signal.SIGSTOP)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(thaw_later)
        with trio.move_on_after(1.0) as cancelled:
            await write()
    assert cancelled.cancelled_caught


@pytest.mark.timeout(60)
async def test_s_cancelling_a_blocked_write_keeps_the_connection_usable() -> None:
    warm, size = 16 * MiB, 64 * MiB  # the warm-up grows the yamux window past the socket buffers
    with trio.fail_after(45):
        async with (
            peer_process() as (proc, addr),
            open_host(stall_timeout=10) as ours,
            running(stock_host(), ()) as stock,
        ):
            # Stock: the cancellation lands inside a socket write, half an encrypted frame
            # stays on the wire, and the whole connection breaks.
            await stock.connect(info(addr))
            peer_id = info(addr).peer_id
            raw = await stock.new_stream(peer_id, [TProtocol(SINK)])
            await raw.write(bytes(warm))
            await _cancel_a_write_blocked_on_a_frozen_peer(proc, lambda: raw.write(bytes(size)))
            with pytest.raises(Exception):  # noqa: B017  # whichever way the broken connection fails
                probe = await stock.new_stream(peer_id, [TProtocol(ECHO)])
                await probe.write(b"anyone?")
                assert await probe.read(7) == b"anyone?"
            # Ours
            peer = await ours.connect(addr)
            stream = await ours.open_stream(peer, SINK)
            await stream.send_all(bytes(warm))
            await _cancel_a_write_blocked_on_a_frozen_peer(
                proc, lambda: stream.send_all(bytes(size))
            )
            # Assert: that stream is reset, the connection carries on
            with pytest.raises(TransportError):
                await stream.send_all(b"more")
            working = await ours.open_stream(peer, ECHO)
            assert await exchange(working, b"anyone?") == b"anyone?"
            assert peer in ours.connected_peers()


# -- the socket finder the frozen-peer fix relies on ---------------------------------------------


@pytest.mark.timeout(60)
async def test_the_socket_under_a_connection_is_found() -> None:
    with trio.fail_after(30):
        async with open_host() as a, open_host() as b:
            await a.connect(b.listen_addrs()[0])
            (conn,) = a._lhost.get_network().get_connections(ID.from_base58(b.peer_id))
            assert isinstance(find_socket_stream(conn), trio.SocketStream)
