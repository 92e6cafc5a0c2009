"""Net layer: yamux frames (``/yamux/1.0.0``, hashicorp's spec) as plain data, sans-IO.

:class:`FrameDecoder` turns a yamux byte stream, fed in pieces of any size (one per Noise
message, say), into events; a DATA frame's body comes out as it arrives, in slices of the pieces
fed (no copy, no waiting for the whole frame), so a frame may span any number of pieces and a
piece hold any number of frames. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">BBHII")  # version, type, flags, stream id, length
HEADER_SIZE = HEADER.size
VERSION = 0

TYPE_DATA = 0x0
TYPE_WINDOW_UPDATE = 0x1
TYPE_PING = 0x2
TYPE_GO_AWAY = 0x3

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GO_AWAY_NORMAL = 0x0
GO_AWAY_PROTOCOL_ERROR = 0x1

INITIAL_WINDOW = 256 * 1024
"""Every stream's window before any update, in both directions (the spec's 256 KiB)."""


class YamuxProtocolError(Exception):
    """The peer broke the yamux protocol; the connection cannot continue."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    type: int
    flags: int
    stream_id: int
    length: int


@dataclass(frozen=True, slots=True)
class FrameStarted:
    """A frame's header. For all but DATA frames this is the whole frame."""

    header: FrameHeader


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Part of a DATA frame's body, a slice of a piece that was fed."""

    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class DataEnded:
    """The DATA frame ``header`` is complete (its flags take effect now)."""

    header: FrameHeader


FrameEvent = FrameStarted | DataReceived | DataEnded


def encode_header(type_: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, type_, flags, stream_id, length)


class FrameDecoder:
    """Incremental yamux frame decoder.

    Args:
        max_data: largest DATA frame accepted; a larger one is a :class:`YamuxProtocolError`
            (receive windows bound it anyway; this bounds it before any stream is looked up).
    """

    def __init__(self, max_data: int) -> None:
        self._max_data = max_data
        self._partial_header = bytearray()
        self._data: FrameHeader | None = None  # the DATA frame whose body is coming
        self._left = 0

    def whole_data_frame(self, piece: memoryview) -> tuple[int, int, memoryview] | None:
        """``(stream_id, flags, body)`` if nothing is pending and ``piece`` is exactly one DATA
        frame (the common case: a peer that fills each Noise message with one frame), else None
        (then :meth:`feed` it). Taking this answer counts as feeding the piece."""
        if self._data is not None or self._partial_header or len(piece) < HEADER_SIZE:
            return None
        version, type_, flags, stream_id, length = HEADER.unpack_from(piece)
        if version != VERSION or type_ != TYPE_DATA or HEADER_SIZE + length != len(piece):
            return None
        if length > self._max_data:
            return None  # feed() raises
        return stream_id, flags, piece[HEADER_SIZE:]

    def feed(self, piece: bytes | bytearray | memoryview) -> list[FrameEvent]:
        """Events for everything ``piece`` completes or continues.

        Raises:
            YamuxProtocolError: an unknown version or type, or an oversized DATA frame.
        """
        view = memoryview(piece).cast("B")
        size = len(view)
        position = 0
        events: list[FrameEvent] = []
        while True:
            data = self._data
            if data is not None:
                take = min(self._left, size - position)
                if take:
                    events.append(DataReceived(data.stream_id, view[position : position + take]))
                    position += take
                    self._left -= take
                if self._left:
                    return events
                events.append(DataEnded(data))
                self._data = None
            if position == size:
                return events
            if self._partial_header or size - position < HEADER_SIZE:
                need = HEADER_SIZE - len(self._partial_header)
                self._partial_header += view[position : position + need]
                position = min(size, position + need)
                if len(self._partial_header) < HEADER_SIZE:
                    return events
                fields = HEADER.unpack(self._partial_header)
                self._partial_header.clear()
            else:
                fields = HEADER.unpack_from(view, position)
                position += HEADER_SIZE
            header = self._check(*fields)
            events.append(FrameStarted(header))
            if header.type == TYPE_DATA:
                self._data = header
                self._left = header.length

    def _check(
        self, version: int, type_: int, flags: int, stream_id: int, length: int
    ) -> FrameHeader:
        if version != VERSION:
            raise YamuxProtocolError(f"yamux version {version}")
        if type_ > TYPE_GO_AWAY:
            raise YamuxProtocolError(f"unknown yamux frame type {type_}")
        if type_ == TYPE_DATA and length > self._max_data:
            raise YamuxProtocolError(f"a {length}-byte DATA frame")
        return FrameHeader(type_, flags, stream_id, length)
