"""Net layer: pushing a signed message and its blob to a peer that asked for it.

Two protocols share one stream layout and one implementation (:class:`PushKind`):

- ``/fednode/push/1.0.0``: a client pushes its signed ``ModelUpdate`` (and the trained model's
  blob) to its combiner;
- ``/fednode/partial/1.0.0``: a combiner pushes its signed ``PartialAggregate`` (and the blob of
  its weighted mean) to the reducer.

Stream layout (u32 = 4-byte big-endian length prefix of a frame)::

    sender -> receiver:  u32 | PushOffer{envelope, chunk_size, chunks}
    receiver -> sender:  u32 | PushReply{status: accept | have | refuse, reason}
    sender -> receiver:  (accept only) the blob's ``size`` bytes, raw
    receiver -> sender:  (accept, have) u32 | PushAck{status: stored | rejected, reason}

The receiver verifies the envelope (it must seal the protocol's message type, signed by its
author) and asks ``admit`` before a single blob byte flows, so a refused push costs one round
trip. It checks each chunk against the offer's list as it lands (dropping the transfer at the
first bad chunk) and the whole blob against the signed digest and ``size`` (``ModelUpdate.update``,
``PartialAggregate.partial``) before storing it (pinned) and calling ``on_stored``. Only then does
it ack ``stored``: an end of stream without an ack is a failed push (a killed receiver ends
streams like a clean EOF on py-libp2p), and the sender keeps its message to retry.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import trio

from fednode.crypto import digest, open_envelope
from fednode.errors import (
    CryptoError,
    LocalProtocolError,
    RemoteProtocolError,
    TransferError,
    TransportError,
    WireError,
)
from fednode.net.blobstore import BlobStore
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
from fednode.wire import Digest, Envelope, ModelUpdate, PartialAggregate, PeerId, decode, encode
from fednode.wire.transfer import (
    DEFAULT_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    PushAck,
    PushOffer,
    PushReply,
    chunk_count,
    header_limit,
)

PUSH_PROTOCOL = "/fednode/push/1.0.0"
PARTIAL_PROTOCOL = "/fednode/partial/1.0.0"
#: Largest signed envelope accepted in an offer (a partial lists its contributions: at the
#: 4096-client cap of a plan, about 0.4 MB).
MAX_ENVELOPE = 1 << 20
_SMALL_FRAME = 8192
_MAX_REASON = 512

M = TypeVar("M", ModelUpdate, PartialAggregate)


@dataclass(frozen=True, slots=True)
class PushKind(Generic[M]):
    """What one push protocol carries: its ID and the signed message type whose blob follows."""

    protocol: str
    message: type[M]
    noun: str  #: what the messages say it is

    def blob(self, msg: M) -> tuple[Digest, int]:
        """The blob ``msg`` names: (digest, size)."""
        if isinstance(msg, ModelUpdate):
            return msg.update, msg.size
        return msg.partial, msg.size


#: A client's update to its combiner.
UPDATES = PushKind(PUSH_PROTOCOL, ModelUpdate, "update")
#: A combiner's partial aggregate to the reducer.
PARTIALS = PushKind(PARTIAL_PROTOCOL, PartialAggregate, "partial")

Admit = Callable[[M, Envelope], "str | None"]
"""``admit(message, envelope)``: ``None`` to accept, else the reason to refuse (wrong round, not
assigned here, over capacity, duplicate). Called once the envelope verified, before any bytes."""
OnStored = Callable[[M, Envelope], Awaitable["str | None"]]
"""``on_stored(message, envelope)``: the blob is stored and pinned; ``None`` acks ``stored``,
a reason acks ``rejected`` (and unpins)."""
OnAbandoned = Callable[[M, str], None]
"""``on_abandoned(message, reason)``: an admitted push did not end stored (to release whatever
``admit`` reserved)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class PushResult:
    """How a push ended, when the receiver answered.

    ``stored``: the receiver acked it (``bytes_sent`` were sent); ``already-held``: it had the blob
    and acked without bytes; ``refused``: it said no before any bytes, with ``reason``.
    """

    status: Literal["stored", "already-held", "refused"]
    reason: str
    bytes_sent: int

    @property
    def accepted(self) -> bool:
        return self.status != "refused"


async def push_update(
    host: Host,
    peer: PeerId,
    envelope: bytes,
    source: BlobStore | bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
    ack_timeout: float = 30.0,
) -> PushResult:
    """Push the signed update ``envelope`` and its blob (from ``source``) to ``peer``
    (``/fednode/push/1.0.0``; see :func:`push_signed`)."""
    return await push_signed(
        UPDATES,
        host,
        peer,
        envelope,
        source,
        chunk_size=chunk_size,
        progress=progress,
        timeout=timeout,
        stall_timeout=stall_timeout,
        ack_timeout=ack_timeout,
    )


async def push_partial(
    host: Host,
    peer: PeerId,
    envelope: bytes,
    source: BlobStore | bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
    ack_timeout: float = 30.0,
) -> PushResult:
    """Push the signed partial aggregate ``envelope`` and its blob (from ``source``) to the
    reducer ``peer`` (``/fednode/partial/1.0.0``; see :func:`push_signed`)."""
    return await push_signed(
        PARTIALS,
        host,
        peer,
        envelope,
        source,
        chunk_size=chunk_size,
        progress=progress,
        timeout=timeout,
        stall_timeout=stall_timeout,
        ack_timeout=ack_timeout,
    )


async def push_signed(
    kind: PushKind[M],
    host: Host,
    peer: PeerId,
    envelope: bytes,
    source: BlobStore | bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
    ack_timeout: float = 30.0,
) -> PushResult:
    """Push the signed message ``envelope`` (of ``kind``) and its blob (from ``source``) to
    ``peer``.

    Args:
        envelope: the canonical encoding of the envelope sealing a ``kind.message``.
        source: a store holding the blob, or its bytes (sent without copying).
        progress: ``progress(bytes_sent, total)`` after each write.
        timeout: seconds to open the stream, send the offer and get the reply.
        stall_timeout: seconds one 1 MiB write may wait for the receiver to take it.
        ack_timeout: seconds, after the last byte, for the receiver to verify, store and ack.

    Returns:
        the outcome when the receiver answered (refusals included).

    Raises:
        TransferError: the stream failed, timed out or ended without an ack, or the receiver
            rejected the blob.
        WireError: the receiver answered with a malformed frame.
        LocalProtocolError: ``source`` does not hold the blob the envelope names.
    """
    msg, _ = open_envelope(envelope, kind.message)
    key, size = kind.blob(msg)
    chunks = await run_io(size, _local_chunks, source, key, size, chunk_size)
    offer = PushOffer(envelope=envelope, chunk_size=chunk_size, chunks=chunks)
    try:
        with trio.fail_after(timeout):
            stream = await host.open_stream(peer, kind.protocol)
    except trio.TooSlowError:
        raise TransferError(f"no stream to {peer} within {timeout:g} s") from None
    try:
        result = await _push(
            stream, offer, kind.noun, key, size, source, progress, timeout, stall_timeout,
            ack_timeout,
        )  # fmt: skip
    except BaseException:
        await abort(stream)
        raise
    await stream.aclose()
    return result


def _local_chunks(
    source: BlobStore | bytes, key: Digest, size: int, chunk_size: int
) -> tuple[Digest, ...]:
    if isinstance(source, BlobStore):
        try:
            held = source.size(key)
        except KeyError:
            raise LocalProtocolError(f"blob {key.hex()[:16]} is not in the store") from None
        if held != size:
            raise LocalProtocolError(f"blob is {held} bytes, the signed message says {size}")
        return source.chunk_digests(key, chunk_size)
    if len(source) != size or digest(source) != key:
        raise LocalProtocolError("the bytes to push are not the blob the message names")
    view = memoryview(source)
    return tuple(digest(view[i : i + chunk_size]) for i in range(0, len(source), chunk_size))


async def _push(
    stream: Stream,
    offer: PushOffer,
    noun: str,
    key: Digest,
    size: int,
    source: BlobStore | bytes,
    progress: Progress | None,
    timeout: float,
    stall_timeout: float,
    ack_timeout: float,
) -> PushResult:
    deadline = trio.current_time() + timeout
    await send_frame(stream, encode(offer), timeout)
    reply = decode(
        bytes(await receive_frame(stream, _SMALL_FRAME, deadline - trio.current_time())), PushReply
    )
    if reply.status == "refuse":
        return PushResult(status="refused", reason=reply.reason, bytes_sent=0)
    sent = 0
    if reply.status == "accept":

        def on_sent(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None:
                progress(sent, size)

        if isinstance(source, BlobStore):
            with source.open_reader(key, 0) as reader:
                await send_blob_bytes(
                    stream, reader, size, stall_timeout=stall_timeout, on_sent=on_sent
                )
        else:
            await send_blob_bytes(
                stream, memoryview(source), size, stall_timeout=stall_timeout, on_sent=on_sent
            )
    try:
        ack = decode(bytes(await receive_frame(stream, _SMALL_FRAME, ack_timeout)), PushAck)
    except TransferError as exc:
        raise TransferError(f"no ack for the pushed {noun}: {exc}") from exc
    if ack.status != "stored":
        raise TransferError(f"the receiver rejected the {noun}: {ack.reason}")
    return PushResult(
        status="stored" if reply.status == "accept" else "already-held", reason="", bytes_sent=sent
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PushServerStatistics:
    """A snapshot of a :class:`PushServer`. ``bytes_received`` counts verified blob bytes."""

    offers: int
    refused: int
    stored: int
    rejected: int
    failed: int
    active: int
    bytes_received: int
    local: int  #: offers from this very node (:meth:`PushServer.deliver_local`)


class PushServer(Generic[M]):
    """Receives the pushes of one :class:`PushKind` into a :class:`BlobStore`.

    Args:
        admit: decides each verified offer before any bytes flow (see :data:`Admit`).
        on_stored: called with each stored message before the ack (see :data:`OnStored`).
        on_abandoned: called when an admitted push fails (see :data:`OnAbandoned`).
        max_size: refuse blobs larger than this.
        max_concurrent: refuse ("busy") beyond this many pushes at once.
        timeout: seconds to read the offer and answer it.
        stall_timeout: seconds one chunk may take to arrive.
        kind: what is pushed (default: client updates, ``/fednode/push/1.0.0``).
    """

    def __init__(
        self,
        store: BlobStore,
        admit: Admit[M],
        *,
        on_stored: OnStored[M] | None = None,
        on_abandoned: OnAbandoned[M] | None = None,
        max_size: int = 1 << 30,
        max_concurrent: int = 16,
        timeout: float = 10.0,
        stall_timeout: float = 30.0,
        kind: PushKind[M] = UPDATES,  # type: ignore[assignment]  # M is ModelUpdate then
    ) -> None:
        self.kind: PushKind[M] = kind
        self.store = store
        self.admit: Admit[M] = admit
        self.on_stored: OnStored[M] | None = on_stored
        self.on_abandoned: OnAbandoned[M] | None = on_abandoned
        self.max_size = max_size
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self._counts = dict.fromkeys(
            ("offers", "refused", "stored", "rejected", "failed", "local"), 0
        )
        self._active = 0
        self._bytes_received = 0

    def statistics(self) -> PushServerStatistics:
        return PushServerStatistics(
            **self._counts, active=self._active, bytes_received=self._bytes_received
        )

    async def handle(self, stream: Stream) -> None:
        """Receive one push on ``stream``; never raises for anything the peer does."""
        try:
            await self._receive(stream)
        except PEER_ERRORS as exc:
            self._counts["failed"] += 1
            log.info("push from %s failed: %s", stream.remote_peer, exc)
            await abort(stream)
        except BaseException:
            await abort(stream)
            raise
        else:
            await _close(stream)

    async def deliver_local(self, sealed: bytes) -> PushResult:
        """Take a push from this very node (an ``auto`` node elected combiner pushes its own
        update to itself): the same checks and answers as over the wire, without a stream. The
        blob must already be in this server's store (the sender and receiver share it).

        Raises:
            WireError, CryptoError: ``sealed`` is not a valid envelope of the protocol's message.
            TransferError: ``on_stored`` rejected it.
        """
        self._counts["offers"] += 1
        self._counts["local"] += 1
        msg, envelope = open_envelope(sealed, self.kind.message)
        key, size = self.kind.blob(msg)
        if size > self.max_size:
            self._counts["refused"] += 1
            return PushResult(status="refused", reason="too-large", bytes_sent=0)
        if not self.store.has(key):
            raise LocalProtocolError("a local push of a blob the store does not hold")
        reason = self.admit(msg, envelope)
        if reason is not None:
            self._counts["refused"] += 1
            return PushResult(status="refused", reason=reason, bytes_sent=0)
        self._active += 1
        stored = False
        try:
            self.store.pin(key)  # the receiver's own pin, as a pushed blob gets
            reason = await self.on_stored(msg, envelope) if self.on_stored else None
            if reason is not None:  # as a "rejected" ack is to a remote sender
                self.store.unpin(key)
                self._counts["rejected"] += 1
                raise TransferError(f"the receiver rejected the {self.kind.noun}: {reason}")
            self._counts["stored"] += 1
            stored = True
            return PushResult(status="already-held", reason="", bytes_sent=0)
        finally:
            self._active -= 1
            if not stored and self.on_abandoned is not None:
                self.on_abandoned(msg, "rejected" if reason else "cancelled")

    async def _reply(
        self, stream: Stream, status: Literal["accept", "have", "refuse"], reason: str = ""
    ) -> None:
        if status == "refuse":
            self._counts["refused"] += 1
        reply = PushReply(status=status, reason=reason[:_MAX_REASON])
        await send_frame(stream, encode(reply), self.timeout)

    async def _ack(
        self, stream: Stream, status: Literal["stored", "rejected"], reason: str = ""
    ) -> None:
        self._counts[status] += 1
        ack = PushAck(status=status, reason=reason[:_MAX_REASON])
        await send_frame(stream, encode(ack), self.timeout)

    async def _receive(self, stream: Stream) -> None:
        self._counts["offers"] += 1
        limit = header_limit(self.max_size, MIN_CHUNK_SIZE, extra=MAX_ENVELOPE)
        raw = await receive_frame(stream, limit, self.timeout)
        offer = decode(bytes(raw), PushOffer, header_limits(len(raw)))
        try:
            msg, envelope = open_envelope(offer.envelope, self.kind.message)
        except (WireError, CryptoError) as exc:
            await self._reply(stream, "refuse", f"invalid envelope: {exc}")
            return
        _, size = self.kind.blob(msg)
        if size > self.max_size:
            await self._reply(stream, "refuse", f"blob of {size} bytes exceeds {self.max_size}")
            return
        if len(offer.chunks) != chunk_count(size, offer.chunk_size):
            raise RemoteProtocolError("the chunk list does not fit the blob's size")
        if self._active >= self.max_concurrent:
            await self._reply(stream, "refuse", "busy")
            return
        reason = self.admit(msg, envelope)
        if reason is not None:
            await self._reply(stream, "refuse", reason)
            return
        self._active += 1
        outcome = "cancelled"
        try:
            failure = await self._transfer(stream, offer, msg)
            if failure is not None:
                outcome = failure
                return
            reason = await self.on_stored(msg, envelope) if self.on_stored else None
            if reason is not None:
                self.store.unpin(self.kind.blob(msg)[0])
                outcome = f"rejected: {reason}"
                await self._ack(stream, "rejected", reason)
                return
            # Taken into account: if the ack is lost now, the sender retries and admit sees a
            # duplicate; the push is not abandoned.
            outcome = "stored"
            await self._ack(stream, "stored")
        except PEER_ERRORS as exc:
            if outcome == "cancelled":
                outcome = str(exc)
            raise
        finally:
            self._active -= 1
            if outcome != "stored" and self.on_abandoned is not None:
                self.on_abandoned(msg, outcome)

    async def _transfer(self, stream: Stream, offer: PushOffer, msg: M) -> str | None:
        """Receive, verify, store and pin an admitted push's blob; ``None`` once it is stored,
        else why not."""
        key, size = self.kind.blob(msg)
        if self.store.has(key):
            self.store.pin(key)
            await self._reply(stream, "have")
            return None
        await self._reply(stream, "accept")
        with self.store.open_partial(key) as partial:

            def on_chunk(n: int) -> None:
                self._bytes_received += n

            try:
                await receive_chunks(
                    stream,
                    partial,
                    offer.chunks,
                    chunk_size=offer.chunk_size,
                    size=size,
                    stall_timeout=self.stall_timeout,
                    on_chunk=on_chunk,
                )
            except ChunkMismatch as exc:
                self._counts["rejected"] += 1
                log.info("push from %s: %s", stream.remote_peer, exc)
                await abort(stream)
                return f"tampered: {exc}"
            try:
                await run_io(sync_cost(self.store), partial.commit, True)
            except TransferError as exc:
                await self._ack(stream, "rejected", f"the blob does not match its digest: {exc}")
                return "rejected: digest mismatch"
        return None


async def _close(stream: Stream) -> None:
    try:
        await stream.aclose()
    except TransportError:
        pass


def serve_push(
    host: Host,
    store: BlobStore,
    admit: Admit[ModelUpdate],
    *,
    on_stored: OnStored[ModelUpdate] | None = None,
    on_abandoned: OnAbandoned[ModelUpdate] | None = None,
    max_size: int = 1 << 30,
    max_concurrent: int = 16,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
) -> PushServer[ModelUpdate]:
    """Register a :class:`PushServer` for client updates (``/fednode/push/1.0.0``) on ``host``;
    returns it (for statistics)."""
    server = PushServer(
        store,
        admit,
        on_stored=on_stored,
        on_abandoned=on_abandoned,
        max_size=max_size,
        max_concurrent=max_concurrent,
        timeout=timeout,
        stall_timeout=stall_timeout,
        kind=UPDATES,
    )
    host.set_stream_handler(UPDATES.protocol, server.handle)
    return server


def serve_partials(
    host: Host,
    store: BlobStore,
    admit: Admit[PartialAggregate],
    *,
    on_stored: OnStored[PartialAggregate] | None = None,
    on_abandoned: OnAbandoned[PartialAggregate] | None = None,
    max_size: int = 1 << 30,
    max_concurrent: int = 64,
    timeout: float = 10.0,
    stall_timeout: float = 30.0,
) -> PushServer[PartialAggregate]:
    """Register a :class:`PushServer` for combiners' partial aggregates
    (``/fednode/partial/1.0.0``) on ``host``; returns it (for statistics)."""
    server = PushServer(
        store,
        admit,
        on_stored=on_stored,
        on_abandoned=on_abandoned,
        max_size=max_size,
        max_concurrent=max_concurrent,
        timeout=timeout,
        stall_timeout=stall_timeout,
        kind=PARTIALS,
    )
    host.set_stream_handler(PARTIALS.protocol, server.handle)
    return server


__all__ = [
    "PARTIALS",
    "PARTIAL_PROTOCOL",
    "PUSH_PROTOCOL",
    "UPDATES",
    "Admit",
    "OnAbandoned",
    "OnStored",
    "PushKind",
    "PushResult",
    "PushServer",
    "PushServerStatistics",
    "push_partial",
    "push_signed",
    "push_update",
    "serve_partials",
    "serve_push",
]
