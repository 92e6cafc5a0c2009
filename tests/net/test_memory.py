"""The in-memory transport beyond the contract: fault injection, exact virtual times, determinism.

Every test runs on an autojumping MockClock, so times are exact and a deadlock fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TypeVar

import pytest
import trio
from trio.testing import MockClock

from fednode.crypto import NodeKey
from fednode.errors import TransportError
from fednode.net.interface import GossipMessage, PeerConnected, PeerDisconnected, Stream
from fednode.net.memory import MemoryHost, MemoryNetwork

TOPIC = "fednode/test/memory"
ECHO = "/fednode/test/echo/1.0.0"
HOLD = "/fednode/test/hold/1.0.0"
T = TypeVar("T")


def key(n: int) -> NodeKey:
    return NodeKey(bytes([n]) * 32)


async def echo(stream: Stream) -> None:
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)


async def open_hosts(stack: AsyncExitStack, network: MemoryNetwork, count: int) -> list[MemoryHost]:
    return [await stack.enter_async_context(network.open_host(key(n + 1))) for n in range(count)]


async def line(network: MemoryNetwork, stack: AsyncExitStack) -> tuple[MemoryHost, ...]:
    """A - B - C, connected."""
    a, b, c = await open_hosts(stack, network, 3)
    await a.connect(b.listen_addrs()[0])
    await b.connect(c.listen_addrs()[0])
    return a, b, c


def drain(channel: trio.MemoryReceiveChannel[GossipMessage]) -> list[bytes]:
    received = []
    while True:
        try:
            received.append(channel.receive_nowait().data)
        except trio.WouldBlock:
            return received


def all_tasks() -> set[trio.lowlevel.Task]:
    tasks, pending = set(), [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is not None:
            tasks.add(task)
            pending.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return tasks


async def test_addresses_are_stable_memory_multiaddrs(autojump_clock: MockClock) -> None:
    # Prepare
    network = MemoryNetwork()
    # Execute
    async with network.open_host(key(1)) as a, network.open_host(key(2)) as b:
        addrs = (a.listen_addrs(), b.listen_addrs())
    async with network.open_host(key(2)) as b_again:
        again = b_again.listen_addrs()
    # Assert
    assert addrs == ([f"/memory/1/p2p/{key(1).peer_id}"], [f"/memory/2/p2p/{key(2).peer_id}"])
    assert again == addrs[1]


async def test_latency_costs_exact_virtual_time(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a, b, c = await open_hosts(stack, network, 3)
        network.set_link(a.peer_id, b.peer_id, latency=0.05)
        network.set_link(b.peer_id, c.peer_id, latency=0.02)
        b.set_stream_handler(ECHO, echo)
        at_c = await c.subscribe(TOPIC)
        # Execute
        start = trio.current_time()
        await a.connect(b.listen_addrs()[0])
        connected = trio.current_time()
        await b.connect(c.listen_addrs()[0])
        rtt = await a.ping(b.peer_id)
        before_open = trio.current_time()
        await a.open_stream(b.peer_id, ECHO)
        opened = trio.current_time()
        await a.publish(TOPIC, b"x")
        published = trio.current_time()
        message = await at_c.receive()
        arrived = trio.current_time()
        # Assert
        assert connected - start == pytest.approx(0.1)
        assert rtt == pytest.approx(0.1)
        assert opened - before_open == pytest.approx(0.1)
        assert arrived - published == pytest.approx(0.07)  # one hop each: 50 ms + 20 ms
        assert message.source == a.peer_id


async def test_gossip_takes_the_fastest_path(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare: A - B - C and a slow direct A - C
        network = MemoryNetwork()
        a, b, c = await line(network, stack)
        await a.connect(c.listen_addrs()[0])
        network.set_link(a.peer_id, c.peer_id, latency=1.0)
        network.set_link(a.peer_id, b.peer_id, latency=0.1)
        network.set_link(b.peer_id, c.peer_id, latency=0.1)
        at_c = await c.subscribe(TOPIC)
        # Execute
        start = trio.current_time()
        await a.publish(TOPIC, b"x")
        await at_c.receive()
        # Assert
        assert trio.current_time() - start == pytest.approx(0.2)
        assert drain(at_c) == []


async def test_gossip_reaches_the_component_through_unsubscribed_relays_only(
    autojump_clock: MockClock,
) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a, _, c = await line(network, stack)
        island = await stack.enter_async_context(network.open_host(key(9)))
        at_a, at_c, at_island = [await h.subscribe(TOPIC) for h in (a, c, island)]
        # Execute
        await a.publish(TOPIC, b"x")
        # Assert
        assert drain(at_c) == [b"x"]
        assert drain(at_a) == []
        assert drain(at_island) == []
        assert network.statistics().gossip_delivered == 1


async def test_a_link_that_drops_everything_loses_gossip_downstream(
    autojump_clock: MockClock,
) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a, b, c = await line(network, stack)
        network.set_link(b.peer_id, c.peer_id, drop=1.0)
        at_b, at_c = await b.subscribe(TOPIC), await c.subscribe(TOPIC)
        # Execute
        await a.publish(TOPIC, b"x")
        # Assert
        assert drain(at_b) == [b"x"]
        assert drain(at_c) == []
        stats = network.statistics()
        assert (stats.gossip_delivered, stats.gossip_lost) == (1, 1)


async def _lossy_run(seed: int) -> list[bytes]:
    async with AsyncExitStack() as stack:
        network = MemoryNetwork(seed=seed)
        a, b, c = await line(network, stack)
        network.set_link(a.peer_id, b.peer_id, drop=0.3)
        network.set_link(b.peer_id, c.peer_id, drop=0.3, duplicate=0.2, latency=0.01)
        at_c = await c.subscribe(TOPIC)
        for n in range(100):
            await a.publish(TOPIC, b"%d" % n)
        await trio.sleep(1)  # virtual: lets the delayed copies land
        return drain(at_c)


async def test_faults_are_reproducible_from_the_seed(autojump_clock: MockClock) -> None:
    # Execute
    first, again, other = await _lossy_run(7), await _lossy_run(7), await _lossy_run(8)
    # Assert
    assert first == again
    assert first != other
    assert 30 < len(set(first)) < 70  # about 0.7 * 0.7 of 100 arrive
    assert len(first) > len(set(first))  # some were duplicated
    assert first == sorted(first, key=int)  # one path, one latency: order is kept


async def test_duplicates_arrive_twice(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a, b = await open_hosts(stack, network, 2)
        await a.connect(b.listen_addrs()[0])
        network.set_link(a.peer_id, b.peer_id, duplicate=1.0)
        at_b = await b.subscribe(TOPIC)
        # Execute
        await a.publish(TOPIC, b"x")
        # Assert
        assert drain(at_b) == [b"x", b"x"]
        assert network.statistics().gossip_duplicated == 1


async def test_a_full_subscription_drops_and_counts(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork(gossip_buffer=2)
        a, b = await open_hosts(stack, network, 2)
        await a.connect(b.listen_addrs()[0])
        at_b = await b.subscribe(TOPIC)
        # Execute
        for n in range(5):
            await a.publish(TOPIC, b"%d" % n)
        # Assert
        assert drain(at_b) == [b"0", b"1"]
        assert network.statistics().gossip_overflowed == 3


async def test_partition_cuts_connections_until_healed(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a, b, c = await open_hosts(stack, network, 3)
        b_events, c_events = b.peer_events(), c.peer_events()
        await a.connect(b.listen_addrs()[0])
        await b.connect(c.listen_addrs()[0])
        c.set_stream_handler(ECHO, echo)
        stream = await b.open_stream(c.peer_id, ECHO)
        at_b, at_c = await b.subscribe(TOPIC), await c.subscribe(TOPIC)
        # Execute
        network.partition([{a.peer_id, b.peer_id}, {c.peer_id}])
        await a.publish(TOPIC, b"during")
        # Assert
        assert [e async for e in _take(b_events, 3)][-1] == PeerDisconnected(peer=c.peer_id)
        assert [e async for e in _take(c_events, 2)] == [
            PeerConnected(peer=b.peer_id),
            PeerDisconnected(peer=b.peer_id),
        ]
        with pytest.raises(TransportError):
            await stream.receive_some()
        with pytest.raises(TransportError):
            await c.connect(b.listen_addrs()[0])
        assert drain(at_b) == [b"during"] and drain(at_c) == []
        assert a.peer_id in b.connected_peers()
        # Execute: heal, and the peers redial
        network.heal()
        await a.publish(TOPIC, b"healed, not redialled")
        await c.connect(b.listen_addrs()[0])
        await a.publish(TOPIC, b"after")
        # Assert
        assert drain(at_c) == [b"after"]


async def _take(channel: trio.MemoryReceiveChannel[T], n: int) -> AsyncIterator[T]:
    for _ in range(n):
        yield await channel.receive()


async def test_kill_is_abrupt_and_the_peer_can_come_back(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        (a,) = await open_hosts(stack, network, 1)
        b = await stack.enter_async_context(network.open_host(key(2)))
        a_events = a.peer_events()
        await a.connect(b.listen_addrs()[0])
        handler_cancelled = trio.Event()

        async def hold_forever(stream: Stream) -> None:
            try:
                await trio.sleep_forever()
            finally:
                handler_cancelled.set()

        b.set_stream_handler(HOLD, hold_forever)
        stream = await a.open_stream(b.peer_id, HOLD)
        old_addrs = b.listen_addrs()
        # Execute
        network.kill(b.peer_id)
        # Assert
        await handler_cancelled.wait()
        assert [e async for e in _take(a_events, 2)][-1] == PeerDisconnected(peer=b.peer_id)
        with pytest.raises(TransportError):
            await stream.receive_some()
        assert b.closed and b.listen_addrs() == []
        with pytest.raises(TransportError):
            await b.connect(a.listen_addrs()[0])
        assert network.peers() == [a.peer_id]
        # Execute: the same key restarts at the same address; a redials from what it knew
        async with network.open_host(key(2)) as b_again:
            b_again.set_stream_handler(ECHO, echo)
            again = await a.open_stream(b_again.peer_id, ECHO)
            await again.send_all(b"back")
            # Assert
            assert b_again.listen_addrs() == old_addrs
            assert await again.receive_some() == b"back"


async def test_a_host_that_does_not_listen_cannot_be_dialled(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        server = await stack.enter_async_context(network.open_host(key(1)))
        client = await stack.enter_async_context(network.open_host(key(2), listen=False))
        client.set_stream_handler(ECHO, echo)
        # Execute
        await client.connect(server.listen_addrs()[0])
        served = await server.open_stream(client.peer_id, ECHO)  # over the client's connection
        await served.send_all(b"x")
        reply = await served.receive_some()
        await client.disconnect(server.peer_id)
        # Assert
        assert client.listen_addrs() == []
        assert reply == b"x"
        assert server.peer_addrs(client.peer_id) == []
        with pytest.raises(TransportError):
            await server.open_stream(client.peer_id, ECHO)


async def test_handler_failures_are_logged(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a, b = await open_hosts(stack, network, 2)
        await a.connect(b.listen_addrs()[0])

        async def boom(stream: Stream) -> None:
            raise ValueError("handler bug")

        b.set_stream_handler(HOLD, boom)
        # Execute
        with caplog.at_level(logging.ERROR, logger="fednode.net.memory"):
            stream = await a.open_stream(b.peer_id, HOLD)
            with pytest.raises(TransportError):
                await stream.receive_some()
        # Assert
        (record,) = caplog.records
        assert record.exc_info is not None and "handler bug" in str(record.exc_info[1])


async def test_a_handler_that_returns_closes_its_stream(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a, b = await open_hosts(stack, network, 2)
        await a.connect(b.listen_addrs()[0])

        async def say_hi(stream: Stream) -> None:
            await stream.send_all(b"hi")

        b.set_stream_handler(HOLD, say_hi)
        # Execute
        stream = await a.open_stream(b.peer_id, HOLD)
        # Assert
        assert await stream.receive_some() == b"hi"
        assert await stream.receive_some() == b""


async def test_an_error_in_the_block_escapes_unwrapped(autojump_clock: MockClock) -> None:
    # Prepare
    network = MemoryNetwork()
    # Execute
    with pytest.raises(KeyError) as raised:
        async with network.open_host(key(1)):
            raise KeyError("from the body")
    # Assert
    assert type(raised.value) is KeyError
    assert network.peers() == []


async def test_one_host_per_key(autojump_clock: MockClock) -> None:
    network = MemoryNetwork()
    async with network.open_host(key(1)):
        with pytest.raises(TransportError):
            async with network.open_host(key(1)):
                pass


async def test_leaving_the_block_leaves_no_task_behind(autojump_clock: MockClock) -> None:
    # Prepare
    network = MemoryNetwork()
    before = all_tasks()
    # Execute: leave with a handler blocked and delayed gossip in flight
    async with network.open_host(key(1)) as a, network.open_host(key(2)) as b:
        await a.connect(b.listen_addrs()[0])
        network.set_link(a.peer_id, b.peer_id, latency=5)
        b.set_stream_handler(HOLD, lambda stream: trio.sleep_forever())
        await a.open_stream(b.peer_id, HOLD)
        await b.subscribe(TOPIC)
        await a.publish(TOPIC, b"in flight")
        during = all_tasks() - before
    # Assert
    assert len(during) >= 4  # each host's task runner and gossip timer, and the handler
    assert all_tasks() - before == set()
    assert network.statistics().connections == 0
