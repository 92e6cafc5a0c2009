"""``/fednode/blob/1.0.0`` on the in-memory transport, on an autojumping MockClock.

Faults are injected between a holder's host and its blob server by wrapping the server's stream:
a holder that dies (its stream ends like a clean EOF, as a killed py-libp2p peer's does), one
that flips a byte, one whose disk lies, one that stalls. Blobs here are small (16 KiB chunks)
so all file work runs inline and virtual times are exact.
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from fednode.crypto import NodeKey, digest
from fednode.errors import TransferError, TransportError
from fednode.net.blob import (
    BLOB_PROTOCOL,
    BlobServer,
    FetchError,
    FetchResult,
    fetch_blob,
    serve_blobs,
)
from fednode.net.blobstore import BlobStore
from fednode.net.framing import receive_frame, send_frame
from fednode.net.interface import Host, Stream
from fednode.net.memory import MemoryNetwork
from fednode.wire import PeerId, encode
from fednode.wire.transfer import BlobResponse

CHUNK = 16 << 10
SIZE = 10 * CHUNK + 1234
STREAM_BUFFER = 64 << 10


def blob(n: int = SIZE, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ------------------------------------------------------------------------------ stream wrappers


class WrappedStream:
    """Delegates to a real stream; subclasses intercept what the blob server sends."""

    def __init__(self, inner: Stream) -> None:
        self.inner = inner
        self.frames_seen = 0
        self.blob_bytes = 0  # bytes sent after the response frame

    @property
    def protocol(self) -> str:
        return self.inner.protocol

    @property
    def remote_peer(self) -> PeerId:
        return self.inner.remote_peer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.frames_seen == 0:  # the response frame goes out in one write
            self.frames_seen = 1
            await self.inner.send_all(data)
            return
        await self.send_blob(bytes(data))
        self.blob_bytes += len(data)

    async def send_blob(self, data: bytes) -> None:
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def reset(self) -> None:
        await self.inner.reset()


class DiesAfter(WrappedStream):
    """Sends ``limit`` blob bytes, then the holder 'dies': its stream ends like a clean EOF."""

    def __init__(self, inner: Stream, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit
        self.dead = False

    async def send_blob(self, data: bytes) -> None:
        room = self.limit - self.blob_bytes
        if len(data) > room:
            await self.inner.send_all(data[:room])
            await self.inner.send_eof()
            self.dead = True
            raise TransportError("killed")
        await self.inner.send_all(data)

    async def reset(self) -> None:
        if not self.dead:  # a dead process resets nothing
            await self.inner.reset()


class FlipsByte(WrappedStream):
    """Flips one bit of the blob byte at ``position`` (counted from the first byte sent)."""

    def __init__(self, inner: Stream, position: int) -> None:
        super().__init__(inner)
        self.position = position

    async def send_blob(self, data: bytes) -> None:
        at = self.position - self.blob_bytes
        if 0 <= at < len(data):
            data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
        await self.inner.send_all(data)


class CountingHost:
    """A host whose outgoing streams count the bytes they receive."""

    def __init__(self, inner: Host) -> None:
        self.inner = inner
        self.received = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open_stream(self, peer: PeerId, protocol: str) -> Stream:
        stream = await self.inner.open_stream(peer, protocol)
        outer = self

        class Counting(WrappedStream):
            async def receive_some(self, max_bytes: int = 65536) -> bytes:
                data = await self.inner.receive_some(max_bytes)
                outer.received += len(data)
                return data

        return Counting(stream)


# ------------------------------------------------------------------------------------- fixture


@dataclass
class Holder:
    host: Host
    store: BlobStore
    server: BlobServer

    @property
    def peer(self) -> PeerId:
        return self.host.peer_id

    def wrap(self, wrapper: Callable[[Stream], Stream]) -> None:
        """Put ``wrapper`` between the host and the blob server."""

        async def handler(stream: Stream) -> None:
            await self.server.handle(wrapper(stream))

        self.host.set_stream_handler(BLOB_PROTOCOL, handler)

    def handle_with(self, handler: Callable[[Stream], Awaitable[None]]) -> None:
        self.host.set_stream_handler(BLOB_PROTOCOL, handler)


@dataclass
class Swarm:
    network: MemoryNetwork
    client: Host
    store: BlobStore
    holders: list[Holder]
    root: Path

    @property
    def peers(self) -> list[PeerId]:
        return [h.peer for h in self.holders]


@asynccontextmanager
async def open_swarm(
    tmp_path: Path, holders: int, data: bytes | None = None
) -> AsyncIterator[Swarm]:
    """A client and ``holders`` holders (each holding ``data`` if given), all connected."""
    network = MemoryNetwork(seed=1, stream_buffer=STREAM_BUFFER)
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(network.open_host(NodeKey(bytes([1]) * 32)))
        swarm = Swarm(network, client, BlobStore(tmp_path / "client", durable=False), [], tmp_path)
        for i in range(holders):
            host = await stack.enter_async_context(network.open_host(NodeKey(bytes([i + 2]) * 32)))
            store = BlobStore(tmp_path / f"holder{i}", durable=False)
            if data is not None:
                store.put(data)
            swarm.holders.append(Holder(host, store, serve_blobs(host, store)))
            await client.connect(host.listen_addrs()[0])
        yield swarm


async def fetch(swarm: Swarm, data: bytes, **options: Any) -> FetchResult:
    options.setdefault("max_size", 1 << 20)
    options.setdefault("chunk_size", CHUNK)
    return await fetch_blob(swarm.client, swarm.peers, digest(data), swarm.store, **options)


# --------------------------------------------------------------------------------------- tests


async def test_fetch_from_a_holder(tmp_path: Path, autojump_clock: MockClock) -> None:
    # Prepare
    data = blob()
    progress: list[tuple[int, int]] = []
    async with open_swarm(tmp_path, 1, data) as swarm:
        # Execute
        result = await fetch(
            swarm, data, progress=lambda held, total: progress.append((held, total))
        )
        # Assert
        assert swarm.store.get(digest(data)) == data
        assert (result.size, result.received, result.resumed_from) == (SIZE, SIZE, 0)
        assert result.sources == (swarm.peers[0],) and result.faults == ()
        assert progress == [(min((i + 1) * CHUNK, SIZE), SIZE) for i in range(11)]
        assert swarm.holders[0].server.statistics().bytes_sent == SIZE
        assert swarm.holders[0].server.statistics().served == 1
        assert trio.current_time() == 0  # no latency configured, nothing waited


async def test_a_held_blob_needs_no_network(tmp_path: Path, autojump_clock: MockClock) -> None:
    data = blob()
    async with open_swarm(tmp_path, 1, data) as swarm:
        swarm.store.put(data)
        result = await fetch(swarm, data, pin=True)
        assert result.received == 0 and result.sources == ()
        assert swarm.store.pinned(digest(data))
        assert swarm.holders[0].server.statistics().requests == 0


async def test_empty_blob(tmp_path: Path, autojump_clock: MockClock) -> None:
    async with open_swarm(tmp_path, 1, b"") as swarm:
        result = await fetch(swarm, b"")
        assert result.size == 0 and swarm.store.get(digest(b"")) == b""


async def test_second_holder_resumes_after_the_first_dies_mid_transfer(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: the first holder dies (clean EOF) 2.5 chunks in
    data = blob()
    async with open_swarm(tmp_path, 2, data) as swarm:
        first, second = swarm.holders
        first.wrap(lambda s: DiesAfter(s, 2 * CHUNK + CHUNK // 2))
        # Execute
        result = await fetch(swarm, data, pin=True)
        # Assert: two verified chunks kept; the second holder sent only the rest
        assert swarm.store.get(digest(data)) == data and swarm.store.pinned(digest(data))
        assert result.sources == (first.peer, second.peer)
        assert [(f.peer, f.misbehaved) for f in result.faults] == [(first.peer, False)]
        assert "peer closed mid-transfer" in result.faults[0].reason
        assert second.server.statistics().bytes_sent == SIZE - 2 * CHUNK
        assert result.received == SIZE


async def test_resume_after_a_holder_is_killed(tmp_path: Path, autojump_clock: MockClock) -> None:
    # Prepare: kill the first holder (its streams reset) once the first chunk is verified
    data = blob()
    async with open_swarm(tmp_path, 2, data) as swarm:
        first, second = swarm.holders

        def kill_after_first_chunk(held: int, total: int) -> None:
            if held == CHUNK:
                swarm.network.kill(first.peer)

        # Execute
        result = await fetch(swarm, data, progress=kill_after_first_chunk)
        # Assert
        assert swarm.store.get(digest(data)) == data
        assert result.sources == (first.peer, second.peer)
        assert second.server.statistics().bytes_sent == SIZE - CHUNK


async def test_resume_across_a_restart_from_the_part_file(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: the only holder dies 3 chunks in; the fetch fails but keeps its .part
    data = blob()
    async with open_swarm(tmp_path, 2, data) as swarm:
        first, second = swarm.holders
        first.wrap(lambda s: DiesAfter(s, 3 * CHUNK))
        with pytest.raises(FetchError):
            await fetch_blob(
                swarm.client,
                [first.peer],
                digest(data),
                swarm.store,
                max_size=1 << 20,
                chunk_size=CHUNK,
            )
        # Execute: the node restarts (a new store on the same directory) and asks another holder
        reopened = BlobStore(tmp_path / "client", durable=False)
        result = await fetch_blob(
            swarm.client, [second.peer], digest(data), reopened, max_size=1 << 20, chunk_size=CHUNK
        )
        # Assert
        assert reopened.get(digest(data)) == data
        assert (result.resumed_from, result.received) == (3 * CHUNK, SIZE - 3 * CHUNK)
        assert second.server.statistics().bytes_sent == SIZE - 3 * CHUNK
        assert reopened.statistics().partials == 0


async def test_tampered_chunk_is_rejected_and_its_holder_blamed(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: the first holder flips a bit in chunk 5
    data = blob()
    async with open_swarm(tmp_path, 2, data) as swarm:
        first, second = swarm.holders
        first.wrap(lambda s: FlipsByte(s, 5 * CHUNK + 7))
        # Execute
        result = await fetch(swarm, data)
        # Assert: chunks 0-4 kept, the rest from the second holder, the first one blamed
        assert swarm.store.get(digest(data)) == data
        assert result.misbehaving == (first.peer,)
        assert "chunk 5 does not match" in result.faults[0].reason
        assert second.server.statistics().bytes_sent == SIZE - 5 * CHUNK


async def test_tampering_holder_alone_fails_the_fetch_and_keeps_the_verified_prefix(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    data = blob()
    async with open_swarm(tmp_path, 1, data) as swarm:
        swarm.holders[0].wrap(lambda s: FlipsByte(s, 5 * CHUNK + 7))
        with pytest.raises(FetchError) as caught:
            await fetch(swarm, data)
        assert caught.value.misbehaving == (swarm.peers[0],)
        assert not swarm.store.has(digest(data))
        assert swarm.store.partial_size(digest(data)) == 5 * CHUNK


def corrupt_on_disk(holder: Holder, data: bytes, position: int) -> None:
    """The holder's disk flips a byte: its chunk list now describes the wrong bytes."""
    path = holder.store.root / digest(data).hex()
    raw = bytearray(path.read_bytes())
    raw[position] ^= 1
    path.write_bytes(bytes(raw))


async def test_a_false_chunk_list_is_caught_by_the_final_digest(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: every chunk the first holder sends matches its list, but the list is of bad bytes
    data = blob()
    async with open_swarm(tmp_path, 2, data) as swarm:
        first, second = swarm.holders
        corrupt_on_disk(first, data, 7 * CHUNK)
        # Execute
        result = await fetch(swarm, data)
        # Assert: the first holder is blamed at the end; the fetch starts over with the second
        assert swarm.store.get(digest(data)) == data
        assert result.misbehaving == (first.peer,)
        assert "does not hash to the blob's digest" in result.faults[0].reason
        assert first.server.statistics().bytes_sent == SIZE
        assert second.server.statistics().bytes_sent == SIZE
        assert result.sources == (second.peer,)


async def test_a_list_disputing_held_chunks_wins_if_the_blob_verifies(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: the first holder's disk is bad in chunk 3 and it dies 5 chunks in, so the .part
    # holds a bad chunk 3 that matched the (false) list it was verified against
    data = blob()
    async with open_swarm(tmp_path, 2, data) as swarm:
        first, second = swarm.holders
        corrupt_on_disk(first, data, 3 * CHUNK + 100)
        first.wrap(lambda s: DiesAfter(s, 5 * CHUNK))
        # Execute
        result = await fetch(swarm, data)
        # Assert: cut back to the 3 chunks the second holder's list agrees with, resumed there
        assert swarm.store.get(digest(data)) == data
        assert second.server.statistics().bytes_sent == SIZE - 3 * CHUNK
        assert result.misbehaving == (first.peer,)
        assert [f.reason for f in result.faults if f.misbehaved] == ["sent a false chunk list"]


async def test_not_found_and_busy_fall_through_to_the_next_holder(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare
    data = blob()
    async with open_swarm(tmp_path, 3) as swarm:
        empty, busy, holder = swarm.holders
        busy.store.put(data)
        busy.server.max_concurrent = 0
        holder.store.put(data)
        # Execute
        result = await fetch(swarm, data)
        # Assert
        assert swarm.store.get(digest(data)) == data
        assert [(f.peer, f.reason, f.misbehaved) for f in result.faults] == [
            (empty.peer, "answered 'not-found'", False),
            (busy.peer, "answered 'busy'", False),
        ]
        assert result.sources == (holder.peer,)
        assert empty.server.statistics().not_found == 1
        assert busy.server.statistics().busy == 1


async def test_a_request_for_a_blob_being_fetched_waits_for_it(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    """A combiner's clients ask it for the round's model while it is still fetching it: their
    requests wait for it instead of hearing "not found" and trying the next holder."""
    # Prepare: the first holder is about to hold the blob (0.3 s from now); the second has it
    data = blob()
    async with open_swarm(tmp_path, 2) as swarm:
        fetching, holder = swarm.holders
        holder.store.put(data)

        async def fetch_it_there() -> None:
            with fetching.server.expecting(digest(data)):
                await trio.sleep(0.3)
                fetching.store.put(data)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_it_there)
            await trio.sleep(0.1)
            # Execute
            result = await fetch(swarm, data)
        # Assert: served by the first holder as soon as it had the blob
        assert trio.current_time() - started == pytest.approx(0.3)
        assert result.sources == (fetching.peer,) and result.faults == ()
        stats = fetching.server.statistics()
        assert (stats.waited, stats.not_found, stats.served) == (1, 0, 1)
        assert holder.server.statistics().requests == 0


async def test_waiting_for_an_expected_blob_is_bounded(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: one holder's fetch fails after 0.5 s; the other's never ends (it waits 2 s)
    data = blob()
    async with open_swarm(tmp_path, 2) as swarm:
        failing, stuck = swarm.holders
        stuck.server.expect_wait = 2.0

        async def failing_fetch() -> None:
            with failing.server.expecting(digest(data)):
                await trio.sleep(0.5)

        with stuck.server.expecting(digest(data)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(failing_fetch)
                started = trio.current_time()
                # Execute
                with pytest.raises(FetchError) as caught:
                    await fetch(swarm, data)
                elapsed = trio.current_time() - started
    # Assert: "not-found" from each, once its fetch ended or its wait ran out
    assert [f.reason for f in caught.value.faults] == ["answered 'not-found'"] * 2
    assert elapsed == pytest.approx(0.5 + 2.0)
    assert failing.server.statistics().waited == stuck.server.statistics().waited == 1


async def test_no_holder_raises_with_every_fault(tmp_path: Path, autojump_clock: MockClock) -> None:
    data = blob()
    async with open_swarm(tmp_path, 2) as swarm:
        with pytest.raises(FetchError, match="no holder delivered") as caught:
            await fetch(swarm, data)
        assert [f.peer for f in caught.value.faults] == swarm.peers
        assert caught.value.misbehaving == ()


async def test_a_blob_over_max_size_is_refused_by_an_honest_holder(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    data = blob()
    async with open_swarm(tmp_path, 1, data) as swarm:
        with pytest.raises(FetchError, match="too-large"):
            await fetch(swarm, data, max_size=SIZE - 1)
        stats = swarm.holders[0].server.statistics()
        assert (stats.too_large, stats.bytes_sent) == (1, 0)


async def test_an_oversize_declared_blob_is_refused_before_its_bytes_are_read(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a holder that ignores max_size, declares 100 MiB and streams as fast as it can
    declared = 100 << 20
    written = 0

    async def liar(stream: Stream) -> None:
        nonlocal written
        await receive_frame(stream, 1024, 10)
        chunks = tuple(digest(b"%d" % i) for i in range(declared // CHUNK))
        response = BlobResponse(
            status="ok", size=declared, offset=0, chunk_size=CHUNK, chunks=chunks
        )
        await send_frame(stream, encode(response), 10)
        while True:
            await stream.send_all(bytes(CHUNK))
            written += CHUNK

    data = blob()
    async with open_swarm(tmp_path, 1) as swarm:
        swarm.holders[0].handle_with(liar)
        client = CountingHost(swarm.client)
        header = 4 + len(
            encode(
                BlobResponse(
                    status="ok",
                    size=declared,
                    offset=0,
                    chunk_size=CHUNK,
                    chunks=(digest(b""),) * (declared // CHUNK),
                )
            )
        )
        # Execute
        with pytest.raises(FetchError) as caught:
            await fetch_blob(
                client,
                swarm.peers,
                digest(data),
                swarm.store,
                max_size=declared - 1,
                chunk_size=CHUNK,
            )
        # Assert: we read the response frame and not one blob byte; the liar got rid of no more
        # than the stream's buffer before the reset
        assert caught.value.misbehaving == (swarm.peers[0],)
        assert "declares 104857600 bytes" in caught.value.faults[0].reason
        assert client.received == header
        assert written <= STREAM_BUFFER
        assert swarm.store.partial_size(digest(data)) == 0


async def test_a_stalled_holder_times_out_at_the_exact_virtual_time(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: the first holder answers, sends half a chunk and freezes
    data = blob()
    stall_timeout = 7.0

    async def frozen(stream: Stream) -> None:
        await receive_frame(stream, 1024, 10)
        chunks = tuple(digest(data[i : i + CHUNK]) for i in range(0, SIZE, CHUNK))
        response = BlobResponse(status="ok", size=SIZE, offset=0, chunk_size=CHUNK, chunks=chunks)
        await send_frame(stream, encode(response), 10)
        await stream.send_all(data[: CHUNK // 2])
        await trio.sleep_forever()

    async with open_swarm(tmp_path, 2, data) as swarm:
        swarm.holders[0].handle_with(frozen)
        # Execute
        result = await fetch(swarm, data, stall_timeout=stall_timeout)
        # Assert
        assert trio.current_time() == stall_timeout
        assert swarm.store.get(digest(data)) == data
        assert [(f.peer, f.misbehaved) for f in result.faults] == [(swarm.peers[0], False)]
        assert "timed out" in result.faults[0].reason


async def test_a_holder_cuts_off_a_fetcher_that_stops_reading(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a fetcher that reads the response and then nothing; the blob outgrows the buffer
    data = blob(4 * STREAM_BUFFER)
    async with open_swarm(tmp_path, 1, data) as swarm:
        holder = swarm.holders[0]
        holder.server.stall_timeout = 5.0
        finished = trio.Event()

        async def handler(stream: Stream) -> None:
            await holder.server.handle(stream)
            finished.set()

        holder.handle_with(handler)
        stream = await swarm.client.open_stream(holder.peer, BLOB_PROTOCOL)
        await send_frame(stream, encode_request(data), 10)
        await receive_frame(stream, 1 << 20, 10)
        # Execute
        await finished.wait()
        # Assert: cut off exactly one stall timeout after it started writing
        assert trio.current_time() == 5.0
        stats = holder.server.statistics()
        assert (stats.failed, stats.active, stats.bytes_sent) == (1, 0, 0)


def encode_request(data: bytes) -> bytes:
    from fednode.wire.transfer import BlobRequest

    return encode(BlobRequest(digest=digest(data), offset=0, max_size=1 << 30, chunk_size=CHUNK))


async def test_progress_on_a_slow_link_is_paced_by_the_reader(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Prepare: a fetcher whose stream hands over at most 4 KiB per virtual second
    data = blob(4 * CHUNK)
    async with open_swarm(tmp_path, 1, data) as swarm:
        inner = swarm.client

        class Slow(CountingHost):
            async def open_stream(self, peer: PeerId, protocol: str) -> Stream:
                stream = await inner.open_stream(peer, protocol)

                class Paced(WrappedStream):
                    async def receive_some(self, max_bytes: int = 65536) -> bytes:
                        await trio.sleep(1)
                        return await self.inner.receive_some(min(max_bytes, 4096))

                return Paced(stream)

        times: list[float] = []

        def record(held: int, total: int) -> None:
            times.append(trio.current_time())

        # Execute
        await fetch_blob(
            Slow(inner), swarm.peers, digest(data), swarm.store, max_size=1 << 20,
            chunk_size=CHUNK, stall_timeout=5.0, progress=record,
        )  # fmt: skip
        # Assert: 2 s for the response frame, then a chunk per 4 s; 18 s in all, never stalled
        assert swarm.store.get(digest(data)) == data
        assert times == [6.0, 10.0, 14.0, 18.0]


# ------------------------------------------------------------------------------------- framing


@asynccontextmanager
async def scripted_stream(script: Callable[[Stream], Awaitable[None]]) -> AsyncIterator[Stream]:
    """A stream to a peer whose handler runs ``script``."""
    network = MemoryNetwork(seed=1, stream_buffer=STREAM_BUFFER)
    async with (
        network.open_host(NodeKey(bytes([1]) * 32)) as a,
        network.open_host(NodeKey(bytes([2]) * 32)) as b,
    ):
        b.set_stream_handler("/test/1", script)
        await a.connect(b.listen_addrs()[0])
        yield await a.open_stream(b.peer_id, "/test/1")


async def test_frames_round_trip_small_and_large(autojump_clock: MockClock) -> None:
    payloads = [b"", b"x", blob(300_000)]

    async def echo(stream: Stream) -> None:
        for _ in payloads:
            await send_frame(stream, await receive_frame(stream, 1 << 20, 5), 5)

    async with scripted_stream(echo) as stream:
        for payload in payloads:
            await send_frame(stream, payload, 5)
            assert await receive_frame(stream, 1 << 20, 5) == payload


@pytest.mark.parametrize(
    "sent",
    [b"", b"\x00\x00", b"\x00\x00\x00\x05abc"],
    ids=["before-the-frame", "inside-the-length", "inside-the-body"],
)
async def test_end_of_stream_before_or_inside_a_frame_is_a_transfer_error(
    sent: bytes, autojump_clock: MockClock
) -> None:
    async def says_little(stream: Stream) -> None:
        await stream.send_all(sent)
        await stream.send_eof()

    async with scripted_stream(says_little) as stream:
        with pytest.raises(TransferError, match="peer closed mid-transfer"):
            await receive_frame(stream, 1024, 5)


async def test_an_oversize_frame_is_refused_unread_and_the_stream_reset(
    autojump_clock: MockClock,
) -> None:
    async def big(stream: Stream) -> None:
        await stream.send_all(struct.pack(">I", 10_000) + bytes(10_000))

    async with scripted_stream(big) as stream:
        with pytest.raises(TransferError, match="exceeds the 1024-byte limit"):
            await receive_frame(stream, 1024, 5)
        with pytest.raises(TransportError):
            await stream.receive_some(1)


async def test_a_frame_read_times_out_at_its_deadline(autojump_clock: MockClock) -> None:
    async def silent(stream: Stream) -> None:
        await trio.sleep_forever()

    async with scripted_stream(silent) as stream:
        with pytest.raises(TransferError, match="timed out"):
            await receive_frame(stream, 1024, 2.5)
        assert trio.current_time() == 2.5
