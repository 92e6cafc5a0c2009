"""Wire layer: canonical CBOR messages, arrays and models. Imports nothing above it (no crypto,
no trio, no libp2p)."""

from __future__ import annotations

from fednode.wire.arrays import decode_array, decode_model, encode_array, encode_model
from fednode.wire.control import Heartbeat, Role, control_topic, is_federation_id
from fednode.wire.messages import (
    BlobHeader,
    Contribution,
    Envelope,
    GlobalModel,
    ModelBlob,
    ModelUpdate,
    PartialAggregate,
    PartialRef,
    TensorInfo,
)
from fednode.wire.scan import BLOB_LIMITS, CONTROL_LIMITS, Limits, check_frame
from fednode.wire.schema import (
    REGISTRY,
    Digest,
    FederationId,
    Model,
    Nonce,
    PeerId,
    PublicKey,
    SessionId,
    Signature,
    decode,
    decode_value,
    encode,
    message,
    record,
)

__all__ = [
    "BLOB_LIMITS",
    "CONTROL_LIMITS",
    "REGISTRY",
    "BlobHeader",
    "Contribution",
    "Digest",
    "Envelope",
    "FederationId",
    "GlobalModel",
    "Heartbeat",
    "Limits",
    "Model",
    "ModelBlob",
    "ModelUpdate",
    "Nonce",
    "PartialAggregate",
    "PartialRef",
    "PeerId",
    "PublicKey",
    "Role",
    "SessionId",
    "Signature",
    "TensorInfo",
    "check_frame",
    "control_topic",
    "decode",
    "decode_array",
    "decode_model",
    "decode_value",
    "encode",
    "encode_array",
    "encode_model",
    "is_federation_id",
    "message",
    "record",
]
