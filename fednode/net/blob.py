"""Net layer: ``/fednode/blob/1.0.0``, fetching a content-addressed blob from any peer holding it.

Stream layout (u32 = 4-byte big-endian length prefix of a frame)::

    fetcher -> holder:  u32 | BlobRequest{digest, offset, max_size, chunk_size}
    holder -> fetcher:  u32 | BlobResponse{status, size, offset, chunk_size, chunks}
    holder -> fetcher:  (status "ok" only) bytes [offset, size) of the blob, raw, then end of stream

Chunk verification: a blob's address is BLAKE3-256 of its bytes. The response lists the BLAKE3-256
of every ``chunk_size`` chunk of the whole blob; the fetcher checks each chunk against that list as
it arrives and keeps only verified chunks (in ``<digest>.part``), and at the end checks the whole
blob against its address. So:

- a chunk that does not match the list its own sender sent is caught on arrival, and that peer is
  blamed and dropped; the verified prefix stays and the fetch resumes from it with the next holder;
- a list that is itself false is caught at the end (every chunk matched it, yet the blob does not
  hash to its address), and every peer that sent that list is blamed; the partial file is dropped
  and the fetch starts over with the holders not blamed;
- a holder whose list disagrees with the chunks already held takes over: the held prefix is cut
  back to where the two agree, and the final digest decides who lied (on success, every peer
  whose list differed from the true one is blamed too).

Both ends know how many bytes must follow the response, so a killed holder (on py-libp2p: a clean
end of stream) is told from a finished one by the count alone, and no trailer is needed. The holder
writes 1 MiB at a time whatever the chunk size (py-libp2p moves fewer, larger writes faster). Each
chunk read and each write has ``stall_timeout``: a peer that stops sending or reading is cut off,
a slow one only makes the other side wait. File reads, hashing and writes of more than
:data:`~fednode.net.chunkio.INLINE_IO` bytes run in a worker thread, so the event loop never
blocks on them, and overlap the network: the holder reads the next block while it sends this one,
the fetcher verifies and stores a chunk while the next arrives (``chunkio``, shared with the push
protocol). Nothing holds more than two chunks or two writes of the blob in memory. The full scheme
is in ``protocols/wire.md``, "Data plane: verification, blame, resumption, timeouts".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import trio

from fednode.errors import (
    CryptoError,
    RemoteProtocolError,
    TransferError,
    TransportError,
    WireError,
)
from fednode.net.blobstore import BlobStore, PartialBlob
from fednode.net.chunkio import (
    PEER_ERRORS,
    ChunkMismatch,
    Progress,
    header_limits,
    receive_chunks,
    run_io,
    send_blob_bytes,
    sync_cost,
)
from fednode.net.framing import abort, receive_frame, send_frame
from fednode.net.interface import Host, Stream
from fednode.wire import Digest, PeerId, decode, encode
from fednode.wire.transfer import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNKS,
    BlobRequest,
    BlobResponse,
    BlobStatus,
    chunk_count,
    header_limit,
)

BLOB_PROTOCOL = "/fednode/blob/1.0.0"
_REQUEST_LIMIT = 1024

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerFault:
    """One thing that went wrong with one peer during a transfer.

    ``misbehaved`` is true when the peer provably broke the protocol or lied (a tampered chunk,
    a false chunk list, a malformed or contradictory header): log it and score the peer. Otherwise
    the peer was merely unavailable (not found, busy, timed out, died mid-transfer).
    """

    peer: PeerId
    reason: str
    misbehaved: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchResult:
    """A completed fetch: the blob is in the store.

    Attributes:
        resumed_from: bytes a ``.part`` file already held when the fetch began.
        received: verified bytes received over the network by this call.
        sources: the peers whose bytes make up the stored blob, in order.
        faults: what went wrong on the way, peer by peer.
    """

    digest: Digest
    size: int
    resumed_from: int
    received: int
    sources: tuple[PeerId, ...]
    faults: tuple[PeerFault, ...]

    @property
    def misbehaving(self) -> tuple[PeerId, ...]:
        return tuple(dict.fromkeys(f.peer for f in self.faults if f.misbehaved))


class FetchError(TransferError):
    """No holder delivered a verified blob. ``faults`` says what went wrong with each."""

    def __init__(self, message: str, faults: Sequence[PeerFault]) -> None:
        self.faults = tuple(faults)
        detail = "; ".join(f"{f.peer[:16]}: {f.reason}" for f in self.faults)
        super().__init__(f"{message} ({detail})" if detail else message)

    @property
    def misbehaving(self) -> tuple[PeerId, ...]:
        return tuple(dict.fromkeys(f.peer for f in self.faults if f.misbehaved))


# ------------------------------------------------------------------------------------- client


class _Restart(Exception):
    """Ask the same holder again: the held prefix was cut back to where its list agrees."""


@dataclass(slots=True)
class _Fetch:
    host: Host
    digest: Digest
    store: BlobStore
    max_size: int
    expected_size: int | None
    chunk_size: int
    progress: Progress | None
    timeout: float
    stall_timeout: float
    faults: list[PeerFault] = field(default_factory=list)
    blamed: set[PeerId] = field(default_factory=set)
    sources: list[PeerId] = field(default_factory=list)
    received: int = 0
    # Per attempt: the chunk list the held bytes were verified against, and who sent which list.
    reference: tuple[Digest, ...] | None = None
    lists: dict[PeerId, tuple[Digest, ...]] = field(default_factory=dict)

    def fault(self, peer: PeerId, reason: str, *, misbehaved: bool) -> None:
        log.info("blob %s from %s: %s", self.digest.hex()[:16], peer, reason)
        self.faults.append(PeerFault(peer=peer, reason=reason, misbehaved=misbehaved))
        if misbehaved:
            self.blamed.add(peer)

    def _open_partial(self) -> PartialBlob:
        return self.store.open_partial(self.digest, resume_chunk_size=self.chunk_size)

    async def run(self, peers: Sequence[PeerId]) -> FetchResult:
        resumed_from: int | None = None
        while True:
            candidates = [p for p in dict.fromkeys(peers) if p not in self.blamed]
            if not candidates:
                raise FetchError(f"no holder delivered blob {self.digest.hex()[:16]}", self.faults)
            partial = await run_io(self.store.partial_size(self.digest), self._open_partial)
            with partial:
                if resumed_from is None:
                    resumed_from = partial.size
                self.reference, self.lists = None, {}
                size = await self._attempt(candidates, partial)
                if size is None:
                    raise FetchError(
                        f"no holder delivered blob {self.digest.hex()[:16]}", self.faults
                    )
                try:
                    await run_io(sync_cost(self.store), partial.commit)
                except TransferError:
                    self.sources.clear()  # nothing they sent was kept
                    for peer, chunks in self.lists.items():
                        if chunks == self.reference:
                            self.fault(
                                peer,
                                "its chunk list does not hash to the blob's digest",
                                misbehaved=True,
                            )
                    continue
            for peer, chunks in self.lists.items():
                if chunks != self.reference:
                    self.fault(peer, "sent a false chunk list", misbehaved=True)
            return FetchResult(
                digest=self.digest,
                size=size,
                resumed_from=resumed_from,
                received=self.received,
                sources=tuple(self.sources),
                faults=tuple(self.faults),
            )

    async def _attempt(self, candidates: list[PeerId], partial: PartialBlob) -> int | None:
        """Try holders in turn until all chunks are held; returns the blob's size, or None."""
        for peer in candidates:
            if peer in self.blamed:
                continue
            try:
                size = await self._from_peer(peer, partial)
            except ChunkMismatch as exc:
                self.fault(peer, str(exc), misbehaved=True)
            except RemoteProtocolError as exc:
                self.fault(peer, str(exc), misbehaved=True)
            except WireError as exc:
                self.fault(peer, f"malformed response: {exc}", misbehaved=True)
            except (TransportError, CryptoError) as exc:
                self.fault(peer, str(exc), misbehaved=False)
            else:
                if size is not None:
                    return size
        return None

    async def _from_peer(self, peer: PeerId, partial: PartialBlob) -> int | None:
        for _ in range(2):
            try:
                with trio.fail_after(self.timeout):
                    stream = await self.host.open_stream(peer, BLOB_PROTOCOL)
            except trio.TooSlowError:
                raise TransferError(f"no stream within {self.timeout:g} s") from None
            try:
                return await self._exchange(peer, stream, partial)
            except _Restart:
                await stream.aclose()
            except BaseException:
                await abort(stream)
                raise
        raise RemoteProtocolError("its chunk list keeps contradicting the chunks it agreed to")

    async def _exchange(self, peer: PeerId, stream: Stream, partial: PartialBlob) -> int | None:
        request = BlobRequest(
            digest=self.digest,
            offset=partial.size,
            max_size=self.max_size,
            chunk_size=self.chunk_size,
        )
        await send_frame(stream, encode(request), self.timeout)
        raw = await receive_frame(
            stream, header_limit(self.max_size, self.chunk_size), self.timeout
        )
        response = decode(bytes(raw), BlobResponse, header_limits(len(raw)))
        if response.status != "ok":
            self.fault(peer, f"answered {response.status!r}", misbehaved=False)
            await stream.aclose()
            return None
        # Everything about the response is checked before a single byte of the blob is read.
        if response.size > self.max_size:
            raise RemoteProtocolError(
                f"declares {response.size} bytes, over the {self.max_size} asked for"
            )
        if self.expected_size is not None and response.size != self.expected_size:
            raise RemoteProtocolError(
                f"declares {response.size} bytes, expected {self.expected_size}"
            )
        if response.chunk_size != self.chunk_size:
            raise RemoteProtocolError(
                f"answered chunk size {response.chunk_size}, asked {self.chunk_size}"
            )
        held = partial.chunks
        agreed = next(
            (
                i
                for i, (ours, theirs) in enumerate(zip(held, response.chunks, strict=False))
                if ours != theirs
            ),
            min(len(held), len(response.chunks)),
        )
        if agreed < len(held):
            # Its list contradicts chunks we hold, so one of its list and the one we verified them
            # against is false. Follow it from where the two agree; the final digest will tell.
            log.info("blob %s: %s disputes chunk %d on", self.digest.hex()[:16], peer, agreed)
            await run_io(agreed * self.chunk_size, partial.truncate_chunks, agreed, self.chunk_size)
            raise _Restart
        if response.offset != request.offset:
            raise RemoteProtocolError(f"answered offset {response.offset}, asked {request.offset}")
        self.reference = response.chunks
        self.lists[peer] = response.chunks
        delivered = False

        def on_chunk(n: int) -> None:
            nonlocal delivered
            delivered = True
            self.received += n
            if self.progress is not None:
                self.progress(partial.size, response.size)

        try:
            await receive_chunks(
                stream,
                partial,
                response.chunks,
                chunk_size=self.chunk_size,
                size=response.size,
                stall_timeout=self.stall_timeout,
                on_chunk=on_chunk,
            )
        finally:
            if delivered and peer not in self.sources:
                self.sources.append(peer)
        await stream.aclose()
        return response.size


async def fetch_blob(
    host: Host,
    peers: Sequence[PeerId],
    digest: Digest,
    store: BlobStore,
    *,
    max_size: int,
    expected_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
    pin: bool = False,
) -> FetchResult:
    """Fetch blob ``digest`` into ``store`` from the first of ``peers`` able to deliver it.

    Holders are tried in order. Bytes already verified (in this call or a ``.part`` file left by
    an earlier one) are kept, and the next holder is asked only for the rest. A blob already in
    the store returns at once.

    Args:
        max_size: refuse a blob declared larger than this, before reading any of its bytes.
        expected_size: if known (from a signed message), refuse any other declared size.
        progress: ``progress(bytes_held, total)`` after each verified chunk.
        timeout: seconds to open a stream and exchange request and response with one holder.
        stall_timeout: seconds one chunk may take to arrive before the holder counts as stalled.
        pin: pin the blob as it is stored (once, also if it was already held), so no eviction
            can take it before the caller is done with it.

    Raises:
        FetchError: no holder delivered a verified blob; ``faults`` (and ``misbehaving``) say why.
        TransferError: another fetch of the same blob into ``store`` is running.
    """
    if pin:  # before it lands, so no eviction can come between
        store.pin(digest)
    try:
        if store.has(digest):
            size = store.size(digest)
            return FetchResult(
                digest=digest, size=size, resumed_from=size, received=0, sources=(), faults=()
            )
        fetch = _Fetch(
            host=host,
            digest=digest,
            store=store,
            max_size=max_size,
            expected_size=expected_size,
            chunk_size=chunk_size,
            progress=progress,
            timeout=timeout,
            stall_timeout=stall_timeout,
        )
        return await fetch.run(peers)
    except BaseException:
        if pin:
            store.unpin(digest)
        raise


# ------------------------------------------------------------------------------------- server


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobServerStatistics:
    """A snapshot of a :class:`BlobServer`. ``bytes_sent`` counts blob bytes only."""

    requests: int
    served: int
    not_found: int
    too_large: int
    busy: int
    failed: int
    waited: int  #: requests that waited for an expected blob (then served or not found)
    active: int
    bytes_sent: int


class BlobServer:
    """Answers ``/fednode/blob/1.0.0`` requests from a :class:`BlobStore`.

    At most ``max_concurrent`` transfers run at once; further requests get ``busy``. ``timeout``
    bounds reading a request and sending the response; ``stall_timeout`` bounds each write while
    streaming, so a fetcher that stops reading is cut off (a slow one just makes us wait).

    A request for a blob the node is about to hold (:meth:`expecting`: a fetch of it under way)
    waits for it, up to ``expect_wait`` seconds, before it is answered ``not-found``: a round's
    clients ask their combiner for the global model at the moment the combiner itself starts
    fetching it, and waiting those few milliseconds beats a trip to another holder. Waiting
    requests count against ``max_concurrent`` like transfers.
    """

    def __init__(
        self,
        store: BlobStore,
        *,
        max_concurrent: int = 8,
        timeout: float = 10.0,
        stall_timeout: float = 30.0,
        expect_wait: float = 5.0,
    ) -> None:
        self.store = store
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.expect_wait = expect_wait
        self._counts = dict.fromkeys(
            ("requests", "served", "not_found", "too_large", "busy", "failed", "waited"), 0
        )
        self._active = 0
        self._bytes_sent = 0
        self._expected: dict[Digest, tuple[int, trio.Event]] = {}

    def statistics(self) -> BlobServerStatistics:
        return BlobServerStatistics(
            **self._counts, active=self._active, bytes_sent=self._bytes_sent
        )

    @contextlib.contextmanager
    def expecting(self, digest: Digest) -> Iterator[None]:
        """While inside, requests for ``digest`` not held yet wait for it (see the class
        docstring); leaving wakes them, whether the blob came or not. Nests."""
        count, arrived = self._expected.get(digest, (0, trio.Event()))
        self._expected[digest] = (count + 1, arrived)
        try:
            yield
        finally:
            count, arrived = self._expected[digest]
            if count > 1:
                self._expected[digest] = (count - 1, arrived)
            else:
                del self._expected[digest]
                arrived.set()

    async def _wait_expected(self, key: Digest) -> None:
        expected = self._expected.get(key)
        if expected is None or self.store.has(key):
            return
        self._counts["waited"] += 1
        with trio.move_on_after(self.expect_wait):
            await expected[1].wait()

    async def handle(self, stream: Stream) -> None:
        """Serve one request on ``stream``; never raises for anything the peer does."""
        self._counts["requests"] += 1
        try:
            await self._serve(stream)
        except PEER_ERRORS as exc:
            self._counts["failed"] += 1
            log.info("blob request from %s failed: %s", stream.remote_peer, exc)
            await abort(stream)
        except BaseException:
            await abort(stream)
            raise

    async def _refuse(self, stream: Stream, status: BlobStatus) -> None:
        self._counts[status.replace("-", "_")] += 1
        response = BlobResponse(status=status, size=0, offset=0, chunk_size=0, chunks=())
        await send_frame(stream, encode(response), self.timeout)
        await stream.aclose()

    async def _serve(self, stream: Stream) -> None:
        raw = await receive_frame(stream, _REQUEST_LIMIT, self.timeout)
        request = decode(bytes(raw), BlobRequest)
        if self._active >= self.max_concurrent:
            await self._refuse(stream, "busy")
            return
        self._active += 1
        try:
            await self._stream_blob(stream, request)
        finally:
            self._active -= 1

    async def _stream_blob(self, stream: Stream, request: BlobRequest) -> None:
        key = request.digest
        await self._wait_expected(key)
        try:
            size = self.store.size(key)
        except KeyError:
            await self._refuse(stream, "not-found")
            return
        if size > request.max_size:
            await self._refuse(stream, "too-large")
            return
        # A fetcher holding more than the blob has (a false list misled it) learns from our list
        # where it went wrong; it then asks again.
        offset = min(request.offset, size - size % request.chunk_size)
        if chunk_count(size, request.chunk_size) > MAX_CHUNKS:
            raise RemoteProtocolError(f"chunk size {request.chunk_size} gives too many chunks")
        try:
            chunks = await run_io(size, self.store.chunk_digests, key, request.chunk_size)
            reader = self.store.open_reader(key, offset)
        except KeyError:  # evicted meanwhile
            await self._refuse(stream, "not-found")
            return
        with reader:
            response = BlobResponse(
                status="ok", size=size, offset=offset, chunk_size=request.chunk_size, chunks=chunks
            )
            await send_frame(stream, encode(response), self.timeout)

            def on_sent(n: int) -> None:
                self._bytes_sent += n

            await send_blob_bytes(
                stream, reader, size - offset, stall_timeout=self.stall_timeout, on_sent=on_sent
            )
        self._counts["served"] += 1
        await stream.aclose()


def serve_blobs(
    host: Host,
    store: BlobStore,
    *,
    max_concurrent: int = 8,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
    expect_wait: float = 5.0,
) -> BlobServer:
    """Register a :class:`BlobServer` for ``store`` on ``host``; returns it (for statistics and
    :meth:`~BlobServer.expecting`)."""
    server = BlobServer(
        store,
        max_concurrent=max_concurrent,
        timeout=timeout,
        stall_timeout=stall_timeout,
        expect_wait=expect_wait,
    )
    host.set_stream_handler(BLOB_PROTOCOL, server.handle)
    return server
