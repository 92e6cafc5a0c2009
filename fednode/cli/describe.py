"""CLI layer: what ``fednode inspect`` found, as a snapshot (:class:`Inspection`) that both the
rich view and the JSON view render from, plus the JSON view itself.

Pure: no I/O and no rich. Tensors are summarised (dtype, shape, size, a few statistics) and never
dumped; secrets (a key file's seed) are never shown.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednode.crypto import KeyFile, peer_id_from_public_key
from fednode.wire import Envelope, PublicKey
from fednode.wire.arrays import dtype_name

#: Longest byte string shown in full; longer ones show their length and first bytes.
MAX_HEX_BYTES = 64
HEX_PREVIEW_BYTES = 16
#: Fields whose value is secret, by message class.
SECRET_FIELDS: dict[type[Any], frozenset[str]] = {KeyFile: frozenset({"seed"})}


@dataclass(frozen=True, slots=True, kw_only=True)
class Inspection:
    """One decoded input.

    Attributes:
        source: the file name, or ``<stdin>``.
        size: bytes read.
        digest: BLAKE3-256 of those bytes (a blob's content address).
        envelope: the signed envelope, if the input was one; its signature has been verified.
        message: the decoded message (for an envelope, its payload).
    """

    source: str
    size: int
    digest: bytes
    envelope: Envelope | None
    message: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSummary:
    """A tensor without its data. Statistics skip NaN and infinities (counted in ``nonfinite``);
    they are None for an empty tensor or one with no finite value."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    min: float | None
    max: float | None
    mean: float | None
    nonfinite: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def summarize_tensor(name: str, array: np.ndarray[Any, Any]) -> TensorSummary:
    dtype = dtype_name(array.dtype)
    values = array.astype(np.float32) if dtype == "bfloat16" else array
    nonfinite = 0
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        nonfinite = int(values.size - np.count_nonzero(finite))
        if nonfinite:
            values = values[finite]
    lo = hi = mean = None
    if values.size:
        cast = int if values.dtype.kind in "iu" else float
        lo, hi = cast(values.min()), cast(values.max())
        mean = float(values.mean(dtype=np.float64))
    return TensorSummary(
        name=name, dtype=dtype, shape=tuple(array.shape), nbytes=int(array.nbytes),
        min=lo, max=hi, mean=mean, nonfinite=nonfinite,
    )  # fmt: skip


def tensor_summaries(value: Any) -> list[TensorSummary] | None:
    """Summaries if ``value`` is a tensor or a model (name -> tensor), else None."""
    if isinstance(value, np.ndarray):
        return [summarize_tensor("", value)]
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        return [summarize_tensor(name, array) for name, array in value.items()]
    return None


_PUBLIC_KEY_FIELDS: dict[type[Any], frozenset[str]] = {}


def _public_key_fields(cls: type[Any]) -> frozenset[str]:
    names = _PUBLIC_KEY_FIELDS.get(cls)
    if names is None:
        hints = typing.get_type_hints(cls)
        names = frozenset(n for n, h in hints.items() if PublicKey in (h, *typing.get_args(h)))
        _PUBLIC_KEY_FIELDS[cls] = names
    return names


def is_public_key(obj: Any, name: str) -> bool:
    """Whether field ``name`` of the message or record ``obj`` holds a peer's public key."""
    return name in _public_key_fields(type(obj))


def is_secret(obj: Any, name: str) -> bool:
    return name in SECRET_FIELDS.get(type(obj), frozenset())


def peer_id_or_none(public_key: bytes) -> str | None:
    try:
        return peer_id_from_public_key(public_key)
    except ValueError:
        return None


def fields_of(obj: Any) -> list[tuple[str, Any]]:
    """The (name, value) pairs of a message or record, in declaration order."""
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]


def inspection_json(inspection: Inspection) -> dict[str, Any]:
    """The JSON view: bytes as hex, tensors as {dtype, shape, nbytes, min, max, mean, nonfinite}."""
    out: dict[str, Any] = {
        "source": inspection.source,
        "size": inspection.size,
        "digest": inspection.digest.hex(),
    }
    envelope = inspection.envelope
    if envelope is not None:
        out["envelope"] = {
            "signer": envelope.signer.hex(),
            "signer_peer_id": peer_id_or_none(envelope.signer),
            "domain": envelope.domain,
            "signature": envelope.signature.hex(),
            "signature_valid": True,
        }
    msg = inspection.message
    out["message"] = {"type": msg.TYPE, "v": msg.VERSION, **_object_json(msg)}
    return out


def _object_json(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields_of(obj):
        if is_secret(obj, name):
            out[name] = None
            continue
        out[name] = _value_json(value)
        if is_public_key(obj, name) and value is not None:
            out[f"{name}_peer_id"] = peer_id_or_none(value)
    return out


def _value_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinity: "nan", "inf", "-inf" instead.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        if len(value) <= MAX_HEX_BYTES:
            return value.hex()
        return {"nbytes": len(value), "head": value[:HEX_PREVIEW_BYTES].hex()}
    tensors = tensor_summaries(value)
    if tensors is not None:
        rows = [_tensor_json(t) for t in tensors]
        return rows[0] if isinstance(value, np.ndarray) else rows
    if dataclasses.is_dataclass(value):
        return _object_json(value)
    if isinstance(value, dict):
        return {key: _value_json(v) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_value_json(v) for v in value]
    raise TypeError(f"no JSON view for {type(value).__name__}")


def _tensor_json(t: TensorSummary) -> dict[str, Any]:
    row: dict[str, Any] = {"name": t.name} if t.name else {}
    row.update(
        dtype=t.dtype, shape=list(t.shape), nbytes=t.nbytes, min=t.min, max=t.max, mean=t.mean
    )
    row["nonfinite"] = t.nonfinite
    return row
