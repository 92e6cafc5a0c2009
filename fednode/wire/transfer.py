"""Wire layer: the data-plane messages of ``/fednode/blob/1.0.0`` and ``/fednode/push/1.0.0``.

Both protocols move a blob as fixed-size chunks; the header of a transfer lists the BLAKE3-256
digest of every chunk so the receiver checks each chunk as it lands (the scheme is in
``protocols/wire.md``, "Data plane"). The blob's address stays BLAKE3-256 of its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fednode.wire.schema import Digest, message

#: Smallest, default and largest chunk sizes; a chunk size is a power of two in this range.
MIN_CHUNK_SIZE = 16 << 10
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
#: Most chunks one transfer may list (64 GiB at the default chunk size).
MAX_CHUNKS = 1 << 16
#: A chunk digest costs 34 bytes of CBOR (2-byte head + 32); the rest of a header fits in this.
_HEADER_SLACK = 512


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ValueError(reason)


def valid_chunk_size(chunk_size: int) -> bool:
    """A power of two between :data:`MIN_CHUNK_SIZE` and :data:`MAX_CHUNK_SIZE`."""
    return MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a blob of ``size`` bytes has (the last one may be short)."""
    return -(-size // chunk_size)


def header_limit(max_size: int, chunk_size: int, extra: int = 0) -> int:
    """The largest header frame a transfer of at most ``max_size`` bytes can need."""
    return _HEADER_SLACK + extra + 34 * min(MAX_CHUNKS, chunk_count(max_size, chunk_size))


@message("blob-request")
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobRequest:
    """Ask a holder for a blob's bytes from ``offset`` on, cut into ``chunk_size`` chunks.

    ``offset`` is a multiple of ``chunk_size`` (a resumed fetch continues at a chunk boundary);
    ``max_size`` is the largest blob the asker accepts.
    """

    digest: Digest
    offset: int
    max_size: int
    chunk_size: int

    def __post_init__(self) -> None:
        _require(valid_chunk_size(self.chunk_size), "chunk_size must be a power of two in range")
        _require(
            self.offset >= 0 and self.offset % self.chunk_size == 0,
            "offset must be a chunk boundary",
        )
        _require(self.max_size >= 0, "max_size must be non-negative")


BlobStatus = Literal["ok", "not-found", "too-large", "busy"]


@message("blob-response")
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobResponse:
    """A holder's answer. With ``ok``, ``size - offset`` raw bytes follow on the stream.

    ``chunks`` lists the digest of every chunk of the whole blob (not only from ``offset``), so a
    resuming fetcher can check the list against the chunks it already holds. Other statuses carry
    zeros and an empty list.
    """

    status: BlobStatus
    size: int
    offset: int
    chunk_size: int
    chunks: tuple[Digest, ...]

    def __post_init__(self) -> None:
        _require(self.size >= 0 and self.offset >= 0, "size and offset must be non-negative")
        if self.status == "ok":
            _require(
                valid_chunk_size(self.chunk_size), "chunk_size must be a power of two in range"
            )
            _require(self.offset <= self.size, "offset beyond the blob")
            _require(
                len(self.chunks) == chunk_count(self.size, self.chunk_size), "one digest per chunk"
            )
        else:
            _require(
                self.size == self.offset == self.chunk_size == 0 and not self.chunks,
                "only ok carries a blob",
            )


@message("push-offer")
@dataclass(frozen=True, slots=True, kw_only=True)
class PushOffer:
    """A signed update offered to a combiner, before any of its bytes.

    ``envelope`` is the canonical encoding of the :class:`~fednode.wire.Envelope` that signs the
    :class:`~fednode.wire.ModelUpdate`; the blob it names (``update``, ``size``) follows as raw
    bytes once the receiver accepts, cut into ``chunk_size`` chunks whose digests are ``chunks``.
    """

    envelope: bytes
    chunk_size: int
    chunks: tuple[Digest, ...]

    def __post_init__(self) -> None:
        _require(valid_chunk_size(self.chunk_size), "chunk_size must be a power of two in range")
        _require(len(self.chunks) <= MAX_CHUNKS, "too many chunks")


PushStatus = Literal["accept", "have", "refuse"]


@message("push-reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class PushReply:
    """The receiver's decision, sent before any blob bytes flow.

    ``accept``: send the bytes. ``have``: the receiver already holds the blob; send nothing and
    wait for the ack. ``refuse``: ``reason`` says why (wrong round, not assigned, over capacity,
    duplicate, too large); the stream ends.
    """

    status: PushStatus
    reason: str


AckStatus = Literal["stored", "rejected"]


@message("push-ack")
@dataclass(frozen=True, slots=True, kw_only=True)
class PushAck:
    """Sent last: ``stored`` once the blob verified and is on the receiver's disk, taken into
    account; ``rejected`` with a ``reason`` otherwise. No ack means the push failed."""

    status: AckStatus
    reason: str


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "AckStatus",
    "BlobRequest",
    "BlobResponse",
    "BlobStatus",
    "PushAck",
    "PushOffer",
    "PushReply",
    "PushStatus",
    "chunk_count",
    "header_limit",
    "valid_chunk_size",
]
