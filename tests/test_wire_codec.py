"""Wire codec: every registered message and every dtype survives a round trip, and equal messages
encode to identical, canonical bytes."""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import struct
import typing
from typing import Any

import cbor2
import hypothesis.extra.numpy as hnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fednode.wire
from fednode.crypto import KeyFile  # importing it registers "ed25519-key"
from fednode.errors import WireError
from fednode.wire import (
    REGISTRY,
    BlobHeader,
    Contribution,
    Envelope,
    GlobalModel,
    ModelBlob,
    ModelUpdate,
    PartialAggregate,
    PartialRef,
    TensorInfo,
    decode,
    encode,
)
from fednode.wire.control import Heartbeat, Role
from fednode.wire.rounds import (
    MAX_LEASE_MS,
    MAX_MEMBERS,
    MAX_ROUND_DEADLINE_MS,
    Assignment,
    BlobRef,
    PartitionScheme,
    RoundPlan,
    RoundResult,
    ServerOptimizer,
    SessionCheckpoint,
    SessionConfig,
    SessionEnded,
    SessionOutcome,
)
from fednode.wire.schema import INT_MAX, INT_MIN
from fednode.wire.status import MemberState, NodeStatus, PeerStatus
from fednode.wire.transfer import (
    AckStatus,
    BlobRequest,
    BlobResponse,
    BlobStatus,
    PushAck,
    PushOffer,
    PushReply,
    PushStatus,
    chunk_count,
)

# Every wire module, so REGISTRY holds every message whatever else this session imported.
for _module in pkgutil.iter_modules(fednode.wire.__path__):
    importlib.import_module(f"fednode.wire.{_module.name}")

DTYPES = [
    np.dtype(name)
    for name in (
        "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
        "float16", "float32", "float64",
    )
] + [np.dtype(ml_dtypes.bfloat16)]  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Strategies. Values range over everything the wire accepts: the whole 64-bit integer range,
# every float (NaN, infinities, -0.0, subnormals), any text, arbitrary tensor bits.

U64 = st.integers(0, INT_MAX)
WIRE_INTS = st.integers(INT_MIN, INT_MAX)
DIGESTS = st.binary(min_size=32, max_size=32)
KEYS = st.binary(min_size=32, max_size=32)
NONCES = st.binary(min_size=16, max_size=16)
SIGNATURES = st.binary(min_size=64, max_size=64)
TEXTS = st.text(max_size=16)
ANY_DTYPE = st.sampled_from(DTYPES)
METRICS = st.dictionaries(st.text(max_size=12), st.floats(), max_size=5)


@st.composite
def arrays(draw: st.DrawFn, dtypes: st.SearchStrategy[np.dtype[Any]] = ANY_DTYPE) -> Any:
    """An array of any shape (0-d and empty included) filled with arbitrary bits."""
    dtype = draw(dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    size = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=size, max_size=size))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


MODELS = st.dictionaries(st.text(min_size=1, max_size=8), arrays(), max_size=4)
TENSOR_INFOS = st.builds(
    TensorInfo,
    name=st.text(min_size=1, max_size=16),
    dtype=st.sampled_from([d.name for d in DTYPES]),
    shape=st.lists(st.integers(0, 2**40 - 1), max_size=4).map(tuple),
)


@st.composite
def partial_aggregates(draw: st.DrawFn) -> PartialAggregate:
    by_signer = draw(
        st.dictionaries(KEYS, st.tuples(DIGESTS, st.integers(1, 2**60)), min_size=1, max_size=4)
    )
    contributions = tuple(
        Contribution(signer=signer, update=update, weight=weight)
        for signer, (update, weight) in sorted(by_signer.items())
    )
    return PartialAggregate(
        federation=draw(TEXTS),
        session=draw(TEXTS),
        round=draw(U64),
        parent=draw(DIGESTS),
        partial=draw(DIGESTS),
        size=draw(U64),
        contributions=contributions,
        total_weight=sum(c.weight for c in contributions),
        combiner=draw(KEYS),
        created_ms=draw(U64),
        nonce=draw(NONCES),
    )


@st.composite
def global_models(draw: st.DrawFn) -> GlobalModel:
    by_combiner = draw(
        st.dictionaries(KEYS, st.tuples(DIGESTS, st.integers(1, 2**60), DIGESTS), max_size=4)
    )
    partials = tuple(
        PartialRef(
            combiner=combiner, partial=partial, total_weight=weight, contributions=contributions
        )
        for combiner, (partial, weight, contributions) in sorted(by_combiner.items())
    )
    return GlobalModel(
        federation=draw(TEXTS),
        session=draw(TEXTS),
        round=draw(U64),
        model=draw(DIGESTS),
        size=draw(U64),
        parent=draw(DIGESTS if partials else st.none() | DIGESTS),  # None: the initial model
        partials=partials,
        num_examples=sum(p.total_weight for p in partials),
        reducer=draw(KEYS),
        created_ms=draw(U64),
    )


CHUNK_SIZES = st.integers(14, 24).map(lambda bits: 1 << bits)
PEER_IDS = st.from_regex(r"[1-9A-HJ-NP-Za-km-z]{1,64}", fullmatch=True)
ADDRS = st.lists(st.text(min_size=1, max_size=20).map(lambda s: "/" + s), max_size=4).map(tuple)


@st.composite
def blob_requests(draw: st.DrawFn) -> BlobRequest:
    chunk_size = draw(CHUNK_SIZES)
    offset = chunk_size * draw(st.integers(0, 2**30))
    return BlobRequest(
        digest=draw(DIGESTS), offset=offset, max_size=draw(U64), chunk_size=chunk_size
    )


@st.composite
def blob_responses(draw: st.DrawFn) -> BlobResponse:
    status = draw(st.sampled_from(typing.get_args(BlobStatus)))
    if status != "ok":
        return BlobResponse(status=status, size=0, offset=0, chunk_size=0, chunks=())
    chunk_size = draw(CHUNK_SIZES)
    size = draw(st.integers(0, 4 * chunk_size))
    count = chunk_count(size, chunk_size)
    chunks = tuple(draw(st.lists(DIGESTS, min_size=count, max_size=count)))
    offset = draw(st.integers(0, size))
    return BlobResponse(
        status=status, size=size, offset=offset, chunk_size=chunk_size, chunks=chunks
    )


FEDERATIONS = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
SESSIONS = st.text(min_size=1, max_size=24)
POSITIVE = st.floats(min_value=0.0, exclude_min=True, allow_infinity=False, allow_nan=False)
UNIT = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
SESSION_CONFIGS = st.builds(
    SessionConfig,
    rounds=st.integers(1, INT_MAX),
    min_clients=st.integers(1, INT_MAX),
    max_retries=U64,
    round_deadline_ms=st.integers(1, MAX_ROUND_DEADLINE_MS),
    epochs=st.integers(1, INT_MAX),
    batch_size=st.integers(1, INT_MAX),
    lr=POSITIVE,
    aggregator=st.just("fedavg"),
    server_optimizer=st.sampled_from(typing.get_args(ServerOptimizer)),
    server_lr=POSITIVE,
    server_momentum=UNIT,
    beta1=UNIT,
    beta2=UNIT,
    tau=POSITIVE,
    eval_every=U64,
    seed=U64,
    task=st.from_regex(r"[a-z_.:/]{1,40}", fullmatch=True),
    partition=st.sampled_from(typing.get_args(PartitionScheme)),
    alpha=POSITIVE,
    proximal_mu=st.floats(min_value=0.0, allow_infinity=False, allow_nan=False),
)


@st.composite
def round_plans(draw: st.DrawFn) -> RoundPlan:
    combiners = sorted(draw(st.sets(PEER_IDS, max_size=3)))
    clients = draw(st.lists(PEER_IDS, unique=True, max_size=6))
    groups: dict[str, list[str]] = {}
    for client in clients:
        if combiners:
            groups.setdefault(draw(st.sampled_from(combiners)), []).append(client)
    created = draw(st.integers(0, 2**62))
    return RoundPlan(
        federation=draw(FEDERATIONS),
        session=draw(SESSIONS),
        term=draw(U64),
        round=draw(st.integers(1, INT_MAX)),
        amendment=draw(U64),
        parent=draw(DIGESTS),
        parent_size=draw(U64),
        holders=tuple(draw(st.lists(PEER_IDS, max_size=3))),
        assignments=tuple(
            Assignment(combiner=c, clients=tuple(sorted(ks))) for c, ks in sorted(groups.items())
        ),
        min_clients=draw(st.integers(1, INT_MAX)),
        deadline_ms=created + draw(st.integers(1, 2**62)),
        config=draw(SESSION_CONFIGS),
        reducer=draw(KEYS),
        created_ms=created,
    )


@st.composite
def round_results(draw: st.DrawFn) -> RoundResult:
    by_signer = draw(
        st.dictionaries(KEYS, st.tuples(DIGESTS, st.integers(1, 2**50)), min_size=1, max_size=5)
    )
    included = tuple(
        Contribution(signer=signer, update=update, weight=weight)
        for signer, (update, weight) in sorted(by_signer.items())
    )
    cuts = (
        sorted(draw(st.sets(st.integers(1, len(included) - 1), max_size=3)))
        if len(included) > 1
        else []
    )
    bounds = [0, *cuts, len(included)]
    count = len(bounds) - 1  # one partial per run of contributions between cuts
    combiners = sorted(draw(st.lists(KEYS, unique=True, min_size=count, max_size=count)))
    partials = tuple(
        PartialRef(
            combiner=combiner,
            partial=draw(DIGESTS),
            total_weight=sum(c.weight for c in included[lo:hi]),
            contributions=draw(DIGESTS),
        )
        for combiner, lo, hi in zip(combiners, bounds, bounds[1:], strict=False)
    )
    return RoundResult(
        federation=draw(FEDERATIONS),
        session=draw(SESSIONS),
        term=draw(U64),
        round=draw(st.integers(1, INT_MAX)),
        amendment=draw(U64),
        parent=draw(DIGESTS),
        model=draw(DIGESTS),
        size=draw(U64),
        partials=partials,
        included=included,
        num_examples=sum(c.weight for c in included),
        metrics=draw(METRICS),
        reducer=draw(KEYS),
        created_ms=draw(U64),
    )


@st.composite
def sessions_ended(draw: st.DrawFn) -> SessionEnded:
    outcome = draw(st.sampled_from(typing.get_args(SessionOutcome)))
    return SessionEnded(
        federation=draw(FEDERATIONS),
        session=draw(SESSIONS),
        term=draw(U64),
        outcome=outcome,
        rounds=draw(U64),
        model=draw(DIGESTS),
        reason=draw(st.text(min_size=1, max_size=32)) if outcome == "failed" else "",
        reducer=draw(KEYS),
        created_ms=draw(U64),
    )


@st.composite
def session_checkpoints(draw: st.DrawFn) -> SessionCheckpoint:
    config = draw(SESSION_CONFIGS)
    round_ = draw(st.integers(0, min(config.rounds, INT_MAX)))
    stateless = config.server_optimizer == "fedavg" or round_ == 0
    return SessionCheckpoint(
        federation=draw(FEDERATIONS),
        session=draw(SESSIONS),
        term=draw(st.integers(1, INT_MAX)),
        round=round_,
        model=draw(DIGESTS),
        size=draw(U64),
        holders=tuple(draw(st.lists(PEER_IDS, max_size=3))),
        config=config,
        optimizer=None if stateless else BlobRef(digest=draw(DIGESTS), size=draw(U64)),
        members=tuple(sorted(draw(st.sets(PEER_IDS, min_size=1, max_size=min(5, MAX_MEMBERS))))),
        lease_ms=draw(st.integers(1, MAX_LEASE_MS)),
        reducer=draw(KEYS),
        created_ms=draw(U64),
    )


PEER_STATUSES = st.builds(
    PeerStatus,
    peer=PEER_IDS,
    state=st.sampled_from(typing.get_args(MemberState)),
    role=st.sampled_from(typing.get_args(Role)),
    region=TEXTS,
    capacity=U64,
    attached=U64,
    cpu=st.floats(),
    memory=st.floats(),
    bandwidth=st.floats(),
    rtt_ms=st.none() | st.floats(),
    last_seen_ms=U64,
    connected=st.booleans(),
    round=WIRE_INTS,
    addrs=ADDRS,
)

#: One strategy per wire type. A newly registered message needs one here.
STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "envelope": st.builds(
        Envelope,
        signer=KEYS,
        domain=st.text(
            st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=128
        ),
        payload=st.binary(max_size=64),
        signature=SIGNATURES,
    ),
    "blob-header": st.builds(
        BlobHeader,
        digest=DIGESTS,
        size=U64,
        kind=st.sampled_from(["model", "update", "partial"]),
        tensors=st.lists(TENSOR_INFOS, max_size=3).map(tuple),
    ),
    "model": st.builds(ModelBlob, tensors=MODELS),
    "model-update": st.builds(
        ModelUpdate,
        federation=TEXTS,
        session=TEXTS,
        round=U64,
        parent=DIGESTS,
        update=DIGESTS,
        size=U64,
        num_examples=st.integers(1, INT_MAX),
        metrics=METRICS,
        signer=KEYS,
        created_ms=U64,
        nonce=NONCES,
    ),
    "partial-aggregate": partial_aggregates(),
    "global-model": global_models(),
    "ed25519-key": st.builds(
        KeyFile, seed=st.binary(min_size=32, max_size=32), created_ms=WIRE_INTS
    ),
    "heartbeat": st.builds(
        Heartbeat,
        federation=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
        peer=st.from_regex(r"[1-9A-HJ-NP-Za-km-z]{1,128}", fullmatch=True),
        incarnation=U64,
        seq=U64,
        sent_ms=U64,
        interval_ms=st.integers(1, 600_000),
        role=st.sampled_from(typing.get_args(Role)),
        capacity=U64,
        attached=U64,
        cpu=st.floats(0.0, 1.0),
        memory=st.floats(0.0, 1.0),
        bandwidth=st.floats(min_value=0.0, allow_infinity=False),
        region=st.text(max_size=64),
        addrs=st.lists(st.text(min_size=1, max_size=20).map(lambda s: "/" + s), max_size=16).map(
            tuple
        ),
        session=st.text(max_size=24),
        round=st.integers(-1, INT_MAX),
    ),
    "round-plan": round_plans(),
    "round-result": round_results(),
    "session-ended": sessions_ended(),
    "session-checkpoint": session_checkpoints(),
    "blob-request": blob_requests(),
    "blob-response": blob_responses(),
    "push-offer": st.builds(
        PushOffer,
        envelope=st.binary(max_size=64),
        chunk_size=CHUNK_SIZES,
        chunks=st.lists(DIGESTS, max_size=4).map(tuple),
    ),
    "push-reply": st.builds(
        PushReply, status=st.sampled_from(typing.get_args(PushStatus)), reason=TEXTS
    ),
    "push-ack": st.builds(
        PushAck, status=st.sampled_from(typing.get_args(AckStatus)), reason=TEXTS
    ),
    "node-status": st.builds(
        NodeStatus,
        peer=PEER_IDS,
        federation=TEXTS,
        role=st.sampled_from(typing.get_args(Role)),
        addrs=ADDRS,
        uptime_ms=U64,
        connected=U64,
        heartbeats_accepted=U64,
        heartbeats_rejected=U64,
        peers=st.lists(PEER_STATUSES, max_size=3).map(tuple),
    ),
}


def assert_same(got: Any, want: Any, path: str = "msg") -> None:
    """Field by field equality where floats compare by bits (any NaN equals any NaN: the wire
    has one NaN) and arrays by dtype, shape and bytes (so NaN payloads must survive)."""
    if dataclasses.is_dataclass(want):
        assert type(got) is type(want), path
        for field in dataclasses.fields(want):
            assert_same(getattr(got, field.name), getattr(want, field.name), f"{path}.{field.name}")
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), path
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, dict):
        assert type(got) is dict and got.keys() == want.keys(), path
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, tuple):
        assert type(got) is tuple and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert type(got) is float, path
        assert (math.isnan(got) and math.isnan(want)) or struct.pack(">d", got) == struct.pack(
            ">d", want
        ), path
    else:
        assert type(got) is type(want) and got == want, path


# ---------------------------------------------------------------------------------------------


def test_every_registered_message_has_a_strategy() -> None:
    # Prepare
    registered = set(REGISTRY)

    # Execute
    missing = registered - set(STRATEGIES)

    # Assert
    assert not missing, f"add a strategy to STRATEGIES in {__file__} for {sorted(missing)}"


@pytest.mark.parametrize("type_name", sorted(REGISTRY))
@given(data=st.data())
def test_message_round_trips(type_name: str, data: st.DataObject) -> None:
    # Prepare
    msg = data.draw(STRATEGIES[type_name])

    # Execute
    frame = encode(msg)
    decoded = decode(frame)
    decoded_as_expected = decode(frame, REGISTRY[type_name])

    # Assert
    assert_same(decoded, msg)
    assert_same(decoded_as_expected, msg)
    assert encode(decoded) == frame


@pytest.mark.parametrize("type_name", sorted(REGISTRY))
@given(data=st.data())
def test_encoding_is_canonical_cbor(type_name: str, data: st.DataObject) -> None:
    # Prepare
    msg = data.draw(STRATEGIES[type_name])

    # Execute
    frame = encode(msg)

    # Assert: re-encoding the plain CBOR value canonically changes nothing
    assert cbor2.dumps(cbor2.loads(frame), canonical=True) == frame


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_every_dtype_round_trips_bit_for_bit(dtype: np.dtype[Any], data: st.DataObject) -> None:
    # Prepare
    array = data.draw(arrays(st.just(dtype)))

    # Execute
    decoded = decode(encode(ModelBlob(tensors={"t": array})), ModelBlob).tensors["t"]

    # Assert
    assert decoded.dtype == dtype
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


@given(metrics=METRICS, data=st.data())
def test_same_metrics_in_any_insertion_order_encode_identically(
    metrics: dict[str, float], data: st.DataObject
) -> None:
    # Prepare
    shuffled = dict(data.draw(st.permutations(list(metrics.items()))))
    fields = {
        "federation": "fed", "session": "s", "round": 1, "parent": b"\1" * 32, "update": b"\2" * 32,
        "size": 10, "num_examples": 5, "signer": b"\3" * 32, "created_ms": 0, "nonce": b"\4" * 16,
    }  # fmt: skip

    # Execute
    one = encode(ModelUpdate(metrics=metrics, **fields))
    other = encode(ModelUpdate(metrics=shuffled, **fields))

    # Assert
    assert one == other


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0.5, "f93800"),
        (-0.0, "f98000"),
        (float("inf"), "f97c00"),
        (float("-inf"), "f9fc00"),
        (float("nan"), "f97e00"),
        (5.960464477539063e-08, "f90001"),  # smallest half-precision subnormal
        (1.401298464324817e-45, "fa00000001"),  # smallest single-precision subnormal
        (0.1, "fb3fb999999999999a"),
        (1e300, "fb7e37e43c8800759c"),
    ],
)
def test_floats_travel_in_their_shortest_exact_form(value: float, wire: str) -> None:
    # Prepare
    update = ModelUpdate(
        federation="f", session="s", round=0, parent=b"\0" * 32, update=b"\0" * 32, size=0,
        num_examples=1, metrics={"m": value}, signer=b"\0" * 32, created_ms=0, nonce=b"\0" * 16,
    )  # fmt: skip

    # Execute
    frame = encode(update)
    decoded = decode(frame, ModelUpdate).metrics["m"]

    # Assert
    assert bytes.fromhex("616d" + wire) in frame  # key "m", then the value
    assert_same(decoded, value)


@pytest.mark.parametrize("value", [INT_MIN, -1, 0, 23, 24, 255, 256, 2**32, INT_MAX])
def test_integers_round_trip_across_the_64_bit_range(value: int) -> None:
    # Prepare
    key = KeyFile(seed=b"\7" * 32, created_ms=value)

    # Execute
    decoded = decode(encode(key), KeyFile)

    # Assert
    assert decoded == key


def test_encoding_an_unregistered_dataclass_is_a_type_error() -> None:
    # Prepare
    record = TensorInfo(name="w", dtype="float32", shape=(2,))

    # Execute / Assert
    with pytest.raises(TypeError):
        encode(record)


@settings(max_examples=200)
@given(data=st.data())
def test_a_flipped_bit_decodes_to_a_valid_message_or_raises_wire_error(data: st.DataObject) -> None:
    # Prepare
    type_name = data.draw(st.sampled_from(sorted(STRATEGIES)))
    frame = bytearray(encode(data.draw(STRATEGIES[type_name])))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)

    # Execute
    try:
        msg = decode(bytes(frame))
    except WireError:
        return

    # Assert: what decodes is a valid message of a registered type, stable under re-encoding
    assert type(msg) in REGISTRY.values()
    assert_same(decode(encode(msg)), msg)
