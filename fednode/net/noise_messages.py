"""Net layer: Noise transport messages as libp2p frames them, sans-IO.

On the wire each message is a 2-byte big-endian length and a ChaCha20-Poly1305 ciphertext of at
most 65535 bytes (65519 of plaintext and the 16-byte tag), sealed with the session key and the
next nonce (32 zero bits, then a 64-bit little-endian counter). :func:`seal_messages` writes a
batch of them into one buffer; :class:`MessageOpener` takes the byte stream in pieces of any
size and returns the plaintext of every message completed. Both drive a :class:`NoiseCipher`,
one direction of a session the Noise handshake produced. No sockets, no clock.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

LENGTH_SIZE = 2
TAG_SIZE = 16
MAX_MESSAGE = 65535
"""Largest Noise transport message (ciphertext and tag), as in the Noise and libp2p specs."""
MAX_PLAINTEXT = MAX_MESSAGE - TAG_SIZE
"""65519: the most plaintext one message carries (go-libp2p's ``MaxPlaintextLength``)."""
MAX_NONCE = 2**64 - 1
"""Reserved by the Noise spec; a session must not use it."""

Buffer = bytes | bytearray | memoryview
Message = Sequence[Buffer]
"""The plaintext of one message, in pieces (a yamux header and its payload, say)."""

_NONCE = struct.Struct("<4xQ")


class NoiseDecryptError(Exception):
    """A Noise message failed authentication or framing (tampered, truncated, out of order):
    the session is unusable from here on."""


class NoiseCipher:
    """One direction of a negotiated Noise session: the noise library's ``CipherState`` (its
    key, and its nonce counter, which stays the one source of truth), sealing and opening in
    nonce order with the ``cryptography`` ChaCha20-Poly1305 object the handshake keyed.

    Raises:
        TypeError: the state is not ChaChaPoly as libp2p negotiates it.
    """

    def __init__(self, cipher_state: Any) -> None:
        self._state = cipher_state
        wrapper = cipher_state.cipher  # noise's ChaCha20Cipher
        aead = getattr(wrapper, "cipher", None)
        if not isinstance(aead, ChaCha20Poly1305) or wrapper.format_nonce(1) != _NONCE.pack(1):
            raise TypeError(f"not a ChaChaPoly Noise cipher: {type(wrapper).__name__}")
        self._aead = aead

    def _reserve(self, count: int) -> int:
        """The next ``count`` nonces' first one, taken from the counter."""
        first: int = self._state.n
        if first + count >= MAX_NONCE:
            raise NoiseDecryptError("the Noise nonces are exhausted")
        self._state.n = first + count
        return first

    def seal_batch(self, messages: Sequence[Message], out: bytearray) -> int:
        """Write each message (length prefix, then ciphertext) into ``out`` in order; returns the
        bytes written. A message in several pieces is first joined in ``out`` itself, after the
        last byte the batch needs (``out`` holds :func:`sealed_size` bytes, plus
        :data:`MAX_PLAINTEXT` if any message has more than one piece).

        Raises:
            ValueError: a message holds more than :data:`MAX_PLAINTEXT` bytes (nothing sealed).
        """
        sizes = [sum(len(piece) for piece in pieces) for pieces in messages]
        if sizes and max(sizes) > MAX_PLAINTEXT:
            raise ValueError(f"{max(sizes)} bytes do not fit one Noise message")
        view = memoryview(out)
        scratch = view[len(out) - MAX_PLAINTEXT :]
        encrypt_into = self._aead.encrypt_into
        pack = _NONCE.pack
        nonce = self._reserve(len(messages))
        position = 0
        for pieces, size in zip(messages, sizes, strict=True):
            sealed = size + TAG_SIZE
            out[position] = sealed >> 8
            out[position + 1] = sealed & 0xFF
            position += LENGTH_SIZE
            if len(pieces) == 1:
                source: Buffer = pieces[0]
            else:  # one copy into the scratch space: the AEAD wants contiguous plaintext
                filled = 0
                for piece in pieces:
                    scratch[filled : filled + len(piece)] = piece
                    filled += len(piece)
                source = scratch[:size]
            encrypt_into(pack(nonce), source, None, view[position : position + sealed])
            nonce += 1
            position += sealed
        return position

    def open_all(self, view: memoryview, spans: Sequence[tuple[int, int]]) -> list[memoryview]:
        """The plaintexts of the ciphertexts at ``spans`` of ``view``, in nonce order.

        Raises:
            NoiseDecryptError: one failed authentication (the counter stays at it).
        """
        decrypt = self._aead.decrypt
        pack = _NONCE.pack
        nonce: int = self._state.n
        if nonce + len(spans) >= MAX_NONCE:
            raise NoiseDecryptError("the Noise nonces are exhausted")
        opened: list[memoryview] = []
        try:
            for begin, end in spans:
                opened.append(memoryview(decrypt(pack(nonce), view[begin:end], None)))
                nonce += 1
        except InvalidTag:
            raise NoiseDecryptError("a Noise message failed authentication") from None
        finally:
            self._state.n = nonce
        return opened


def sealed_size(messages: Sequence[Message]) -> int:
    """Bytes :meth:`NoiseCipher.seal_batch` writes for ``messages``."""
    return sum(LENGTH_SIZE + TAG_SIZE + sum(len(piece) for piece in pieces) for pieces in messages)


def split_messages(buffer: Buffer, start: int, end: int) -> tuple[list[tuple[int, int]], int]:
    """The complete length-prefixed messages in ``buffer[start:end]``: their ciphertexts'
    ``(begin, end)`` offsets, and where the first incomplete one starts (``end`` if none).

    Raises:
        NoiseDecryptError: a length prefix announces a message too short to hold its tag.
    """
    spans: list[tuple[int, int]] = []
    while end - start >= LENGTH_SIZE:
        length = (buffer[start] << 8) | buffer[start + 1]
        if length < TAG_SIZE:
            raise NoiseDecryptError(f"a {length}-byte Noise message cannot hold its tag")
        body = start + LENGTH_SIZE
        if end - body < length:
            break
        spans.append((body, body + length))
        start = body + length
    return spans, start


class MessageOpener:
    """The receiving side: feed it the byte stream as it arrives, in pieces of any size; it
    returns the plaintext of every message completed, decrypting the ones wholly inside a piece
    where they lie and carrying the start of an unfinished one (at most one message) over."""

    def __init__(self, cipher: NoiseCipher) -> None:
        self._cipher = cipher
        self._carry = bytearray()

    @property
    def inside_message(self) -> bool:
        """Whether the stream so far ends partway through a message."""
        return bool(self._carry)

    def feed(self, data: Buffer) -> list[memoryview]:
        """Plaintexts of the messages ``data`` completes, in order.

        Raises:
            NoiseDecryptError: a message failed authentication, or its length is impossible.
        """
        view = memoryview(data).cast("B")
        opened: list[memoryview] = []
        position = 0
        if self._carry:
            position = self._continue_carried(view, opened)
            if self._carry:
                return opened
        spans, end = split_messages(view, position, len(view))
        opened += self._cipher.open_all(view, spans)
        if end < len(view):
            self._carry += view[end:]
        return opened

    def _continue_carried(self, view: memoryview, opened: list[memoryview]) -> int:
        """Add what ``view`` has of the carried message; once complete, open it into
        ``opened`` and empty the carry. Returns how much of ``view`` was used."""
        carry = self._carry
        used = 0
        if len(carry) < LENGTH_SIZE:
            used = min(LENGTH_SIZE - len(carry), len(view))
            carry += view[:used]
            if len(carry) < LENGTH_SIZE:
                return used
        length = (carry[0] << 8) | carry[1]
        if length < TAG_SIZE:
            raise NoiseDecryptError(f"a {length}-byte Noise message cannot hold its tag")
        take = min(LENGTH_SIZE + length - len(carry), len(view) - used)
        carry += view[used : used + take]
        used += take
        if len(carry) == LENGTH_SIZE + length:
            with memoryview(carry) as whole:
                opened += self._cipher.open_all(whole, [(LENGTH_SIZE, len(carry))])
            carry.clear()
        return used
