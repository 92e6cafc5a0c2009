"""Net layer: chunk I/O shared by the two data-plane protocols (``blob`` and ``push``).

Sending a blob's bytes in :data:`WRITE_SIZE` writes and receiving them chunk by chunk, each chunk
verified against the BLAKE3-256 digest its sender listed before it is kept, each read and write
bounded by a stall timeout. File reads, hashing and writes of more than :data:`INLINE_IO` bytes
run in a worker thread, overlapped with the network: the sender reads the next block while it
sends this one, the receiver verifies and stores a chunk while the next arrives, so nothing holds
more than two chunks or two writes in memory. The verification and blame scheme they serve is in
``protocols/wire.md``, "Data plane: verification, blame, resumption, timeouts".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import BinaryIO, Generic, TypeVar, TypeVarTuple

import trio

from fednode.crypto import digest as blake3_digest
from fednode.errors import (
    CryptoError,
    RemoteProtocolError,
    TransferError,
    TransportError,
    WireError,
)
from fednode.net.blobstore import BlobStore, PartialBlob
from fednode.net.framing import receive_exactly, send_all
from fednode.net.interface import Stream
from fednode.wire import Digest, Limits
from fednode.wire.transfer import MAX_CHUNKS

#: Bytes per write when streaming a blob.
WRITE_SIZE = 1 << 20
#: Errors a peer can cause; anything else is our own bug and propagates.
PEER_ERRORS = (WireError, CryptoError, RemoteProtocolError, TransportError)

#: File and hashing work on at most this many bytes runs inline: it takes well under a
#: millisecond, less than a hop to a worker thread, and keeps tests on an autojumping MockClock
#: exact (while a task waits for a thread, such a clock leaps to the next deadline).
INLINE_IO = 256 << 10

Progress = Callable[[int, int], None]
"""``progress(bytes_held, total)``, called after each verified chunk."""

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_io(cost: int, fn: Callable[[*Ts], T], *args: *Ts) -> T:
    """Run blocking ``fn(*args)`` inline if it touches at most :data:`INLINE_IO` bytes, else in
    a worker thread so the event loop keeps serving streams (py-libp2p resets a stream whose
    reader stalls for 5 s)."""
    if cost <= INLINE_IO:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


def sync_cost(store: BlobStore) -> int:
    """The :func:`run_io` cost of a commit: an fsync is never inline."""
    return INLINE_IO + 1 if store.durable else 0


class ChunkMismatch(TransferError):
    """A chunk did not hash to the digest its sender listed for it."""

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(f"chunk {index} does not match its listed digest")


def header_limits(max_frame: int) -> Limits:
    """Decoding limits for a transfer header that may list up to :data:`MAX_CHUNKS` digests."""
    return Limits(
        max_frame=max_frame, max_depth=4, max_items=MAX_CHUNKS, max_total_items=MAX_CHUNKS + 64
    )


class _Background(Generic[T]):
    """``run_io(cost, fn, *args)`` started in ``nursery`` now, its result collected later, so
    the event loop moves the next chunk over the network meanwhile. An exception from ``fn``
    is kept for :meth:`result`; it never escapes into the nursery."""

    def __init__(
        self, nursery: trio.Nursery, cost: int, fn: Callable[[*Ts], T], *args: *Ts
    ) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: Exception | None = None

        async def run() -> None:
            try:
                self._value = await run_io(cost, fn, *args)
            except Exception as exc:
                self._error = exc
            finally:
                self._done.set()

        nursery.start_soon(run)

    async def settle(self) -> None:
        """Wait for it to finish, even in a cancelled scope (a thread cannot be abandoned)."""
        with trio.CancelScope(shield=True):
            await self._done.wait()

    async def result(self) -> T:
        await self.settle()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


async def _pipelined(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Run ``body(nursery)``; its exception comes out as raised (a nursery would wrap it in an
    ExceptionGroup), after the background work it started has finished."""
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            await body(nursery)
        except BaseException as exc:
            failure = exc
    if failure is not None:
        raise failure


async def send_blob_bytes(
    stream: Stream,
    source: BinaryIO | memoryview,
    count: int,
    *,
    stall_timeout: float,
    on_sent: Callable[[int], None],
) -> None:
    """Send ``count`` bytes from ``source`` (a file positioned at the start, or a memoryview) in
    :data:`WRITE_SIZE` writes, each within ``stall_timeout``; ``on_sent(n)`` after each. From
    a file, the next block is read (in a worker thread, if large) while this one is sent."""
    if isinstance(source, memoryview) or count <= INLINE_IO:
        await _send_blob_bytes_inline(stream, source, count, stall_timeout, on_sent)
        return
    reader = source

    async def body(nursery: trio.Nursery) -> None:
        sent = 0
        n = min(WRITE_SIZE, count)
        reading = _Background(nursery, n, reader.read, n)
        while sent < count:
            block = await reading.result()
            if len(block) != n:
                raise TransferError(
                    f"local blob file ended after {sent + len(block)} of {count} bytes"
                )
            following = min(WRITE_SIZE, count - sent - n)
            if following:
                reading = _Background(nursery, following, reader.read, following)
            try:
                await send_all(stream, block, stall_timeout)
            except BaseException:
                if following:
                    await reading.settle()
                raise
            sent += n
            on_sent(n)
            n = following

    await _pipelined(body)


async def _send_blob_bytes_inline(
    stream: Stream,
    source: BinaryIO | memoryview,
    count: int,
    stall_timeout: float,
    on_sent: Callable[[int], None],
) -> None:
    for sent in range(0, count, WRITE_SIZE):
        n = min(WRITE_SIZE, count - sent)
        if isinstance(source, memoryview):
            block: bytes | memoryview = source[sent : sent + n]
        else:
            block = source.read(n)
            if len(block) != n:
                raise TransferError(
                    f"local blob file ended after {sent + len(block)} of {count} bytes"
                )
        await send_all(stream, block, stall_timeout)
        on_sent(n)


def _verify_and_append(partial: PartialBlob, data: bytes | bytearray, expected: Digest) -> bool:
    if blake3_digest(data) != expected:
        return False
    partial.append(data, expected)
    return True


async def receive_chunks(
    stream: Stream,
    partial: PartialBlob,
    chunks: Sequence[Digest],
    *,
    chunk_size: int,
    size: int,
    stall_timeout: float,
    on_chunk: Callable[[int], None],
) -> None:
    """Receive the chunks from ``partial.size`` to ``size``, verifying each against ``chunks``
    before appending it to ``partial``. Each chunk must arrive within ``stall_timeout``.

    A chunk larger than :data:`INLINE_IO` is verified and appended in a worker thread while the
    next one arrives, so at most two chunks are held. When receiving fails, the chunk already in
    hand is still verified and kept (the prefix a later attempt resumes from), and a mismatch in
    it is what gets raised.

    Raises:
        ChunkMismatch: a chunk did not verify (nothing of it was kept; the caller resets).
        TransferError: the stream ended, broke or stalled.
    """

    async def body(nursery: trio.Nursery) -> None:
        verifying: tuple[int, int, _Background[bool]] | None = None

        async def finish() -> None:
            assert verifying is not None
            index, length, check = verifying
            if not await check.result():
                raise ChunkMismatch(index)
            on_chunk(length)

        for index in range(partial.size // chunk_size, len(chunks)):
            length = min(chunk_size, size - index * chunk_size)
            try:
                data = await receive_exactly(stream, length, stall_timeout)
            except BaseException as exc:
                if verifying is not None:
                    try:
                        await finish()
                    except ChunkMismatch as mismatch:
                        raise mismatch from exc
                raise
            if verifying is not None:
                await finish()
                verifying = None
            if length <= INLINE_IO:  # no thread: nothing to overlap with
                if not _verify_and_append(partial, data, chunks[index]):
                    raise ChunkMismatch(index)
                on_chunk(length)
                continue
            check = _Background(nursery, length, _verify_and_append, partial, data, chunks[index])
            verifying = (index, length, check)
        if verifying is not None:
            await finish()

    await _pipelined(body)
