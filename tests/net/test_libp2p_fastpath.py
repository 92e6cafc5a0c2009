"""The libp2p fast path (``fednode.net.libp2p_fastpath``): same wire format, safer failures.

- Interop: a stock py-libp2p host (``libp2p.new_host``, Noise + yamux) and ours move 20 MiB each
  way, byte-exact, whichever side opens the stream; each side is checked to really run its own
  stack, so the test cannot pass with the fast path missing.
- Noise messages (sans-IO): the stock noise library's messages open in our reader however the
  byte stream is cut, ours open in the stock library, the largest message fits, an oversized one
  spends no nonce, a tampered or impossible one is an error and never plaintext.
- yamux frames (sans-IO): any cut of a frame stream decodes to the same frames; bad versions,
  types and sizes are protocol errors.
- Connections: a bit flipped on the wire fails the stream instead of corrupting it, a peer that
  overruns its window loses the connection, a write cancelled after sealing ends the session.

Real sockets on loopback under a hard timeout; everything waits on events, nothing sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr
from noise.connection import Keypair, NoiseConnection

from fednode.crypto.keys import NodeKey
from fednode.errors import TransportError
from fednode.net.interface import PeerDisconnected, PeerEvent, Stream
from fednode.net.libp2p_fastnoise import FastNoiseSession, FastNoiseTransport
from fednode.net.libp2p_fastyamux import FIRST_WINDOW, FastYamux
from fednode.net.libp2p_host import open_libp2p_host
from fednode.net.libp2p_workarounds import FASTPATH_ENV, close_network
from fednode.net.noise_messages import (
    MAX_MESSAGE,
    MAX_PLAINTEXT,
    MessageOpener,
    NoiseCipher,
    NoiseDecryptError,
    sealed_size,
)
from fednode.net.yamux_frames import (
    FLAG_FIN,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    FrameDecoder,
    FrameEvent,
    FrameStarted,
    YamuxProtocolError,
    encode_header,
)
from fednode.wire import PeerId

pytestmark = pytest.mark.libp2p

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
EXCHANGE = TProtocol("/fednode/test/exchange/1.0.0")
SINK = TProtocol("/fednode/test/sink/1.0.0")
MiB = 1024 * 1024
TIMEOUT = 60
PROMPTLY = 10  # seconds: far less than any stall deadline in play


# -- helpers: Noise sessions without sockets ----------------------------------------------------


def noise_pair() -> tuple[NoiseConnection, NoiseConnection]:
    """An initiator and a responder that completed the XX handshake libp2p uses, in memory,
    with fixed static keys; from here on they are the stock library's transport state."""
    ends = []
    for seed in (b"i" * 32, b"r" * 32):
        end = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
        end.set_keypair_from_private_bytes(Keypair.STATIC, seed)
        ends.append(end)
    initiator, responder = ends
    initiator.set_as_initiator()
    responder.set_as_responder()
    initiator.start_handshake()
    responder.start_handshake()
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    responder.read_message(initiator.write_message())
    assert initiator.handshake_finished and responder.handshake_finished
    return initiator, responder


def stock_messages(sender: NoiseConnection, plaintexts: list[bytes]) -> bytes:
    """What py-libp2p's stock ``NoiseTransportReadWriter`` puts on the wire for these."""
    wire = bytearray()
    for plaintext in plaintexts:
        sealed = sender.encrypt(plaintext)
        wire += len(sealed).to_bytes(2, "big") + sealed
    return bytes(wire)


def stock_open(receiver: NoiseConnection, wire: bytes) -> list[bytes]:
    """Read ``wire`` the way the stock reader does: length, body, decrypt, repeat."""
    plaintexts, position = [], 0
    while position < len(wire):
        length = int.from_bytes(wire[position : position + 2], "big")
        assert length <= MAX_MESSAGE
        body = wire[position + 2 : position + 2 + length]
        plaintexts.append(bytes(receiver.decrypt(body)))
        position += 2 + length
    return plaintexts


def seal(sender: NoiseConnection, messages: list[tuple[bytes, ...]]) -> bytes:
    cipher = NoiseCipher(sender.noise_protocol.cipher_state_encrypt)
    out = bytearray(sealed_size(messages) + MAX_PLAINTEXT)
    written = cipher.seal_batch(messages, out)
    assert written == sealed_size(messages)
    return bytes(out[:written])


def feed_in_pieces(opener: MessageOpener, wire: bytes, cuts: list[int]) -> list[bytes]:
    opened: list[bytes] = []
    bounds = [0, *sorted(set(cut % (len(wire) + 1) for cut in cuts)), len(wire)]
    for start, end in itertools.pairwise(bounds):
        opened += [bytes(m) for m in opener.feed(wire[start:end])]
    assert not opener.inside_message
    return opened


PLAINTEXTS = [b"", b"x", bytes(range(256)) * 3, random.Random(7).randbytes(MAX_PLAINTEXT), b"end"]


# -- Noise messages -----------------------------------------------------------------------------


@given(cuts=st.lists(st.integers(min_value=0, max_value=200_000), max_size=12))
def test_stock_messages_open_however_the_stream_is_cut(cuts: list[int]) -> None:
    # Prepare: the stock library seals; cuts fall anywhere, inside length prefixes included
    initiator, responder = noise_pair()
    wire = stock_messages(initiator, PLAINTEXTS)
    opener = MessageOpener(NoiseCipher(responder.noise_protocol.cipher_state_decrypt))
    # Execute
    opened = feed_in_pieces(opener, wire, [*cuts, 1, 2, 3, len(wire) - 1])
    # Assert
    assert opened == PLAINTEXTS


def test_our_batch_is_standard_noise_messages_the_stock_library_opens() -> None:
    # Prepare: multi-piece messages (a yamux header and its payload), and a full-size one
    initiator, responder = noise_pair()
    header = encode_header(TYPE_DATA, 0, 1, MAX_PLAINTEXT - 12)
    payload = bytes(PLAINTEXTS[3][: MAX_PLAINTEXT - 12])
    messages = [(b"a",), (header, memoryview(payload)), (b"", b"bc", b"d")]
    # Execute
    wire = seal(initiator, messages)
    # Assert: each is 2 length bytes + ciphertext; the largest is exactly 65535 bytes
    assert stock_open(responder, wire) == [b"a", header + payload, b"bcd"]
    assert int.from_bytes(wire[19:21], "big") == MAX_MESSAGE
    # ...and the stock sender, continuing on the same nonces, is still in step
    assert stock_open(responder, stock_messages(initiator, [b"after"])) == [b"after"]


def test_an_oversized_message_is_refused_before_any_nonce_is_spent() -> None:
    initiator, responder = noise_pair()
    with pytest.raises(ValueError, match="do not fit"):
        seal(initiator, [(b"ok",), (bytes(MAX_PLAINTEXT + 1),)])
    assert stock_open(responder, seal(initiator, [(b"next",)])) == [b"next"]


def test_a_tampered_message_is_an_error_never_plaintext() -> None:
    # Prepare: the second of three messages has one bit flipped
    initiator, responder = noise_pair()
    wire = bytearray(stock_messages(initiator, [b"first", b"second", b"third"]))
    wire[2 + 5 + 16 + 2 + 3] ^= 0x01
    opener = MessageOpener(NoiseCipher(responder.noise_protocol.cipher_state_decrypt))
    # Execute / Assert: the first message opens, the second raises, nothing else comes out
    assert [bytes(m) for m in opener.feed(wire[:23])] == [b"first"]
    with pytest.raises(NoiseDecryptError):
        opener.feed(wire[23:])


@pytest.mark.parametrize("length", [0, 15])
def test_a_message_too_short_for_its_tag_is_an_error(length: int) -> None:
    _, responder = noise_pair()
    opener = MessageOpener(NoiseCipher(responder.noise_protocol.cipher_state_decrypt))
    with pytest.raises(NoiseDecryptError, match="cannot hold its tag"):
        opener.feed(length.to_bytes(2, "big") + bytes(length))


def test_a_stream_ending_inside_a_message_is_noticed() -> None:
    initiator, responder = noise_pair()
    wire = stock_messages(initiator, [b"whole", b"cut short"])
    opener = MessageOpener(NoiseCipher(responder.noise_protocol.cipher_state_decrypt))
    assert [bytes(m) for m in opener.feed(wire[:-4])] == [b"whole"]
    assert opener.inside_message


# -- yamux frames -------------------------------------------------------------------------------


def frames(events: list[FrameEvent]) -> list[tuple[int, int, int, int, bytes]]:
    """Events folded back into whole frames: (type, flags, stream, length, DATA body)."""
    result: list[tuple[int, int, int, int, bytes]] = []
    body = bytearray()
    for event in events:
        if isinstance(event, FrameStarted):
            h = event.header
            if h.type != TYPE_DATA:
                result.append((h.type, h.flags, h.stream_id, h.length, b""))
        elif isinstance(event, DataReceived):
            body += event.data
        else:
            h = event.header
            result.append((h.type, h.flags, h.stream_id, h.length, bytes(body)))
            body.clear()
    return result


FRAMES = [
    (TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 786_432, b""),
    (TYPE_DATA, 0, 1, 65_524, bytes(65_524)),  # stock's size: spans two Noise messages
    (TYPE_DATA, FLAG_FIN, 1, 0, b""),
    (TYPE_PING, FLAG_SYN, 0, 7, b""),
    (TYPE_DATA, 0, 3, 5, b"hello"),
    (TYPE_GO_AWAY, 0, 0, 0, b""),
]
STREAM = b"".join(encode_header(t, f, s, n) + body for t, f, s, n, body in FRAMES)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_yamux_frames_decode_the_same_however_the_stream_is_cut(cuts: list[int]) -> None:
    decoder = FrameDecoder(max_data=1 << 24)
    bounds = [0, *sorted(set(cuts)), len(STREAM)]
    events: list[FrameEvent] = []
    for start, end in itertools.pairwise(bounds):
        events += decoder.feed(STREAM[start:end])
    assert frames(events) == FRAMES


def test_a_whole_data_frame_is_taken_at_once_only_when_nothing_is_pending() -> None:
    decoder = FrameDecoder(max_data=1 << 24)
    frame = encode_header(TYPE_DATA, 0, 5, 3) + b"abc"
    whole = decoder.whole_data_frame(memoryview(frame))
    assert whole is not None and whole[:2] == (5, 0) and bytes(whole[2]) == b"abc"
    assert decoder.feed(frame[:4]) == []  # half a header now pending
    assert decoder.whole_data_frame(memoryview(frame)) is None
    assert decoder.whole_data_frame(memoryview(encode_header(TYPE_PING, 0, 0, 1))) is None


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (struct.pack(">BBHII", 1, TYPE_DATA, 0, 1, 0), "version"),
        (struct.pack(">BBHII", 0, 4, 0, 1, 0), "type"),
        (encode_header(TYPE_DATA, 0, 1, 1025), "DATA frame"),
    ],
)
def test_bad_yamux_headers_are_protocol_errors(header: bytes, error: str) -> None:
    with pytest.raises(YamuxProtocolError, match=error):
        FrameDecoder(max_data=1024).feed(header)


# -- helpers: hosts -----------------------------------------------------------------------------


def stock_host() -> Any:
    """``libp2p.new_host`` with its own Noise (only, so that it is what gets negotiated) and its
    default muxer, yamux."""
    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    return new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise})


@asynccontextmanager
async def running(lhost: Any) -> AsyncIterator[Any]:
    async with lhost.run([Multiaddr(LOOPBACK)]):
        try:
            yield lhost
        finally:
            with trio.CancelScope(shield=True):
                await close_network(lhost)


def connection_of(lhost: Any, peer: str) -> Any:
    (conn,) = lhost.get_network().get_connections(ID.from_base58(peer))
    return conn.muxed_conn


async def read_all_stock(net_stream: Any) -> bytes:
    data = bytearray()
    try:
        while True:
            data += await net_stream.read(MiB)
    except StreamEOF:
        return bytes(data)


async def read_all(stream: Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(MiB):
        data += chunk
    return bytes(data)


async def disconnected(events: trio.MemoryReceiveChannel[PeerEvent], peer: str) -> None:
    async for event in events:
        if event == PeerDisconnected(peer=PeerId(peer)):
            return
    raise AssertionError("the event channel closed")


async def both(first: Callable[[], Awaitable[Any]], second: Callable[[], Awaitable[Any]]) -> Any:
    """Run both at once; returns the second's result."""
    result: list[Any] = []

    async def keep() -> None:
        result.append(await second())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(keep)
    return result[0]


# -- interop ------------------------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("opener", ["stock", "ours"])
async def test_a_stock_host_and_ours_exchange_20_mib_each_way_byte_exact(opener: str) -> None:
    # Prepare: on one stream each side sends its own 20 MiB while reading the other's
    rng = random.Random(20)
    from_stock, from_ours = rng.randbytes(20 * MiB), rng.randbytes(20 * MiB)
    got: dict[str, bytes] = {}
    finished = {"stock": trio.Event(), "ours": trio.Event()}

    async def stock_side(net_stream: Any) -> None:
        async def send() -> None:
            await net_stream.write(from_stock)
            await net_stream.close_write()

        got["at stock"] = await both(send, lambda: read_all_stock(net_stream))
        finished["stock"].set()

    async def ours_side(stream: Stream) -> None:
        async def send() -> None:
            await stream.send_all(from_ours)
            await stream.send_eof()

        got["at ours"] = await both(send, lambda: read_all(stream))
        finished["ours"].set()

    with trio.fail_after(TIMEOUT - 5):
        async with (
            running(stock_host()) as stock,
            open_libp2p_host(NodeKey.generate(), [LOOPBACK]) as ours,
        ):
            stock.set_stream_handler(EXCHANGE, stock_side)
            ours.set_stream_handler(str(EXCHANGE), ours_side)
            stock_id = str(stock.get_id())
            # Execute
            if opener == "stock":
                await stock.connect(info_from_p2p_addr(Multiaddr(ours.listen_addrs()[0])))
                await stock_side(await stock.new_stream(ID.from_base58(ours.peer_id), [EXCHANGE]))
            else:
                await ours.connect(f"{stock.get_addrs()[0]}")
                await ours_side(await ours.open_stream(stock_id, str(EXCHANGE)))
            await finished["stock"].wait()
            await finished["ours"].wait()
            # Assert: each side ran its own stack...
            ours_conn = connection_of(ours._lhost, stock_id)
            stock_conn = connection_of(stock, ours.peer_id)
            assert isinstance(ours_conn, FastYamux)
            assert isinstance(ours_conn.secured_conn, FastNoiseSession)
            assert type(stock_conn) is Yamux and type(stock_conn.secured_conn) is SecureSession
    # ...and every byte arrived, in order
    assert got["at stock"] == from_ours
    assert got["at ours"] == from_stock


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize(("setting", "fast"), [(None, True), ("0", False)])
async def test_the_fast_path_is_on_unless_switched_off(
    setting: str | None, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if setting is None:
        monkeypatch.delenv(FASTPATH_ENV, raising=False)
    else:
        monkeypatch.setenv(FASTPATH_ENV, setting)
    with trio.fail_after(TIMEOUT - 5):
        async with (
            open_libp2p_host(NodeKey.generate(), [LOOPBACK]) as a,
            open_libp2p_host(NodeKey.generate(), [LOOPBACK]) as b,
        ):
            await a.connect(b.listen_addrs()[0])
            conn = connection_of(a._lhost, b.peer_id)
            assert isinstance(conn, FastYamux) is fast
            assert isinstance(conn.secured_conn, FastNoiseSession) is fast


# -- failures on a connection -------------------------------------------------------------------


@asynccontextmanager
async def bit_flipping_proxy(target: str, at: int) -> AsyncIterator[str]:
    """A TCP proxy to ``target`` (a full multiaddr) that flips one bit of the byte at offset
    ``at`` of what the dialer sends; yields the multiaddr to dial instead."""
    maddr = Multiaddr(target)
    host, port = maddr.value_for_protocol("ip4"), int(maddr.value_for_protocol("tcp"))
    peer = maddr.value_for_protocol("p2p")

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream, flip: bool) -> None:
        seen = 0
        try:
            while data := await source.receive_some(65536):
                if flip and seen <= at < seen + len(data):
                    data = bytearray(data)
                    data[at - seen] ^= 0x10
                seen += len(data)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await sink.aclose()

    async def relay(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(host, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, server, True)
            nursery.start_soon(pipe, server, client, False)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        proxy_port = listeners[0].socket.getsockname()[1]
        yield f"/ip4/127.0.0.1/tcp/{proxy_port}/p2p/{peer}"
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(TIMEOUT)
async def test_a_bit_flipped_on_the_wire_fails_the_stream_and_never_corrupts_it() -> None:
    # Prepare: 4 MiB from a to b through a proxy that flips a bit 1 MiB into the connection
    payload = random.Random(4).randbytes(4 * MiB)
    received = bytearray()
    outcome: dict[str, BaseException] = {}
    done = trio.Event()

    async def sink(stream: Stream) -> None:
        try:
            while chunk := await stream.receive_some(MiB):
                received.extend(chunk)
        except TransportError as exc:
            outcome["error"] = exc
        finally:
            done.set()

    # No write deadline may end the connection for us: only the forgery can, and promptly
    patient = {"send_timeout": 2 * TIMEOUT, "stall_timeout": 2 * TIMEOUT}
    with trio.fail_after(PROMPTLY):
        async with (
            open_libp2p_host(NodeKey.generate(), [LOOPBACK], **patient) as a,
            open_libp2p_host(NodeKey.generate(), [LOOPBACK], **patient) as b,
            bit_flipping_proxy(b.listen_addrs()[0], at=MiB) as via_proxy,
        ):
            b.set_stream_handler(str(SINK), sink)
            a_events, b_events = a.peer_events(), b.peer_events()
            await a.connect(via_proxy)
            stream = await a.open_stream(b.peer_id, str(SINK))
            # Execute
            with pytest.raises(TransportError):
                await stream.send_all(payload)
                await stream.send_eof()
                await read_all(stream)  # the end of b's side: never clean
            await done.wait()
            # Assert: b's reader got an error, only a correct prefix before it; both dropped
            assert isinstance(outcome.get("error"), TransportError)
            assert len(received) < MiB and payload.startswith(received)
            await disconnected(a_events, b.peer_id)
            await disconnected(b_events, a.peer_id)


@pytest.mark.timeout(TIMEOUT)
async def test_a_peer_that_overruns_its_window_loses_the_connection() -> None:
    # Prepare: a stock sender told it has 1 GiB of credit; our handler does not read yet
    release = trio.Event()
    outcome: dict[str, BaseException] = {}
    done = trio.Event()

    async def hold_then_read(stream: Stream) -> None:
        await release.wait()
        try:
            await read_all(stream)
        except TransportError as exc:
            outcome["error"] = exc
        finally:
            done.set()

    with trio.fail_after(PROMPTLY):
        async with (
            running(stock_host()) as stock,
            open_libp2p_host(NodeKey.generate(), [LOOPBACK]) as ours,
        ):
            ours.set_stream_handler(str(SINK), hold_then_read)
            events = ours.peer_events()
            await stock.connect(info_from_p2p_addr(Multiaddr(ours.listen_addrs()[0])))
            net_stream = await stock.new_stream(ID.from_base58(ours.peer_id), [SINK])
            net_stream.muxed_stream.send_window = 1 << 30
            # Execute: more than the first window, which our side never extended
            with contextlib.suppress(Exception):  # stock may or may not notice in time
                await net_stream.write(bytes(FIRST_WINDOW + MiB))
            # Assert: our side dropped the connection, and its stream fails, not ends
            await disconnected(events, str(stock.get_id()))
            release.set()
            await done.wait()
            assert isinstance(outcome.get("error"), TransportError)


class _StreamConn:
    """A raw connection over a trio in-memory stream (what TrioTCPStream is to a socket)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, n: int | None = None) -> bytes:
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    def get_remote_address(self) -> None:
        return None


async def session_pair() -> tuple[FastNoiseSession, FastNoiseSession]:
    """Two fast sessions after a real libp2p Noise XX handshake over a lockstep stream pair
    (a write completes only once the other side reads it)."""
    left, right = trio.testing.lockstep_stream_pair()
    keys = [create_new_key_pair() for _ in range(2)]
    transports = [
        FastNoiseTransport(key, noise_privkey=create_new_x25519_key_pair().private_key)
        for key in keys
    ]
    sessions: dict[str, Any] = {}

    async def inbound() -> None:
        sessions["in"] = await transports[1].secure_inbound(_StreamConn(right))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbound)
        responder = ID.from_pubkey(keys[1].public_key)
        sessions["out"] = await transports[0].secure_outbound(_StreamConn(left), responder)
    return sessions["out"], sessions["in"]


@pytest.mark.timeout(TIMEOUT)
async def test_a_cancelled_write_spends_no_nonce_or_ends_the_session() -> None:
    writer, reader = await session_pair()
    # A write cancelled before it starts seals nothing: the next message still opens
    with trio.CancelScope() as scope:
        scope.cancel()
        await writer.write(b"never sealed")
    assert scope.cancelled_caught
    assert await both(lambda: writer.write(b"ok"), lambda: reader.read(2)) == b"ok"
    # A write cancelled while its sealed batch is on its way (nobody reads) ends the session,
    # rather than leaving the peer to stumble on a nonce gap or half a message later
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, b"stuck")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(ConnectionClosedError, match="aborted"), trio.fail_after(5):
        await writer.write(b"after")


@pytest.mark.timeout(TIMEOUT)
async def test_sessions_over_any_raw_connection_carry_messages_of_every_size() -> None:
    # Prepare: a real handshake, then the fallback path (no socket) both ways
    writer, reader = await session_pair()
    sizes = [0, 1, MAX_PLAINTEXT, MAX_PLAINTEXT + 1, 3 * MAX_PLAINTEXT + 17]
    payloads = [random.Random(size).randbytes(size) for size in sizes]

    async def send() -> None:
        for payload in payloads:
            await writer.write(payload)

    async def receive() -> list[bytes]:
        return [await reader.read(len(payload)) for payload in payloads]

    # Execute
    with trio.fail_after(TIMEOUT - 5):
        received = await both(send, receive)
    # Assert
    assert received == payloads
