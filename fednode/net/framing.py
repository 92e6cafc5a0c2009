"""Net layer: length-prefixed frames and exact reads over a :class:`~fednode.net.interface.Stream`.

A frame is a u32 big-endian length followed by that many bytes. Every operation here has its own
deadline (``timeout`` seconds for the whole call): when it passes, the stream is reset and a
:class:`~fednode.errors.TransferError` raised. An end of stream before the bytes we are owed is a
:class:`TransferError` too ("peer closed mid-transfer"): on py-libp2p a killed peer's stream ends
exactly like a clean EOF, so only the byte count tells a finished sender from a dead one.
Exact reads go straight into their result through ``stream.receive_into`` where a stream has it.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import trio

from fednode.errors import TransferError, TransportError
from fednode.net.interface import Stream

ReceiveInto = Callable[[memoryview], Awaitable[int]]
"""``stream.receive_into(buffer)``, which some streams offer (``Libp2pStream`` does):
``receive_some`` written straight into ``buffer``, one copy fewer for bulk data."""

HEADER = struct.Struct(">I")
MAX_FRAME = (1 << 32) - 1
#: How long a reset after a failure may take before we give up on it (on py-libp2p a write to a
#: frozen peer blocks forever, and so can what tears it down).
RESET_GRACE = 1.0
#: Frames below this go out as one write (one yamux frame, one Noise message); larger ones as two
#: writes rather than a copy of the body.
_COALESCE = 256 << 10


async def abort(stream: Stream) -> None:
    """Reset ``stream``, ignoring failures; waits at most :data:`RESET_GRACE` seconds, even
    inside a cancelled scope (so cleanup after a cancellation still resets)."""
    with trio.CancelScope(shield=True), trio.move_on_after(RESET_GRACE):
        try:
            await stream.reset()
        except TransportError:
            pass


async def _send_all(stream: Stream, data: bytes | bytearray | memoryview, deadline: float) -> None:
    try:
        with trio.fail_at(deadline):
            await stream.send_all(data)
    except trio.TooSlowError:
        await abort(stream)
        raise TransferError(f"timed out sending {len(data)} bytes (peer not reading)") from None
    except TransferError:
        raise
    except TransportError as exc:
        raise TransferError(f"stream broke while sending: {exc}") from exc


async def _receive_exactly(stream: Stream, n: int, deadline: float) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    received = 0
    receive_into: ReceiveInto | None = getattr(stream, "receive_into", None)
    try:
        with trio.fail_at(deadline):
            while received < n:
                if receive_into is not None:
                    count = await receive_into(view[received:])
                else:
                    data = await stream.receive_some(n - received)
                    count = len(data)
                    view[received : received + count] = data
                if not count:
                    raise TransferError(
                        f"peer closed mid-transfer ({received} of {n} bytes received)"
                    )
                received += count
    except trio.TooSlowError:
        await abort(stream)
        raise TransferError(f"timed out with {received} of {n} bytes received") from None
    except TransferError:
        raise
    except TransportError as exc:
        raise TransferError(f"stream broke mid-transfer: {exc}") from exc
    return buf


async def send_all(stream: Stream, data: bytes | bytearray | memoryview, timeout: float) -> None:
    """Send ``data`` within ``timeout`` seconds; a slow reader makes us wait (backpressure).

    Raises:
        TransferError: the stream broke, or the peer did not take the bytes in time (the stream
            is then reset).
    """
    await _send_all(stream, data, trio.current_time() + timeout)


async def receive_exactly(stream: Stream, n: int, timeout: float) -> bytearray:
    """Read exactly ``n`` bytes within ``timeout`` seconds.

    Raises:
        TransferError: the stream ended first ("peer closed mid-transfer"), broke, or timed out
            (the stream is then reset).
    """
    return await _receive_exactly(stream, n, trio.current_time() + timeout)


async def send_frame(stream: Stream, data: bytes | bytearray | memoryview, timeout: float) -> None:
    """Send one frame (u32 big-endian length, then ``data``) within ``timeout`` seconds."""
    if len(data) > MAX_FRAME:
        raise ValueError(f"a frame holds at most {MAX_FRAME} bytes, got {len(data)}")
    deadline = trio.current_time() + timeout
    header = HEADER.pack(len(data))
    if len(data) < _COALESCE:
        await _send_all(stream, header + bytes(data), deadline)
    else:
        await _send_all(stream, header, deadline)
        await _send_all(stream, data, deadline)


async def receive_frame(stream: Stream, max_size: int, timeout: float) -> bytearray:
    """Receive one frame of at most ``max_size`` bytes within ``timeout`` seconds.

    Raises:
        TransferError: the stream ended before or inside the frame, broke, or timed out; or the
            frame declares more than ``max_size`` bytes (the stream is then reset, body unread).
    """
    deadline = trio.current_time() + timeout
    (length,) = HEADER.unpack(await _receive_exactly(stream, HEADER.size, deadline))
    if length > max_size:
        await abort(stream)
        raise TransferError(f"frame of {length} bytes exceeds the {max_size}-byte limit")
    return await _receive_exactly(stream, length, deadline)
