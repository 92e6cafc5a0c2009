"""Wire layer: numpy arrays and models as CBOR values.

An array is an RFC 8746 row-major multi-dimensional array, ``#6.40([shape, typed-array])``, its
data a little-endian typed array (tags 64-86). bfloat16 has no RFC 8746 tag, so it travels as
``{"dtype": "bfloat16", "shape": [...], "data": bytes}``. A model is an ordered map name -> array;
since canonical CBOR sorts map keys, it is encoded as an array of ``[name, array]`` pairs.

Decoding takes the byte strings cbor2 produced and wraps them with ``np.frombuffer``: the tensor
bytes are copied once (by cbor2, out of the frame) and never again. Decoded arrays are read-only.
Encoding with a :class:`Splicer` copies them once too: large tensors enter the value tree as
placeholders, and the splicer puts their bytes in place of those in cbor2's output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from cbor2 import CBORTag

from fednode.errors import WireError

BFLOAT16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
_BFLOAT16_BITS = np.dtype("<u2")  # bfloat16 on the wire: little-endian 16-bit patterns

#: numpy dtype name -> RFC 8746 little-endian typed-array tag.
DTYPE_TAGS: dict[str, int] = {
    "uint8": 64,
    "uint16": 69,
    "uint32": 70,
    "uint64": 71,
    "int8": 72,
    "int16": 77,
    "int32": 78,
    "int64": 79,
    "float16": 84,
    "float32": 85,
    "float64": 86,
}
_TAG_DTYPES: dict[int, np.dtype[Any]] = {
    tag: np.dtype(name).newbyteorder("<") for name, tag in DTYPE_TAGS.items()
}
# Big-endian variants (and the clamped uint8, 68) decode too, at the cost of a byte swap.
_TAG_DTYPES.update(
    {
        68: np.dtype("uint8"),
        65: np.dtype(">u2"),
        66: np.dtype(">u4"),
        67: np.dtype(">u8"),
        73: np.dtype(">i2"),
        74: np.dtype(">i4"),
        75: np.dtype(">i8"),
        80: np.dtype(">f2"),
        81: np.dtype(">f4"),
        82: np.dtype(">f8"),
    }
)
SUPPORTED_DTYPES = (*DTYPE_TAGS, "bfloat16")

MAX_NDIM = 32
MAX_NAME_LEN = 512


def dtype_name(dtype: np.dtype[Any]) -> str:
    """Our wire name of a numpy dtype, or :class:`WireError` if it cannot travel."""
    if dtype == BFLOAT16:
        return "bfloat16"
    name = dtype.newbyteorder("=").name
    if name not in DTYPE_TAGS:
        supported = ", ".join(SUPPORTED_DTYPES)
        raise WireError(f"dtype {dtype} cannot be encoded (supported: {supported})")
    return name


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a wire dtype name."""
    if name == "bfloat16":
        return BFLOAT16
    if name not in DTYPE_TAGS:
        raise WireError(f"unknown dtype {name!r}")
    little: np.dtype[Any] = np.dtype(name).newbyteorder("<")
    return little


#: Tensors smaller than this are copied into the value tree: cheaper than a placeholder.
SPLICE_MIN_BYTES = 4096
_PLACEHOLDER_HEAD = b"\x50"  # a CBOR byte string of 16 bytes: 12 random, then a 4-byte index


class Splicer:
    """Puts large tensors' bytes into a CBOR encoding without copying them into the value tree.

    :func:`encode_array` hands a tensor's buffer to :meth:`placeholder` and puts the 16-byte string
    it returns in the tree where the data goes; cbor2 encodes that tree (canonically, as ever), and
    :meth:`splice` replaces each encoded placeholder with the byte-string head and the tensor's
    bytes, in one join. Map order depends only on keys, never on these values, so the result is
    byte for byte what cbor2 gives for the tree with the real bytes in it.
    """

    __slots__ = ("_marker", "_parts", "_prefix")

    def __init__(self, prefix: bytes | None = None) -> None:
        if prefix is not None and len(prefix) != 12:
            raise ValueError("a placeholder prefix is 12 bytes")
        self._prefix = prefix  # drawn on first use: most messages carry no large tensor
        self._marker = b""
        self._parts: list[memoryview] = []

    def placeholder(self, data: np.ndarray[Any, Any]) -> bytes:
        """A byte string to encode in place of the C-contiguous ``data`` (kept, not copied)."""
        if not self._marker:
            self._marker = _PLACEHOLDER_HEAD + (self._prefix or os.urandom(12))
        index = len(self._parts)
        self._parts.append(data.reshape(-1).view(np.uint8).data)
        return self._marker[1:] + index.to_bytes(4, "big")

    def __len__(self) -> int:
        return len(self._parts)

    def splice(self, skeleton: bytes) -> bytes | None:
        """``skeleton`` (cbor2's encoding of the tree) with each placeholder filled in.

        None if the placeholders cannot be told apart from other bytes: the marker must occur
        exactly once per placeholder, overlaps counted. Random 12-byte prefixes make that
        astronomically rare; the caller then encodes the real bytes the slow way.
        """
        marker, parts = self._marker, self._parts
        found: list[int] = []
        at = skeleton.find(marker)
        while at >= 0:
            if len(found) == len(parts):
                return None
            found.append(at)
            at = skeleton.find(marker, at + 1)
        if len(found) != len(parts):
            return None
        view = memoryview(skeleton)
        chunks: list[bytes | memoryview] = []
        done = 0
        for at in found:
            end = at + 1 + 16
            part = parts[int.from_bytes(skeleton[end - 4 : end], "big")]
            chunks += (view[done:at], _bytes_head(part.nbytes), part)
            done = end
        chunks.append(view[done:])
        return b"".join(chunks)


def _bytes_head(n: int) -> bytes:
    """The shortest CBOR head of a byte string of ``n`` bytes (major type 2)."""
    if n < 24:
        return bytes([0x40 | n])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([0x40 | ai]) + n.to_bytes(size, "big")
    raise WireError(f"a byte string of {n} bytes is too long for CBOR")


def encode_array(
    array: np.ndarray[Any, Any], splicer: Splicer | None = None
) -> CBORTag | dict[str, Any]:
    """An array as a CBOR value (see the module docstring).

    With a ``splicer``, a large array's data is a placeholder that the splicer fills in later.
    """
    name = dtype_name(array.dtype)
    shape = list(array.shape)
    if name == "bfloat16":  # no numpy byte-order flag for it: go through its 16-bit pattern
        array = array.view(np.uint16).astype("<u2", copy=False)
    else:
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    array = np.ascontiguousarray(array)
    if splicer is not None and array.nbytes >= SPLICE_MIN_BYTES:
        data = splicer.placeholder(array)
    else:
        data = array.tobytes()
    if name == "bfloat16":
        return {"data": data, "dtype": "bfloat16", "shape": shape}
    return CBORTag(40, [shape, CBORTag(DTYPE_TAGS[name], data)])


def _check_shape(shape: Any, path: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise WireError(f"shape must be an array of at most {MAX_NDIM} dimensions", path)
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim >= 1 << 40:
            raise WireError(f"bad dimension {dim!r}", path)
    return tuple(shape)


def _from_bytes(
    data: Any, dtype: np.dtype[Any], shape: tuple[int, ...], path: str
) -> np.ndarray[Any, Any]:
    if not isinstance(data, bytes):
        raise WireError("array data must be a byte string", path)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        need = f"shape {list(shape)} of {dtype} needs {expected} bytes"
        raise WireError(f"{need}, got {len(data)}", path)
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("<"))
        array.flags.writeable = False  # read-only, like every decoded array
    return array


def decode_array(value: Any, path: str = "") -> np.ndarray[Any, Any]:
    """The numpy array a CBOR value encodes, or :class:`WireError`."""
    if isinstance(value, CBORTag):
        if value.tag != 40:
            raise WireError(f"expected a tag-40 array, got tag {value.tag}", path)
        body = value.value
        if not isinstance(body, (list, tuple)) or len(body) != 2:
            raise WireError("tag 40 must hold [shape, typed-array]", path)
        shape = _check_shape(body[0], path)
        typed = body[1]
        if not isinstance(typed, CBORTag) or typed.tag not in _TAG_DTYPES:
            raise WireError("tag 40 data must be an RFC 8746 typed array", path)
        return _from_bytes(typed.value, _TAG_DTYPES[typed.tag], shape, path)
    if isinstance(value, dict):
        if set(value) != {"data", "dtype", "shape"}:
            raise WireError("array map must have exactly dtype, shape and data", path)
        if value["dtype"] != "bfloat16":
            raise WireError(f"array map form is only for bfloat16, not {value['dtype']!r}", path)
        bits = _from_bytes(value["data"], _BFLOAT16_BITS, _check_shape(value["shape"], path), path)
        return bits.astype(np.uint16, copy=False).view(BFLOAT16)
    raise WireError(f"expected an array, got {type(value).__name__}", path)


def encode_model(
    model: Mapping[str, np.ndarray[Any, Any]], splicer: Splicer | None = None
) -> list[list[Any]]:
    """A model (ordered name -> array) as a CBOR array of ``[name, array]`` pairs."""
    return [[name, encode_array(np.asarray(array), splicer)] for name, array in model.items()]


def decode_model(value: Any, path: str = "") -> dict[str, np.ndarray[Any, Any]]:
    """The ordered model a CBOR value encodes, or :class:`WireError`."""
    if not isinstance(value, (list, tuple)):
        raise WireError("a model must be an array of [name, array] pairs", path)
    model: dict[str, np.ndarray[Any, Any]] = {}
    for i, pair in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise WireError("expected a [name, array] pair", where)
        name = pair[0]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            need = f"1 to {MAX_NAME_LEN} characters"
            raise WireError(f"tensor name must be a text string of {need}", where)
        if name in model:
            raise WireError(f"duplicate tensor name {name!r}", where)
        model[name] = decode_array(pair[1], f"{where}.{name}")
    return model
