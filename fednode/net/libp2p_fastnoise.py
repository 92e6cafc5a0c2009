"""Net layer, libp2p fast path: py-libp2p's Noise session, batched (see :mod:`libp2p_fastpath`).

After the stock XX handshake (``PatternXX``, unchanged: same keys, same identity checks), the
session it returns is replaced by a :class:`FastNoiseSession` holding the same negotiated cipher
states. What changes is only how messages meet the socket:

- writing, many Noise transport messages are encrypted into one buffer and handed to the socket
  in one ``send_all`` (stock: one socket write per message, two for each 64 KiB yamux frame);
- reading, the socket is read in large pieces (``recv_into`` a reused 1 MiB buffer) and every
  complete message in it is decrypted in one go (stock: one 2-byte read for the length, then
  reads for the body, each through two locks and a trio checkpoint).

The wire format is untouched: each message is a 2-byte big-endian length and a ChaCha20-Poly1305
ciphertext of at most 65535 bytes (65519 of plaintext), encrypted with the session's key and its
next nonce, exactly as ``NoiseTransportReadWriter`` does, so any libp2p Noise peer reads it. A
message that fails authentication ends the connection (:class:`NoiseDecryptError`); it is never
skipped or passed on.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.security.noise.patterns import PatternXX
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession

logger = logging.getLogger("fednode.net.libp2p")

LENGTH_SIZE = 2
TAG_SIZE = 16
MAX_MESSAGE = 65535
"""Largest Noise transport message (ciphertext and tag), as in the Noise and libp2p specs."""
MAX_PLAINTEXT = MAX_MESSAGE - TAG_SIZE
"""65519: the most plaintext one message carries (go-libp2p's ``MaxPlaintextLength``)."""
RECEIVE_BUFFER = 1 << 20
"""Most bytes taken from the socket per read."""
SEND_BUFFER = 2 << 20
"""Pooled send buffers hold batches up to this size (1 MiB of yamux frames and what queued up
with them); a larger batch gets a buffer of its own."""
_MAX_NONCE = 2**64 - 1

Buffer = bytes | bytearray | memoryview


class NoiseDecryptError(IOException):
    """A Noise message failed authentication (tampered, truncated or out of order): the
    connection is unusable from here on, since every later nonce is off by one."""


def split_messages(buffer: Buffer, start: int, end: int) -> tuple[list[tuple[int, int]], int]:
    """The complete length-prefixed Noise messages in ``buffer[start:end]``: a list of
    ``(body_start, body_end)`` offsets, and the offset where the first incomplete one begins
    (``end`` if none). Sans-IO; the caller owns the buffer.

    Raises:
        NoiseDecryptError: a length prefix announces a message too short to hold its tag.
    """
    messages: list[tuple[int, int]] = []
    while end - start >= LENGTH_SIZE:
        length = (buffer[start] << 8) | buffer[start + 1]
        if length < TAG_SIZE:
            raise NoiseDecryptError(f"a {length}-byte Noise message cannot hold its tag")
        body = start + LENGTH_SIZE
        if end - body < length:
            break
        messages.append((body, body + length))
        start = body + length
    return messages, start


_NONCE = struct.Struct("<4xQ")  # Noise ChaChaPoly: 32 zero bits, then the counter, little-endian


class _CipherDirection:
    """One direction of the negotiated Noise session: its ``CipherState`` (key and nonce counter,
    as the handshake left them), sealing and opening messages in nonce order.

    The AEAD is called directly (the same ``cryptography`` ChaCha20-Poly1305 object the noise
    library keyed), so that a batch costs one Python call per message; the counter lives in the
    ``CipherState`` as before."""

    def __init__(self, cipher_state: Any) -> None:
        self._state = cipher_state
        wrapper = cipher_state.cipher  # noise's ChaCha20Cipher, keyed by the handshake
        aead = getattr(wrapper, "cipher", None)
        if not isinstance(aead, ChaCha20Poly1305) or wrapper.format_nonce(1) != _NONCE.pack(1):
            raise TypeError(f"unexpected Noise cipher {type(wrapper).__name__}")
        self._aead = aead

    def _take_nonces(self, count: int) -> int:
        first: int = self._state.n
        if first + count >= _MAX_NONCE:
            raise NoiseDecryptError("the Noise nonce is exhausted")
        self._state.n = first + count
        return first

    def seal_into(self, plaintext: Buffer, out: memoryview) -> None:
        """Encrypt ``plaintext`` with the next nonce into ``out`` (``len(plaintext) + 16``)."""
        self._aead.encrypt_into(_NONCE.pack(self._take_nonces(1)), plaintext, None, out)

    def open_all(self, view: memoryview, spans: list[tuple[int, int]]) -> list[memoryview]:
        """Decrypt the messages at ``spans`` of ``view``, in order. On a failure the counter
        stays at the message that failed (the session is dead anyway)."""
        decrypt = self._aead.decrypt
        pack = _NONCE.pack
        n: int = self._state.n
        if n + len(spans) >= _MAX_NONCE:
            raise NoiseDecryptError("the Noise nonce is exhausted")
        opened: list[memoryview] = []
        try:
            for begin, end in spans:
                opened.append(memoryview(decrypt(pack(n), view[begin:end], None)))
                n += 1
        except InvalidTag:
            raise NoiseDecryptError("a Noise message failed authentication") from None
        finally:
            self._state.n = n
        return opened


class held:  # noqa: N801 - used like trio's own lowercase context managers
    """``async with held(lock)``: take a trio lock without yielding when it is free (trio's
    ``async with lock`` always passes through the scheduler, once per batch per layer here)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class _BufferPool:
    """Send buffers shared by all sessions: a session holds one only while a batch is being
    written, so idle connections cost nothing (one 1 MiB buffer each would add up)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        if size > self.size:
            return bytearray(size)
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        if len(buffer) == self.size and len(self._free) < self._keep:
            self._free.append(buffer)


_SEND_BUFFERS = _BufferPool(SEND_BUFFER, keep=4)


class FastNoiseSession(SecureSession):
    """A Noise secure session that batches messages per socket write and per socket read.

    Besides the stock ``read(n)`` / ``write(data)`` (used for multistream negotiation, and by any
    muxer), it offers :meth:`write_messages` (several Noise messages, one socket write) and
    :meth:`receive_messages` (every message one socket read completed), which the fast yamux
    uses. One task reads at a time; writers serialise on the session's lock.
    """

    def __init__(self, session: SecureSession) -> None:
        super().__init__(
            local_peer=session.local_peer,
            local_private_key=session.local_private_key,
            remote_peer=session.remote_peer,
            remote_permanent_pubkey=session.remote_permanent_pubkey,
            is_initiator=session.is_initiator,
            conn=session.conn,
        )
        noise_rw: Any = session.conn  # NoiseTransportReadWriter: keeps the layer chain intact
        protocol = noise_rw.noise_state.noise_protocol
        self._seal = _CipherDirection(protocol.cipher_state_encrypt)
        self._open = _CipherDirection(protocol.cipher_state_decrypt)
        self._raw: Any = noise_rw.read_writer.read_write_closer  # RawConnection
        tcp = getattr(self._raw, "stream", None)  # TrioTCPStream
        sock = getattr(tcp, "stream", None)
        self._socket: trio.SocketStream | None = (
            sock if isinstance(sock, trio.SocketStream) else None
        )
        self._send_lock = trio.Lock()
        self._plain = bytearray(MAX_PLAINTEXT)  # one message's plaintext, assembled from pieces
        self._plain_view = memoryview(self._plain)
        self._carry = bytearray()  # the start of a message the last read did not complete
        self._last_carried = memoryview(b"")
        self._pending: deque[memoryview] = deque()  # decrypted, not yet read
        self._eof = False

    # -- writing ---------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        await self.write_messages(
            [(view[i : i + MAX_PLAINTEXT],) for i in range(0, len(view), MAX_PLAINTEXT)]
            or [(b"",)]
        )

    async def write_messages(self, messages: Iterable[Sequence[Buffer]]) -> None:
        """Send one Noise message per item (the concatenation of its pieces, at most
        :data:`MAX_PLAINTEXT` bytes), all in one socket write, in order.

        A cancellation either lands before anything is encrypted, or, once the batch is sealed
        (its nonces spent) and partly sent, closes the socket: a connection is never left with
        half a message or a gap in its nonces for the peer to trip over later.
        """
        batch = [pieces for pieces in messages]
        sizes = [sum(len(piece) for piece in pieces) for pieces in batch]
        total = sum(sizes) + len(sizes) * (LENGTH_SIZE + TAG_SIZE)
        async with held(self._send_lock):
            await trio.lowlevel.checkpoint_if_cancelled()  # the last point where nothing is lost
            wire = _SEND_BUFFERS.take(total)
            try:
                # Encrypting under the lock keeps nonce order and wire order the same.
                self._seal_into(batch, sizes, wire)
                await self._send(memoryview(wire)[:total])
            except BaseException:
                self._abort()
                raise
            finally:
                _SEND_BUFFERS.give(wire)

    def _seal_into(self, batch: list[Sequence[Buffer]], sizes: list[int], wire: bytearray) -> None:
        if max(sizes, default=0) > MAX_PLAINTEXT:
            raise ValueError(f"{max(sizes)} bytes do not fit one Noise message")
        out = memoryview(wire)
        plain = self._plain
        plain_view = self._plain_view
        encrypt_into = self._seal._aead.encrypt_into
        pack = _NONCE.pack
        n = self._seal._take_nonces(len(batch))
        position = 0
        for pieces, size in zip(batch, sizes, strict=True):
            sealed = size + TAG_SIZE
            wire[position] = sealed >> 8
            wire[position + 1] = sealed & 0xFF
            position += LENGTH_SIZE
            if len(pieces) == 1:
                source: Buffer = pieces[0]
            else:  # e.g. a yamux header and its payload: one copy into the plaintext buffer
                filled = 0
                for piece in pieces:
                    plain[filled : filled + len(piece)] = piece
                    filled += len(piece)
                source = plain_view[:size]
            encrypt_into(pack(n), source, None, out[position : position + sealed])
            n += 1
            position += sealed

    async def _send(self, wire: memoryview) -> None:
        try:
            if self._socket is not None:
                await self._socket.send_all(wire)
            else:
                await self._raw.write(wire.tobytes())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionClosedError(f"Noise session write failed: {exc!r}") from exc

    def _abort(self) -> None:
        if self._socket is not None:
            self._socket.socket.close()

    # -- reading ---------------------------------------------------------------------------------

    async def receive_messages(self) -> list[memoryview]:
        """The plaintext of every message available: what an earlier ``read`` left, else all
        the messages completed by one socket read. ``[]`` at the end of the connection.

        Raises:
            NoiseDecryptError: a message failed authentication; the connection must be closed.
            ConnectionClosedError: the socket broke, or ended inside a message.
        """
        if self._pending:
            pending = list(self._pending)
            self._pending.clear()
            return pending
        while not self._eof:
            data = await self._receive()
            if not data:
                self._eof = True
                if self._carry:
                    raise ConnectionClosedError("the connection ended inside a Noise message")
                break
            messages = self._open_received(data)
            if messages:
                return messages
        return []

    async def _receive(self) -> bytes:
        """One socket read: whatever is there, up to :data:`RECEIVE_BUFFER` bytes. (A fresh
        buffer each time rather than one kept per connection: as fast, and an idle connection
        holds no memory for it.)"""
        try:
            if self._socket is not None:
                data: bytes = await self._socket.socket.recv(RECEIVE_BUFFER)
            else:
                data = await self._raw.read(RECEIVE_BUFFER)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionClosedError(f"Noise session read failed: {exc!r}") from exc
        return data

    def _open_received(self, data: bytes) -> list[memoryview]:
        """Decrypt every message ``data`` completes (with the carried start of one), and carry
        the start of the next."""
        view = memoryview(data)
        opened: list[memoryview] = []
        position = 0
        if self._carry:
            position = self._complete_carried(view)
            if self._carry:  # still incomplete
                return opened
            opened.append(self._last_carried)
        spans, end = split_messages(view, position, len(view))
        opened += self._open.open_all(view, spans)
        if end < len(view):
            self._carry += view[end:]
        return opened

    def _complete_carried(self, view: memoryview) -> int:
        """Add to the carried message what ``view`` has of it; if that completes it, decrypt it
        into ``_last_carried`` and empty the carry. Returns how much of ``view`` was used."""
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
                (self._last_carried,) = self._open.open_all(whole, [(LENGTH_SIZE, len(carry))])
            carry.clear()
        return used

    async def read(self, n: int | None = None) -> bytes:
        """Stock semantics: ``n`` bytes (fewer only at the end of the connection); with ``n``
        None, one message's worth."""
        if n == 0:
            return b""
        result = bytearray()
        while n is None or len(result) < n:
            if not self._pending:
                messages = await self.receive_messages()
                if not messages:
                    if result:
                        return bytes(result)
                    raise ConnectionClosedError("Connection closed")
                self._pending.extend(messages)
            head = self._pending[0]
            take = len(head) if n is None else min(len(head), n - len(result))
            result += head[:take]
            if take == len(head):
                self._pending.popleft()
            else:
                self._pending[0] = head[take:]
            if n is None and result:
                break
        return bytes(result)

    async def close(self) -> None:
        await self._raw.close()


class FastPatternXX(PatternXX):
    """The stock XX handshake, whose resulting session is wrapped in a :class:`FastNoiseSession`."""

    async def handshake_inbound(self, conn: Any) -> Any:
        return FastNoiseSession(await super().handshake_inbound(conn))

    async def handshake_outbound(self, conn: Any, remote_peer: Any) -> Any:
        return FastNoiseSession(await super().handshake_outbound(conn, remote_peer))


class FastNoiseTransport(NoiseTransport):
    """py-libp2p's ``/noise`` transport, negotiating exactly as stock, with the fast session."""

    def get_pattern(self) -> Any:
        return FastPatternXX(
            self.local_peer, self.libp2p_privkey, self.noise_privkey, self.early_data
        )
