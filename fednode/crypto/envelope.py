"""Crypto layer: signed envelopes.

The signature covers ``b"fednode-envelope-v1\\x00" + domain + b"\\x00" + payload``; the domain is
``fednode/<type>/v<version>`` of the payload's message type, so a signature made for one kind of
message never verifies as another. :func:`open_envelope` verifies before it decodes the payload,
then checks that the payload's type matches the domain and, for messages that name their author,
that the author is the signer.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from fednode.crypto.keys import NodeKey, peer_id_from_public_key, verify
from fednode.errors import BadSignatureError, WireError
from fednode.wire import CONTROL_LIMITS, Envelope, Limits, decode, encode
from fednode.wire.schema import LOCAL_TYPES

M = TypeVar("M")
_CONTEXT = b"fednode-envelope-v1\x00"

#: Messages whose named author must be the envelope's signer: the field holds the signer's raw
#: public key, or (a text field) the signer's peer ID.
AUTHOR_FIELDS = {
    "model-update": "signer",
    "partial-aggregate": "combiner",
    "global-model": "reducer",
    "heartbeat": "peer",
    "round-plan": "reducer",
    "round-result": "reducer",
    "session-ended": "reducer",
    "session-checkpoint": "reducer",
}


def domain_of(cls: type[Any]) -> str:
    """The signing domain of a message class."""
    return f"fednode/{cls.TYPE}/v{cls.VERSION}"


def signing_input(domain: str, payload: bytes) -> bytes:
    if "\x00" in domain:
        raise ValueError("a domain cannot contain NUL")
    return _CONTEXT + domain.encode() + b"\x00" + payload


def seal(key: NodeKey, msg: Any) -> Envelope:
    """Sign a message into an envelope."""
    if msg.TYPE in LOCAL_TYPES:
        raise ValueError(f"a {msg.TYPE!r} is a local storage format and is never signed")
    payload = encode(msg)
    domain = domain_of(type(msg))
    return Envelope(
        signer=key.public_key,
        domain=domain,
        payload=payload,
        signature=key.sign(signing_input(domain, payload)),
    )


def seal_bytes(key: NodeKey, msg: Any) -> bytes:
    """The canonical encoding of :func:`seal`'s envelope."""
    return encode(seal(key, msg))


def verify_envelope(envelope: Envelope, domain: str | None = None) -> None:
    """Raise :class:`BadSignatureError` unless the envelope verifies (for ``domain``, if given)."""
    if domain is not None and envelope.domain != domain:
        raise BadSignatureError(f"envelope is for {envelope.domain!r}, expected {domain!r}")
    verify(envelope.signer, signing_input(envelope.domain, envelope.payload), envelope.signature)


def open_envelope(
    data: bytes | Envelope, expected: type[M] | None = None, limits: Limits = CONTROL_LIMITS
) -> tuple[M, Envelope]:
    """Verify then decode a signed message. Returns (message, envelope).

    Raises:
        WireError: the envelope or payload is malformed.
        BadSignatureError: the signature, domain or author does not check out.
    """
    envelope = data if isinstance(data, Envelope) else decode(data, Envelope, limits)
    verify_envelope(envelope, domain_of(expected) if expected is not None else None)
    # Decoded as any type: with the domain already matched to ``expected``, a payload of another
    # type is a signer's lie about what it signed, caught as such just below.
    msg: Any = decode(envelope.payload, limits=limits)
    if msg.TYPE in LOCAL_TYPES:
        raise WireError(f"a {msg.TYPE!r} never travels in an envelope", "payload")
    if domain_of(type(msg)) != envelope.domain:
        raise BadSignatureError(f"payload is a {msg.TYPE!r} but was signed for {envelope.domain!r}")
    author = AUTHOR_FIELDS.get(msg.TYPE)
    if author is not None and not _is_signer(getattr(msg, author), envelope.signer):
        raise BadSignatureError(f"{msg.TYPE} names a {author} other than its signer")
    return cast(M, msg), envelope


def _is_signer(author: object, signer: bytes) -> bool:
    if isinstance(author, str):  # a peer ID
        return author == peer_id_from_public_key(signer)
    return author == signer


__all__ = ["domain_of", "open_envelope", "seal", "seal_bytes", "signing_input", "verify_envelope"]
