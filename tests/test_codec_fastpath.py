"""The spliced model encoding is byte for byte plain canonical cbor2 and copies each tensor once."""

from __future__ import annotations

import io
import tracemalloc
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.wire import BLOB_LIMITS, ModelBlob, decode, encode, encode_model
from fednode.wire.arrays import BFLOAT16, DTYPE_TAGS, SPLICE_MIN_BYTES, Splicer, _bytes_head

DTYPES = [np.dtype(name) for name in DTYPE_TAGS] + [BFLOAT16]


def plain(model: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """The reference: cbor2's canonical encoding of the tree with every tensor's bytes in it."""
    return cbor2.dumps({"tensors": encode_model(model), "type": "model", "v": 1}, canonical=True)


def random_array(
    rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...], layout: str
) -> np.ndarray[Any, Any]:
    """Random bits (NaNs, infinities and all) of ``dtype``, laid out as asked."""
    count = int(np.prod(shape))
    array = np.frombuffer(rng.bytes(count * dtype.itemsize), dtype=dtype).reshape(shape)
    if layout == "big-endian" and dtype.itemsize > 1 and dtype != BFLOAT16:
        return array.byteswap().view(dtype.newbyteorder(">"))
    if layout == "transposed":
        return array.T
    if layout == "strided" and array.ndim:
        doubled = np.repeat(array, 2, axis=0)
        return doubled[::2]
    return array


@st.composite
def models(draw: st.DrawFn) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    model: dict[str, np.ndarray[Any, Any]] = {}
    for i in range(draw(st.integers(0, 8))):
        dtype = draw(st.sampled_from(DTYPES))
        # Dimensions from empty through sizes on both sides of SPLICE_MIN_BYTES and past 65535
        # bytes, so every byte-string head form a tensor can get is exercised.
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 64, 300]), max_size=3)))
        if draw(st.booleans()):
            shape = (draw(st.integers(0, 40_000 // dtype.itemsize)),)
        layout = draw(st.sampled_from(["plain", "big-endian", "transposed", "strided"]))
        model[f"layer{i}.{dtype.name}"] = random_array(rng, dtype, shape, layout)
    return model


@settings(max_examples=150, deadline=None)
@given(models())
def test_spliced_encoding_is_plain_canonical_cbor(model: dict[str, np.ndarray[Any, Any]]) -> None:
    # Prepare
    expected = plain(model)

    # Execute
    blob = encode(ModelBlob(tensors=model))  # type: ignore[arg-type]

    # Assert
    assert blob == expected
    decoded = decode(blob, ModelBlob, BLOB_LIMITS).tensors
    assert list(decoded) == list(model)
    for name, array in model.items():
        assert decoded[name].dtype == array.dtype.newbyteorder("<") or array.dtype == BFLOAT16
        assert decoded[name].shape == array.shape
        want = array.astype(decoded[name].dtype).tobytes()
        assert decoded[name].tobytes() == want


def test_every_dtype_and_edge_shape_at_once() -> None:
    # Prepare: each dtype as 0-d, empty, just under, at and over the splice threshold, big-endian
    rng = np.random.default_rng(7)
    model: dict[str, np.ndarray[Any, Any]] = {}
    for dtype in DTYPES:
        under = SPLICE_MIN_BYTES // dtype.itemsize - 1
        for label, shape in [
            ("scalar", ()),
            ("empty", (0, 5)),
            ("under", (under,)),
            ("at", (under + 1,)),
            ("big", (3, 7, 1000)),
        ]:
            for layout in ("plain", "big-endian"):
                name = f"{dtype.name}.{label}.{layout}"
                model[name] = random_array(rng, dtype, shape, layout)

    # Execute
    blob = encode(ModelBlob(tensors=model))  # type: ignore[arg-type]

    # Assert
    assert blob == plain(model)


def test_placeholders_filled_by_index_not_by_order() -> None:
    # Prepare: canonical map order ("a" before "b") is the reverse of the order dumped
    rng = np.random.default_rng(1)
    first = {"w": random_array(rng, np.dtype("float32"), (5000,), "plain")}
    second = {"w": random_array(rng, BFLOAT16, (3000,), "plain")}
    splicer = Splicer()
    tree = {"b": encode_model(first, splicer), "a": encode_model(second, splicer)}
    reference = {"b": encode_model(first), "a": encode_model(second)}

    # Execute
    spliced = splicer.splice(cbor2.dumps(tree, canonical=True))

    # Assert
    assert len(splicer) == 2
    assert spliced == cbor2.dumps(reference, canonical=True)


def test_marker_found_in_other_bytes_gives_up() -> None:
    # Prepare: a small tensor (copied inline) whose bytes contain the placeholder marker
    prefix = bytes(range(1, 13))
    small = np.frombuffer(b"\x50" + prefix + b"\x00\x00\x00\x00" + bytes(3), dtype=np.uint8)
    big = np.ones(SPLICE_MIN_BYTES, dtype=np.uint8)
    splicer = Splicer(prefix)
    tree = encode_model({"small": small, "big": big}, splicer)

    # Execute
    spliced = splicer.splice(cbor2.dumps(tree, canonical=True))

    # Assert
    assert len(splicer) == 1
    assert spliced is None


def test_encode_falls_back_when_the_marker_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: force the "random" prefix to one the model's own bytes contain
    prefix = bytes(range(1, 13))
    small = np.frombuffer(b"\x50" + prefix + b"\x00\x00\x00\x00" + bytes(3), dtype=np.uint8)
    model = {"small": small, "big": np.arange(SPLICE_MIN_BYTES, dtype=np.uint8)}
    monkeypatch.setattr("fednode.wire.arrays.os.urandom", lambda n: prefix)

    # Execute
    blob = encode(ModelBlob(tensors=model))  # type: ignore[arg-type]

    # Assert
    assert blob == plain(model)


@pytest.mark.parametrize(
    "n",
    [0, 23, 24, 255, 256, 4096, 65535, 65536, 2**32 - 1, 2**32, 2**40, 2**64 - 1],
)
def test_byte_string_head_is_cbor2s(n: int) -> None:
    # Prepare
    out = io.BytesIO()
    cbor2.CBOREncoder(out).encode_length(2, n)

    # Execute
    head = _bytes_head(n)

    # Assert
    assert head == out.getvalue()


def test_encode_copies_tensor_bytes_once() -> None:
    # Prepare: 16 MB; the plain path holds a second copy of it (the bytes in the value tree)
    model = {f"w{i}": np.full((1 << 20,), i, dtype=np.float32) for i in range(4)}
    msg = ModelBlob(tensors=model)  # type: ignore[arg-type]
    size = len(encode(msg))

    # Execute
    tracemalloc.start()
    try:
        blob = encode(msg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Assert
    assert blob == plain(model)
    assert peak < 1.25 * size
