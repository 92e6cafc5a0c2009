"""Crypto: Ed25519 against RFC 8032, peer IDs against py-libp2p, key files, BLAKE3 digests."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID

from fednode.crypto import (
    Hasher,
    KeyFile,
    NodeKey,
    digest,
    digest_chunks,
    load_key,
    load_or_create_key,
    peer_id_from_public_key,
    public_key_from_peer_id,
    save_key,
    verify,
)
from fednode.errors import BadSignatureError, KeyFileError
from fednode.wire import Envelope, encode

# RFC 8032 section 7.1: (secret key, public key, message, signature), all hex.
RFC8032_TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1"
    "e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a"
    "7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc10"
    "3b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d"
    "502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089b"
    "eccf80cfe2df16a2cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
    "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988d"
    "cda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7"
    "984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac09"
    "43bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f161"
    "0e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8ca"
    "c60c905c15fc910840b94c00a0b9d0"
)
RFC8032_VECTORS = {
    "TEST 1": (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
        "d25bf5f0595bbe24655141438e7a100b",
    ),
    "TEST 2": (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c"
        "387b2eaeb4302aeeb00d291612bb0c00",
    ),
    "TEST 3": (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc659"
        "4a7c15e9716ed28dc027beceea1ec40a",
    ),
    "TEST 1024": (
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        RFC8032_TEST_1024_MESSAGE,
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b"
        "5e8fcd4f681e30a6ac00a9704a188a03",
    ),
    "TEST SHA(abc)": (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd"
        "454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e030"
        "3dca179c138ac17ad9bef1177331a704",
    ),
}


@pytest.fixture
def private_umask() -> Iterator[None]:
    """Run with umask 0, so a file's mode is exactly what the code asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------ signatures


def test_the_vectors_were_transcribed_correctly() -> None:
    # Prepare
    message_1024 = bytes.fromhex(RFC8032_VECTORS["TEST 1024"][2])
    message_abc = bytes.fromhex(RFC8032_VECTORS["TEST SHA(abc)"][2])

    # Execute / Assert
    assert len(message_1024) == 1023
    assert message_abc == hashlib.sha512(b"abc").digest()


@pytest.mark.parametrize("name", sorted(RFC8032_VECTORS))
def test_sign_and_verify_match_rfc_8032(name: str) -> None:
    # Prepare
    secret, public, message, signature = (bytes.fromhex(x) for x in RFC8032_VECTORS[name])

    # Execute
    key = NodeKey(secret)
    signed = key.sign(message)

    # Assert
    assert key.public_key == public
    assert key.seed == secret
    assert signed == signature
    verify(public, message, signature)


@pytest.mark.parametrize("name", sorted(RFC8032_VECTORS))
def test_a_changed_message_or_signature_does_not_verify(name: str) -> None:
    # Prepare
    _, public, message, signature = (bytes.fromhex(x) for x in RFC8032_VECTORS[name])
    other_message = message + b"\0"
    other_signature = bytes([signature[0] ^ 1]) + signature[1:]
    other_key = NodeKey(b"\x42" * 32).public_key

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        verify(public, other_message, signature)
    with pytest.raises(BadSignatureError):
        verify(public, message, other_signature)
    with pytest.raises(BadSignatureError):
        verify(other_key, message, signature)


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        (b"\1" * 31, b"\0" * 64),
        (b"\1" * 33, b"\0" * 64),
        (None, b"\0" * 63),
        (None, b"\0" * 65),
        (None, b""),
    ],
)
def test_malformed_keys_and_signatures_do_not_verify(
    public_key: bytes | None, signature: bytes
) -> None:
    # Prepare
    key = NodeKey(b"\7" * 32)
    public_key = key.public_key if public_key is None else public_key

    # Execute / Assert
    with pytest.raises(BadSignatureError):
        verify(public_key, b"data", signature)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_a_seed_of_the_wrong_size_is_refused(size: int) -> None:
    # Execute / Assert
    with pytest.raises(KeyFileError):
        NodeKey(b"\1" * size)


def test_generated_keys_differ_and_sign_verifiably() -> None:
    # Prepare
    first, second = NodeKey.generate(), NodeKey.generate()

    # Execute
    signature = first.sign(b"hello")

    # Assert
    assert first.seed != second.seed
    verify(first.public_key, b"hello", signature)


# -------------------------------------------------------------------------------- peer IDs


def _libp2p_peer_id(seed: bytes) -> str:
    private = Ed25519PrivateKey.from_bytes(seed)
    return str(ID.from_pubkey(private.get_public_key()).to_base58())


SEEDS = [bytes(32), b"\xff" * 32, bytes(range(32))] + [
    random.Random(i).randbytes(32) for i in range(64)
]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.hex()[:8])
def test_peer_id_is_what_py_libp2p_derives(seed: bytes) -> None:
    # Prepare
    expected = _libp2p_peer_id(seed)

    # Execute
    key = NodeKey(seed)

    # Assert
    assert key.peer_id == expected
    assert key.peer_id.startswith("12D3KooW")
    assert peer_id_from_public_key(key.public_key) == expected


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.hex()[:8])
def test_public_key_from_peer_id_inverts_the_derivation(seed: bytes) -> None:
    # Prepare
    key = NodeKey(seed)

    # Execute
    public_key = public_key_from_peer_id(_libp2p_peer_id(seed))

    # Assert
    assert public_key == key.public_key


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "12D3KooW0OIl",  # 0, O, I and l are not base58
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeS",  # one character short
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSBB",  # one character long
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # a SHA-256 (RSA-era) peer ID
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSé",
    ],
)
def test_public_key_from_peer_id_refuses_anything_else(peer_id: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        public_key_from_peer_id(peer_id)


def test_peer_id_from_public_key_refuses_a_wrong_length() -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"\1" * 31)


# ------------------------------------------------------------------------------- key files


def test_a_saved_key_has_mode_0600_and_loads_back(tmp_path: Path, private_umask: None) -> None:
    # Prepare
    key = NodeKey(b"\3" * 32)
    path = tmp_path / "keys" / "node.key"

    # Execute
    save_key(key, path)
    loaded = load_key(path)

    # Assert
    assert _mode(path) == 0o600
    assert loaded.seed == key.seed
    assert loaded.peer_id == key.peer_id
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.key"]  # no temporary left


def test_save_refuses_to_overwrite_unless_told(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "node.key"
    first, second = NodeKey(b"\1" * 32), NodeKey(b"\2" * 32)
    save_key(first, path)

    # Execute
    with pytest.raises(KeyFileError):
        save_key(second, path)
    kept = load_key(path)
    save_key(second, path, overwrite=True)
    replaced = load_key(path)

    # Assert
    assert kept.seed == first.seed
    assert replaced.seed == second.seed
    assert _mode(path) == 0o600


def test_save_into_an_unusable_directory_is_a_key_file_error(tmp_path: Path) -> None:
    # Prepare: the key's parent "directory" is a regular file
    blocker = tmp_path / "state"
    blocker.write_bytes(b"")

    # Execute / Assert
    with pytest.raises(KeyFileError):
        save_key(NodeKey(b"\1" * 32), blocker / "node.key")
    with pytest.raises(KeyFileError):
        load_or_create_key(blocker / "sub" / "node.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700])
def test_load_refuses_a_key_file_others_can_access(tmp_path: Path, mode: int) -> None:
    # Prepare
    path = tmp_path / "node.key"
    save_key(NodeKey(b"\1" * 32), path)
    path.chmod(mode)

    # Execute / Assert
    if mode & 0o077:
        with pytest.raises(KeyFileError):
            load_key(path)
    else:
        assert load_key(path).seed == b"\1" * 32


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key\n",
        bytes(range(256)),
        encode(KeyFile(seed=b"\1" * 32, created_ms=0))[:-1],  # truncated
        encode(KeyFile(seed=b"\1" * 32, created_ms=0)) + b"\0",  # trailing byte
        b"\xa0",  # a CBOR map, but not a key file
        b"\0" * 5000,  # over the size limit
    ],
    ids=["empty", "text", "binary", "truncated", "trailing", "empty-map", "huge"],
)
def test_load_refuses_a_file_that_is_not_a_key(tmp_path: Path, content: bytes) -> None:
    # Prepare
    path = tmp_path / "node.key"
    path.write_bytes(content)
    path.chmod(0o600)

    # Execute / Assert
    with pytest.raises(KeyFileError):
        load_key(path)


def test_load_refuses_another_message_type(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "node.key"
    path.write_bytes(
        encode(Envelope(signer=b"\1" * 32, domain="d", payload=b"", signature=b"\0" * 64))
    )
    path.chmod(0o600)

    # Execute / Assert
    with pytest.raises(KeyFileError):
        load_key(path)


def test_load_refuses_a_missing_file_or_a_directory(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "absent.key"
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)

    # Execute / Assert
    with pytest.raises(KeyFileError):
        load_key(missing)
    with pytest.raises(KeyFileError):
        load_key(directory)


def test_load_or_create_creates_once_then_reloads_the_same_key(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "state" / "node.key"

    # Execute
    created, was_created = load_or_create_key(path)
    reloaded, was_created_again = load_or_create_key(path)

    # Assert
    assert (was_created, was_created_again) == (True, False)
    assert reloaded.seed == created.seed
    assert _mode(path) == 0o600


def test_load_or_create_does_not_replace_an_unusable_key_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "node.key"
    path.write_bytes(b"garbage")
    path.chmod(0o600)

    # Execute
    with pytest.raises(KeyFileError):
        load_or_create_key(path)

    # Assert
    assert path.read_bytes() == b"garbage"


# --------------------------------------------------------------------------------- digests


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
        (b"abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"),
    ],
)
def test_digest_is_blake3_256(data: bytes, expected: str) -> None:
    # Execute
    result = digest(data)

    # Assert
    assert result.hex() == expected


def test_chunked_and_incremental_digests_equal_the_one_shot_digest() -> None:
    # Prepare
    data = random.Random(3).randbytes(100_000)
    chunks = [data[i : i + 7777] for i in range(0, len(data), 7777)]
    hasher = Hasher()

    # Execute
    for chunk in chunks:
        hasher.update(memoryview(chunk))

    # Assert
    assert digest_chunks(chunks) == digest(data) == hasher.digest()
    assert digest(data[:-1]) != digest(data)
