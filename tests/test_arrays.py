"""Wire arrays: RFC 8746 tags, edge shapes, exact bits, and decoding without a second copy."""

from __future__ import annotations

import tracemalloc
from typing import Any

import cbor2
import ml_dtypes
import numpy as np
import pytest

from fednode.errors import WireError
from fednode.wire import (
    BLOB_LIMITS,
    ModelBlob,
    decode,
    decode_array,
    decode_value,
    encode,
    encode_array,
)

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

#: RFC 8746 section 2.1: the little-endian typed-array tag of each dtype.
LITTLE_ENDIAN_TAGS = {
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
#: The big-endian (and clamped uint8) tags, which decode too.
OTHER_TAGS = {
    "uint8": 68,
    "uint16": 65,
    "uint32": 66,
    "uint64": 67,
    "int16": 73,
    "int32": 74,
    "int64": 75,
    "float16": 80,
    "float32": 81,
    "float64": 82,
}
DTYPES = [np.dtype(name) for name in LITTLE_ENDIAN_TAGS] + [BFLOAT16]


def round_trip(model: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    return decode(encode(ModelBlob(tensors=model)), ModelBlob, BLOB_LIMITS).tensors


def from_bits(dtype: np.dtype[Any], bits: list[int]) -> np.ndarray[Any, Any]:
    """An array of ``dtype`` holding exactly these bit patterns."""
    unsigned = np.dtype(f"<u{dtype.itemsize}")
    return np.array(bits, dtype=unsigned).view(dtype)


@pytest.mark.parametrize(("name", "tag"), sorted(LITTLE_ENDIAN_TAGS.items()))
def test_an_array_travels_as_tag_40_around_its_little_endian_typed_array(
    name: str, tag: int
) -> None:
    # Prepare
    array = np.arange(6, dtype=name).reshape(2, 3)

    # Execute
    value = encode_array(array)

    # Assert
    assert value == cbor2.CBORTag(
        40, [[2, 3], cbor2.CBORTag(tag, array.astype(array.dtype.newbyteorder("<")).tobytes())]
    )


def test_bfloat16_travels_as_a_map_of_dtype_shape_and_data() -> None:
    # Prepare
    array = np.array([[1.0, -2.5]], dtype=BFLOAT16)

    # Execute
    value = encode_array(array)

    # Assert
    assert value == {"dtype": "bfloat16", "shape": [1, 2], "data": bytes.fromhex("803f20c0")}


@pytest.mark.parametrize(("name", "tag"), sorted(OTHER_TAGS.items()))
def test_big_endian_and_clamped_tags_decode_to_the_same_values(name: str, tag: int) -> None:
    # Prepare
    array = np.arange(5, dtype=name) * 3
    big = array.astype(array.dtype.newbyteorder(">"))
    frame = cbor2.dumps(cbor2.CBORTag(40, [[5], cbor2.CBORTag(tag, big.tobytes())]))

    # Execute
    decoded = decode_array(decode_value(frame))

    # Assert
    assert decoded.dtype == np.dtype(name).newbyteorder("<")
    assert decoded.tolist() == array.tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_byte_order_and_layout_of_the_input_do_not_change_the_encoding(
    dtype: np.dtype[Any],
) -> None:
    # Prepare
    array = np.arange(12).astype(dtype).reshape(3, 4)
    variants = [np.asfortranarray(array), np.repeat(array, 2, axis=1)[:, ::2]]
    if dtype.itemsize > 1 and dtype != BFLOAT16:
        variants.append(array.astype(dtype.newbyteorder(">")))

    # Execute
    frames = {encode(ModelBlob(tensors={"w": v})) for v in [array, *variants]}

    # Assert
    assert len(frames) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 2, 5), (1, 1, 1, 1)], ids=str)
def test_zero_dimensional_and_empty_arrays_round_trip(
    dtype: np.dtype[Any], shape: tuple[int, ...]
) -> None:
    # Prepare
    array = np.full(shape, 3, dtype=dtype)

    # Execute
    decoded = round_trip({"t": array})["t"]

    # Assert
    assert decoded.dtype == dtype
    assert decoded.shape == shape
    assert decoded.tobytes() == array.tobytes()


SPECIAL_BITS = {
    # +inf, -inf, quiet NaN, signalling NaN, NaN with payload and sign, -0.0, smallest subnormal
    np.dtype("float16"): [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE5A, 0x8000, 0x0001],
    np.dtype("float32"): [
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0x7F800001,
        0xFFC0BEEF,
        0x80000000,
        0x1,
    ],
    np.dtype("float64"): [
        0x7FF0000000000000,
        0xFFF0000000000000,
        0x7FF8000000000000,
        0x7FF0000000000001,
        0xFFF80000DEADBEEF,
        0x8000000000000000,
        0x1,
    ],
    BFLOAT16: [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC5, 0x8000, 0x0001],
}


@pytest.mark.parametrize("dtype", sorted(SPECIAL_BITS, key=str), ids=str)
def test_nan_inf_and_subnormal_bit_patterns_survive(dtype: np.dtype[Any]) -> None:
    # Prepare
    array = from_bits(dtype, SPECIAL_BITS[dtype])

    # Execute
    decoded = round_trip({"t": array})["t"]

    # Assert
    assert decoded.view(f"<u{dtype.itemsize}").tolist() == SPECIAL_BITS[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integer_extremes_survive(dtype: np.dtype[Any]) -> None:
    # Prepare
    array = from_bits(dtype, [0, 1, (1 << 8 * dtype.itemsize) - 1, 1 << (8 * dtype.itemsize - 1)])

    # Execute
    decoded = round_trip({"t": array})["t"]

    # Assert
    assert decoded.tobytes() == array.tobytes()


def test_a_model_keeps_its_tensor_order() -> None:
    # Prepare
    names = ["z.weight", "a.bias", "m", "b"]
    model = {name: np.full(2, i, dtype="float32") for i, name in enumerate(names)}

    # Execute
    decoded = round_trip(model)

    # Assert
    assert list(decoded) == names
    assert [int(a[0]) for a in decoded.values()] == [0, 1, 2, 3]


def test_models_with_the_same_tensors_in_another_order_encode_differently() -> None:
    # Prepare
    first = {"a": np.zeros(1, "uint8"), "b": np.ones(1, "uint8")}
    second = dict(reversed(first.items()))

    # Execute
    frames = encode(ModelBlob(tensors=first)), encode(ModelBlob(tensors=second))

    # Assert
    assert frames[0] != frames[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoded_arrays_are_read_only(dtype: np.dtype[Any]) -> None:
    # Prepare
    array = np.zeros(4, dtype=dtype)

    # Execute
    decoded = round_trip({"t": array})["t"]

    # Assert
    assert not decoded.flags.writeable


@pytest.mark.parametrize(
    "dtype", [np.dtype(bool), np.dtype("complex64"), np.dtype("<U2"), np.dtype(object)], ids=str
)
def test_a_dtype_the_wire_cannot_carry_is_refused(dtype: np.dtype[Any]) -> None:
    # Prepare
    array = np.zeros(2, dtype=dtype)

    # Execute / Assert
    with pytest.raises(WireError):
        encode_array(array)


@pytest.mark.parametrize("dtype", [np.dtype("float32"), BFLOAT16], ids=str)
def test_a_large_array_decodes_without_a_second_copy(dtype: np.dtype[Any]) -> None:
    # Prepare
    array = np.arange(8 << 20, dtype="float32").astype(dtype)  # 32 MiB or 16 MiB
    frame = encode(ModelBlob(tensors={"big": array}))
    tracemalloc.start()

    # Execute
    try:
        decoded = decode(frame, ModelBlob, BLOB_LIMITS).tensors["big"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: cbor2's copy out of the frame is the only one; numpy views it
    assert peak < 1.5 * array.nbytes
    assert not decoded.flags.owndata
    assert decoded.tobytes() == array.tobytes()
