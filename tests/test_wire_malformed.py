"""Wire codec: malformed, non-canonical or oversized input is a WireError, never another
exception, and never costs memory for data that is not there."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import struct
import tracemalloc
from typing import Any

import cbor2
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fednode.wire
from fednode.crypto import KeyFile  # importing it registers "ed25519-key"
from fednode.errors import WireError
from fednode.wire import (
    BLOB_LIMITS,
    CONTROL_LIMITS,
    REGISTRY,
    BlobHeader,
    Contribution,
    Envelope,
    GlobalModel,
    Limits,
    ModelBlob,
    ModelUpdate,
    PartialAggregate,
    PartialRef,
    TensorInfo,
    check_frame,
    decode,
    encode,
)
from fednode.wire.control import Heartbeat
from fednode.wire.rounds import (
    Assignment,
    BlobRef,
    RoundPlan,
    RoundResult,
    SessionCheckpoint,
    SessionConfig,
    SessionEnded,
)
from fednode.wire.scan import ALLOWED_TAGS
from fednode.wire.status import NodeStatus, PeerStatus
from fednode.wire.transfer import BlobRequest, BlobResponse, PushAck, PushOffer, PushReply

# Every wire module, so REGISTRY holds every message whatever else this session imported.
for _module in pkgutil.iter_modules(fednode.wire.__path__):
    importlib.import_module(f"fednode.wire.{_module.name}")

K1, K2, K3 = (bytes([i]) * 32 for i in (1, 2, 3))
D1, D2, D3 = (bytes([i]) * 32 for i in (0xD1, 0xD2, 0xD3))
NONCE = bytes(range(16))
P1 = "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
P2 = "12D3KooWHHzSeKaY8xuZVzkLbKFfvNgPPeKhFBGrMbNzbm5akpqu"
P3 = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
#: 257 sorted base58 peer IDs: one more than a checkpoint may name.
OVER_MEMBER_CAP = sorted(a + b + c for a in "abc" for b in "abcdefghij" for c in "abcdefghij")[:257]
CONFIG = SessionConfig(
    rounds=10, min_clients=2, max_retries=1, round_deadline_ms=60_000, epochs=1, batch_size=32,
    lr=0.05, aggregator="fedavg", server_optimizer="fedyogi", server_lr=0.01,
    server_momentum=0.0, beta1=0.9, beta2=0.99, tau=1e-3, eval_every=2, seed=7,
    task="fednode.task.digits", partition="dirichlet", alpha=0.5, proximal_mu=0.01,
)  # fmt: skip

#: One valid message of every wire type, exercising every kind of field.
SAMPLES: dict[str, Any] = {
    "envelope": Envelope(
        signer=K1, domain="fednode/model-update/v1", payload=b"\xa0", signature=b"\5" * 64
    ),
    "blob-header": BlobHeader(
        digest=D1,
        size=1234,
        kind="model",
        tensors=(
            TensorInfo(name="w", dtype="float32", shape=(2, 3)),
            TensorInfo(name="b", dtype="bfloat16", shape=()),
        ),
    ),
    "model": ModelBlob(
        tensors={
            "w": np.arange(6, dtype="<f4").reshape(2, 3),
            "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
            "i": np.array(7, dtype="<i8"),
            "e": np.zeros((0, 2), dtype="<u2"),
        }
    ),
    "model-update": ModelUpdate(
        federation="fed",
        session="s1",
        round=3,
        parent=D1,
        update=D2,
        size=1234,
        num_examples=60,
        metrics={"loss": 0.25, "acc": 0.1, "nan": float("nan")},
        signer=K1,
        created_ms=1_700_000_000_000,
        nonce=NONCE,
    ),
    "partial-aggregate": PartialAggregate(
        federation="fed",
        session="s1",
        round=3,
        parent=D1,
        partial=D2,
        size=1234,
        contributions=(
            Contribution(signer=K1, update=D1, weight=10),
            Contribution(signer=K3, update=D3, weight=30),
        ),
        total_weight=40,
        combiner=K2,
        created_ms=1_700_000_000_000,
        nonce=NONCE,
    ),
    "global-model": GlobalModel(
        federation="fed",
        session="s1",
        round=3,
        model=D3,
        size=1234,
        parent=D1,
        partials=(
            PartialRef(combiner=K1, partial=D1, total_weight=40, contributions=D2),
            PartialRef(combiner=K2, partial=D2, total_weight=20, contributions=D3),
        ),
        num_examples=60,
        reducer=K3,
        created_ms=1_700_000_000_000,
    ),
    "ed25519-key": KeyFile(seed=b"\x09" * 32, created_ms=1_700_000_000_000),
    "heartbeat": Heartbeat(
        federation="fed",
        peer="12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB",
        incarnation=1_700_000_000_000,
        seq=5,
        sent_ms=1_700_000_005_000,
        interval_ms=1000,
        role="combiner",
        capacity=8,
        attached=2,
        cpu=0.5,
        memory=0.25,
        bandwidth=1e6,
        region="eu",
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        session="s1",
        round=-1,
    ),
    "round-plan": RoundPlan(
        federation="fed",
        session="s1",
        term=1,
        round=3,
        amendment=1,
        parent=D1,
        parent_size=1234,
        holders=(P1,),
        assignments=(
            Assignment(combiner=P1, clients=(P1, P3)),
            Assignment(combiner=P2, clients=(P2,)),
        ),
        min_clients=2,
        deadline_ms=1_700_000_060_000,
        config=CONFIG,
        reducer=K1,
        created_ms=1_700_000_000_000,
    ),
    "round-result": RoundResult(
        federation="fed",
        session="s1",
        term=1,
        round=3,
        amendment=1,
        parent=D1,
        model=D2,
        size=1234,
        partials=(PartialRef(combiner=K2, partial=D3, total_weight=40, contributions=D1),),
        included=(
            Contribution(signer=K1, update=D1, weight=10),
            Contribution(signer=K3, update=D3, weight=30),
        ),
        num_examples=40,
        metrics={"loss": 0.25, "eval_accuracy": 0.9},
        reducer=K1,
        created_ms=1_700_000_000_000,
    ),
    "session-ended": SessionEnded(
        federation="fed",
        session="s1",
        term=1,
        outcome="failed",
        rounds=2,
        model=D2,
        reason="round 3 fell short",
        reducer=K1,
        created_ms=1_700_000_000_000,
    ),
    "session-checkpoint": SessionCheckpoint(
        federation="fed",
        session="s1",
        term=2,
        round=3,
        model=D2,
        size=1234,
        holders=(P1, P2),
        config=CONFIG,
        optimizer=BlobRef(digest=D3, size=4321),
        members=(P1, P2, P3),
        lease_ms=15_000,
        reducer=K1,
        created_ms=1_700_000_000_000,
    ),
    "blob-request": BlobRequest(digest=D1, offset=2 << 20, max_size=1 << 30, chunk_size=1 << 20),
    "blob-response": BlobResponse(
        status="ok", size=40_000, offset=16_384, chunk_size=16_384, chunks=(D1, D2, D3)
    ),
    "push-offer": PushOffer(envelope=b"\xa4signed", chunk_size=1 << 20, chunks=(D1, D2)),
    "push-reply": PushReply(status="refuse", reason="over capacity"),
    "push-ack": PushAck(status="stored", reason=""),
    "node-status": NodeStatus(
        peer="12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB",
        federation="fed",
        role="combiner",
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        uptime_ms=60_000,
        connected=1,
        heartbeats_accepted=10,
        heartbeats_rejected=1,
        peers=(
            PeerStatus(
                peer="12D3KooWHHzSeKaY8xuZVzkLbKFfvNgPPeKhFBGrMbNzbm5akpqu",
                state="suspect",
                role="client",
                region="eu",
                capacity=0,
                attached=0,
                cpu=0.5,
                memory=0.25,
                bandwidth=1e6,
                rtt_ms=None,
                last_seen_ms=2500,
                connected=False,
                round=3,
                addrs=(),
            ),
        ),
    ),
}
FIELDS = [(name, f.name) for name, msg in sorted(SAMPLES.items()) for f in dataclasses.fields(msg)]
UPDATE = SAMPLES["model-update"]


def enc(value: Any) -> bytes:
    return cbor2.dumps(value, canonical=True)


def plain(msg: Any) -> dict[str, Any]:
    """A message as the plain CBOR map it travels as."""
    return dict(cbor2.loads(encode(msg)))


def edited(msg: Any, **changes: Any) -> bytes:
    """``msg``'s canonical encoding with top-level fields replaced by plain CBOR values."""
    return enc(plain(msg) | changes)


def head(major: int, arg: int, width: int | None = None) -> bytes:
    """A CBOR head; ``width`` (0, 1, 2, 4 or 8 argument bytes) forces a form, minimal or not."""
    if width is None:
        width = 0 if arg < 24 else next(w for w in (1, 2, 4, 8) if arg < 1 << (8 * w))
    if width == 0:
        return bytes([major << 5 | arg])
    return bytes([major << 5 | {1: 24, 2: 25, 4: 26, 8: 27}[width]]) + arg.to_bytes(width, "big")


def pairs(msg: Any) -> list[tuple[bytes, bytes]]:
    """The encoded (key, value) pairs of a message's map, in canonical order."""
    return sorted((enc(k), enc(v)) for k, v in plain(msg).items())


def raw_map(items: list[tuple[bytes, bytes]]) -> bytes:
    return head(5, len(items)) + b"".join(k + v for k, v in items)


def with_raw(msg: Any, field: str, raw: bytes) -> bytes:
    """``msg``'s encoding with one field's value replaced by raw CBOR bytes."""
    return raw_map([(k, raw if k == enc(field) else v) for k, v in pairs(msg)])


def rejected(frame: bytes, limits: Limits = CONTROL_LIMITS) -> WireError:
    """The WireError decoding ``frame`` raises (any other exception fails the test)."""
    with pytest.raises(WireError) as info:
        decode(frame, limits=limits)
    return info.value


def assert_valid_or_wire_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except WireError:
        return
    assert type(msg) in REGISTRY.values()
    assert decode(encode(msg)).__class__ is type(msg)


# --------------------------------------------------------------------------------- the samples


def test_every_registered_message_has_a_sample() -> None:
    # Prepare
    registered = set(REGISTRY)

    # Execute
    missing = registered - set(SAMPLES)

    # Assert
    assert not missing, f"add a valid message to SAMPLES in {__file__} for {sorted(missing)}"


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_sample_is_valid_and_the_raw_helpers_rebuild_it(type_name: str) -> None:
    # Prepare
    msg = SAMPLES[type_name]

    # Execute
    frame = encode(msg)

    # Assert: the controls every rejection below is measured against
    assert type(decode(frame)) is type(msg)
    assert raw_map(pairs(msg)) == frame
    assert edited(msg) == frame


# ------------------------------------------------------------------ truncation and bit flips


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_every_truncation_is_rejected(type_name: str) -> None:
    # Prepare
    frame = encode(SAMPLES[type_name])

    # Execute / Assert
    for length in range(len(frame)):
        rejected(frame[:length])


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_every_single_bit_flip_decodes_validly_or_raises_wire_error(type_name: str) -> None:
    # Prepare
    frame = encode(SAMPLES[type_name])

    # Execute / Assert
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert_valid_or_wire_error(bytes(flipped))


def test_trailing_bytes_are_rejected() -> None:
    # Prepare
    frame = encode(UPDATE)

    # Execute / Assert
    for trailer in (b"\x00", b"\xa0", frame):
        rejected(frame + trailer)


# ------------------------------------------------------------------------- fields and types


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_an_extra_field_is_rejected(type_name: str) -> None:
    # Prepare
    frame = edited(SAMPLES[type_name], zzz=0)

    # Execute
    error = rejected(frame)

    # Assert
    assert "zzz" in str(error)


@pytest.mark.parametrize(
    ("type_name", "field"), [*FIELDS, *((t, k) for t in sorted(SAMPLES) for k in ("type", "v"))]
)
def test_a_missing_field_is_rejected(type_name: str, field: str) -> None:
    # Prepare
    value = plain(SAMPLES[type_name])
    del value[field]

    # Execute / Assert
    rejected(enc(value))


@pytest.mark.parametrize(("type_name", "field"), FIELDS)
def test_a_field_of_the_wrong_type_is_rejected(type_name: str, field: str) -> None:
    # Prepare
    value = plain(SAMPLES[type_name])
    value[field] = 7 if isinstance(value[field], str) else "x"

    # Execute
    error = rejected(enc(value))

    # Assert
    assert error.path.startswith(field)


@pytest.mark.parametrize(
    ("type_name", "field", "index", "change"),
    [
        ("blob-header", "tensors", 0, {"zzz": 1}),
        ("blob-header", "tensors", 0, {"shape": 6}),
        ("blob-header", "tensors", 0, {"dtype": "complex64"}),
        ("partial-aggregate", "contributions", 1, {"weight": "10"}),
        ("partial-aggregate", "contributions", 1, {"signer": b"\3" * 31}),
        ("global-model", "partials", 0, {"zzz": 1}),
        ("global-model", "partials", 0, {"total_weight": 40.0}),
        ("round-plan", "assignments", 1, {"clients": []}),
        ("round-plan", "assignments", 0, {"combiner": "not a peer id"}),
        ("round-result", "included", 1, {"weight": 0}),
    ],
)
def test_a_bad_record_inside_a_message_is_rejected(
    type_name: str, field: str, index: int, change: dict[str, Any]
) -> None:
    # Prepare
    value = plain(SAMPLES[type_name])
    records = [dict(r) for r in value[field]]
    records[index] |= change
    value[field] = records

    # Execute
    error = rejected(enc(value))

    # Assert
    assert error.path.startswith(f"{field}[{index}]")


@pytest.mark.parametrize(
    ("type_name", "field", "missing"),
    [
        ("blob-header", "tensors", "shape"),
        ("partial-aggregate", "contributions", "weight"),
        ("global-model", "partials", "combiner"),
    ],
)
def test_a_record_missing_a_field_is_rejected(type_name: str, field: str, missing: str) -> None:
    # Prepare
    value = plain(SAMPLES[type_name])
    records = [dict(r) for r in value[field]]
    del records[0][missing]
    value[field] = records

    # Execute
    error = rejected(enc(value))

    # Assert
    assert error.path == f"{field}[0]"
    assert missing in str(error)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("parent", b"\1" * 31),
        ("parent", b"\1" * 33),
        ("signer", b"\1" * 31),
        ("nonce", b"\1" * 15),
        ("nonce", b"\1" * 17),
        ("round", True),
        ("round", 3.0),
        ("round", -(2**63) - 1),
        ("round", -(2**64)),
        ("federation", "x" * 4097),
        ("federation", b"fed"),
        ("metrics", {"acc": 1}),
        ("metrics", {"acc": True}),
        ("metrics", {"acc": None}),
        ("metrics", {b"acc": 0.5}),
        ("metrics", [["acc", 0.5]]),
    ],
)
def test_a_field_value_out_of_its_domain_is_rejected(field: str, value: Any) -> None:
    # Prepare
    frame = edited(UPDATE, **{field: value})

    # Execute
    error = rejected(frame)

    # Assert
    assert error.path.startswith(field)


@pytest.mark.parametrize(
    ("field", "value"), [("created_ms", 0), ("size", 2**64 - 1), ("federation", "x" * 4096)]
)
def test_field_values_at_the_edge_of_their_domain_are_accepted(field: str, value: Any) -> None:
    # Prepare
    frame = edited(UPDATE, **{field: value})

    # Execute
    msg = decode(frame, ModelUpdate)

    # Assert
    assert getattr(msg, field) == value


def test_a_signature_of_the_wrong_size_is_rejected() -> None:
    # Prepare
    frame = edited(SAMPLES["envelope"], signature=b"\5" * 63)

    # Execute
    error = rejected(frame)

    # Assert
    assert error.path == "signature"


def test_invalid_utf8_text_is_rejected() -> None:
    # Prepare
    frame = with_raw(UPDATE, "federation", b"\x63\xff\xfe\xfd")

    # Execute / Assert
    rejected(frame)


# ------------------------------------------------------------------------ type and version


@pytest.mark.parametrize(
    "type_value", ["no-such-message", "MODEL-UPDATE", "", 5, None, b"model-update"]
)
def test_an_unknown_or_non_text_message_type_is_rejected(type_value: Any) -> None:
    # Prepare
    frame = edited(UPDATE, type=type_value)

    # Execute
    error = rejected(frame)

    # Assert
    assert error.path == "type"


@pytest.mark.parametrize("version", [0, 2, -1, 2**64 - 1, "1", 1.0, None])
def test_an_unsupported_or_non_integer_version_is_rejected(version: Any) -> None:
    # Prepare
    frame = edited(UPDATE, v=version)

    # Execute
    error = rejected(frame)

    # Assert
    assert error.path == "v"


@pytest.mark.parametrize("value", [[1, 2], "model-update", 5, None, b"\xa0"])
def test_a_frame_that_is_not_a_map_is_rejected(value: Any) -> None:
    # Prepare
    frame = enc(value)

    # Execute / Assert
    rejected(frame)


def test_a_message_of_another_type_than_expected_is_rejected() -> None:
    # Prepare
    frame = encode(UPDATE)

    # Execute
    with pytest.raises(WireError) as info:
        decode(frame, GlobalModel)

    # Assert
    assert info.value.path == "type"


# ------------------------------------------------------------------------------------ tags


def test_the_array_tag_replaced_by_an_unknown_tag_is_rejected() -> None:
    # Prepare: tag 40 (d8 28) becomes tag 41
    frame = encode(SAMPLES["model"])
    assert frame.count(b"\xd8\x28") == 3

    # Execute / Assert
    rejected(frame.replace(b"\xd8\x28", b"\xd8\x29", 1))


@pytest.mark.parametrize(
    "tag", [76, 83, 87]
)  # reserved, float128 big-endian, float128 little-endian
def test_a_typed_array_tag_we_do_not_decode_is_rejected(tag: int) -> None:
    # Prepare: the float32 typed array (d8 55) becomes another RFC 8746 tag
    frame = encode(SAMPLES["model"])

    # Execute / Assert
    rejected(frame.replace(b"\xd8\x55", bytes([0xD8, tag]), 1))


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("created_ms", b"\xc1" + head(0, 1_700_000_000_000)),  # tag 1: epoch date-time
        ("created_ms", b"\xc2\x41\x01"),  # tag 2: bignum
        ("federation", b"\xd9\xd9\xf7\x63fed"),  # tag 55799: self-described CBOR
        ("federation", b"\xd8\x20\x63fed"),  # tag 32: URI
    ],
)
def test_an_unknown_tag_is_rejected(field: str, raw: bytes) -> None:
    # Prepare
    frame = with_raw(UPDATE, field, raw)

    # Execute / Assert
    rejected(frame)


def test_a_self_described_frame_is_rejected() -> None:
    # Prepare
    frame = b"\xd9\xd9\xf7" + encode(UPDATE)

    # Execute / Assert
    rejected(frame)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("created_ms", cbor2.CBORTag(64, b"\1\2")),  # an allowed tag where an int belongs
        ("metrics", {"acc": cbor2.CBORTag(85, b"\0\0\0\0")}),
        ("nonce", cbor2.CBORTag(40, [[16], cbor2.CBORTag(64, NONCE)])),
    ],
)
def test_an_allowed_tag_in_the_wrong_place_is_rejected(field: str, value: Any) -> None:
    # Prepare
    frame = edited(UPDATE, **{field: value})

    # Execute / Assert
    rejected(frame)


# ---------------------------------------------------------------------------------- arrays


def _model_frame(array_value: Any, name: Any = "w") -> bytes:
    return edited(SAMPLES["model"], tensors=[[name, array_value]])


F32 = np.arange(6, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    "array_value",
    [
        cbor2.CBORTag(40, [[2, 3], cbor2.CBORTag(85, F32[:-4])]),  # data shorter than the shape
        cbor2.CBORTag(40, [[2, 3], cbor2.CBORTag(85, F32 + b"\0\0\0\0")]),  # data longer
        cbor2.CBORTag(40, [[2, 3], cbor2.CBORTag(86, F32)]),  # 24 bytes are not 6 float64s
        cbor2.CBORTag(40, [[], cbor2.CBORTag(85, b"")]),  # a 0-d array holds one element
        cbor2.CBORTag(40, [[0], cbor2.CBORTag(85, b"\0\0\0\0")]),
        cbor2.CBORTag(40, [[2**39, 2**39, 2**39], cbor2.CBORTag(85, F32)]),
        cbor2.CBORTag(40, [6, cbor2.CBORTag(85, F32)]),  # shape not an array
        cbor2.CBORTag(40, [[-6], cbor2.CBORTag(85, F32)]),
        cbor2.CBORTag(40, [[6.0], cbor2.CBORTag(85, F32)]),
        cbor2.CBORTag(40, [[True] * 6, cbor2.CBORTag(85, F32)]),
        cbor2.CBORTag(40, [[2**40], cbor2.CBORTag(85, F32)]),
        cbor2.CBORTag(40, [[1] * 33, cbor2.CBORTag(64, b"\0")]),  # more than 32 dimensions
        cbor2.CBORTag(40, [[6], F32]),  # data not a typed array
        cbor2.CBORTag(40, [[6], cbor2.CBORTag(85, list(range(6)))]),  # typed array of non-bytes
        cbor2.CBORTag(40, [[6], cbor2.CBORTag(40, [[6], cbor2.CBORTag(85, F32)])]),
        cbor2.CBORTag(40, [[6], cbor2.CBORTag(85, F32), 0]),  # three items in the tag
        cbor2.CBORTag(40, [[6]]),
        cbor2.CBORTag(85, F32),  # a typed array without its shape
        F32,
        {"data": b"\0" * 6, "dtype": "bfloat16", "shape": [2]},  # bfloat16 length mismatch
        {"data": F32, "dtype": "float32", "shape": [6]},  # map form is for bfloat16 only
        {"data": b"\0" * 4, "dtype": "bfloat16", "shape": [2], "order": "C"},
        {"data": b"\0" * 4, "dtype": "bfloat16"},
        {"data": [0, 0], "dtype": "bfloat16", "shape": [2]},
    ],
    ids=repr,
)
def test_an_inconsistent_array_is_rejected(array_value: Any) -> None:
    # Prepare
    frame = _model_frame(array_value)

    # Execute
    error = rejected(frame)

    # Assert
    assert error.path.startswith("tensors[0]")


def test_the_consistent_array_those_cases_break_is_accepted() -> None:
    # Prepare
    frame = _model_frame(cbor2.CBORTag(40, [[2, 3], cbor2.CBORTag(85, F32)]))

    # Execute
    model = decode(frame, ModelBlob).tensors

    # Assert
    assert model["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "tensors",
    [
        [["w", cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"\1")])]] * 2,  # a name twice
        [["", cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"\1")])]],
        [["x" * 513, cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"\1")])]],
        [[7, cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"\1")])]],
        [["w"]],
        [["w", cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"\1")]), "extra"]],
        {"w": cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"\1")])},  # a map loses the order
    ],
    ids=repr,
)
def test_a_malformed_model_is_rejected(tensors: Any) -> None:
    # Prepare
    frame = edited(SAMPLES["model"], tensors=tensors)

    # Execute / Assert
    rejected(frame)


# ------------------------------------------------------------------ non-canonical encodings


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_a_non_minimal_integer_is_rejected(width: int) -> None:
    # Prepare: round = 3 with a wider head than it needs
    frame = with_raw(UPDATE, "round", head(0, 3, width))

    # Execute / Assert
    rejected(frame)


@pytest.mark.parametrize(
    ("value", "shortest"), [(0, 0), (23, 0), (24, 1), (255, 1), (256, 2), (65536, 4), (2**32, 8)]
)
def test_integers_are_accepted_only_in_their_shortest_form(value: int, shortest: int) -> None:
    # Prepare
    widths = [w for w in (0, 1, 2, 4, 8) if value < (24 if w == 0 else 1 << 8 * w)]
    frames = {w: with_raw(UPDATE, "size", head(0, value, w)) for w in widths}

    # Execute / Assert
    assert decode(frames.pop(shortest), ModelUpdate).size == value
    for frame in frames.values():
        rejected(frame)


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("federation", head(3, 3, 1) + b"fed"),  # text length
        ("nonce", head(2, 16, 1) + NONCE),  # byte-string length
        ("metrics", head(5, 0, 1)),  # map length
        ("created_ms", head(1, 0, 1)),  # negative integer
    ],
)
def test_a_non_minimal_length_or_negative_head_is_rejected(field: str, raw: bytes) -> None:
    # Prepare
    frame = with_raw(UPDATE, field, raw)

    # Execute / Assert
    rejected(frame)


def test_a_non_minimal_array_or_tag_head_is_rejected() -> None:
    # Prepare
    frame = encode(SAMPLES["model"])
    assert frame.count(b"\x84\x82") == 1  # the array of 4 tensors and its first pair
    wide_array = frame.replace(b"\x84\x82", head(4, 4, 1) + b"\x82")
    wide_tag = frame.replace(b"\xd8\x28", head(6, 40, 2), 1)

    # Execute / Assert
    rejected(wide_array)
    rejected(wide_tag)


def test_map_keys_out_of_canonical_order_are_rejected() -> None:
    # Prepare
    items = pairs(UPDATE)
    swapped = [items[1], items[0], *items[2:]]
    in_order = head(5, 2) + enc("abc") + enc(0.5) + enc("acc") + enc(0.5)
    swapped_metrics = head(5, 2) + enc("acc") + enc(0.5) + enc("abc") + enc(0.5)

    # Execute / Assert
    assert decode(with_raw(UPDATE, "metrics", in_order), ModelUpdate).metrics == {
        "abc": 0.5,
        "acc": 0.5,
    }
    rejected(raw_map(swapped))
    rejected(raw_map(items[::-1]))
    rejected(with_raw(UPDATE, "metrics", swapped_metrics))


@pytest.mark.parametrize("same_value", [True, False])
def test_duplicate_map_keys_are_rejected(same_value: bool) -> None:
    # Prepare
    items = pairs(UPDATE)
    duplicate = (items[0][0], items[0][1] if same_value else enc("other"))
    metrics = head(5, 2) + enc("acc") + enc(0.5) + enc("acc") + enc(0.5 if same_value else 0.25)

    # Execute / Assert
    rejected(raw_map([items[0], duplicate, *items[1:]]))
    rejected(with_raw(UPDATE, "metrics", metrics))


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("federation", b"\x7f\x63fed\xff"),  # indefinite text
        ("nonce", b"\x5f\x50" + NONCE + b"\xff"),  # indefinite byte string
        ("metrics", b"\xbf\x63acc\xf9\x38\x00\xff"),  # indefinite map
        ("metrics", b"\xbf\xff"),
    ],
)
def test_indefinite_lengths_are_rejected(field: str, raw: bytes) -> None:
    # Prepare
    frame = with_raw(UPDATE, field, raw)

    # Execute / Assert
    rejected(frame)


def test_an_indefinite_array_or_top_level_map_is_rejected() -> None:
    # Prepare
    items = pairs(UPDATE)
    indefinite_map = b"\xbf" + b"".join(k + v for k, v in items) + b"\xff"
    model = encode(SAMPLES["model"])
    # "tensors" is the last key, so a break at the end closes the array: well-formed CBOR
    indefinite_array = model.replace(b"\x84\x82", b"\x9f\x82", 1) + b"\xff"

    # Execute / Assert
    rejected(indefinite_map)
    rejected(indefinite_array)


def _f16(bits: int) -> bytes:
    return b"\xf9" + bits.to_bytes(2, "big")


def _f32(value: float) -> bytes:
    return b"\xfa" + struct.pack(">f", value)


def _f64(value: float) -> bytes:
    return b"\xfb" + struct.pack(">d", value)


EXACT_SINGLE = struct.unpack(">f", struct.pack(">f", 0.1))[0]


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        (_f16(0x3800), True),  # 0.5
        (_f32(0.5), False),  # fits half precision
        (_f64(0.5), False),
        (_f32(EXACT_SINGLE), True),
        (_f64(EXACT_SINGLE), False),  # fits single precision
        (_f64(0.1), True),
        (_f16(0x7C00), True),  # inf
        (_f32(float("inf")), False),
        (_f64(float("-inf")), False),
        (_f16(0x8000), True),  # -0.0
        (_f64(-0.0), False),
        (_f16(0x7E00), True),  # the one canonical NaN
        (_f16(0x7E01), False),  # NaN with a payload
        (_f16(0x7C01), False),  # signalling NaN
        (_f16(0xFE00), False),  # negative NaN
        (b"\xfa\x7f\xc0\x00\x00", False),  # single-precision NaN
        (b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", False),  # double-precision NaN
    ],
    ids=lambda v: v.hex() if isinstance(v, bytes) else str(v),
)
def test_floats_are_accepted_only_in_their_shortest_form(raw: bytes, accepted: bool) -> None:
    # Prepare
    frame = with_raw(UPDATE, "metrics", head(5, 1) + enc("acc") + raw)

    # Execute / Assert
    if accepted:
        decode(frame, ModelUpdate)
    else:
        rejected(frame)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xf7",  # undefined
        b"\xf0",  # simple(16)
        b"\xf8\x20",  # simple(32), two-byte form
        b"\xf8\x14",  # false in the two-byte form
        b"\x1c",  # reserved additional information 28
        b"\x3d",  # reserved, negative integer
        b"\xff",  # break outside an indefinite item
    ],
    ids=bytes.hex,
)
def test_simple_values_and_reserved_heads_are_rejected(raw: bytes) -> None:
    # Prepare
    frame = with_raw(UPDATE, "created_ms", raw)

    # Execute / Assert
    rejected(frame)


# --------------------------------------------------------------------------------- limits


def test_a_frame_over_max_frame_is_rejected() -> None:
    # Prepare
    frame = encode(UPDATE)
    tight = Limits(max_frame=len(frame))
    too_tight = Limits(max_frame=len(frame) - 1)

    # Execute / Assert
    assert decode(frame, ModelUpdate, tight) is not None
    rejected(frame, too_tight)


def test_control_limits_refuse_a_model_that_blob_limits_accept() -> None:
    # Prepare
    frame = encode(ModelBlob(tensors={"w": np.zeros(CONTROL_LIMITS.max_frame // 4, dtype="<f4")}))

    # Execute / Assert
    assert len(frame) > CONTROL_LIMITS.max_frame
    rejected(frame)
    assert decode(frame, ModelBlob, BLOB_LIMITS).tensors["w"].size == CONTROL_LIMITS.max_frame // 4


@pytest.mark.parametrize("opener", [b"\x81", b"\xa1\x60", b"\xd8\x28"])  # array, map, tag
def test_nesting_deeper_than_max_depth_is_rejected(opener: bytes) -> None:
    # Prepare
    limits = Limits(max_depth=5)
    at_limit = opener * 5 + b"\x00"
    beyond = opener * 6 + b"\x00"

    # Execute / Assert
    check_frame(at_limit, limits)
    with pytest.raises(WireError, match="deeper"):
        check_frame(beyond, limits)
    rejected(beyond, limits)


def test_nesting_deep_enough_to_overflow_the_stack_is_a_wire_error() -> None:
    # Prepare
    frame = b"\x81" * 200_000 + b"\x00"

    # Execute / Assert
    rejected(frame)


def test_a_deeply_nested_field_value_is_rejected() -> None:
    # Prepare
    depth = CONTROL_LIMITS.max_depth
    frame = with_raw(UPDATE, "metrics", b"\xa1\x61a" * depth + _f16(0x3800))

    # Execute
    error = rejected(frame)

    # Assert
    assert "deeper" in str(error)


@pytest.mark.parametrize(("count", "major"), [(5, 4), (5, 5)])
def test_a_container_over_max_items_is_rejected(count: int, major: int) -> None:
    # Prepare
    limits = Limits(max_items=4)
    items = [enc(f"k{i}") + b"\x00" if major == 5 else b"\x00" for i in range(count)]
    at_limit = head(major, count - 1) + b"".join(items[:-1])
    over = head(major, count) + b"".join(items)

    # Execute / Assert
    check_frame(at_limit, limits)
    with pytest.raises(WireError, match="items"):
        check_frame(over, limits)


def test_a_frame_over_max_total_items_is_rejected() -> None:
    # Prepare
    limits = Limits(max_total_items=10)
    at_limit = head(4, 3) + (head(4, 2) + b"\x00\x00") * 3  # 1 + 3 * 3 = 10 items
    over = head(4, 3) + (head(4, 2) + b"\x00\x00") * 2 + head(4, 3) + b"\x00\x00\x00"

    # Execute / Assert
    check_frame(at_limit, limits)
    with pytest.raises(WireError, match="items"):
        check_frame(over, limits)


@pytest.mark.parametrize(
    "frame",
    [
        head(2, 2**62) + b"x" * 16,  # byte string
        head(3, 2**62) + b"x" * 16,  # text string
        head(4, 2**32) + b"\0" * 16,  # array
        head(5, 2**32) + b"\0" * 16,  # map
        head(4, 1000) + b"\0" * 16,  # array within max_items, but not within the frame
        with_raw(UPDATE, "nonce", head(2, 2**63)),
        encode(SAMPLES["model"]).replace(head(2, 24), head(2, 2**40), 1),  # the float32 data
    ],
    ids=["bytes", "text", "array", "map", "short-array", "nonce", "tensor-data"],
)
def test_a_huge_declared_length_is_rejected_before_allocating(frame: bytes) -> None:
    # Prepare
    tracemalloc.start()

    # Execute
    try:
        with pytest.raises(WireError, match=r"declared|exceeds"):
            check_frame(frame, BLOB_LIMITS)  # our own check, before cbor2 sees the frame
        rejected(frame, BLOB_LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert
    assert peak < 256 * 1024


# ---------------------------------------------------------------------- message invariants


def _contribution(signer: bytes, weight: int) -> dict[str, Any]:
    return {"signer": signer, "update": D1, "weight": weight}


def _partial_ref(combiner: bytes, weight: int) -> dict[str, Any]:
    return {"combiner": combiner, "partial": D2, "total_weight": weight, "contributions": D3}


def _assignment(combiner: str, *clients: str) -> dict[str, Any]:
    return {"combiner": combiner, "clients": list(clients)}


def _config(**changes: Any) -> dict[str, Any]:
    return plain(SAMPLES["round-plan"])["config"] | changes


@pytest.mark.parametrize(
    ("type_name", "changes"),
    [
        ("partial-aggregate", {"contributions": [_contribution(K3, 30), _contribution(K1, 10)]}),
        ("partial-aggregate", {"contributions": [_contribution(K1, 10), _contribution(K1, 30)]}),
        ("partial-aggregate", {"total_weight": 41}),
        ("partial-aggregate", {"contributions": [], "total_weight": 0}),
        ("partial-aggregate", {"contributions": [_contribution(K1, 0), _contribution(K3, 40)]}),
        ("partial-aggregate", {"round": -1}),
        ("global-model", {"partials": [_partial_ref(K2, 20), _partial_ref(K1, 40)]}),
        ("global-model", {"partials": [_partial_ref(K1, 40), _partial_ref(K1, 20)]}),
        ("global-model", {"num_examples": 61}),
        ("global-model", {"round": -1}),
        ("model-update", {"num_examples": 0}),
        ("model-update", {"round": -1}),
        ("model-update", {"size": -1}),
        ("blob-header", {"size": -1}),
        ("blob-header", {"tensors": [{"name": "w", "dtype": "float32", "shape": [2, -1]}]}),
        ("ed25519-key", {"seed": b"\x09" * 31}),
        ("ed25519-key", {"seed": b"\x09" * 33}),
        ("envelope", {"domain": ""}),
        ("envelope", {"domain": "d" * 129}),
        ("envelope", {"domain": "fednode/model-update/v1\x00"}),
        ("round-plan", {"round": 0}),
        ("round-plan", {"deadline_ms": 1_700_000_000_000}),
        ("round-plan", {"federation": "fed/eu"}),
        ("round-plan", {"session": ""}),
        ("round-plan", {"holders": ["0OIl"]}),
        ("round-plan", {"assignments": [_assignment(P2, P2), _assignment(P1, P1)]}),
        ("round-plan", {"assignments": [_assignment(P1, P1), _assignment(P2, P1)]}),
        ("round-plan", {"assignments": [_assignment(P1, P3, P1)]}),
        ("round-plan", {"config": _config(lr=0.0)}),
        ("round-plan", {"config": _config(rounds=0)}),
        ("round-plan", {"config": _config(round_deadline_ms=0)}),
        ("round-plan", {"config": _config(server_momentum=1.0)}),
        ("round-plan", {"config": _config(alpha=float("inf"))}),
        ("round-plan", {"config": _config(task="two words")}),
        ("round-plan", {"config": _config(server_optimizer="sgd")}),
        ("round-result", {"num_examples": 41}),
        ("round-result", {"partials": [], "num_examples": 0, "included": []}),
        ("round-result", {"included": [_contribution(K3, 30), _contribution(K1, 10)]}),
        ("round-result", {"round": 0}),
        ("session-ended", {"reason": ""}),
        ("session-ended", {"outcome": "completed"}),
        ("session-ended", {"reason": "x" * 1025}),
        ("session-checkpoint", {"term": 0}),
        ("session-checkpoint", {"round": 11}),
        ("session-checkpoint", {"round": -1}),
        ("session-checkpoint", {"optimizer": None}),
        ("session-checkpoint", {"round": 0}),  # a stateful optimiser carries nothing at round 0
        ("session-checkpoint", {"config": _config(server_optimizer="fedavg")}),
        ("session-checkpoint", {"optimizer": {"digest": D3, "size": -1}}),
        ("session-checkpoint", {"optimizer": {"digest": D3[:31], "size": 1}}),
        ("session-checkpoint", {"optimizer": {"digest": D3}}),
        ("session-checkpoint", {"members": []}),
        ("session-checkpoint", {"members": [P2, P1]}),
        ("session-checkpoint", {"members": [P1, P1]}),
        ("session-checkpoint", {"members": ["0OIl"]}),
        ("session-checkpoint", {"members": OVER_MEMBER_CAP}),
        ("session-checkpoint", {"holders": ["x" * 200]}),
        ("session-checkpoint", {"lease_ms": 0}),
        ("session-checkpoint", {"lease_ms": 600_001}),
        ("session-checkpoint", {"federation": "fed/eu"}),
        ("session-checkpoint", {"session": ""}),
        ("session-checkpoint", {"size": -1}),
    ],
    ids=repr,
)
def test_an_invariant_violation_decodes_as_wire_error(
    type_name: str, changes: dict[str, Any]
) -> None:
    # Prepare
    frame = edited(SAMPLES[type_name], **changes)

    # Execute / Assert
    rejected(frame)


# ---------------------------------------------------------------------- anything at all


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), children, max_size=4)
        | st.builds(cbor2.CBORTag, st.sampled_from(sorted(ALLOWED_TAGS)), children)
    )


CBOR_VALUES = st.recursive(
    st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40)
    | st.booleans()
    | st.none(),
    _containers,
    max_leaves=12,
)


@st.composite
def damaged_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid sample's map with a few fields replaced, dropped or added, as arbitrary CBOR."""
    value = plain(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    names = sorted(value)
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
        value[name] = draw(CBOR_VALUES)
    if draw(st.booleans()):
        del value[draw(st.sampled_from(names))]
    return value


@settings(max_examples=200)
@given(value=damaged_messages())
def test_any_damaged_message_decodes_validly_or_raises_wire_error(value: dict[str, Any]) -> None:
    # Prepare
    frame = enc(value)

    # Execute / Assert
    assert_valid_or_wire_error(frame)


@settings(max_examples=200)
@given(frame=st.binary(max_size=64) | CBOR_VALUES.map(enc))
def test_any_bytes_decode_validly_or_raise_wire_error(frame: bytes) -> None:
    # Execute / Assert
    assert_valid_or_wire_error(frame)
