"""Publish pacing around libp2p's silent queue drops (workaround (c) of
``fednode.net.libp2p_host``), on trio's MockClock with a stand-in ``Pubsub``: a publish waits for a
peer whose outbound queue is half full, but a peer that does not read is waited for once, not on
every publish (it made every heartbeat of a node late by the whole wait, and its peers called
it dead)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from libp2p.peer.id import ID

from fednode.net.libp2p_gossip import Gossip

QUEUE_WAIT = 1.0


@dataclass
class _Inner:
    max_size: int = 32


@dataclass
class FakeQueue:
    """What ``_half_full`` reads of libp2p's RpcQueue: its length and capacity."""

    length: int = 0
    _queue: _Inner = field(default_factory=_Inner)

    def __len__(self) -> int:
        return self.length


@dataclass
class FakePubsub:
    peer_queues: dict[Any, FakeQueue] = field(default_factory=dict)
    published: list[tuple[float, bytes]] = field(default_factory=list)

    async def publish(self, topic: str, data: bytes) -> None:
        self.published.append((trio.current_time(), data))


def gossip(pubsub: FakePubsub) -> Gossip:
    return Gossip(
        pubsub,
        ID(b"self"),
        max_message=1024,
        publish_interval=0.02,
        queue_wait=QUEUE_WAIT,
        subscription_buffer=8,
    )


async def test_a_stuck_peer_delays_one_publish_not_every_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Prepare: one peer that never reads (its queue stays full), one that is fine.
    pubsub = FakePubsub({ID(b"stuck"): FakeQueue(32), ID(b"fine"): FakeQueue(0)})
    g = gossip(pubsub)
    # Execute
    start = trio.current_time()
    for i in range(5):
        await g.publish("t", b"%d" % i)
    # Assert: the first publish waited the whole queue_wait; the next four did not wait for it.
    times = [t - start for t, _ in pubsub.published]
    assert len(times) == 5
    assert times[0] >= QUEUE_WAIT
    assert times[-1] - times[0] < 0.2


async def test_a_peer_that_drains_is_waited_for_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Prepare
    queue = FakeQueue(32)
    pubsub = FakePubsub({ID(b"slow"): queue})
    g = gossip(pubsub)
    await g.publish("t", b"a")  # waits QUEUE_WAIT, then marks the peer stuck
    queue.length = 0  # it caught up
    await g.publish("t", b"b")
    queue.length = 20  # busy again: half full
    # Execute: the queue drains 0.3 s later; the publish must wait for it, not skip it.
    start = trio.current_time()

    async def drain() -> None:
        await trio.sleep(0.3)
        queue.length = 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await g.publish("t", b"c")
    # Assert
    waited = pubsub.published[-1][0] - start
    assert 0.3 <= waited < QUEUE_WAIT


async def test_a_half_full_queue_that_drains_in_time_is_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Prepare
    queue = FakeQueue(16)
    pubsub = FakePubsub({ID(b"busy"): queue})
    g = gossip(pubsub)

    async def drain() -> None:
        await trio.sleep(0.5)
        queue.length = 3

    # Execute
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await g.publish("t", b"x")
    # Assert: published once there was room, not before and not after the full wait.
    assert 0.5 <= pubsub.published[0][0] - start < QUEUE_WAIT
