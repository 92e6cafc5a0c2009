"""Crypto layer: node keys, libp2p peer IDs, signed envelopes, content digests. Imports only wire
(no trio, no libp2p)."""

from __future__ import annotations

from fednode.crypto.digest import DIGEST_SIZE, Hasher, contributions_digest, digest, digest_chunks
from fednode.crypto.envelope import (
    domain_of,
    open_envelope,
    seal,
    seal_bytes,
    signing_input,
    verify_envelope,
)
from fednode.crypto.keys import (
    KeyFile,
    NodeKey,
    load_key,
    load_or_create_key,
    peer_id_from_public_key,
    public_key_from_peer_id,
    save_key,
    verify,
)

__all__ = [
    "DIGEST_SIZE",
    "Hasher",
    "KeyFile",
    "NodeKey",
    "contributions_digest",
    "digest",
    "digest_chunks",
    "domain_of",
    "load_key",
    "load_or_create_key",
    "open_envelope",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "save_key",
    "seal",
    "seal_bytes",
    "signing_input",
    "verify",
    "verify_envelope",
]
