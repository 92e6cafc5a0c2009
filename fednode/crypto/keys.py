"""Crypto layer: a node's Ed25519 identity, its key file and its libp2p peer ID.

One key is both the node's libp2p identity and its signing key. The peer ID is the standard one:
the identity multihash of the protobuf-encoded public key (``KeyType = Ed25519``), in base58btc,
so it reads ``12D3KooW...`` and matches what every libp2p implementation derives.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import base58
import nacl.exceptions
import nacl.signing

from fednode.errors import BadSignatureError, KeyFileError, WireError
from fednode.wire import PeerId, PublicKey, Signature, decode, encode, message

SEED_SIZE = 32
_PROTOBUF_ED25519_PREFIX = (
    b"\x08\x01\x12\x20"  # field 1 (Type) = 1 (Ed25519); field 2 (Data), 32 bytes
)
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"  # identity hash, 36 bytes
MAX_KEY_FILE = 4096


@message("ed25519-key", local=True)
@dataclass(frozen=True, slots=True, kw_only=True)
class KeyFile:
    """A node key as stored on disk (mode 0600)."""

    seed: bytes
    created_ms: int

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_SIZE:
            raise ValueError(f"seed must be {SEED_SIZE} bytes")


def peer_id_from_public_key(public_key: bytes) -> PeerId:
    """The libp2p peer ID (``12D3KooW...``) of a raw Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    encoded = _PROTOBUF_ED25519_PREFIX + public_key
    return PeerId(base58.b58encode(_IDENTITY_MULTIHASH_PREFIX + encoded).decode("ascii"))


def public_key_from_peer_id(peer_id: str) -> PublicKey:
    """The Ed25519 public key inlined in a ``12D3KooW...`` peer ID, or ``ValueError``."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise ValueError(f"not a base58 peer ID: {peer_id!r}") from exc
    prefix = _IDENTITY_MULTIHASH_PREFIX + _PROTOBUF_ED25519_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"not an Ed25519 identity peer ID: {peer_id!r}")
    return PublicKey(raw[len(prefix) :])


class NodeKey:
    """An Ed25519 signing key with its public key and peer ID."""

    __slots__ = ("_signing", "peer_id", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise KeyFileError(f"an Ed25519 seed is {SEED_SIZE} bytes, got {len(seed)}")
        self._signing = nacl.signing.SigningKey(seed)
        self.public_key = PublicKey(bytes(self._signing.verify_key))
        self.peer_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(os.urandom(SEED_SIZE))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Handle with care."""
        return bytes(self._signing)

    def sign(self, data: bytes) -> Signature:
        """A raw Ed25519 signature over ``data`` (envelopes add the domain; see ``envelope``)."""
        return Signature(self._signing.sign(data).signature)

    def __repr__(self) -> str:
        return f"NodeKey({self.peer_id})"


def verify(public_key: bytes, data: bytes, signature: bytes) -> None:
    """Raise :class:`BadSignatureError` unless ``signature`` by ``public_key`` covers ``data``."""
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
    except (
        nacl.exceptions.BadSignatureError,
        nacl.exceptions.ValueError,
        nacl.exceptions.TypeError,
    ) as exc:
        raise BadSignatureError("signature does not verify") from exc


def save_key(key: NodeKey, path: Path, *, overwrite: bool = False) -> None:
    """Write ``key`` to ``path`` (mode 0600) atomically; replaces a file only if told to."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} already exists; pass --force to overwrite it")
    data = encode(KeyFile(seed=key.seed, created_ms=int(time.time() * 1000)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a parent is a regular file
        raise KeyFileError(f"cannot create the directory of {path}: {exc.strerror}") from exc
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if a file appeared meanwhile: never clobber
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; pass --force to overwrite it") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_key(path: Path) -> NodeKey:
    """Read a key file, refusing one that others can read or that is not a fednode key."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"key file {path} does not exist (create one with `fednode keygen {path}`)"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} has mode {mode:04o}; others must not read it: chmod 600 {path}"
        )
    if st.st_size > MAX_KEY_FILE:
        raise KeyFileError(f"key file {path} is {st.st_size} bytes; not a fednode key")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        stored = decode(data, KeyFile)
    except WireError as exc:
        raise KeyFileError(f"{path} is not a fednode key file ({exc})") from exc
    return NodeKey(stored.seed)


def load_or_create_key(path: Path) -> tuple[NodeKey, bool]:
    """The key at ``path``, creating it first if there is none. Returns (key, created)."""
    path = Path(path)
    if path.exists():
        return load_key(path), False
    key = NodeKey.generate()
    try:
        save_key(key, path)
    except KeyFileError:
        if path.exists():  # another process created it first: use theirs
            return load_key(path), False
        raise
    return key, True
