"""The Host/Stream contract (``fednode.net.interface``), run against every transport.

Each test takes ``clock`` so the memory transport runs on an autojumping MockClock: a deadlock
there fails at once (the ``fail_after`` fires in virtual time) instead of hanging.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
import trio
from trio.testing import MockClock

from fednode.crypto import NodeKey
from fednode.errors import TransportError
from fednode.net.interface import (
    GossipMessage,
    Host,
    PeerConnected,
    PeerDisconnected,
    PeerEvent,
    Stream,
)

if TYPE_CHECKING:
    from tests.net.conftest import HostFactory

DEADLINE = 45  # seconds (virtual for memory); the libp2p hard timeout is 60
ECHO = "/fednode/test/echo/1.0.0"
HOLD = "/fednode/test/hold/1.0.0"
BOOM = "/fednode/test/boom/1.0.0"
TOPIC = "fednode/test/contract"
MiB = 1024 * 1024
GOSSIP_ATTEMPTS = 60
GOSSIP_RETRY = 0.25  # seconds between publishes while the gossip mesh forms


# -- helpers ------------------------------------------------------------------------------------


async def echo(stream: Stream) -> None:
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)
    await stream.aclose()


@dataclass
class Seen:
    """What a handler saw, and when it finished."""

    done: trio.Event = field(default_factory=trio.Event)
    received: int = 0
    error: BaseException | None = None
    eof: bool = False

    async def drain(self, stream: Stream) -> None:
        """Read until the end of the stream or an error, and record which it was."""
        try:
            while chunk := await stream.receive_some():
                self.received += len(chunk)
            self.eof = True
        except TransportError as exc:
            self.error = exc
        finally:
            self.done.set()


async def connected_pair(make_host: HostFactory) -> tuple[Host, Host]:
    a, b = await make_host(), await make_host()
    await a.connect(b.listen_addrs()[0])
    return a, b


async def next_event(events: trio.MemoryReceiveChannel[PeerEvent], peer: str) -> PeerEvent:
    """The next connection event about ``peer`` (events about other peers are skipped)."""
    async for event in events:
        if event.peer == peer:
            return event
    raise AssertionError("the event channel closed")


async def exchange(stream: Stream, payload: bytes) -> bytes:
    """Send ``payload`` then EOF while reading everything that comes back."""
    received = bytearray()

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await stream.receive_some():
            received += chunk
    return bytes(received)


async def read_all(stream: Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def publish_until_received(
    publisher: Host,
    subscription: trio.MemoryReceiveChannel[GossipMessage],
    label: str,
) -> list[GossipMessage]:
    """Publish ``label/0``, ``label/1``, … until one arrives (a real mesh takes a while to form).

    Returns every message the subscription received meanwhile, ending with the ``label`` one.
    """
    received: list[GossipMessage] = []
    for attempt in range(GOSSIP_ATTEMPTS):
        await publisher.publish(TOPIC, f"{label}/{attempt}".encode())
        with trio.move_on_after(GOSSIP_RETRY):
            async for message in subscription:
                received.append(message)
                if message.data.startswith(f"{label}/".encode()):
                    return received
    raise AssertionError(f"no {label!r} message arrived after {GOSSIP_ATTEMPTS} publishes")


# -- connections --------------------------------------------------------------------------------


async def test_connect_by_full_multiaddr_returns_the_peer_id(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await make_host(), await make_host()
        addrs = b.listen_addrs()
        # Execute
        peer = await a.connect(addrs[0])
        # Assert
        assert addrs and all(addr.endswith(f"/p2p/{b.peer_id}") for addr in addrs)
        assert peer == b.peer_id
        assert b.peer_id in a.connected_peers()
        assert a.peer_addrs(b.peer_id) != []


async def test_connect_to_a_bad_address_raises(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await make_host(), await make_host()
        addr = b.listen_addrs()[0]
        without_peer = addr.rsplit("/p2p/", 1)[0]
        wrong_peer = f"{without_peer}/p2p/{NodeKey.generate().peer_id}"
        # Execute / Assert
        for bad in (without_peer, wrong_peer, "not a multiaddr"):
            with pytest.raises(TransportError):
                await a.connect(bad)
        assert b.peer_id not in a.connected_peers()


async def test_both_sides_see_peer_connected(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await make_host(), await make_host()
        a_events, b_events = a.peer_events(), b.peer_events()
        # Execute
        await a.connect(b.listen_addrs()[0])
        # Assert
        assert await next_event(a_events, b.peer_id) == PeerConnected(peer=b.peer_id)
        assert await next_event(b_events, a.peer_id) == PeerConnected(peer=a.peer_id)
        assert a.peer_id in b.connected_peers()


# -- streams ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, MiB, 10 * MiB], ids=["1B", "1MiB", "10MiB"])
async def test_echo_round_trip_is_exact(
    make_host: HostFactory, clock: MockClock | None, size: int
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)
        b.set_stream_handler(ECHO, echo)
        payload = random.Random(size).randbytes(size)
        # Execute
        stream = await a.open_stream(b.peer_id, ECHO)
        returned = await exchange(stream, payload)
        await stream.aclose()
        # Assert
        assert stream.protocol == ECHO and stream.remote_peer == b.peer_id
        assert len(returned) == size
        assert returned == payload


async def test_send_eof_half_closes(make_host: HostFactory, clock: MockClock | None) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)
        seen: list[bytes] = []

        async def reply_after_eof(stream: Stream) -> None:
            while chunk := await stream.receive_some():
                seen.append(chunk)
            seen.append(await stream.receive_some())  # still b"" after the end
            await stream.send_all(b"got " + b"".join(seen))
            await stream.aclose()

        b.set_stream_handler(ECHO, reply_after_eof)
        stream = await a.open_stream(b.peer_id, ECHO)
        # Execute
        await stream.send_all(b"question")
        await stream.send_eof()
        reply = await read_all(stream)
        # Assert
        assert reply == b"got question"
        assert seen[-1] == b""
        with pytest.raises(TransportError):
            await stream.send_all(b"after eof")


async def test_reset_by_opener_raises_in_the_handler(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)
        seen = Seen()
        b.set_stream_handler(HOLD, seen.drain)
        stream = await a.open_stream(b.peer_id, HOLD)
        await stream.send_all(b"partial")
        # Execute
        await stream.reset()
        await seen.done.wait()
        # Assert
        assert isinstance(seen.error, TransportError)
        assert not seen.eof
        with pytest.raises(TransportError):
            await stream.send_all(b"after reset")


async def test_reset_by_handler_raises_at_the_opener(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)

        async def reset_at_once(stream: Stream) -> None:
            assert await stream.receive_some() == b"x"
            await stream.reset()

        b.set_stream_handler(HOLD, reset_at_once)
        stream = await a.open_stream(b.peer_id, HOLD)
        # Execute
        await stream.send_all(b"x")
        # Assert
        with pytest.raises(TransportError):
            while await stream.receive_some():
                pass


async def test_handler_exception_resets_the_stream_and_the_host_carries_on(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)
        calls = 0

        async def boom(stream: Stream) -> None:
            nonlocal calls
            calls += 1
            await stream.receive_some(1)
            raise ValueError("handler bug")

        b.set_stream_handler(BOOM, boom)
        b.set_stream_handler(ECHO, echo)
        # Execute
        outcomes = []
        for _ in range(2):
            failing = await a.open_stream(b.peer_id, BOOM)
            await failing.send_all(b"x")
            try:
                while await failing.receive_some():
                    pass
            except TransportError as exc:
                outcomes.append(exc)
        working = await a.open_stream(b.peer_id, ECHO)
        returned = await exchange(working, b"still alive")
        # Assert
        assert calls == 2 and len(outcomes) == 2
        assert returned == b"still alive"
        assert a.peer_id in b.connected_peers()


async def test_open_stream_for_an_unknown_protocol_raises(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)
        b.set_stream_handler(ECHO, echo)
        # Execute / Assert
        with pytest.raises(TransportError):
            await a.open_stream(b.peer_id, "/fednode/test/nobody-speaks-this/1.0.0")
        stream = await a.open_stream(b.peer_id, ECHO)  # the connection survives
        assert await exchange(stream, b"ok") == b"ok"


async def test_open_stream_to_an_unknown_peer_raises(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a = await make_host()
        stranger = NodeKey.generate().peer_id
        # Execute / Assert
        with pytest.raises(TransportError):
            await a.open_stream(stranger, ECHO)


async def test_a_receiver_that_does_not_read_blocks_the_sender(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    # Prepare
    total, chunk = 20 * MiB, 16 * 1024
    a, b = await connected_pair(make_host)
    release = trio.Event()
    received = 0

    async def read_when_released(stream: Stream) -> None:
        nonlocal received
        await release.wait()
        while data := await stream.receive_some():
            received += len(data)
        await stream.send_all(received.to_bytes(8, "big"))
        await stream.aclose()

    b.set_stream_handler(HOLD, read_when_released)
    sent = 0
    sender_done = trio.Event()

    async def send_everything(stream: Stream) -> None:
        nonlocal sent
        block = bytes(chunk)
        while sent < total:
            await stream.send_all(block)
            sent += chunk
        await stream.send_eof()
        sender_done.set()

    with trio.fail_after(DEADLINE):
        stream = await a.open_stream(b.peer_id, HOLD)
        async with trio.open_nursery() as nursery:
            # Execute: give the sender a fair chance to finish while nobody reads
            nursery.start_soon(send_everything, stream)
            with trio.move_on_after(1.0):  # virtual on memory; < yamux's 5 s window timeout
                await sender_done.wait()
            stalled_at = sent
            release.set()
        reply = await read_all(stream)
    # Assert
    assert 0 < stalled_at < total // 2  # the sender stalled, early
    if make_host.stream_buffer is not None:
        assert stalled_at == make_host.stream_buffer  # the memory pipe holds exactly this much
    assert received == total
    assert int.from_bytes(reply, "big") == total


async def test_writing_to_a_stream_the_peer_closed_fails_promptly(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    # Prepare: a handler that turns a request down after its first byte (and so closes the
    # stream) while the opener is still uploading; the upload must fail, not stall.
    a, b = await connected_pair(make_host)

    async def refuse(stream: Stream) -> None:
        await stream.receive_some(1)

    b.set_stream_handler(HOLD, refuse)
    b.set_stream_handler(ECHO, echo)
    sent = 0
    with trio.fail_after(DEADLINE):
        stream = await a.open_stream(b.peer_id, HOLD)
        # Execute
        with trio.fail_after(5), pytest.raises(TransportError):
            while sent < 20 * MiB:
                await stream.send_all(bytes(MiB))
                sent += MiB
        # Assert: only that stream failed; the connection carries on
        assert b.peer_id in a.connected_peers()
        assert await exchange(await a.open_stream(b.peer_id, ECHO), b"still here") == b"still here"
    assert sent < 20 * MiB


async def test_disconnect_notifies_both_sides_and_fails_streams(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await make_host(), await make_host()
        a_events, b_events = a.peer_events(), b.peer_events()
        await a.connect(b.listen_addrs()[0])
        assert await next_event(b_events, a.peer_id) == PeerConnected(peer=a.peer_id)
        seen = Seen()
        b.set_stream_handler(HOLD, seen.drain)
        stream = await a.open_stream(b.peer_id, HOLD)
        await stream.send_all(b"hello")
        # Execute
        await a.disconnect(b.peer_id)
        # Assert
        assert await next_event(a_events, b.peer_id) == PeerConnected(peer=b.peer_id)
        assert await next_event(a_events, b.peer_id) == PeerDisconnected(peer=b.peer_id)
        assert await next_event(b_events, a.peer_id) == PeerDisconnected(peer=a.peer_id)
        await seen.done.wait()
        assert isinstance(seen.error, TransportError)
        with pytest.raises(TransportError):
            await stream.send_all(b"after disconnect")
        assert b.peer_id not in a.connected_peers()
        assert a.peer_id not in b.connected_peers()


async def test_open_stream_redials_a_disconnected_peer_it_knows(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await make_host(), await make_host()
        b_events = b.peer_events()
        await a.connect(b.listen_addrs()[0])
        b.set_stream_handler(ECHO, echo)
        assert await next_event(b_events, a.peer_id) == PeerConnected(peer=a.peer_id)
        await a.disconnect(b.peer_id)
        assert await next_event(b_events, a.peer_id) == PeerDisconnected(peer=a.peer_id)
        # Execute
        stream = await a.open_stream(b.peer_id, ECHO)
        returned = await exchange(stream, b"again")
        # Assert
        assert returned == b"again"
        assert b.peer_id in a.connected_peers()


async def test_ping_returns_a_non_negative_float(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)
        # Execute
        rtt = await a.ping(b.peer_id)
        # Assert
        assert isinstance(rtt, float)
        assert rtt >= 0.0


async def test_aclose_is_idempotent_and_closes_streams(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await make_host(), await make_host()
        b_events = b.peer_events()
        await a.connect(b.listen_addrs()[0])
        assert await next_event(b_events, a.peer_id) == PeerConnected(peer=a.peer_id)
        a_events = a.peer_events()
        a_topic = await a.subscribe(TOPIC)
        seen = Seen()
        b.set_stream_handler(HOLD, seen.drain)
        stream = await a.open_stream(b.peer_id, HOLD)
        await stream.send_all(b"hello")
        # Execute
        await a.aclose()
        await a.aclose()
        # Assert
        with pytest.raises(TransportError):
            await stream.send_all(b"after close")
        assert all(e.peer == b.peer_id for e in [e async for e in a_events])  # and it ends
        assert [m async for m in a_topic] == []
        assert await next_event(b_events, a.peer_id) == PeerDisconnected(peer=a.peer_id)
        await seen.done.wait()
        assert isinstance(seen.error, TransportError)
        with pytest.raises(TransportError):
            await a.open_stream(b.peer_id, HOLD)


# -- gossip -------------------------------------------------------------------------------------


async def test_gossip_crosses_a_line_once_with_its_source(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare: A - B - C, B relays (as every fednode node subscribes to its federation's topics)
        a, b, c = await make_host(), await make_host(), await make_host()
        await a.connect(b.listen_addrs()[0])
        await b.connect(c.listen_addrs()[0])
        at_c = await c.subscribe(TOPIC)
        at_b = await b.subscribe(TOPIC)
        # Execute
        received = await publish_until_received(a, at_c, "hello")
        received += await publish_until_received(a, at_c, "end")  # all before it has arrived
        # Assert
        assert a.peer_id not in c.connected_peers()
        assert all(m.source == a.peer_id and m.topic == TOPIC for m in received)
        counts = Counter(m.data for m in received)
        assert all(n == 1 for n in counts.values()), counts
        if make_host.transport == "memory":
            assert [m.data for m in received] == [b"hello/0", b"end/0"]
            assert [m.data for m in (at_b.receive_nowait(), at_b.receive_nowait())] == [
                b"hello/0",
                b"end/0",
            ]


async def test_publishing_an_oversized_message_raises(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare: gossip drops RPCs over 1 MiB silently; the host must refuse loudly instead
        a, b = await connected_pair(make_host)
        await b.subscribe(TOPIC)
        # Execute / Assert
        with pytest.raises(TransportError):
            await a.publish(TOPIC, bytes(MiB))


async def test_gossip_is_not_delivered_to_its_publisher(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    with trio.fail_after(DEADLINE):
        # Prepare
        a, b = await connected_pair(make_host)
        at_a = await a.subscribe(TOPIC)
        at_b = await b.subscribe(TOPIC)
        # Execute
        received = await publish_until_received(a, at_b, "hello")
        received += await publish_until_received(a, at_b, "end")
        # Assert
        assert all(m.source == a.peer_id for m in received)
        with pytest.raises(trio.WouldBlock):
            at_a.receive_nowait()


async def test_discoveries_stay_empty_without_mdns_and_end_at_close(
    make_host: HostFactory, clock: MockClock | None
) -> None:
    # Prepare: hosts are opened without mDNS (the default); connecting is not discovering
    a, b = await make_host(), await make_host()
    found = a.discoveries()
    await a.connect(b.listen_addrs()[0])
    # Execute
    with pytest.raises(trio.WouldBlock):
        found.receive_nowait()
    await a.aclose()
    # Assert
    with trio.fail_after(DEADLINE):
        assert [event async for event in found] == []
    assert [event async for event in a.discoveries()] == []
