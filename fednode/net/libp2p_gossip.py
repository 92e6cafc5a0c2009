"""Net layer, libp2p adapter: GossipSub behind the Host's ``subscribe`` and ``publish``.

Workaround (c) of :mod:`fednode.net.libp2p_host` lives here: a 1 s heartbeat that stays 1 s,
no spam limit on our own publishes, publishes paced so that libp2p's silent queue drops do not
happen, and a size limit that raises instead of dropping. Each topic has one libp2p
subscription, emptied by a task of its own into one channel per subscriber.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub

from fednode.errors import TransportError
from fednode.net.interface import GossipMessage
from fednode.wire import PeerId

logger = logging.getLogger("fednode.net.libp2p")

GOSSIP_MAX_MESSAGE = 512 * 1024
"""Gossip payloads must be smaller: libp2p's 1 MiB RPC limit has to hold them plus the envelope."""
GOSSIP_PROTOCOLS = (PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID)
_MIN_POLL = 0.005


def gossip_router(heartbeat: float) -> Any:
    """GossipSub with the spec's degrees and our heartbeat. Its "adaptive" mode is off: when the
    mesh looks thin (any federation under D=6 peers) it stretches the heartbeat to 30-60 s. Its
    spam limit is off: 10 msg/s per topic, applied to our own publishes too."""
    return GossipSub(
        protocols=list(GOSSIP_PROTOCOLS),
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=heartbeat,  # type: ignore[arg-type]  # hinted int; floats work
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
    )


class Gossip:
    """Subscriptions and paced publishing on one libp2p ``Pubsub``."""

    def __init__(
        self,
        pubsub: Any,
        own_id: ID,
        *,
        max_message: int,
        publish_interval: float,
        queue_wait: float,
        subscription_buffer: int,
    ) -> None:
        self._pubsub = pubsub
        self._own_id = own_id
        self._max_message = max_message
        self._publish_interval = publish_interval
        self._queue_wait = queue_wait
        self._subscription_buffer = subscription_buffer
        self._topics: dict[str, list[trio.MemorySendChannel[GossipMessage]]] = {}
        self._publish_lock = trio.Lock()
        self._next_publish = 0.0
        self._stuck: set[Any] = set()  # peers whose queue stayed half full a whole queue_wait

    async def subscribe(
        self, topic: str, nursery: trio.Nursery
    ) -> trio.MemoryReceiveChannel[GossipMessage]:
        send, receive = trio.open_memory_channel[GossipMessage](self._subscription_buffer)
        if topic not in self._topics:
            try:
                subscription = await self._pubsub.subscribe(topic)
            except Exception as exc:
                raise TransportError(f"subscribing to {topic!r} failed: {exc}") from exc
            self._topics[topic] = []
            nursery.start_soon(self._drain, topic, subscription)
        self._topics[topic].append(send)
        return receive

    async def _drain(self, topic: str, subscription: Any) -> None:
        """Empty libp2p's 32-message subscription channel (it drops on overflow) as fast as
        messages come, into each subscriber's channel, keeping only other peers' messages on
        this topic (libp2p also hands us our own publishes)."""
        async for msg in subscription:
            try:
                source = ID(msg.from_id)
                data, topics = bytes(msg.data), list(msg.topicIDs)
            except Exception:  # cannot happen with strict signing; never let it stop us
                continue
            if source == self._own_id or topic not in topics:
                continue
            message = GossipMessage(topic=topic, source=PeerId(str(source)), data=data)
            for send in list(self._topics[topic]):
                try:
                    send.send_nowait(message)
                except trio.WouldBlock:
                    logger.debug("subscriber to %r is not keeping up; message dropped", topic)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._topics[topic].remove(send)

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) >= self._max_message:
            raise TransportError(
                f"gossip message of {len(data)} bytes; the limit is {self._max_message}"
                " (send large data over a stream)"
            )
        async with self._publish_lock:
            await trio.sleep_until(self._next_publish)
            await self._wait_for_queue_room()
            try:
                await self._pubsub.publish(topic, bytes(data))
            except Exception as exc:
                raise TransportError(f"publishing on {topic!r} failed: {exc}") from exc
            self._next_publish = trio.current_time() + self._publish_interval

    async def _wait_for_queue_room(self) -> None:
        """Wait while some peer's outbound RPC queue (32 RPCs) is at least half full: libp2p
        drops what does not fit, silently. A peer that stays half full for ``queue_wait`` is
        stuck (frozen, or starved of CPU): we publish anyway and let it miss the message, and
        later publishes do not wait for it again until its queue drains below half. One slow
        peer must not hold back every message we send (our heartbeats above all: late ones
        make the others call us dead). (The publish interval protects the queues of the peers
        that relay our messages, which we cannot see.)"""
        queues = self._pubsub.peer_queues
        self._stuck = {p for p in self._stuck if p in queues and _half_full(queues[p])}
        with trio.move_on_after(self._queue_wait) as scope:
            while self._waiting_for(queues):
                await trio.sleep(max(self._publish_interval, _MIN_POLL))
        if scope.cancelled_caught:
            stuck = self._waiting_for(queues)
            logger.info("gossip: %d peer(s) not reading; publishing past them", len(stuck))
            self._stuck.update(stuck)

    def _waiting_for(self, queues: Any) -> list[Any]:
        """The peers, not known stuck, whose outbound queue is at least half full."""
        return [p for p, q in list(queues.items()) if p not in self._stuck and _half_full(q)]

    def close(self) -> None:
        """End every subscriber's channel."""
        for senders in self._topics.values():
            for send in senders:
                send.close()


def _half_full(queue: Any) -> bool:
    capacity = getattr(getattr(queue, "_queue", None), "max_size", 32)
    return len(queue) >= capacity // 2
