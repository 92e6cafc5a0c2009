"""LAN discovery (``Host.discoveries()``) on the in-memory transport, where hosts opened with
``mdns=True`` share one simulated LAN segment, and the feed both transports report through.

Every test runs on an autojumping MockClock: times are exact and a missing event fails at once.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from trio.testing import MockClock

from fednode.crypto import NodeKey
from fednode.net.discovery import MAX_KNOWN, DiscoveryFeed
from fednode.net.interface import PeerDiscovered
from fednode.net.memory import MemoryNetwork
from fednode.wire import PeerId


def key(n: int) -> NodeKey:
    return NodeKey(bytes([n]) * 32)


def drain(channel: trio.MemoryReceiveChannel[PeerDiscovered]) -> list[PeerDiscovered]:
    received = []
    while True:
        try:
            received.append(channel.receive_nowait())
        except trio.WouldBlock:
            return received


def found(peer: PeerId, *addrs: str) -> PeerDiscovered:
    return PeerDiscovered(peer=peer, addrs=addrs)


async def test_mdns_hosts_on_one_network_hear_each_other_at_once(
    autojump_clock: MockClock,
) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a = await stack.enter_async_context(network.open_host(key(1), mdns=True))
        a_found = a.discoveries()
        # Execute
        b = await stack.enter_async_context(network.open_host(key(2), mdns=True))
        b_found = b.discoveries()
        # Assert: both directions, at t = 0, with full addresses also learned as peer addresses
        assert drain(a_found) == [found(b.peer_id, *b.listen_addrs())]
        assert drain(b_found) == [found(a.peer_id, *a.listen_addrs())]
        assert a.peer_addrs(b.peer_id) == b.listen_addrs()
        assert a.connected_peers() == [] and trio.current_time() == 0


async def test_hosts_without_mdns_neither_announce_nor_hear(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        plain = await stack.enter_async_context(network.open_host(key(1)))
        mdns = await stack.enter_async_context(network.open_host(key(2), mdns=True))
        # Execute
        other_plain = await stack.enter_async_context(network.open_host(key(3)))
        await trio.sleep(10)
        # Assert
        assert drain(plain.discoveries()) == []
        assert drain(mdns.discoveries()) == []
        assert drain(other_plain.discoveries()) == []
        assert mdns.peer_addrs(plain.peer_id) == []


async def test_a_host_that_does_not_listen_hears_but_is_not_heard(
    autojump_clock: MockClock,
) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        server = await stack.enter_async_context(network.open_host(key(1), mdns=True))
        # Execute
        client = await stack.enter_async_context(network.open_host(key(2), listen=False, mdns=True))
        # Assert
        assert drain(client.discoveries()) == [found(server.peer_id, *server.listen_addrs())]
        assert drain(server.discoveries()) == []


async def test_a_host_that_leaves_is_not_replayed_and_its_channels_end(
    autojump_clock: MockClock,
) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a = await stack.enter_async_context(network.open_host(key(1), mdns=True))
        async with network.open_host(key(2), mdns=True) as b:
            b_found = b.discoveries()
            before = drain(a.discoveries())
        killed = await stack.enter_async_context(network.open_host(key(3), mdns=True))
        network.kill(killed.peer_id)
        # Execute
        after = drain(a.discoveries())
        # Assert: b's channel ended when b closed
        assert [event.peer for event in before] == [b.peer_id]
        assert after == []
        assert [event.peer async for event in b_found] == [a.peer_id]
        assert [event async for event in killed.discoveries()] == []


async def test_a_restarted_host_is_reported_again(autojump_clock: MockClock) -> None:
    async with AsyncExitStack() as stack:
        # Prepare
        network = MemoryNetwork()
        a = await stack.enter_async_context(network.open_host(key(1), mdns=True))
        a_found = a.discoveries()
        async with network.open_host(key(2), mdns=True):
            pass
        # Execute
        async with network.open_host(key(2), mdns=True) as again:
            # Assert
            assert drain(a_found) == [found(again.peer_id, *again.listen_addrs())] * 2


# -- the feed both transports share --------------------------------------------------------


async def test_the_feed_replays_known_peers_and_reports_only_news() -> None:
    # Prepare
    feed = DiscoveryFeed(PeerId("own"))
    early = feed.open_channel()
    # Execute
    reports = [
        feed.report(found(PeerId("p1"), "/a/p2p/p1")),
        feed.report(found(PeerId("p1"), "/a/p2p/p1")),  # the same again: not news
        feed.report(found(PeerId("own"), "/o/p2p/own")),  # ourselves: never
        feed.report(found(PeerId("p2"), "/b/p2p/p2")),
        feed.report(found(PeerId("p1"), "/c/p2p/p1")),  # new addresses: news
    ]
    feed.forget(PeerId("p2"))
    late = feed.open_channel()
    # Assert
    assert reports == [True, False, False, True, True]
    assert [e.addrs for e in drain(early)] == [("/a/p2p/p1",), ("/b/p2p/p2",), ("/c/p2p/p1",)]
    assert drain(late) == [found(PeerId("p1"), "/c/p2p/p1")]


async def test_the_feed_remembers_a_bounded_number_of_peers() -> None:
    # Prepare
    feed = DiscoveryFeed(PeerId("own"))
    # Execute
    for i in range(MAX_KNOWN + 5):
        feed.report(found(PeerId(f"p{i}"), f"/a/p2p/p{i}"))
    replayed = drain(feed.open_channel())
    # Assert: the oldest went first
    assert len(replayed) == MAX_KNOWN
    assert replayed[0].peer == "p5" and replayed[-1].peer == f"p{MAX_KNOWN + 4}"


async def test_a_closed_feed_ends_its_channels_and_reports_nothing() -> None:
    # Prepare
    feed = DiscoveryFeed(PeerId("own"))
    feed.report(found(PeerId("p1"), "/a/p2p/p1"))
    channel = feed.open_channel()
    # Execute
    feed.close()
    # Assert
    assert [e.peer async for e in channel] == ["p1"]
    assert [e async for e in feed.open_channel()] == []
    assert feed.report(found(PeerId("p2"), "/b/p2p/p2")) is False


@pytest.mark.parametrize("mdns", [False, True])
async def test_discoveries_of_a_closed_host_end_at_once(
    autojump_clock: MockClock, mdns: bool
) -> None:
    # Prepare
    network = MemoryNetwork()
    async with network.open_host(key(1), mdns=mdns) as host:
        pass
    # Execute
    events = [event async for event in host.discoveries()]
    # Assert
    assert events == []
