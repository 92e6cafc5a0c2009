"""Net layer, libp2p adapter: one libp2p stream behind fednode's ``Stream`` interface.

Writes have two deadlines: ``send_timeout`` for a whole ``send_all`` and ``stall_timeout`` for
any moment without progress (a frozen peer, a reader that stopped). Missing either resets the
stream and tears the peer's connection down, then raises :class:`TransportError`. Writes never
call yamux while its send window is closed, so yamux's own 5 s window wait never fires; the
stall timeout replaces it. Chunks are written under a cancel shield, so that a caller's
cancellation never splits an encrypted frame (it resets the stream instead of breaking the
connection). Reads have no deadline here: the caller owns its protocol's timing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.stream_muxer.exceptions import MuxedStreamError

from fednode.errors import TransportError
from fednode.wire import PeerId

logger = logging.getLogger("fednode.net.libp2p")

_WRITE_CHUNK = 1024 * 1024  # bounded copies; large writes keep yamux frames full
_WINDOW_POLL = 0.01  # stock yamux has no event for a window update; it polls at this rate
_RESET_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    """Write deadlines of a libp2p stream, in seconds."""

    send_timeout: float = 30.0
    stall_timeout: float = 15.0


OnStall = Callable[[PeerId, str], Awaitable[None]]
"""Called with the peer and a reason when a write missed its deadline; tears the peer down."""


class Libp2pStream:
    """A libp2p ``NetStream`` seen through fednode's Stream interface."""

    def __init__(
        self,
        net_stream: Any,
        *,
        protocol: str,
        remote_peer: PeerId,
        limits: StreamLimits,
        on_stall: OnStall,
        spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None,
    ) -> None:
        self._net = net_stream
        self._protocol = protocol
        self._remote_peer = remote_peer
        self._limits = limits
        self._on_stall = on_stall
        self._spawn = spawn  # starts a background task in the host's nursery
        self._send_lock = trio.Lock()
        self._eof_sent = False
        self._closed = False

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def remote_peer(self) -> PeerId:
        return self._remote_peer

    def __repr__(self) -> str:
        return f"Libp2pStream({self._protocol} with {self._remote_peer})"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send everything, in chunks of at most 1 MiB. A chunk, once started, is written under
        a cancel shield (bounded by the stall deadline): cancelling a write halfway through
        would leave half an encrypted frame on the wire and break the whole connection. A
        caller's cancellation therefore lands between chunks, and resets a half-sent stream."""
        view = memoryview(data).cast("B")
        async with self._send_lock:
            if self._closed or self._eof_sent:
                raise TransportError(f"{self!r}: send after close")
            offset = 0
            try:
                with trio.fail_after(self._limits.send_timeout):
                    while offset < len(view):
                        await trio.lowlevel.checkpoint_if_cancelled()  # chunks are shielded
                        room = self._open_send_window()
                        if not room:
                            with trio.fail_after(self._limits.stall_timeout):
                                room = await self._wait_send_window()
                        end = offset + min(room, _WRITE_CHUNK, len(view) - offset)
                        deadline = trio.current_time() + self._limits.stall_timeout
                        with trio.CancelScope(shield=True, deadline=deadline) as chunk:
                            await self._net.write(view[offset:end])  # yamux copies it
                        if chunk.cancelled_caught:
                            raise trio.TooSlowError
                        offset = end
            except trio.TooSlowError as exc:
                await self._stalled("send timed out")
                raise TransportError(f"{self!r}: send timed out") from exc
            except trio.Cancelled:
                if offset:
                    await self.reset()
                raise
            except Exception as exc:
                raise TransportError(f"{self!r}: send failed: {exc!r}") from exc

    def _open_send_window(self) -> int:
        """Bytes yamux takes at once now (0: wait for the window, or not yamux)."""
        window = getattr(self._net.muxed_stream, "send_window", None)
        return window if isinstance(window, int) and window > 0 else 0

    async def _wait_send_window(self) -> int:
        """Bytes yamux will take without waiting. Waiting here rather than inside yamux's write
        avoids its fixed 5 s window timeout; our stall deadline bounds the wait instead."""
        muxed = self._net.muxed_stream
        window = getattr(muxed, "send_window", None)
        if not isinstance(window, int):  # another muxer: let it do its own flow control
            return _WRITE_CHUNK
        wait_send_window = getattr(muxed, "wait_send_window", None)
        if wait_send_window is not None:  # the fast path's yamux: woken by the update
            await wait_send_window()
        while muxed.send_window <= 0 and not (muxed.closed or muxed.send_closed):
            await trio.sleep(_WINDOW_POLL)
        return max(int(muxed.send_window), 1)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        try:
            data: bytes = await self._net.read(max_bytes)
        except StreamEOF as exc:
            # yamux reports a connection that died under the stream (peer killed, socket
            # error) as end of stream too, but marks the stream reset; only a FIN is clean.
            if getattr(self._net.muxed_stream, "reset_received", False):
                raise TransportError(f"{self!r}: connection lost") from exc
            return b""
        except Exception as exc:
            raise TransportError(f"{self!r}: receive failed: {exc!r}") from exc
        return data

    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Straight into ``buffer`` where the muxer can (the fast path's yamux): one copy from
        the decrypted messages, none through an intermediate ``bytes``."""
        view = memoryview(buffer).cast("B")
        if not view:
            raise ValueError("buffer must hold at least 1 byte")
        read_into = getattr(self._net.muxed_stream, "read_into", None)
        if read_into is not None:
            try:
                count: int = await read_into(view)
                return count
            except MuxedStreamError:
                pass  # the end of the stream, or a reset: let receive_some tell which
            except Exception as exc:
                raise TransportError(f"{self!r}: receive failed: {exc!r}") from exc
        data = await self.receive_some(len(view))
        view[: len(data)] = data
        return len(data)

    async def send_eof(self) -> None:
        async with self._send_lock:
            if self._eof_sent or self._closed:
                return
            self._eof_sent = True
            try:
                with trio.CancelScope(shield=True), trio.fail_after(self._limits.stall_timeout):
                    await self._net.close_write()
            except trio.TooSlowError as exc:
                await self._stalled("sending end of stream timed out")
                raise TransportError(f"{self!r}: sending end of stream timed out") from exc
            except Exception as exc:
                raise TransportError(f"{self!r}: sending end of stream failed: {exc!r}") from exc

    async def aclose(self) -> None:
        """Close like a TCP socket: send our end of stream; if the peer is still sending, refuse
        the rest (a reset now if its data sits unread, else once more arrives, within
        ``stall_timeout``), so that its writes fail instead of stalling on a window we will
        never open. Never raises: a stream that cannot be closed gracefully is reset."""
        if self._closed:
            return
        try:
            await self.send_eof()
        except TransportError:
            await self.reset()
            return
        self._closed = True
        if self._peer_done_sending():
            await self._release()
        elif self._unread_bytes() or self._spawn is None:
            await self.reset()
        else:
            try:
                self._spawn(self._linger)
            except RuntimeError:  # the host is closing: no lingering
                await self.reset()

    def _peer_done_sending(self) -> bool:
        muxed = self._net.muxed_stream
        return bool(getattr(muxed, "recv_closed", True) or getattr(muxed, "reset_received", True))

    def _unread_bytes(self) -> int:
        muxed = self._net.muxed_stream
        buffers = getattr(getattr(muxed, "conn", None), "stream_buffers", None)
        if not isinstance(buffers, dict):
            return 0
        return len(buffers.get(getattr(muxed, "stream_id", None), b""))

    async def _linger(self) -> None:
        """After our close: the peer's end of stream releases the stream, its data resets it."""
        try:
            with trio.move_on_after(self._limits.stall_timeout):
                await self._net.read(1)
            await self.reset()  # more data, or nothing at all for too long
        except StreamEOF:
            await self._release()
        except Exception:
            await self.reset()

    async def _release(self) -> None:
        """Hand the finished stream back to libp2p (its stream slot and resource scope)."""
        with trio.move_on_after(self._limits.stall_timeout):
            try:
                await self._net.close()
                return
            except Exception:
                pass
        await self.reset()

    async def reset(self) -> None:
        self._closed = True
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_RESET_TIMEOUT),
            contextlib.suppress(Exception),
        ):
            await self._net.reset()

    async def _stalled(self, reason: str) -> None:
        logger.info("%r: %s; disconnecting %s", self, reason, self._remote_peer)
        with trio.CancelScope(shield=True):
            await self._on_stall(self._remote_peer, reason)
            await self.reset()
