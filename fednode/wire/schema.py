"""Wire layer: typed messages <-> canonical CBOR.

A message is a frozen, slotted, keyword-only dataclass registered with :func:`message`, which
gives it a wire ``type`` name and ``v`` version. It travels as a CBOR map of its fields plus
``type`` and ``v``. A :func:`record` is a dataclass nested inside messages (no type, no version).
Field types are read from the annotations once and compiled into checkers, so decoding rejects
unknown or missing fields, wrong types and wrong lengths with a :class:`WireError` that names the
field. No trio, no libp2p.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NewType, Protocol, TypeVar, cast

import cbor2
import numpy as np

from fednode.errors import WireError
from fednode.wire.arrays import Splicer, decode_array, decode_model, encode_array, encode_model
from fednode.wire.scan import CONTROL_LIMITS, Limits, check_frame

# Identifier types. Fixed-size byte strings are checked for their length on decode.
Digest = NewType("Digest", bytes)  #: BLAKE3-256 of a blob's bytes, 32 bytes
PublicKey = NewType("PublicKey", bytes)  #: raw Ed25519 public key, 32 bytes
Signature = NewType("Signature", bytes)  #: Ed25519 signature, 64 bytes
Nonce = NewType("Nonce", bytes)  #: random, 16 bytes
PeerId = NewType("PeerId", str)  #: libp2p peer ID, base58 ``12D3KooW...``
FederationId = NewType("FederationId", str)
SessionId = NewType("SessionId", str)
Model = NewType("Model", dict)  # type: ignore[type-arg]  # ordered name -> np.ndarray

FIXED_BYTES: dict[Any, int] = {Digest: 32, PublicKey: 32, Signature: 64, Nonce: 16}
MAX_TEXT = 4096
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1


class Message(Protocol):
    """What :func:`message` adds to a dataclass."""

    TYPE: ClassVar[str]
    VERSION: ClassVar[int]


M = TypeVar("M")
_Check = Callable[[Any, str], Any]  # (cbor value, path) -> python value, or WireError
_Dump = Callable[[Any, Splicer | None], Any]  # (python value, splicer) -> cbor value


@dataclasses.dataclass(frozen=True, slots=True)
class _Codec:
    fields: tuple[tuple[str, _Check, _Dump], ...]
    names: frozenset[str]


REGISTRY: dict[str, type[Any]] = {}
LOCAL_TYPES: set[str] = set()
_CODECS: dict[type[Any], _Codec] = {}


def message(
    type_name: str, version: int = 1, *, local: bool = False
) -> Callable[[type[M]], type[M]]:
    """Register a dataclass as the wire message ``type_name``, version ``version``.

    A ``local`` message (a key file) is a storage format: it decodes from disk, but is never
    signed into, or accepted from, an envelope.
    """

    def register(cls: type[M]) -> type[M]:
        if type_name in REGISTRY:
            raise TypeError(f"wire type {type_name!r} registered twice")
        _require_dataclass(cls)
        cls.TYPE = type_name  # type: ignore[attr-defined]
        cls.VERSION = version  # type: ignore[attr-defined]
        REGISTRY[type_name] = cls
        if local:
            LOCAL_TYPES.add(type_name)
        return cls

    return register


def record(cls: type[M]) -> type[M]:
    """Mark a dataclass as a record nested in messages."""
    _require_dataclass(cls)
    return cls


def _require_dataclass(cls: type[Any]) -> None:
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or not hasattr(cls, "__slots__"):
        raise TypeError(f"{cls.__name__} must be a frozen, slotted dataclass")


def _codec(cls: type[Any]) -> _Codec:
    codec = _CODECS.get(cls)
    if codec is None:
        hints = typing.get_type_hints(cls)
        fields = tuple((f.name, *_compile(hints[f.name])) for f in dataclasses.fields(cls))
        codec = _Codec(fields=fields, names=frozenset(name for name, _, _ in fields))
        _CODECS[cls] = codec
    return codec


def _identity(value: Any, splicer: Splicer | None = None) -> Any:
    return value


def _compile(tp: Any) -> tuple[_Check, _Dump]:
    """A (check, dump) pair for one annotated type."""
    if tp in FIXED_BYTES:
        size = FIXED_BYTES[tp]

        def check_fixed(v: Any, path: str) -> Any:
            if type(v) is not bytes or len(v) != size:
                raise WireError(f"expected {size} bytes", path)
            return v

        return check_fixed, _identity
    if tp is Model:
        return decode_model, encode_model
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:
        return _compile(supertype)
    if tp is np.ndarray:
        return decode_array, encode_array
    if tp in (int, float, str, bytes, bool):
        return _scalar(tp), _identity
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        allowed = frozenset(args)

        def check_literal(v: Any, path: str) -> Any:
            if not isinstance(v, str) or v not in allowed:
                raise WireError(f"expected one of {sorted(allowed)}, got {v!r}", path)
            return v

        return check_literal, _identity
    if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
        inner_check, inner_dump = _compile(next(a for a in args if a is not type(None)))
        return (
            lambda v, path: None if v is None else inner_check(v, path),
            lambda v, s: None if v is None else inner_dump(v, s),
        )
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_check, item_dump = _compile(args[0])

        def check_tuple(v: Any, path: str) -> Any:
            if not isinstance(v, (list, tuple)):
                raise WireError(f"expected an array, got {type(v).__name__}", path)
            return tuple(item_check(x, f"{path}[{i}]") for i, x in enumerate(v))

        return check_tuple, lambda v, s: [item_dump(x, s) for x in v]
    if origin is dict and args[0] is str:
        value_check, value_dump = _compile(args[1])

        def check_map(v: Any, path: str) -> Any:
            if not isinstance(v, dict):
                raise WireError(f"expected a map, got {type(v).__name__}", path)
            out = {}
            for key, x in v.items():
                if type(key) is not str or len(key) > MAX_TEXT:
                    raise WireError("map keys must be text strings", path)
                out[key] = value_check(x, f"{path}.{key}")
            return out

        return check_map, lambda v, s: {k: value_dump(x, s) for k, x in v.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return (
            lambda v, path: _from_map(tp, v, path, typed=False),
            lambda v, s: _to_map(v, s, typed=False),
        )
    raise TypeError(f"no wire encoding for {tp!r}")


def _scalar(tp: type[Any]) -> _Check:
    def check(v: Any, path: str) -> Any:
        if type(v) is not tp:
            raise WireError(f"expected {tp.__name__}, got {type(v).__name__}", path)
        if tp is int and not INT_MIN <= v <= INT_MAX:
            raise WireError("integer out of the 64-bit range", path)
        if tp is str and len(v) > MAX_TEXT:
            raise WireError(f"text longer than {MAX_TEXT} characters", path)
        return v

    return check


def _to_map(obj: Any, splicer: Splicer | None, *, typed: bool) -> dict[str, Any]:
    codec = _codec(type(obj))
    out = {name: dump(getattr(obj, name), splicer) for name, _, dump in codec.fields}
    if typed:
        out["type"] = obj.TYPE
        out["v"] = obj.VERSION
    return out


def _from_map(cls: type[M], value: Any, path: str, *, typed: bool) -> M:
    if not isinstance(value, dict):
        raise WireError(f"expected a map, got {type(value).__name__}", path)
    codec = _codec(cls)
    keys = set(value)
    if typed:
        keys -= {"type", "v"}
    if keys != codec.names:
        prefix = f"{path}." if path else ""
        extra, missing = sorted(map(str, keys - codec.names)), sorted(codec.names - keys)
        what = "; ".join(
            part
            for part in (
                f"unknown field(s) {', '.join(prefix + k for k in extra)}" if extra else "",
                f"missing field(s) {', '.join(prefix + k for k in missing)}" if missing else "",
            )
            if part
        )
        raise WireError(what, path)
    kwargs = {
        name: check(value[name], f"{path}.{name}" if path else name)
        for name, check, _ in codec.fields
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise WireError(str(exc), path) from exc


def encode(msg: Any) -> bytes:
    """The canonical CBOR encoding of a registered message.

    Large tensors are not copied into the value tree: a :class:`Splicer` puts their bytes straight
    into the output, so each is copied once (``tests/test_codec_fastpath.py`` holds the result to
    plain ``cbor2.dumps(..., canonical=True)``, byte for byte).
    """
    if getattr(type(msg), "TYPE", None) not in REGISTRY:
        raise TypeError(f"{type(msg).__name__} is not a registered wire message")
    splicer = Splicer()
    skeleton = cbor2.dumps(_to_map(msg, splicer, typed=True), canonical=True)
    if not splicer:
        # Small messages: check that what we send is what receivers accept (a 31-byte digest or
        # an int where a float belongs is our bug, and must fail here rather than at every peer).
        try:
            _from_map(type(msg), cbor2.loads(skeleton), "", typed=True)
        except WireError as exc:
            raise ValueError(f"cannot encode {msg.TYPE!r}: {exc}") from None
        return skeleton
    spliced = splicer.splice(skeleton)
    if spliced is None:  # a placeholder's random marker also occurs elsewhere in the message
        return cbor2.dumps(_to_map(msg, None, typed=True), canonical=True)
    return spliced


def encode_records(records: Sequence[Any]) -> bytes:
    """The canonical CBOR array of records (maps of their fields, no type or version): what a
    commitment to a list of records, such as a partial's contributions, hashes."""
    records_value = [_to_map(r, None, typed=False) for r in records]
    encoded: bytes = cbor2.dumps(records_value, canonical=True)
    return encoded


def decode_value(data: bytes, limits: Limits = CONTROL_LIMITS) -> Any:
    """Check ``data`` structurally (:func:`check_frame`), then decode it to plain CBOR values."""
    check_frame(data, limits)
    try:
        return cbor2.loads(
            bytes(data),
            max_depth=limits.max_depth + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except (cbor2.CBORDecodeError, ValueError, OverflowError) as exc:
        raise WireError(f"undecodable CBOR: {exc}") from exc


def message_class(type_name: str, version: int) -> type[Any]:
    """The registered class for a wire type and version, or :class:`WireError`."""
    cls = REGISTRY.get(type_name)
    if cls is None:
        raise WireError(f"unknown message type {type_name!r}", "type")
    if version != cls.VERSION:
        ours = f"we speak {cls.VERSION}"
        raise WireError(f"{type_name!r} version {version} is not supported ({ours})", "v")
    return cls


def decode(data: bytes, expected: type[M] | None = None, limits: Limits = CONTROL_LIMITS) -> M:
    """Decode one message. With ``expected``, any other message type is a :class:`WireError`."""
    value = decode_value(data, limits)
    if not isinstance(value, dict):
        raise WireError(f"a message must be a map, got {type(value).__name__}")
    type_name, version = value.get("type"), value.get("v")
    if type(type_name) is not str:
        raise WireError("missing or non-text 'type'", "type")
    if type(version) is not int:
        raise WireError("missing or non-integer 'v'", "v")
    cls = message_class(type_name, version)
    if expected is not None and cls is not expected:
        raise WireError(f"expected a {expected.TYPE!r} message, got {type_name!r}", "type")  # type: ignore[attr-defined]
    return cast(M, _from_map(cls, value, "", typed=True))
