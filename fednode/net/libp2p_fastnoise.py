"""Net layer, libp2p fast path: py-libp2p's Noise session, batched (see :mod:`libp2p_fastpath`).

After the stock XX handshake (``PatternXX``, unchanged: same keys, same identity checks), the
session it returns is replaced by a :class:`FastNoiseSession` holding the same negotiated cipher
states. What changes is only how messages meet the socket:

- writing, a batch of Noise messages is encrypted into one buffer and handed to the socket in
  one ``send_all`` (stock: one socket write per message, two for each 64 KiB yamux frame);
- reading, the socket is read in large pieces (up to 1 MiB) and every message a read completes
  is decrypted at once (stock: a 2-byte read for the length, then reads for the body, each
  through two locks and a trio checkpoint).

The messages themselves are what :mod:`fednode.net.noise_messages` says, so any libp2p Noise
peer reads them. A message that fails authentication ends the connection
(:class:`~fednode.net.noise_messages.NoiseDecryptError`); it is never skipped or passed on. A
write cancelled after its batch was sealed closes the socket (see :meth:`write_messages`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.security.noise.patterns import PatternXX
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession

from fednode.net.noise_messages import (
    MAX_PLAINTEXT,
    Message,
    MessageOpener,
    NoiseCipher,
    sealed_size,
)

RECEIVE_SIZE = 1 << 20
"""Most bytes taken from the socket per read."""
SEND_BUFFER = 2 << 20
"""Pooled send buffers hold batches up to this size (1 MiB of yamux frames and what queued up
with them); a larger batch gets a buffer of its own."""
SMALL_SEND = 256 << 10
"""A batch needing at most this many bytes (control messages, gossip: most writes) gets a fresh
buffer of its own size: cheaper than a 2 MiB one whenever concurrent writers have emptied the
pool (a fresh 2 MiB buffer is mapped and zeroed page by page, then unmapped)."""

_SOCKET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class held:
    """``async with held(lock)``: take a trio lock without a trip through the scheduler when it
    is free (``async with lock`` always yields once; here that was once per batch per layer)."""

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
    written, so an idle connection costs none (a 2 MiB buffer per connection would add up)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        if size > self.size or size <= SMALL_SEND:
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

    Over TCP it does its own socket I/O: ``os.read``/``os.write`` on the socket's descriptor,
    waiting with trio's ``wait_readable``/``wait_writable`` only when the socket is not ready
    and yielding once per call as trio's own socket methods do (those wrap each call in several
    layers; skipping them measured 5-8 % on a bulk transfer). Closing the socket (ours, or
    :func:`~fednode.net.libp2p_workarounds.abort_connection`) wakes a waiting reader or writer
    as before. Over anything else it uses the raw connection's ``read``/``write``.
    """

    def __init__(self, session: SecureSession) -> None:
        super().__init__(
            local_peer=session.local_peer,
            local_private_key=session.local_private_key,
            remote_peer=session.remote_peer,
            remote_permanent_pubkey=session.remote_permanent_pubkey,
            is_initiator=session.is_initiator,
            conn=session.conn,  # the stock NoiseTransportReadWriter: the layer chain stays
        )
        noise_rw: Any = session.conn
        protocol = noise_rw.noise_state.noise_protocol
        self._seal = NoiseCipher(protocol.cipher_state_encrypt)
        self._opener = MessageOpener(NoiseCipher(protocol.cipher_state_decrypt))
        self._raw: Any = noise_rw.read_writer.read_write_closer  # RawConnection
        sock = getattr(getattr(self._raw, "stream", None), "stream", None)  # TrioTCPStream's
        self._socket = sock if isinstance(sock, trio.SocketStream) else None
        self._send_lock = trio.Lock()
        self._pending: deque[memoryview] = deque()  # decrypted, not yet read
        self._eof = False
        self._broken = False

    # -- writing ---------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        pieces = [view[i : i + MAX_PLAINTEXT] for i in range(0, len(view), MAX_PLAINTEXT)]
        await self.write_messages([(piece,) for piece in pieces] or [(b"",)])

    async def write_messages(self, messages: Sequence[Message]) -> None:
        """Send one Noise message per item (its pieces joined, at most 65,519 bytes), all in one
        socket write, in order.

        A cancellation lands before anything is sealed, or else, once the batch's nonces are
        spent, the socket is closed: the connection is never left with half a message or a gap
        in its nonces for the peer to trip over later.

        Raises:
            ConnectionClosedError: the connection is closed or broke.
            ValueError: a message is too large (nothing was sent).
        """
        total = sealed_size(messages)
        async with held(self._send_lock):
            await trio.lowlevel.checkpoint_if_cancelled()  # the last point where nothing is lost
            if self._broken:
                raise ConnectionClosedError("the Noise session was aborted")
            wire = _SEND_BUFFERS.take(total + MAX_PLAINTEXT)  # and room to join pieces
            try:
                # Sealing under the lock keeps nonce order and wire order the same.
                self._seal.seal_batch(messages, wire)
                try:
                    await self._send(memoryview(wire)[:total])
                except BaseException:
                    self._abort()
                    raise
            finally:
                _SEND_BUFFERS.give(wire)

    async def _send(self, wire: memoryview) -> None:
        # The descriptor is looked up before each call: once the socket is closed it is -1,
        # never a number the process may have reused for another file.
        try:
            if self._socket is None:
                await self._raw.write(wire.tobytes())
                return
            sock = self._socket.socket
            while wire:
                fd = sock.fileno()
                if fd < 0:
                    raise trio.ClosedResourceError("the socket was closed")
                try:
                    sent = os.write(fd, wire)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                wire = wire[sent:]
            await trio.lowlevel.cancel_shielded_checkpoint()
        except _SOCKET_ERRORS as exc:
            raise ConnectionClosedError(f"Noise session write failed: {exc!r}") from exc

    def _abort(self) -> None:
        self._broken = True
        if self._socket is not None:
            self._socket.socket.close()

    # -- reading ---------------------------------------------------------------------------------

    async def receive_messages(self) -> list[memoryview]:
        """The plaintext of every message available: what an earlier ``read`` left, else all
        the messages one socket read completed. ``[]`` at the end of the connection.

        Raises:
            NoiseDecryptError: a message failed authentication; the connection must be closed.
            ConnectionClosedError: the socket broke, or the connection ended inside a message.
        """
        if self._pending:
            pending = list(self._pending)
            self._pending.clear()
            return pending
        while not self._eof:
            data = await self._receive()
            if not data:
                self._eof = True
                if self._opener.inside_message:
                    raise ConnectionClosedError("the connection ended inside a Noise message")
                break
            messages = self._opener.feed(data)
            if messages:
                return messages
        return []

    async def _receive(self) -> bytes:
        """One socket read, up to :data:`RECEIVE_SIZE` bytes: a fresh buffer each time rather
        than one kept per connection (as fast here, and an idle connection holds none)."""
        try:
            if self._socket is None:
                data: bytes = await self._raw.read(RECEIVE_SIZE)
                return data
            sock = self._socket.socket
            while True:
                fd = sock.fileno()
                if fd < 0:
                    raise trio.ClosedResourceError("the socket was closed")
                try:
                    data = os.read(fd, RECEIVE_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        except _SOCKET_ERRORS as exc:
            raise ConnectionClosedError(f"Noise session read failed: {exc!r}") from exc

    async def read(self, n: int | None = None) -> bytes:
        """Stock semantics: ``n`` bytes (fewer only at the end of the connection); with ``n``
        None, what one message holds."""
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
    """The stock XX handshake; the session it establishes becomes a :class:`FastNoiseSession`."""

    async def handshake_inbound(self, conn: Any) -> Any:
        return FastNoiseSession(cast(SecureSession, await super().handshake_inbound(conn)))

    async def handshake_outbound(self, conn: Any, remote_peer: Any) -> Any:
        session = await super().handshake_outbound(conn, remote_peer)
        return FastNoiseSession(cast(SecureSession, session))


class FastNoiseTransport(NoiseTransport):
    """py-libp2p's ``/noise`` transport, negotiating exactly as stock, with the fast session."""

    def get_pattern(self) -> Any:
        return FastPatternXX(
            self.local_peer, self.libp2p_privkey, self.noise_privkey, self.early_data
        )
