"""Net layer: the streams of the in-memory transport (``memory``), and the connections they run on.

Each direction of a stream is a bounded byte pipe: ``send_all`` blocks while the other end's
buffer is full, as a real transport's flow control does. Bytes are reliable and not delayed; a
connection that drops (a kill, a partition) resets every stream opened over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from fednode.errors import TransportError
from fednode.wire import PeerId

if TYPE_CHECKING:
    from fednode.net.memory_host import MemoryHost


class _Pipe:
    """One direction of a stream: a byte buffer holding at most ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self._buffer = bytearray()
        self._capacity = capacity
        self._eof = False
        self._reader_gone = False
        self._error: str | None = None
        self._waiters = trio.lowlevel.ParkingLot()

    @property
    def error(self) -> str | None:
        return self._error

    def _wake(self) -> None:
        self._waiters.unpark_all()

    async def write(self, data: memoryview) -> None:
        offset = 0
        while True:
            if self._error is not None:
                raise TransportError(self._error)
            if self._eof:
                raise TransportError("stream is closed for sending")
            if self._reader_gone:
                raise TransportError("the peer closed the stream")
            if offset == len(data):
                return
            space = self._capacity - len(self._buffer)
            if space == 0:
                await self._waiters.park()
                continue
            taken = min(space, len(data) - offset)
            self._buffer += data[offset : offset + taken]
            offset += taken
            self._wake()

    async def read(self, max_bytes: int) -> bytes:
        while True:
            if self._error is not None:
                raise TransportError(self._error)
            if self._buffer:
                chunk = bytes(self._buffer[:max_bytes])
                del self._buffer[:max_bytes]
                self._wake()
                return chunk
            if self._eof:
                return b""
            await self._waiters.park()

    def close_write(self) -> None:
        self._eof = True
        self._wake()

    def close_read(self) -> None:
        self._reader_gone = True
        self._buffer.clear()
        self._wake()

    def abort(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._buffer.clear()
        self._wake()


class MemoryStream:
    """One end of an in-memory stream. Implements :class:`~fednode.net.interface.Stream`."""

    def __init__(
        self,
        *,
        protocol: str,
        remote_peer: PeerId,
        incoming: _Pipe,
        outgoing: _Pipe,
        connection: _Connection,
    ) -> None:
        self._protocol = protocol
        self._remote_peer = remote_peer
        self._incoming = incoming
        self._outgoing = outgoing
        self._connection = connection
        self._closed = False

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def remote_peer(self) -> PeerId:
        return self._remote_peer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise TransportError("stream is closed")
        await self._outgoing.write(memoryview(data).cast("B"))

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise TransportError("stream is closed")
        return await self._incoming.read(max_bytes)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            return
        if self._outgoing.error is not None:
            raise TransportError(self._outgoing.error)
        self._outgoing.close_write()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._outgoing.close_write()
            self._incoming.close_read()
            self._connection.forget(self)
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        self._abort("stream reset")
        await trio.lowlevel.checkpoint()

    def _abort(self, reason: str) -> None:
        self._incoming.abort(reason)
        self._outgoing.abort(reason)
        self._connection.forget(self)

    def __repr__(self) -> str:
        return f"MemoryStream({self._protocol!r}, remote={self._remote_peer})"


class _Connection:
    """A connection between two hosts, with the streams opened over it."""

    def __init__(self, a: MemoryHost, b: MemoryHost) -> None:
        self.hosts = (a, b)
        self.streams: dict[MemoryStream, None] = {}  # an ordered set

    def forget(self, stream: MemoryStream) -> None:
        self.streams.pop(stream, None)

    def other(self, host: MemoryHost) -> MemoryHost:
        a, b = self.hosts
        return b if host is a else a
