"""The node driver over the in-memory transport on trio's MockClock: discovery through a
bootstrap or mDNS on a LAN, heartbeats, failure detection at exact virtual times, rejoin, status."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trio.testing

from fednode.crypto import NodeKey, seal_bytes
from fednode.net.memory import MemoryNetwork
from fednode.node.config import NodeConfig
from fednode.node.runtime import Node, fetch_status, open_node
from fednode.protocol.membership import PeerState
from fednode.wire import Heartbeat

INTERVAL = 1.0
STEP = 0.01  # virtual seconds: the resolution of the detection-time assertions


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def _key(i: int) -> NodeKey:
    return NodeKey(bytes([i + 1]) * 32)


def _config(
    tmp_path: Path, i: int, role: str, bootstrap: tuple[str, ...] = (), mdns: bool = False
) -> NodeConfig:
    return NodeConfig(
        role=role,
        federation="fed",
        data_dir=tmp_path / f"n{i}",
        bootstrap=bootstrap,
        heartbeat_interval=INTERVAL,
        mdns=mdns,
    )  # type: ignore[arg-type]


async def _start(
    stack: AsyncExitStack,
    net: MemoryNetwork,
    tmp_path: Path,
    i: int,
    role: str,
    bootstrap: tuple[str, ...] = (),
    *,
    mdns: bool = False,
) -> Node:
    """A node on a host of ``net``; with ``mdns`` both join the network's LAN, as
    ``fednode start --mdns`` passes ``config.mdns`` to its host."""
    key = _key(i)
    host = await stack.enter_async_context(net.open_host(key, listen=role != "client", mdns=mdns))
    return await stack.enter_async_context(
        open_node(
            _config(tmp_path, i, role, bootstrap, mdns),
            key,
            host,
            rng=random.Random(i),
            wall_ms=lambda: int(trio.current_time() * 1000) + 1_700_000_000_000,
        )
    )


def _alive(node: Node) -> set[str]:
    return {m.peer for m in node.view.members() if m.state is PeerState.ALIVE}


async def _wait_until(condition: Callable[[], bool], limit: float = 60.0) -> float:
    """Step *virtual* time (MockClock) in ``STEP`` increments until ``condition()`` holds; return
    the virtual time. Nothing here waits on the wall clock."""
    with trio.fail_after(limit):
        while not condition():
            await trio.sleep(STEP)
    return trio.current_time()


async def test_nodes_find_each_other_through_a_bootstrap(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare
    net = MemoryNetwork(seed=1)
    async with AsyncExitStack() as stack:
        boot = await _start(stack, net, tmp_path, 0, "bootstrap")
        addr = boot.host.listen_addrs()[0]
        nodes = [
            await _start(stack, net, tmp_path, i, "client" if i % 2 else "combiner", (addr,))
            for i in range(1, 6)
        ]
        everyone = {n.peer_id for n in [boot, *nodes]}
        # Execute
        await _wait_until(lambda: all(_alive(n) == everyone - {n.peer_id} for n in [boot, *nodes]))
        status = await fetch_status(nodes[1].host, boot.peer_id)
    # Assert
    assert {p.peer for p in status.peers} == everyone - {boot.peer_id}
    assert status.role == "bootstrap" and status.federation == "fed"
    assert all(p.state == "alive" for p in status.peers)


async def test_killed_node_is_declared_dead_within_the_detection_time(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare
    net = MemoryNetwork(seed=2)
    async with AsyncExitStack() as stack:
        boot = await _start(stack, net, tmp_path, 0, "bootstrap")
        addr = boot.host.listen_addrs()[0]
        nodes = [await _start(stack, net, tmp_path, i, "combiner", (addr,)) for i in range(1, 5)]
        victim, others = nodes[0], [boot, *nodes[1:]]
        await _wait_until(lambda: all(victim.peer_id in _alive(n) for n in others))
        # Execute
        killed_at = trio.current_time()
        net.kill(victim.peer_id)
        dead_at = await _wait_until(
            lambda: all(
                (m := n.view.member(victim.peer_id)) is not None and m.state is PeerState.DEAD
                for n in others
            )
        )
    # Assert: disconnect-triggered suspicion, then dead_after_missed intervals (2 s by default);
    # nodes not connected to the victim rely on missed heartbeats: 3 + 2 intervals at most.
    assert dead_at - killed_at <= 5 * INTERVAL + 0.05


async def test_restarted_node_rejoins(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    # Prepare
    net = MemoryNetwork(seed=3)
    async with AsyncExitStack() as stack:
        boot = await _start(stack, net, tmp_path, 0, "bootstrap")
        addr = boot.host.listen_addrs()[0]
        async with AsyncExitStack() as inner:
            first = await _start(inner, net, tmp_path, 1, "combiner", (addr,))
            await _wait_until(lambda: first.peer_id in _alive(boot))
            peer = first.peer_id
        await _wait_until(
            lambda: (m := boot.view.member(peer)) is not None and m.state is PeerState.DEAD
        )
        # Execute
        second = await _start(stack, net, tmp_path, 1, "combiner", (addr,))
        await _wait_until(lambda: peer in _alive(boot) and boot.peer_id in _alive(second))
    # Assert
    assert boot.view.statistics().recoveries >= 1


async def test_restarted_node_redials_peers_from_its_peerstore(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare: node 1 joins through the bootstrap, learns node 2's address, then both node 1 and
    # the bootstrap stop for good.
    net = MemoryNetwork(seed=4)
    async with AsyncExitStack() as stack:
        peer2 = await _start(stack, net, tmp_path, 2, "combiner")
        async with AsyncExitStack() as inner:
            boot = await _start(
                inner, net, tmp_path, 0, "bootstrap", (peer2.host.listen_addrs()[0],)
            )
            boot_addr = boot.host.listen_addrs()[0]
            # a client: it has no inbound port, so only its own peerstore can bring node 2 back
            first = await _start(inner, net, tmp_path, 1, "client", (boot_addr,))
            await _wait_until(lambda: peer2.peer_id in _alive(first))
        # Execute: node 1 restarts with the same data directory; its bootstrap is gone
        again = await _start(stack, net, tmp_path, 1, "client", (boot_addr,))
        await _wait_until(lambda: peer2.peer_id in _alive(again))
        # Assert
        assert peer2.peer_id in again.host.connected_peers()


async def test_bad_heartbeats_are_ignored_and_counted(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare
    net = MemoryNetwork(seed=5)
    async with AsyncExitStack() as stack:
        boot = await _start(stack, net, tmp_path, 0, "bootstrap")
        addr = boot.host.listen_addrs()[0]
        good = await _start(stack, net, tmp_path, 1, "combiner", (addr,))
        await _wait_until(lambda: good.peer_id in _alive(boot))
        rogue_key = _key(9)
        rogue = await stack.enter_async_context(net.open_host(rogue_key))
        await rogue.connect(addr)
        template = good.make_heartbeat()
        fields = {f: getattr(template, f) for f in Heartbeat.__dataclass_fields__}
        other_fed = Heartbeat(**{**fields, "federation": "other", "peer": rogue_key.peer_id})
        forged = Heartbeat(**{**fields, "peer": rogue_key.peer_id, "seq": 10_000})
        # Execute
        await rogue.publish(boot.topic, seal_bytes(rogue_key, other_fed))
        await rogue.publish(boot.topic, seal_bytes(_key(8), forged))  # signed by someone else
        await rogue.publish(boot.topic, b"\xa1garbage")
        await _wait_until(
            lambda: boot.invalid_messages >= 2 and boot.view.statistics().rejected_total >= 1
        )
    # Assert
    assert rogue_key.peer_id not in {m.peer for m in boot.view.members()}


async def test_nodes_on_one_lan_find_each_other_with_mdns_and_no_bootstrap(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare
    net = MemoryNetwork(seed=6)
    async with AsyncExitStack() as stack:
        a = await _start(stack, net, tmp_path, 1, "combiner", mdns=True)
        b = await _start(stack, net, tmp_path, 2, "combiner", mdns=True)
        # Execute
        joined_at = await _wait_until(lambda: _alive(a) == {b.peer_id} and _alive(b) == {a.peer_id})
        connected, a_addrs = a.host.connected_peers(), a.host.listen_addrs()
    # Assert: b heard a as it opened and dialled at once; each then took the other's heartbeat
    # (a's first one went out before they were connected, so b waits for a's second, at 1 s)
    assert joined_at == pytest.approx(INTERVAL)  # to the STEP: the first step past 1 s
    assert connected == [b.peer_id]
    assert a.view.statistics().accepted >= 1 and b.view.statistics().accepted >= 1
    assert [known.peer for known in a.peerstore.peers()] == [b.peer_id]
    assert b.peerstore.peers()[0].addrs == tuple(a_addrs)


async def test_without_mdns_nodes_on_one_network_stay_strangers(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare
    net = MemoryNetwork(seed=7)
    async with AsyncExitStack() as stack:
        a = await _start(stack, net, tmp_path, 1, "combiner")
        b = await _start(stack, net, tmp_path, 2, "combiner", mdns=True)  # one side is not enough
        # Execute
        await trio.sleep(10 * INTERVAL)
    # Assert
    assert a.heartbeats_sent >= 10 and b.heartbeats_sent >= 10
    assert a.host.connected_peers() == [] and b.host.connected_peers() == []
    assert list(a.view.members()) == [] and list(b.view.members()) == []
    assert a.peerstore.peers() == [] and b.peerstore.peers() == []


async def test_a_client_without_an_inbound_port_finds_a_combiner_with_mdns(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare
    net = MemoryNetwork(seed=8)
    async with AsyncExitStack() as stack:
        combiner = await _start(stack, net, tmp_path, 1, "combiner", mdns=True)
        # Execute: the client announces nothing, it only listens, and dials what it hears
        client = await _start(stack, net, tmp_path, 2, "client", mdns=True)
        joined_at = await _wait_until(
            lambda: _alive(combiner) == {client.peer_id} and _alive(client) == {combiner.peer_id}
        )
    # Assert
    assert joined_at == pytest.approx(INTERVAL)  # to the STEP: the first step past 1 s
    assert combiner.peerstore.peers() == []  # nothing to remember: the client has no address


async def test_heartbeats_keep_their_cadence_when_publishing_is_slow(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Prepare: every publish takes 0.4 s (gossip waiting for a busy peer's queue)
    net = MemoryNetwork(seed=7)
    started: list[float] = []
    async with AsyncExitStack() as stack:
        key = _key(1)
        host = await stack.enter_async_context(net.open_host(key, listen=True))
        publish = host.publish

        async def slow_publish(topic: str, data: bytes) -> None:
            started.append(trio.current_time())
            await trio.sleep(0.4)
            await publish(topic, data)

        host.publish = slow_publish  # type: ignore[method-assign]
        begin = trio.current_time()
        await stack.enter_async_context(
            open_node(_config(tmp_path, 1, "combiner"), key, host, rng=random.Random(1))
        )
        # Execute
        await trio.sleep(5.5 * INTERVAL)
    # Assert: one heartbeat per interval, started on the beat, not every 1.4 s
    beats = [round(t - begin, 6) for t in started]
    assert beats[:6] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
