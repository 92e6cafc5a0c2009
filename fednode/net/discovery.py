"""Net layer: what a host has discovered on its LAN, fanned out to ``Host.discoveries()``
channels. Shared by both transports so they keep the same semantics. Trio-side only: a discovery
made on another thread (zeroconf's) hops to the trio thread before it gets here.
"""

from __future__ import annotations

import logging

import trio

from fednode.net.interface import PeerDiscovered
from fednode.wire import PeerId

logger = logging.getLogger(__name__)

MAX_KNOWN = 1024
"""Peers remembered for replay to new channels (and each channel's buffer): a LAN is small, and
a device announcing thousands of fake peers must not grow us without bound."""


class DiscoveryFeed:
    """Peers currently announced on the LAN, and the channels that want to hear about them.

    A new channel first receives every known peer (so a consumer that subscribes after the host
    opened misses nothing), then each new peer or changed address set. A peer announcing the
    same addresses again is not reported twice.
    """

    def __init__(self, own: PeerId) -> None:
        self._own = own
        self._known: dict[PeerId, PeerDiscovered] = {}
        self._senders: list[trio.MemorySendChannel[PeerDiscovered]] = []
        self._closed = False

    def open_channel(self) -> trio.MemoryReceiveChannel[PeerDiscovered]:
        send, receive = trio.open_memory_channel[PeerDiscovered](MAX_KNOWN)
        if self._closed:
            send.close()  # a closed host discovers nothing more: the channel ends at once
            return receive
        for event in self._known.values():
            send.send_nowait(event)  # fits: at most MAX_KNOWN are known
        self._senders.append(send)
        return receive

    def report(self, event: PeerDiscovered) -> bool:
        """Record and fan out ``event``; returns whether it was news."""
        if self._closed or event.peer == self._own or not event.addrs:
            return False
        if self._known.get(event.peer) == event:
            return False
        self._known.pop(event.peer, None)  # re-inserted last: the oldest is evicted first
        self._known[event.peer] = event
        if len(self._known) > MAX_KNOWN:
            del self._known[next(iter(self._known))]
        for send in list(self._senders):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                logger.warning("discovery consumer is not keeping up; dropped %s", event.peer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._senders.remove(send)
        return True

    def forget(self, peer: PeerId) -> None:
        """``peer`` left the LAN (a goodbye): new channels no longer replay it."""
        self._known.pop(peer, None)

    def known(self) -> list[PeerDiscovered]:
        return list(self._known.values())

    def close(self) -> None:
        """End every channel; idempotent."""
        self._closed = True
        self._known.clear()
        for send in self._senders:
            send.close()
        self._senders.clear()
