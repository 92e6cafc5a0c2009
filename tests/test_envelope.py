"""Signed envelopes: a valid one opens; any tampering, relabelling or wrong author is a
BadSignatureError."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fednode.crypto import (
    KeyFile,
    NodeKey,
    domain_of,
    open_envelope,
    seal,
    seal_bytes,
    signing_input,
    verify_envelope,
)
from fednode.errors import BadSignatureError, WireError
from fednode.wire import (
    Contribution,
    Envelope,
    GlobalModel,
    Limits,
    ModelUpdate,
    PartialAggregate,
    PartialRef,
    decode,
    encode,
)

CLIENT = NodeKey(b"\x11" * 32)
COMBINER = NodeKey(b"\x22" * 32)
REDUCER = NodeKey(b"\x33" * 32)
D1, D2 = b"\xd1" * 32, b"\xd2" * 32


def model_update(signer: NodeKey = CLIENT, **changes: Any) -> ModelUpdate:
    fields: dict[str, Any] = {
        "federation": "fed", "session": "s1", "round": 4, "parent": D1, "update": D2, "size": 100,
        "num_examples": 32, "metrics": {"loss": 0.5}, "signer": signer.public_key,
        "created_ms": 1_700_000_000_000, "nonce": b"\x01" * 16,
    }  # fmt: skip
    return ModelUpdate(**(fields | changes))


def partial_aggregate(combiner: NodeKey = COMBINER) -> PartialAggregate:
    return PartialAggregate(
        federation="fed", session="s1", round=4, parent=D1, partial=D2, size=100,
        contributions=(Contribution(signer=CLIENT.public_key, update=D2, weight=32),),
        total_weight=32, combiner=combiner.public_key, created_ms=0, nonce=b"\x02" * 16,
    )  # fmt: skip


def global_model(reducer: NodeKey = REDUCER) -> GlobalModel:
    ref = PartialRef(combiner=COMBINER.public_key, partial=D2, total_weight=32, contributions=D1)
    return GlobalModel(
        federation="fed", session="s1", round=4, model=D2, size=100, parent=D1, partials=(ref,),
        num_examples=32, reducer=reducer.public_key, created_ms=0,
    )  # fmt: skip


def signed_as(key: NodeKey, domain: str, payload: bytes) -> bytes:
    """An envelope whose signature by ``key`` is genuine for exactly this domain and payload."""
    return encode(
        Envelope(
            signer=key.public_key,
            domain=domain,
            payload=payload,
            signature=key.sign(signing_input(domain, payload)),
        )
    )


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ---------------------------------------------------------------------------------- opening


@pytest.mark.parametrize(
    ("key", "msg"),
    [(CLIENT, model_update()), (COMBINER, partial_aggregate()), (REDUCER, global_model())],
    ids=["model-update", "partial-aggregate", "global-model"],
)
def test_a_sealed_message_opens_to_itself(key: NodeKey, msg: Any) -> None:
    # Prepare
    frame = seal_bytes(key, msg)

    # Execute
    opened, envelope = open_envelope(frame)
    opened_as_expected, _ = open_envelope(frame, type(msg))

    # Assert
    assert opened == msg
    assert opened_as_expected == msg
    assert envelope.signer == key.public_key
    assert envelope.domain == domain_of(type(msg)) == f"fednode/{msg.TYPE}/v{msg.VERSION}"
    assert decode(envelope.payload) == msg


def test_open_accepts_an_envelope_object() -> None:
    # Prepare
    envelope = seal(CLIENT, model_update())

    # Execute
    opened, same = open_envelope(envelope, ModelUpdate)

    # Assert
    assert opened == model_update()
    assert same is envelope


def test_sealing_is_deterministic() -> None:
    # Execute
    frames = {seal_bytes(CLIENT, model_update()) for _ in range(3)}

    # Assert
    assert len(frames) == 1


# -------------------------------------------------------------------------------- tampering


def test_a_tampered_payload_does_not_verify() -> None:
    # Prepare: the forged payload is itself a perfectly valid update, with a larger weight
    envelope = seal(CLIENT, model_update())
    forged = dataclasses.replace(envelope, payload=encode(model_update(num_examples=10_000)))

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(encode(forged))


def test_any_flipped_payload_byte_does_not_verify() -> None:
    # Prepare
    envelope = seal(CLIENT, model_update())

    # Execute / Assert
    for index in range(len(envelope.payload)):
        forged = dataclasses.replace(envelope, payload=flip(envelope.payload, index))
        with pytest.raises(BadSignatureError):
            open_envelope(forged)


def test_any_flipped_signature_byte_does_not_verify() -> None:
    # Prepare
    envelope = seal(CLIENT, model_update())

    # Execute / Assert
    for index in range(64):
        forged = dataclasses.replace(envelope, signature=flip(envelope.signature, index))
        with pytest.raises(BadSignatureError):
            open_envelope(encode(forged))


def test_a_relabelled_domain_does_not_verify() -> None:
    # Prepare: a signed update, its domain relabelled to make it pass for a global model
    envelope = seal(CLIENT, model_update())
    relabelled = dataclasses.replace(envelope, domain=domain_of(GlobalModel))

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(encode(relabelled))
    with pytest.raises(BadSignatureError):
        open_envelope(encode(relabelled), GlobalModel)


def test_a_raw_signature_without_the_envelope_context_does_not_verify() -> None:
    # Prepare: the signer's key signed the payload bytes, but not as an envelope
    payload = encode(model_update())
    envelope = Envelope(
        signer=CLIENT.public_key,
        domain=domain_of(ModelUpdate),
        payload=payload,
        signature=CLIENT.sign(payload),
    )

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(envelope)


@pytest.mark.parametrize("expected", [None, ModelUpdate], ids=["any", "expected"])
def test_a_payload_of_another_type_than_its_domain_is_refused(expected: type[Any] | None) -> None:
    # Prepare: a genuine signature, but over a global model labelled as an update
    frame = signed_as(REDUCER, domain_of(ModelUpdate), encode(global_model()))

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(frame, expected)


def test_a_domain_no_message_has_is_refused() -> None:
    # Prepare
    frame = signed_as(CLIENT, "fednode/model-update/v2", encode(model_update()))

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(frame)


# ------------------------------------------------------------------------------------- keys


def test_a_swapped_signer_does_not_verify() -> None:
    # Prepare: the envelope claims another signer than the key that signed it
    envelope = seal(CLIENT, model_update(signer=COMBINER))
    claimed = dataclasses.replace(envelope, signer=COMBINER.public_key)

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(encode(claimed))


@pytest.mark.parametrize(
    "msg",
    [
        model_update(signer=COMBINER),
        partial_aggregate(combiner=REDUCER),
        global_model(reducer=CLIENT),
    ],
    ids=["model-update", "partial-aggregate", "global-model"],
)
def test_a_message_whose_author_is_not_its_signer_is_refused(msg: Any) -> None:
    # Prepare: validly signed, but by someone other than the author the message names
    frame = seal_bytes(NodeKey(b"\x99" * 32), msg)

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(frame)


# ---------------------------------------------------------------------------- expected type


@pytest.mark.parametrize("expected", [GlobalModel, PartialAggregate, Envelope])
def test_open_with_an_expected_type_refuses_other_types(expected: type[Any]) -> None:
    # Prepare
    frame = seal_bytes(CLIENT, model_update())

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        open_envelope(frame, expected)


def test_verify_envelope_checks_the_domain_it_is_given() -> None:
    # Prepare
    envelope = seal(CLIENT, model_update())

    # Execute / Assert
    verify_envelope(envelope)
    verify_envelope(envelope, domain_of(ModelUpdate))
    with pytest.raises(BadSignatureError):
        verify_envelope(envelope, domain_of(GlobalModel))


# ---------------------------------------------------------------------------- malformed input


def test_bytes_that_are_not_an_envelope_are_a_wire_error() -> None:
    # Prepare
    frame = encode(model_update())

    # Execute / Assert
    with pytest.raises(WireError):
        open_envelope(frame)
    with pytest.raises(WireError):
        open_envelope(seal_bytes(CLIENT, model_update())[:-1])


def test_a_domain_with_nul_is_a_wire_error() -> None:
    # Prepare: NUL ends the domain in the signed bytes, so none may contain one
    frame = seal_bytes(CLIENT, model_update())
    domain = domain_of(ModelUpdate).encode()
    forged = frame.replace(
        bytes([0x60 + len(domain)]) + domain, bytes([0x61 + len(domain)]) + domain + b"\0"
    )
    assert forged != frame

    # Execute / Assert
    with pytest.raises(WireError):
        open_envelope(forged)


def test_a_payload_over_the_limits_is_a_wire_error() -> None:
    # Prepare
    frame = seal_bytes(CLIENT, model_update(metrics={f"m{i}": float(i) for i in range(100)}))
    envelope = decode(frame, Envelope)
    limits = Limits(max_frame=len(envelope.payload) - 1)

    # Execute / Assert
    with pytest.raises(WireError):
        open_envelope(envelope, ModelUpdate, limits)


def test_key_files_are_never_signed_nor_accepted_from_an_envelope() -> None:
    # Prepare: a key file is a local storage format; one in an envelope is a leak or an attack
    key_file = KeyFile(seed=CLIENT.seed, created_ms=0)
    forged = signed_as(CLIENT, domain_of(KeyFile), encode(key_file))

    # Execute / Assert
    with pytest.raises(ValueError):
        seal(CLIENT, key_file)
    with pytest.raises(WireError):
        open_envelope(forged)


def test_contributions_digest_is_blake3_of_the_canonical_array() -> None:
    # Prepare
    import cbor2

    from fednode.crypto import contributions_digest, digest
    from fednode.wire import Contribution

    contributions = [
        Contribution(signer=bytes([1]) * 32, update=bytes([2]) * 32, weight=10),
        Contribution(signer=bytes([3]) * 32, update=bytes([4]) * 32, weight=7),
    ]
    expected = cbor2.dumps(
        [{"signer": c.signer, "update": c.update, "weight": c.weight} for c in contributions],
        canonical=True,
    )
    # Execute
    result = contributions_digest(contributions)
    # Assert
    assert result == digest(expected)
    assert result != contributions_digest(contributions[:1])
