"""Node layer: the trio driver every role shares. It pumps the sans-IO machines (membership view,
dial planner) with what the host reports, publishes signed heartbeats, keeps its peers dialled
and remembered, and answers ``/fednode/status/1.0.0``. Peers come from the bootstrap list, the
peerstore, heartbeats and, when the host runs mDNS, its LAN discoveries.

All time comes from ``trio.current_time()`` (so tests run it on MockClock over the in-memory
transport); wall-clock milliseconds for heartbeats come from the ``wall_ms`` callable it is given.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from fednode.crypto import NodeKey, domain_of, seal_bytes
from fednode.errors import BadSignatureError, TransportError, WireError
from fednode.net.framing import receive_frame, send_frame
from fednode.net.interface import GossipMessage, Host, PeerConnected, PeerDiscovered, Stream
from fednode.node.config import NodeConfig
from fednode.node.peerstore import PeerStore
from fednode.protocol.dialing import DialPlanner, peer_of
from fednode.protocol.membership import (
    DetectorConfig,
    HeartbeatRejected,
    MembershipView,
    PeerDied,
    PeerForgotten,
    PeerJoined,
    PeerRecovered,
    PeerRestarted,
    PeerSuspected,
    open_heartbeat,
)
from fednode.wire import (
    Envelope,
    FederationId,
    Heartbeat,
    PeerId,
    SessionId,
    control_topic,
    decode,
    encode,
)
from fednode.wire.status import NodeStatus, PeerStatus

log = logging.getLogger(__name__)

STATUS_PROTOCOL = "/fednode/status/1.0.0"
STATUS_TIMEOUT = 10.0
#: One sealed control message sent straight to a peer that needs it now (a reducer's plan to the
#: combiners it assigns), besides gossip: one frame, then the stream ends.
CONTROL_PROTOCOL = "/fednode/control/1.0.0"
CONTROL_TIMEOUT = 5.0
CONTROL_LIMIT = 1 << 20
#: Learned peers are dialled only while we hold fewer connections than this; gossip reaches the
#: rest through them.
TARGET_CONNECTIONS = 8
PING_INTERVAL = 5.0
PEERSTORE_SAVE_INTERVAL = 30.0
_HEARTBEAT_DOMAIN = domain_of(Heartbeat)

ControlHandler = Callable[[Envelope, PeerId], None]
"""``handler(envelope, source)``: a control message other than a heartbeat, not yet verified."""
MembershipListener = Callable[[Sequence[object]], None]
"""``listener(events)``: membership events (joins, deaths...) just applied to the view."""


@dataclass(frozen=True, slots=True)
class LoadSample:
    """What the node reports about itself in each heartbeat."""

    cpu: float = 0.0
    memory: float = 0.0
    attached: int = 0
    bandwidth: float = 0.0
    session: str = ""
    round: int = -1


def system_load() -> LoadSample:
    """CPU and memory load of this machine, 0 to 1 (psutil)."""
    import psutil

    return LoadSample(
        cpu=min(1.0, psutil.cpu_percent(interval=None) / 100),
        memory=min(1.0, psutil.virtual_memory().percent / 100),
    )


class Node:
    """A running node: identity, host, membership view and the loops that keep them current."""

    def __init__(
        self,
        config: NodeConfig,
        key: NodeKey,
        host: Host,
        *,
        load: Callable[[], LoadSample] = LoadSample,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        rng: random.Random | None = None,
        detector: DetectorConfig | None = None,
    ) -> None:
        self.config = config
        self.key = key
        self.host = host
        self._load = load
        self._wall_ms = wall_ms
        self.started_at = trio.current_time()
        self.incarnation = wall_ms()
        self.seq = 0
        self.topic = control_topic(config.federation)
        offset = wall_ms() - self.started_at * 1000
        self.view = MembershipView(key.peer_id, config.federation, detector, wall_offset_ms=offset)
        self.planner = DialPlanner(self_peer=key.peer_id, rng=rng or random.Random())
        self.peerstore = PeerStore(config.peerstore_path)
        self.heartbeats_sent = 0
        self.last_heartbeat: Heartbeat | None = None  #: the latest made: what peers see of us
        self.invalid_messages = 0  # control messages that failed to decode or verify
        self._changed = trio.Event()  # wakes the timer loop when deadlines may have moved
        self.membership_events: list[object] = []  # the latest few, for the status display
        self._control_handlers: list[ControlHandler] = []
        self._membership_listeners: list[MembershipListener] = []

    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    def _wake(self) -> None:
        self._changed.set()

    def on_control(self, handler: ControlHandler) -> None:
        """Hand every control message that is not a heartbeat to ``handler`` (a role driver),
        called in the gossip task: it must not block. It verifies what it takes."""
        self._control_handlers.append(handler)

    def on_membership(self, listener: MembershipListener) -> None:
        """Call ``listener`` with the membership events of each change to the view."""
        self._membership_listeners.append(listener)

    # --- heartbeats ---

    def make_heartbeat(self) -> Heartbeat:
        sample = self._load()
        heartbeat = Heartbeat(
            federation=FederationId(self.config.federation),
            peer=self.peer_id,
            incarnation=self.incarnation,
            seq=self.seq,
            sent_ms=self._wall_ms(),
            interval_ms=max(1, round(self.config.heartbeat_interval * 1000)),
            role=self.config.role,
            capacity=self.config.capacity if self.config.role in ("combiner", "auto") else 0,
            attached=sample.attached,
            cpu=sample.cpu,
            memory=sample.memory,
            bandwidth=sample.bandwidth,
            region=self.config.region,
            addrs=tuple(self.host.listen_addrs()[:16]),
            session=SessionId(sample.session),
            round=sample.round,
        )
        self.seq += 1
        self.last_heartbeat = heartbeat
        return heartbeat

    async def _publish_heartbeats(self) -> None:
        """One heartbeat every interval, on a fixed cadence: the time a publish takes (gossip
        may wait for a busy peer's queue) does not stretch the period, which peers' failure
        detectors count on. A beat missed altogether (the process was starved) is not made up
        with a burst: the next goes out at once and the cadence restarts from it."""
        interval = self.config.heartbeat_interval
        due = trio.current_time()
        while True:
            try:
                await self.host.publish(self.topic, seal_bytes(self.key, self.make_heartbeat()))
                self.heartbeats_sent += 1
            except TransportError as exc:
                log.warning("heartbeat not published: %s", exc)
            now = trio.current_time()
            due = max(due + interval, now)
            await trio.sleep_until(due)

    async def _receive_gossip(self, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async for msg in channel:
            try:
                envelope = decode(msg.data, Envelope)
                if envelope.domain != _HEARTBEAT_DOMAIN:
                    # Round messages: for the role driver, if any (it verifies them); a node
                    # with no use for them (a bootstrap) only relays them.
                    for handler in self._control_handlers:
                        handler(envelope, msg.source)
                    continue
                heartbeat = open_heartbeat(envelope)
            except (WireError, BadSignatureError) as exc:
                self.invalid_messages += 1
                log.info("dropped an invalid control message from %s: %s", msg.source, exc)
                continue
            self._handle(self.view.on_heartbeat(heartbeat, trio.current_time()))

    def _handle(self, events: Sequence[object]) -> None:
        now = trio.current_time()
        for event in events:
            if isinstance(event, HeartbeatRejected):
                log.debug("heartbeat rejected: %s", event)
                continue
            peer = getattr(event, "peer", None)
            if isinstance(event, (PeerJoined, PeerRecovered, PeerRestarted)) and peer is not None:
                member = self.view.member(peer)
                if member is not None and member.heartbeat.addrs:
                    self.peerstore.remember(peer, list(member.heartbeat.addrs))
                    if len(self.host.connected_peers()) < TARGET_CONNECTIONS:
                        for addr in member.heartbeat.addrs:
                            self.planner.add(_full(addr, peer), now)
            if isinstance(event, PeerForgotten) and peer is not None:
                for addr in self.planner.targets():
                    if peer_of(addr) == peer:
                        self.planner.remove(addr)
            if isinstance(
                event, (PeerJoined, PeerSuspected, PeerDied, PeerRecovered, PeerRestarted)
            ):
                log.info("%s %s", type(event).__name__, peer)
                self.membership_events = [*self.membership_events[-19:], event]
        changes = [e for e in events if not isinstance(e, HeartbeatRejected)]
        if changes:
            for listener in self._membership_listeners:
                listener(changes)
        self._wake()

    async def _watch_peers(self) -> None:
        async for event in self.host.peer_events():
            now = trio.current_time()
            if isinstance(event, PeerConnected):
                self.view.on_connected(event.peer, now)
                self.planner.on_connected(event.peer)
            else:
                self.planner.on_disconnected(event.peer, now)
                self._handle(self.view.on_disconnected(event.peer, now))
            self._wake()

    async def _watch_discoveries(self) -> None:
        """Dial and remember the peers the host finds on the LAN, as if a heartbeat had named
        them (so, beyond :data:`TARGET_CONNECTIONS`, gossip reaches them instead)."""
        async for found in self.host.discoveries():
            self._discovered(found)

    def _discovered(self, found: PeerDiscovered) -> None:
        log.info("PeerDiscovered %s at %s", found.peer, " ".join(found.addrs))
        self.peerstore.remember(found.peer, list(found.addrs))
        if len(self.host.connected_peers()) < TARGET_CONNECTIONS:
            now = trio.current_time()
            for addr in found.addrs:
                self.planner.add(addr, now)
        self._wake()

    async def _run_timers(self) -> None:
        """Apply membership deadlines on time, and dial what the planner says is due."""
        async with trio.open_nursery() as dials:
            while True:
                now = trio.current_time()
                self._handle(self.view.on_timer(now))
                for addr in self.planner.due(now):
                    dials.start_soon(self._dial, addr)
                deadlines = [
                    d
                    for d in (self.view.next_deadline(), self.planner.next_deadline())
                    if d is not None
                ]
                self._changed = trio.Event()
                with trio.move_on_at(min(deadlines, default=now + self.config.heartbeat_interval)):
                    await self._changed.wait()

    async def _dial(self, addr: str) -> None:
        try:
            await self.host.connect(addr)
        except TransportError as exc:
            self.planner.on_dial_failed(addr, trio.current_time())
            first = self.planner.failures(addr) == 1
            log.log(logging.INFO if first else logging.DEBUG, "dial %s failed: %s", addr, exc)
        else:
            self.planner.on_connected(peer_of(addr))
        self._wake()

    async def _ping_peers(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            for peer in self.host.connected_peers():
                with trio.move_on_after(PING_INTERVAL):
                    try:
                        self.view.record_rtt(peer, await self.host.ping(peer), trio.current_time())
                    except TransportError:
                        pass

    async def _save_peerstore(self) -> None:
        while True:
            await trio.sleep(PEERSTORE_SAVE_INTERVAL)
            self.save_peerstore()

    def save_peerstore(self) -> None:
        try:
            self.peerstore.save()
        except OSError as exc:
            log.warning("cannot save the peerstore: %s", exc)

    # --- status ---

    def status(self) -> NodeStatus:
        now = trio.current_time()
        stats = self.view.statistics()
        peers = tuple(
            PeerStatus(
                peer=m.peer,
                state=m.state.value,  # type: ignore[arg-type]
                role=m.role,
                region=m.region,
                capacity=m.capacity,
                attached=m.attached,
                cpu=m.cpu,
                memory=m.memory,
                bandwidth=m.bandwidth,
                rtt_ms=None if m.rtt is None else m.rtt * 1000,
                last_seen_ms=max(0, round((now - m.last_seen_at) * 1000)),
                connected=m.connected,
                round=m.heartbeat.round,
                addrs=m.heartbeat.addrs,
            )
            for m in self.view.members()
        )
        return NodeStatus(
            peer=self.peer_id,
            federation=FederationId(self.config.federation),
            role=self.config.role,
            addrs=tuple(self.host.listen_addrs()),
            uptime_ms=round((now - self.started_at) * 1000),
            connected=len(self.host.connected_peers()),
            heartbeats_accepted=stats.accepted,
            heartbeats_rejected=stats.rejected_total,
            peers=peers,
        )

    async def send_control(self, peer: PeerId, sealed: bytes) -> None:
        """Send one sealed control message straight to ``peer`` (``/fednode/control/1.0.0``).

        Raises:
            TransportError: it did not get there within :data:`CONTROL_TIMEOUT`.
        """
        with trio.move_on_after(CONTROL_TIMEOUT) as scope:
            stream = await self.host.open_stream(peer, CONTROL_PROTOCOL)
            try:
                await send_frame(stream, sealed, CONTROL_TIMEOUT)
            finally:
                await stream.aclose()
        if scope.cancelled_caught:
            raise TransportError(f"no control stream to {peer} within {CONTROL_TIMEOUT:g} s")

    async def _serve_control(self, stream: Stream) -> None:
        try:
            frame = await receive_frame(stream, CONTROL_LIMIT, CONTROL_TIMEOUT)
            envelope = decode(bytes(frame), Envelope)
        except (TransportError, WireError) as exc:
            if isinstance(exc, WireError):
                self.invalid_messages += 1
            log.info("dropped a control message from %s: %s", stream.remote_peer, exc)
            return
        finally:
            with trio.move_on_after(CONTROL_TIMEOUT):
                try:
                    await stream.aclose()
                except TransportError:
                    pass
        if envelope.domain != _HEARTBEAT_DOMAIN:
            for handler in self._control_handlers:
                handler(envelope, stream.remote_peer)

    async def _serve_status(self, stream: Stream) -> None:
        await send_frame(stream, encode(self.status()), STATUS_TIMEOUT)
        await stream.send_eof()

    # --- lifecycle ---

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # (Any: trio-typing, which libp2p installs, shadows trio.TaskStatus for mypy.)
        """Run every loop until cancelled."""
        now = trio.current_time()
        for addr in self.config.bootstrap:
            self.planner.add(addr, now, permanent=True)
        for known in self.peerstore.peers()[:TARGET_CONNECTIONS]:
            for addr in known.addrs:
                self.planner.add(addr, now)
        self.host.set_stream_handler(STATUS_PROTOCOL, self._serve_status)
        self.host.set_stream_handler(CONTROL_PROTOCOL, self._serve_control)
        channel = await self.host.subscribe(self.topic)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_peers)
                nursery.start_soon(self._watch_discoveries)
                nursery.start_soon(self._receive_gossip, channel)
                nursery.start_soon(self._run_timers)
                nursery.start_soon(self._publish_heartbeats)
                nursery.start_soon(self._ping_peers)
                nursery.start_soon(self._save_peerstore)
                task_status.started()
        finally:
            self.save_peerstore()


def _full(addr: str, peer: PeerId) -> str:
    return addr if "/p2p/" in addr else f"{addr}/p2p/{peer}"


@asynccontextmanager
async def open_node(
    config: NodeConfig, key: NodeKey, host: Host, **kwargs: object
) -> AsyncIterator[Node]:
    """Run a node on an open host; leaving the block stops its loops (the host stays open)."""
    node = Node(config, key, host, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()


async def fetch_status(host: Host, peer: PeerId, timeout: float = STATUS_TIMEOUT) -> NodeStatus:
    """Ask a connected node for its :class:`NodeStatus`."""
    stream = await host.open_stream(peer, STATUS_PROTOCOL)
    try:
        frame = await receive_frame(stream, 1 << 20, timeout)
    finally:
        await stream.aclose()
    return decode(bytes(frame), NodeStatus)
