"""Wire layer: a structural check of untrusted CBOR before cbor2 decodes it.

It walks the item headers only (byte strings are skipped by length, never read) and rejects, with
a :class:`WireError` naming the offset, anything that is not deterministic CBOR (RFC 8949 §4.2.1)
or exceeds the limits: truncation, reserved or indefinite lengths, non-minimal heads, unsorted or
duplicate map keys, non-shortest floats, tags outside the allowed set, too deep, too many items.
Because every declared length is checked against the bytes that remain, the decoder that runs
after it never allocates for data that is not there. No trio, no libp2p.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fednode.errors import WireError

#: Tags a fednode message may carry: 40 (RFC 8746 multi-dimensional array) and the RFC 8746
#: typed arrays we decode (uint8/16/32/64, sint8/16/32/64, float16/32/64, both byte orders).
ALLOWED_TAGS = frozenset(
    {40, *range(64, 72), *range(72, 76), *range(77, 80), 80, 81, 82, 84, 85, 86}
)

_MIN_FOR_AI = {24: 24, 25: 0x100, 26: 0x10000, 27: 0x1_0000_0000}
_HEAD_LEN = {24: 1, 25: 2, 26: 4, 27: 8}


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds applied to one frame before decoding.

    Attributes:
        max_frame: largest accepted frame in bytes.
        max_depth: deepest nesting of arrays, maps and tags.
        max_items: most items in one array or map.
        max_total_items: most items (of any kind) in the whole frame.
    """

    max_frame: int = 1 << 20
    max_depth: int = 16
    max_items: int = 65_536
    max_total_items: int = 1_000_000


#: Control-plane messages (heartbeats, plans, envelopes of headers): well under gossipsub's 1 MiB.
CONTROL_LIMITS = Limits()
#: Model blobs: up to 4 GiB of tensors.
BLOB_LIMITS = Limits(max_frame=4 << 30, max_depth=8, max_items=1_000_000)


class _Scanner:
    __slots__ = ("buf", "end", "limits", "pos", "total")

    def __init__(self, buf: memoryview, limits: Limits) -> None:
        self.buf = buf
        self.end = len(buf)
        self.limits = limits
        self.pos = 0
        self.total = 0

    def fail(self, reason: str, at: int) -> WireError:
        return WireError(f"{reason} (at byte {at})")

    def head(self) -> tuple[int, int, int]:
        """Read one item head: (major type, additional info, argument)."""
        start = self.pos
        if start >= self.end:
            raise self.fail("truncated: item expected", start)
        ib = self.buf[start]
        major, ai = ib >> 5, ib & 31
        self.pos = start + 1
        if ai < 24:
            return major, ai, ai
        if ai == 31:
            raise self.fail("indefinite length is not allowed", start)
        n = _HEAD_LEN.get(ai)
        if n is None:
            raise self.fail(f"reserved additional information {ai}", start)
        if self.pos + n > self.end:
            raise self.fail("truncated head", start)
        arg = int.from_bytes(self.buf[self.pos : self.pos + n], "big")
        self.pos += n
        if major != 7 and arg < _MIN_FOR_AI[ai]:
            raise self.fail("non-minimal integer or length encoding", start)
        return major, ai, arg

    def item(self, depth: int) -> None:
        self.total += 1
        if self.total > self.limits.max_total_items:
            raise self.fail(f"more than {self.limits.max_total_items} items", self.pos)
        start = self.pos
        major, ai, arg = self.head()
        if major in (0, 1):
            return
        if major in (2, 3):
            if arg > self.end - self.pos:
                raise self.fail(f"truncated: string of {arg} bytes declared", start)
            self.pos += arg
            return
        if major == 7:
            self.simple(start, ai, arg)
            return
        if depth >= self.limits.max_depth:
            raise self.fail(f"nesting deeper than {self.limits.max_depth}", start)
        if major == 4:
            self.count(arg, 1, start)
            for _ in range(arg):
                self.item(depth + 1)
        elif major == 5:
            self.count(arg, 2, start)
            prev: bytes | None = None
            for _ in range(arg):
                k0 = self.pos
                self.item(depth + 1)
                key = bytes(self.buf[k0 : self.pos])
                if prev is not None and key <= prev:
                    reason = (
                        "duplicate map key" if key == prev else "map keys not in canonical order"
                    )
                    raise self.fail(reason, k0)
                prev = key
                self.item(depth + 1)
        else:  # major 6: tag
            if arg not in ALLOWED_TAGS:
                raise self.fail(f"tag {arg} is not allowed", start)
            self.item(depth + 1)

    def count(self, n: int, min_bytes_each: int, start: int) -> None:
        if n > self.limits.max_items:
            raise self.fail(f"container of {n} items exceeds {self.limits.max_items}", start)
        if n * min_bytes_each > self.end - self.pos:
            raise self.fail(f"truncated: container of {n} items declared", start)

    def simple(self, start: int, ai: int, arg: int) -> None:
        if ai in (20, 21, 22):  # false, true, null
            return
        if ai == 25:
            if (arg & 0x7C00) == 0x7C00 and (arg & 0x03FF) and arg != 0x7E00:
                raise self.fail("NaN not in its canonical form f97e00", start)
            return  # otherwise half precision is always the shortest form
        if ai == 26:
            (value,) = struct.unpack(">f", arg.to_bytes(4, "big"))
            if value != value or _fits_half(value):
                raise self.fail("float not in its shortest form", start)
            return
        if ai == 27:
            (value,) = struct.unpack(">d", arg.to_bytes(8, "big"))
            if value != value or _fits_single(value):
                raise self.fail("float not in its shortest form", start)
            return
        raise self.fail(f"simple value {arg} is not allowed", start)


def _fits_half(value: float) -> bool:
    try:
        return bool(struct.unpack(">e", struct.pack(">e", value))[0] == value)
    except OverflowError:
        return False


def _fits_single(value: float) -> bool:
    try:
        return bool(struct.unpack(">f", struct.pack(">f", value))[0] == value)
    except OverflowError:
        return False


def check_frame(data: bytes | bytearray | memoryview, limits: Limits = CONTROL_LIMITS) -> None:
    """Raise :class:`WireError` unless ``data`` is exactly one deterministic CBOR item in bounds."""
    if len(data) > limits.max_frame:
        raise WireError(f"frame of {len(data)} bytes exceeds the {limits.max_frame}-byte limit")
    scanner = _Scanner(memoryview(data).cast("B"), limits)
    scanner.item(0)
    if scanner.pos != scanner.end:
        raise WireError(f"{scanner.end - scanner.pos} trailing bytes after the message")
