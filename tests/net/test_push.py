"""``/fednode/push/1.0.0`` on the in-memory transport, on an autojumping MockClock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from fednode.crypto import NodeKey, digest, seal_bytes
from fednode.errors import LocalProtocolError, TransferError
from fednode.net.blobstore import BlobStore
from fednode.net.framing import receive_exactly, receive_frame, send_all, send_frame
from fednode.net.interface import Host, Stream
from fednode.net.memory import MemoryNetwork
from fednode.net.push import PUSH_PROTOCOL, PushServer, push_update, serve_push
from fednode.wire import (
    Envelope,
    FederationId,
    ModelUpdate,
    Nonce,
    PeerId,
    SessionId,
    decode,
    encode,
)
from fednode.wire.transfer import PushAck, PushOffer, PushReply

CHUNK = 16 << 10
SIZE = 6 * CHUNK + 99
STREAM_BUFFER = 64 << 10
CLIENT_KEY = NodeKey(bytes([1]) * 32)


def blob(n: int = SIZE, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sealed_update(data: bytes, *, round: int = 3, size: int | None = None) -> bytes:
    update = ModelUpdate(
        federation=FederationId("demo"),
        session=SessionId("s1"),
        round=round,
        parent=digest(b"global model"),
        update=digest(data),
        size=len(data) if size is None else size,
        num_examples=10,
        metrics={"loss": 0.5},
        signer=CLIENT_KEY.public_key,
        created_ms=1_700_000_000_000,
        nonce=Nonce(bytes(16)),
    )
    return seal_bytes(CLIENT_KEY, update)


@dataclass
class Combiner:
    """A receiving side that records every callback."""

    round: int = 3
    admitted: list[ModelUpdate] = field(default_factory=list)
    stored: list[ModelUpdate] = field(default_factory=list)
    abandoned: list[tuple[ModelUpdate, str]] = field(default_factory=list)
    on_stored_reason: str | None = None
    on_stored_delay: float = 0.0
    gave_up: trio.Event = field(default_factory=trio.Event)

    def admit(self, update: ModelUpdate, envelope: Envelope) -> str | None:
        assert envelope.signer == update.signer
        self.admitted.append(update)
        return None if update.round == self.round else f"wrong round {update.round}"

    async def on_stored(self, update: ModelUpdate, envelope: Envelope) -> str | None:
        await trio.sleep(self.on_stored_delay)
        self.stored.append(update)
        return self.on_stored_reason

    def on_abandoned(self, update: ModelUpdate, reason: str) -> None:
        self.abandoned.append((update, reason))
        self.gave_up.set()


@dataclass
class Pair:
    network: MemoryNetwork
    client: Host
    client_store: BlobStore
    host: Host
    store: BlobStore
    server: PushServer
    combiner: Combiner

    @property
    def peer(self) -> PeerId:
        return self.host.peer_id

    def files(self) -> list[str]:
        return sorted(p.name for p in self.store.root.iterdir())

    def handle_with(self, handler: Callable[[Stream], Awaitable[None]]) -> None:
        self.host.set_stream_handler(PUSH_PROTOCOL, handler)


@asynccontextmanager
async def open_pair(tmp_path: Path, **options: Any) -> AsyncIterator[Pair]:
    network = MemoryNetwork(seed=1, stream_buffer=STREAM_BUFFER)
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(network.open_host(CLIENT_KEY))
        host = await stack.enter_async_context(network.open_host(NodeKey(bytes([2]) * 32)))
        await client.connect(host.listen_addrs()[0])
        store = BlobStore(tmp_path / "combiner", durable=False)
        combiner = Combiner()
        server = serve_push(
            host, store, combiner.admit, on_stored=combiner.on_stored,
            on_abandoned=combiner.on_abandoned, **options,
        )  # fmt: skip
        client_store = BlobStore(tmp_path / "client", durable=False)
        yield Pair(network, client, client_store, host, store, server, combiner)


class SendCounter:
    """A host whose outgoing streams count what they send, and may rewrite it."""

    def __init__(self, inner: Host, rewrite: Callable[[int, bytes], bytes] | None = None) -> None:
        self.inner = inner
        self.sent = 0
        self.rewrite = rewrite

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open_stream(self, peer: PeerId, protocol: str) -> Stream:
        stream = await self.inner.open_stream(peer, protocol)
        outer = self

        class Counting:
            protocol = stream.protocol
            remote_peer = stream.remote_peer

            async def send_all(self, data: bytes | bytearray | memoryview) -> None:
                data = bytes(data)
                if outer.rewrite is not None:
                    data = outer.rewrite(outer.sent, data)
                await stream.send_all(data)
                outer.sent += len(data)

            async def receive_some(self, max_bytes: int = 65536) -> bytes:
                return await stream.receive_some(max_bytes)

            async def send_eof(self) -> None:
                await stream.send_eof()

            async def aclose(self) -> None:
                await stream.aclose()

            async def reset(self) -> None:
                await stream.reset()

        return Counting()  # type: ignore[return-value]


def offer_size(envelope: bytes, data: bytes) -> int:
    chunks = tuple(digest(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK))
    return 4 + len(encode(PushOffer(envelope=envelope, chunk_size=CHUNK, chunks=chunks)))


# --------------------------------------------------------------------------------------- tests


async def test_push_accepted_stored_pinned_and_acked(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare
    data = blob()
    envelope = sealed_update(data)
    progress: list[int] = []
    async with open_pair(tmp_path) as pair:
        pair.client_store.put(data)
        # Execute
        result = await push_update(
            pair.client, pair.peer, envelope, pair.client_store, chunk_size=CHUNK,
            progress=lambda sent, total: progress.append(sent),
        )  # fmt: skip
        # Assert
        assert (result.status, result.bytes_sent, result.accepted) == ("stored", SIZE, True)
        assert pair.store.get(digest(data)) == data and pair.store.pinned(digest(data))
        assert [u.update for u in pair.combiner.stored] == [digest(data)]
        assert pair.combiner.abandoned == []
        assert progress == [SIZE]  # one write: the blob is under 1 MiB
        stats = pair.server.statistics()
        assert (stats.offers, stats.stored, stats.bytes_received, stats.active) == (1, 1, SIZE, 0)


async def test_push_from_bytes_in_memory(tmp_path: Path, autojump_clock: MockClock) -> None:
    data = blob()
    async with open_pair(tmp_path) as pair:
        result = await push_update(
            pair.client, pair.peer, sealed_update(data), data, chunk_size=CHUNK
        )
        assert result.status == "stored" and pair.store.get(digest(data)) == data


async def test_push_refused_before_any_blob_byte(tmp_path: Path, autojump_clock: MockClock) -> None:
    # Prepare: an update for a round the combiner is not in
    data = blob()
    envelope = sealed_update(data, round=2)
    async with open_pair(tmp_path) as pair:
        client = SendCounter(pair.client)
        # Execute
        result = await push_update(client, pair.peer, envelope, data, chunk_size=CHUNK)  # type: ignore[arg-type]
        # Assert: the offer went out, and not one byte of the blob
        assert (result.status, result.reason, result.accepted) == (
            "refused",
            "wrong round 2",
            False,
        )
        assert client.sent == offer_size(envelope, data)
        assert len(pair.combiner.admitted) == 1 and pair.combiner.stored == []
        assert (
            pair.server.statistics().refused == 1 and pair.server.statistics().bytes_received == 0
        )
        assert pair.files() == []


async def test_push_with_a_bad_signature_is_refused(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a valid envelope with one payload byte changed after signing
    data = blob()
    good = decode(sealed_update(data), Envelope)
    payload = bytearray(good.payload)
    payload[-1] ^= 1
    forged = Envelope(
        signer=good.signer, domain=good.domain, payload=bytes(payload), signature=good.signature
    )
    async with open_pair(tmp_path) as pair:
        # Execute
        stream = await pair.client.open_stream(pair.peer, PUSH_PROTOCOL)
        chunks = tuple(digest(data[i : i + CHUNK]) for i in range(0, SIZE, CHUNK))
        await send_frame(
            stream, encode(PushOffer(envelope=encode(forged), chunk_size=CHUNK, chunks=chunks)), 5
        )
        reply = decode(bytes(await receive_frame(stream, 4096, 5)), PushReply)
        # Assert
        assert reply.status == "refuse" and reply.reason.startswith("invalid envelope")
        assert pair.combiner.admitted == []


async def test_push_of_a_blob_not_matching_the_update_is_rejected_and_nothing_stored(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a sender that signs one blob's digest and sends other bytes, with a chunk list that
    # matches what it sends (so every chunk verifies and only the final digest can tell)
    signed, sent = blob(seed=1), blob(seed=2)
    envelope = sealed_update(signed)
    async with open_pair(tmp_path) as pair:
        stream = await pair.client.open_stream(pair.peer, PUSH_PROTOCOL)
        chunks = tuple(digest(sent[i : i + CHUNK]) for i in range(0, SIZE, CHUNK))
        # Execute
        await send_frame(
            stream, encode(PushOffer(envelope=envelope, chunk_size=CHUNK, chunks=chunks)), 5
        )
        reply = decode(bytes(await receive_frame(stream, 4096, 5)), PushReply)
        await send_all(stream, sent, 5)
        ack = decode(bytes(await receive_frame(stream, 4096, 5)), PushAck)
        await pair.combiner.gave_up.wait()
        # Assert
        assert reply.status == "accept"
        assert ack.status == "rejected" and "does not match" in ack.reason
        assert not pair.store.has(digest(signed)) and not pair.store.has(digest(sent))
        assert pair.files() == []
        assert pair.combiner.stored == []
        assert [reason for _, reason in pair.combiner.abandoned] == ["rejected: digest mismatch"]


async def test_push_with_a_tampered_chunk_stops_at_that_chunk(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: the sender's link flips a bit in chunk 2 of the blob
    data = blob()
    envelope = sealed_update(data)
    header = offer_size(envelope, data)
    target = header + 2 * CHUNK + 5

    def flip(already_sent: int, chunk: bytes) -> bytes:
        at = target - already_sent
        if 0 <= at < len(chunk):
            return chunk[:at] + bytes([chunk[at] ^ 1]) + chunk[at + 1 :]
        return chunk

    async with open_pair(tmp_path) as pair:
        client = SendCounter(pair.client, rewrite=flip)
        # Execute
        with pytest.raises(TransferError):
            await push_update(client, pair.peer, envelope, data, chunk_size=CHUNK)  # type: ignore[arg-type]
        await pair.combiner.gave_up.wait()
        # Assert: two chunks were taken, the third was caught, nothing was stored
        stats = pair.server.statistics()
        assert (stats.rejected, stats.stored, stats.bytes_received) == (1, 0, 2 * CHUNK)
        assert pair.files() == []
        assert [reason for _, reason in pair.combiner.abandoned] == [
            "tampered: chunk 2 does not match its listed digest"
        ]


async def test_the_sender_checks_its_own_blob(tmp_path: Path, autojump_clock: MockClock) -> None:
    data = blob()
    async with open_pair(tmp_path) as pair:
        with pytest.raises(LocalProtocolError):
            await push_update(
                pair.client, pair.peer, sealed_update(data), blob(seed=9), chunk_size=CHUNK
            )
        with pytest.raises(LocalProtocolError, match="not in the store"):
            await push_update(pair.client, pair.peer, sealed_update(data), pair.client_store)


async def test_an_already_held_blob_is_acked_without_bytes(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    data = blob()
    async with open_pair(tmp_path) as pair:
        pair.store.put(data)
        result = await push_update(
            pair.client, pair.peer, sealed_update(data), data, chunk_size=CHUNK
        )
        assert (result.status, result.bytes_sent) == ("already-held", 0)
        assert len(pair.combiner.stored) == 1 and pair.store.pinned(digest(data))


async def test_the_ack_comes_only_after_on_stored(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    data = blob()
    async with open_pair(tmp_path) as pair:
        pair.combiner.on_stored_delay = 3.0
        result = await push_update(
            pair.client, pair.peer, sealed_update(data), data, chunk_size=CHUNK
        )
        assert result.status == "stored" and trio.current_time() == 3.0


async def test_on_stored_can_reject_and_the_sender_learns_why(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    data = blob()
    async with open_pair(tmp_path) as pair:
        pair.combiner.on_stored_reason = "round closed"
        with pytest.raises(TransferError, match="rejected the update: round closed"):
            await push_update(pair.client, pair.peer, sealed_update(data), data, chunk_size=CHUNK)
        await pair.combiner.gave_up.wait()
        assert not pair.store.pinned(digest(data))
        assert [reason for _, reason in pair.combiner.abandoned] == ["rejected: round closed"]


async def test_a_clean_end_of_stream_without_ack_is_a_failed_push(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a receiver that takes every byte and then dies (its stream ends cleanly)
    data = blob()
    envelope = sealed_update(data)

    async def dies_before_ack(stream: Stream) -> None:
        await receive_frame(stream, 1 << 20, 5)
        await send_frame(stream, encode(PushReply(status="accept", reason="")), 5)
        await receive_exactly(stream, SIZE, 5)
        await stream.send_eof()

    async with open_pair(tmp_path) as pair:
        pair.handle_with(dies_before_ack)
        # Execute / Assert
        with pytest.raises(TransferError, match="no ack for the pushed update: peer closed"):
            await push_update(pair.client, pair.peer, envelope, data, chunk_size=CHUNK)


async def test_a_missing_ack_times_out_at_the_exact_virtual_time(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    data = blob()
    async with open_pair(tmp_path) as pair:
        pair.combiner.on_stored_delay = 1_000.0
        with pytest.raises(TransferError, match="no ack"):
            await push_update(
                pair.client,
                pair.peer,
                sealed_update(data),
                data,
                chunk_size=CHUNK,
                ack_timeout=12.0,
            )
        assert trio.current_time() == 12.0


async def test_a_receiver_that_stops_reading_stalls_the_sender_out(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a receiver that accepts and then reads nothing; the blob outgrows the buffer
    data = blob(4 * STREAM_BUFFER)

    async def accepts_then_freezes(stream: Stream) -> None:
        await receive_frame(stream, 1 << 20, 5)
        await send_frame(stream, encode(PushReply(status="accept", reason="")), 5)
        await trio.sleep_forever()

    async with open_pair(tmp_path) as pair:
        pair.handle_with(accepts_then_freezes)
        sent: list[int] = []
        # Execute
        with pytest.raises(TransferError, match="timed out sending"):
            await push_update(
                pair.client, pair.peer, sealed_update(data), data, chunk_size=CHUNK,
                stall_timeout=4.0, progress=lambda n, total: sent.append(n),
            )  # fmt: skip
        # Assert: backpressure held the sender at the buffer, and it gave up after exactly 4 s
        assert trio.current_time() == 4.0
        assert sent == []


async def test_a_slow_receiver_makes_the_sender_wait_not_fail(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a receiver reading 16 KiB per virtual second
    data = blob(4 * STREAM_BUFFER)

    async def slow_reader(stream: Stream) -> None:
        await receive_frame(stream, 1 << 20, 5)
        await send_frame(stream, encode(PushReply(status="accept", reason="")), 5)
        got = 0
        while got < len(data):
            await trio.sleep(1)
            got += len(await stream.receive_some(CHUNK))
        await send_frame(stream, encode(PushAck(status="stored", reason="")), 5)

    async with open_pair(tmp_path) as pair:
        pair.handle_with(slow_reader)
        # Execute: one 256 KiB write, 16 s to drain, under a 20 s stall timeout
        result = await push_update(
            pair.client, pair.peer, sealed_update(data), data, chunk_size=CHUNK, stall_timeout=20.0
        )
        # Assert
        assert result.status == "stored"
        assert trio.current_time() == 16.0


# ------------------------------------------------------------------------------- real libp2p


@pytest.mark.libp2p
@pytest.mark.timeout(60)
async def test_20_mb_fetch_and_push_over_libp2p_on_loopback(tmp_path: Path) -> None:
    # Prepare: two real hosts; the combiner holds a 20 MB global model, the client a 20 MB update
    libp2p_host = pytest.importorskip("fednode.net.libp2p_host")
    from fednode.net.blob import fetch_blob, serve_blobs

    model, update = blob(20_000_000, seed=1), blob(20_000_000, seed=2)
    envelope = sealed_update(update)
    combiner = Combiner()
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        libp2p_host.open_libp2p_host(
            NodeKey(bytes([2]) * 32), listen_addrs=loopback
        ) as server_host,
        libp2p_host.open_libp2p_host(CLIENT_KEY, listen_addrs=loopback) as client_host,
    ):
        server_store = BlobStore(tmp_path / "combiner")
        client_store = BlobStore(tmp_path / "client")
        server_store.put(model)
        client_store.put(update)
        blob_server = serve_blobs(server_host, server_store)
        push_server = serve_push(
            server_host, server_store, combiner.admit, on_stored=combiner.on_stored
        )
        await client_host.connect(server_host.listen_addrs()[0])
        # Execute
        started = trio.current_time()
        fetched = await fetch_blob(
            client_host, [server_host.peer_id], digest(model), client_store, max_size=1 << 30
        )
        fetch_seconds = trio.current_time() - started
        started = trio.current_time()
        pushed = await push_update(client_host, server_host.peer_id, envelope, client_store)
        push_seconds = trio.current_time() - started
        # Assert
        assert fetched.received == len(model) and client_store.get(digest(model)) == model
        assert blob_server.statistics().bytes_sent == len(model)
        assert pushed.status == "stored" and pushed.bytes_sent == len(update)
        assert server_store.get(digest(update)) == update
        assert push_server.statistics().bytes_received == len(update)
        assert [u.update for u in combiner.stored] == [digest(update)]
        print(
            f"fetch 20 MB: {20 / fetch_seconds:.0f} MB/s; push 20 MB: {20 / push_seconds:.0f} MB/s"
        )
