"""The libp2p adapter end to end on loopback: identity and addresses, a small federation that
finds itself through one bootstrap host (gossip from everyone to everyone, then streams), the
adapter's own fan-out of subscriptions and events, and a clean shutdown.

The Host/Stream contract itself is ``test_contract.py``; the py-libp2p workarounds are
``test_libp2p_workarounds.py``.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from fednode.crypto.keys import NodeKey
from fednode.errors import TransportError
from fednode.net.interface import GossipMessage, PeerConnected, PeerDisconnected, Stream
from fednode.net.libp2p_host import GOSSIP_MAX_MESSAGE, Libp2pHost, open_libp2p_host

pytestmark = pytest.mark.libp2p

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ECHO = "/fednode/test/echo/1.0.0"
TOPIC = "fednode/test/host"
OTHER_TOPIC = "fednode/test/host/other"


def open_host(**options: Any) -> Any:
    return open_libp2p_host(NodeKey.generate(), [LOOPBACK], **options)


def port_of(addr: str) -> int:
    return int(Multiaddr(addr).value_for_protocol("tcp"))


def task_names() -> list[str]:
    names: list[str] = []
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        names.append(task.name)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return sorted(names)


async def echo(stream: Stream) -> None:
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)


async def exchange(stream: Stream, payload: bytes) -> bytes:
    received = bytearray()

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await stream.receive_some():
            received += chunk
    return bytes(received)


async def publish_until_received(
    publisher: Libp2pHost,
    subscription: trio.MemoryReceiveChannel[GossipMessage],
    label: str,
    topic: str = TOPIC,
) -> GossipMessage:
    for attempt in range(100):
        await publisher.publish(topic, f"{label}/{attempt}".encode())
        with trio.move_on_after(0.25):
            async for message in subscription:
                if message.data.startswith(label.encode()):
                    return message
    raise AssertionError(f"no {label} message arrived")


# -- identity and addresses ---------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_the_host_is_the_node_key_on_the_addresses_it_listens_on() -> None:
    key = NodeKey.generate()
    with trio.fail_after(20):
        async with open_libp2p_host(key, [LOOPBACK, "/ip4/127.0.0.2/tcp/0", LOOPBACK]) as host:
            addrs = host.listen_addrs()
            public_key = host._lhost.get_public_key().to_bytes()
    assert host.peer_id == key.peer_id
    assert public_key == key.public_key
    assert len(addrs) == 2
    assert sorted(addr.split("/")[2] for addr in addrs) == ["127.0.0.1", "127.0.0.2"]
    assert all(addr.endswith(f"/p2p/{key.peer_id}") for addr in addrs)
    assert all(port_of(addr) != 0 for addr in addrs)


@pytest.mark.timeout(30)
async def test_a_host_without_listen_addresses_still_dials_out() -> None:
    with trio.fail_after(20):
        async with open_libp2p_host(NodeKey.generate()) as dialer, open_host() as target:
            # Execute
            peer = await dialer.connect(target.listen_addrs()[0])
            rtt = await dialer.ping(peer)
            # Assert
            assert dialer.listen_addrs() == []
            assert peer == target.peer_id and dialer.peer_id in target.connected_peers()
            assert 0.0 <= rtt < 5.0
            addrs = dialer.peer_addrs(peer)
            assert target.listen_addrs()[0] in addrs
            assert all(addr.count("/p2p/") == 1 for addr in addrs)


@pytest.mark.timeout(30)
async def test_bad_input_is_refused_with_transport_errors() -> None:
    with trio.fail_after(20):
        for listen in (["/dns4/example.com/tcp/1"], ["not a multiaddr"]):
            with pytest.raises(TransportError):
                async with open_libp2p_host(NodeKey.generate(), listen):
                    pass
        with pytest.raises(ValueError):
            async with open_host(gossip_max_message=GOSSIP_MAX_MESSAGE + 1):
                pass
        async with open_host() as host:
            with pytest.raises(TransportError):
                await host.connect(host.listen_addrs()[0])  # itself
            with pytest.raises(TransportError):
                await host.open_stream("not a peer id", ECHO)
            assert host.peer_addrs(NodeKey.generate().peer_id) == []


# -- a federation through one bootstrap host ----------------------------------------------------


@pytest.mark.timeout(90)
async def test_five_nodes_via_one_bootstrap_hear_each_other_talk_and_close_cleanly() -> None:
    n = 5
    before = task_names()
    with trio.fail_after(75):
        async with AsyncExitStack() as stack:
            # Prepare: every node knows only the bootstrap address
            boot = await stack.enter_async_context(open_host())
            nodes = [await stack.enter_async_context(open_host()) for _ in range(n)]
            await boot.subscribe(TOPIC)  # the bootstrap relays, as every fednode node does
            subscriptions = {node.peer_id: await node.subscribe(TOPIC) for node in nodes}
            for node in nodes:
                assert await node.connect(boot.listen_addrs()[0]) == boot.peer_id
            everyone = {node.peer_id for node in nodes}
            heard: dict[str, set[str]] = {node.peer_id: set() for node in nodes}
            all_heard = trio.Event()

            async def listen(node: Libp2pHost) -> None:
                async for message in subscriptions[node.peer_id]:
                    assert message.source != node.peer_id and message.topic == TOPIC
                    assert message.data == f"hello from {message.source}".encode()
                    heard[node.peer_id].add(message.source)
                    if all(heard[peer] == everyone - {peer} for peer in heard):
                        all_heard.set()

            async def announce(node: Libp2pHost) -> None:
                while not all_heard.is_set():  # like a heartbeat, until the mesh has formed
                    await node.publish(TOPIC, f"hello from {node.peer_id}".encode())
                    with trio.move_on_after(0.5):
                        await all_heard.wait()

            # Execute: gossip
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(listen, node)
                    nursery.start_soon(announce, node)
                await all_heard.wait()
                nursery.cancel_scope.cancel()
            # Execute: streams, over direct connections around the ring
            for node in nodes:
                node.set_stream_handler(ECHO, echo)
            payload = random.Random(5).randbytes(3 * 1024 * 1024 + 7)
            for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True):
                await a.connect(b.listen_addrs()[0])
                stream = await a.open_stream(b.peer_id, ECHO)
                assert await exchange(stream, payload) == payload
                await stream.aclose()
            # Assert (before leaving)
            assert set(boot.connected_peers()) == everyone
            assert all(heard[peer] == everyone - {peer} for peer in heard)
            ports = [port_of(host.listen_addrs()[0]) for host in (boot, *nodes)]
    # Assert: everything closed
    assert task_names() == before
    for port in ports:
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


# -- the adapter's fan-out ----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_each_subscription_and_event_channel_gets_its_own_copy() -> None:
    with trio.fail_after(45):
        async with open_host() as a, open_host() as b:
            events_1, events_2 = b.peer_events(), b.peer_events()
            await a.connect(b.listen_addrs()[0])
            first, second = await b.subscribe(TOPIC), await b.subscribe(TOPIC)
            other = await b.subscribe(OTHER_TOPIC)
            dropped = await b.subscribe(TOPIC)
            await dropped.aclose()  # a subscriber that went away must not disturb the others
            # Execute
            message = await publish_until_received(a, first, "hello")
            async for copy in second:
                if copy.data == message.data:
                    break
            await publish_until_received(a, other, "other", topic=OTHER_TOPIC)
            await b.disconnect(a.peer_id)
            # Assert
            assert message.source == a.peer_id and message.topic == TOPIC
            for events in (events_1, events_2):
                assert await events.receive() == PeerConnected(peer=a.peer_id)
                assert await events.receive() == PeerDisconnected(peer=a.peer_id)
            for subscription in (first, second):  # nothing from the other topic
                while True:
                    try:
                        assert subscription.receive_nowait().topic == TOPIC
                    except trio.WouldBlock:
                        break
            await b.aclose()
            # After closing, the channels end and the host refuses work
            with pytest.raises(trio.EndOfChannel):
                await events_1.receive()
            with pytest.raises(trio.EndOfChannel):
                while True:
                    await first.receive()
            for call in (
                b.publish(TOPIC, b"late"),
                b.connect(a.listen_addrs()[0]),
                b.open_stream(a.peer_id, ECHO),
                b.subscribe(TOPIC),
                b.ping(a.peer_id),
            ):
                with pytest.raises(TransportError):
                    await call


@pytest.mark.timeout(60)
async def test_a_reply_survives_its_handler_returning_before_the_opener_closes() -> None:
    # Prepare: a request/response protocol where the opener never sends its end of stream
    reply = random.Random(1).randbytes(2 * 1024 * 1024)

    async def answer(stream: Stream) -> None:
        assert await stream.receive_some(7) == b"request"
        await stream.send_all(reply)  # and return: the adapter closes the stream

    with trio.fail_after(45):
        async with open_host() as a, open_host() as b:
            b.set_stream_handler(ECHO, answer)
            await a.connect(b.listen_addrs()[0])
            for _ in range(3):
                stream = await a.open_stream(b.peer_id, ECHO)
                # Execute
                await stream.send_all(b"request")
                received = bytearray()
                while chunk := await stream.receive_some():
                    received += chunk
                await stream.aclose()
                # Assert: all of it, then a clean end of stream (not a reset)
                assert received == reply


@pytest.mark.timeout(60)
async def test_disconnect_by_the_remote_side_is_an_event_here_and_connect_works_again() -> None:
    with trio.fail_after(45):
        async with open_host() as a, open_host() as b:
            events = a.peer_events()
            await a.connect(b.listen_addrs()[0])
            assert await events.receive() == PeerConnected(peer=b.peer_id)
            # Execute
            await b.disconnect(a.peer_id)
            # Assert
            assert await events.receive() == PeerDisconnected(peer=b.peer_id)
            assert b.peer_id not in a.connected_peers()
            assert await a.connect(b.listen_addrs()[0]) == b.peer_id
            assert await events.receive() == PeerConnected(peer=b.peer_id)
            assert ID.from_base58(b.peer_id) in a._lhost.get_connected_peers()
