"""Wire layer: the core messages every node, stored model and signature carries.

Each is spec'd in ``protocols/wire.md`` and ``protocols/messages.cddl`` (a test keeps them in step).
``__post_init__`` checks invariants that types cannot express; a violation decodes as a
:class:`WireError`. Times are integer milliseconds since the Unix epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fednode.wire.arrays import MAX_NAME_LEN, MAX_NDIM
from fednode.wire.schema import (
    Digest,
    FederationId,
    Model,
    Nonce,
    PublicKey,
    SessionId,
    Signature,
    message,
    record,
)

DType = Literal[
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "bfloat16",
]  # fmt: skip
BlobKind = Literal["model", "update", "partial"]


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ValueError(reason)


@message("envelope")
@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """Signed bytes: ``signature`` is Ed25519 by ``signer`` over the domain-separated payload.

    The domain says what the payload is for (``fednode/<type>/v<version>``), so a signature on one
    kind of message can never be replayed as another. Verify before decoding the payload.
    """

    signer: PublicKey
    domain: str
    payload: bytes
    signature: Signature

    def __post_init__(self) -> None:
        _require(0 < len(self.domain) <= 128, "domain must be 1 to 128 characters")
        # NUL ends the domain in the signed bytes (crypto.envelope.signing_input).
        _require("\x00" not in self.domain, "domain must not contain NUL")


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One entry of a blob's tensor table."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        _require(0 < len(self.name) <= MAX_NAME_LEN, f"name must be 1 to {MAX_NAME_LEN} characters")
        _require(len(self.shape) <= MAX_NDIM, f"at most {MAX_NDIM} dimensions")
        _require(all(0 <= d < 1 << 40 for d in self.shape), "dimensions must be in [0, 2**40)")


@message("blob-header")
@dataclass(frozen=True, slots=True, kw_only=True)
class BlobHeader:
    """Describes a content-addressed blob before its bytes flow: what it is, how big, its digest."""

    digest: Digest
    size: int
    kind: BlobKind
    tensors: tuple[TensorInfo, ...]

    def __post_init__(self) -> None:
        _require(self.size >= 0, "size must be non-negative")


@message("model")
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelBlob:
    """A model's parameters in order. Its canonical encoding is the blob; its digest the address."""

    tensors: Model


@message("model-update")
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelUpdate:
    """A client's trained parameters for one round, signed by the client (``signer``)."""

    federation: FederationId
    session: SessionId
    round: int
    parent: Digest  #: the global model the client trained from
    update: Digest  #: the blob holding the trained parameters
    size: int  #: that blob's size in bytes
    num_examples: int
    metrics: dict[str, float]
    signer: PublicKey
    created_ms: int
    nonce: Nonce

    def __post_init__(self) -> None:
        # Training code reports counts as ints; the wire carries metrics as floats.
        if any(type(v) is int for v in self.metrics.values()):
            object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})
        _require(self.round >= 0, "round must be non-negative")
        _require(self.num_examples > 0, "num_examples must be positive")
        _require(self.size >= 0, "size must be non-negative")
        _require(self.created_ms >= 0, "created_ms must be non-negative")


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class Contribution:
    """One client update counted in a partial aggregate."""

    signer: PublicKey
    update: Digest
    weight: int

    def __post_init__(self) -> None:
        _require(self.weight > 0, "weight must be positive")


@message("partial-aggregate")
@dataclass(frozen=True, slots=True, kw_only=True)
class PartialAggregate:
    """A combiner's weighted mean of the updates it holds, signed by the combiner.

    ``contributions`` are sorted by signer with no signer twice, so one update is never counted
    twice and equal partials encode identically; ``total_weight`` is their sum, which lets a tree
    of combiners give exactly the flat FedAvg result.
    """

    federation: FederationId
    session: SessionId
    round: int
    parent: Digest
    partial: Digest  #: the blob holding the weighted mean
    size: int
    contributions: tuple[Contribution, ...]
    total_weight: int
    combiner: PublicKey
    created_ms: int
    nonce: Nonce

    def __post_init__(self) -> None:
        _require(self.round >= 0, "round must be non-negative")
        _require(self.size >= 0, "size must be non-negative")
        _require(self.created_ms >= 0, "created_ms must be non-negative")
        _require(len(self.contributions) > 0, "a partial needs at least one contribution")
        signers = [c.signer for c in self.contributions]
        _require(
            signers == sorted(set(signers)), "contributions must be sorted by signer, each once"
        )
        _require(
            self.total_weight == sum(c.weight for c in self.contributions),
            "total_weight must be the sum of weights",
        )


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class PartialRef:
    """A partial aggregate a global model was reduced from."""

    combiner: PublicKey
    partial: Digest
    total_weight: int
    contributions: Digest  #: BLAKE3 of the canonical CBOR array of the partial's contributions

    def __post_init__(self) -> None:
        _require(self.total_weight > 0, "total_weight must be positive")


@message("global-model")
@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalModel:
    """A new global model, signed by the reducer that built it."""

    federation: FederationId
    session: SessionId
    round: int
    model: Digest  #: the blob holding the new parameters
    size: int
    parent: Digest | None  #: the previous global model; None for the initial model
    partials: tuple[PartialRef, ...]
    num_examples: int
    reducer: PublicKey
    created_ms: int

    def __post_init__(self) -> None:
        _require(self.round >= 0, "round must be non-negative")
        _require(self.size >= 0, "size must be non-negative")
        _require(self.created_ms >= 0, "created_ms must be non-negative")
        _require(
            self.parent is not None or not self.partials,
            "an initial model (no parent) has no partials",
        )
        _require(
            self.num_examples == sum(p.total_weight for p in self.partials),
            "num_examples must be the sum of partial weights",
        )
        combiners = [p.combiner for p in self.partials]
        _require(
            combiners == sorted(set(combiners)), "partials must be sorted by combiner, each once"
        )
