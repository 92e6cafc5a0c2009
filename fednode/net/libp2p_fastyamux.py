"""Net layer, libp2p fast path: py-libp2p's yamux, batched (see :mod:`libp2p_fastpath`).

:class:`FastYamux` and :class:`FastYamuxStream` subclass py-libp2p's ``Yamux`` and
``YamuxStream`` and keep their state (streams, buffers, events, flags, windows), so the stock
methods left in place (close, reset, accept, the RTT pings, cleanup) work unchanged. Replaced:

- the reader: every Noise message one socket read delivered is decoded in one pass
  (:class:`~fednode.net.yamux_frames.FrameDecoder`); DATA bodies go to the stream's buffer as
  slices of the decrypted messages, uncopied, and frames may span messages either way. It never
  waits to write: its replies (SYN's ACK, ping's ACK, RST, window updates) go to an outbox that
  the next writer, or a small control task, sends. So two peers both blocked writing to each
  other never also stop reading, as a stock reader blocked on a ping reply can. (It does wait
  when ten inbound streams are already waiting to be accepted, as stock does.)
- writing: one ``write`` of up to the send window becomes all its DATA frames in one Noise batch
  (one socket write), each frame sized so header and payload fill exactly one Noise message
  (65,507 payload bytes: no 17-byte tail message);
- flow control: a stream's receive window starts at 1 MiB (granted with its SYN or ACK) and
  doubles, up to 16 MiB (go-yamux's maximum), each time credit goes back, which is once the
  reader has consumed half the window or 2 MiB: one WINDOW_UPDATE per 2 MiB instead of one per
  read, and only a stream that is being read gets to buffer much. A writer out of credit is
  woken by the update, not by a 10 ms poll;
- reading: a stream's buffer is a list of those slices; a read copies what it takes once, into
  a new ``bytes`` or (``read_into``) straight into the caller's buffer.

On the wire these are standard yamux frames, windows grown by the spec's own WINDOW_UPDATE
deltas (stock py-libp2p, go- and rust-yamux read them). A peer that overruns the window it was
granted, or sends an unknown frame type or version, loses the connection (GO_AWAY with a
protocol error, as go-yamux does); stock clamps and buffers whatever arrives.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import trio
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from fednode.net.libp2p_fastnoise import FastNoiseSession, held
from fednode.net.noise_messages import MAX_PLAINTEXT, Buffer, Message, NoiseDecryptError
from fednode.net.yamux_frames import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER_SIZE,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataEnded,
    DataReceived,
    FrameDecoder,
    FrameHeader,
    FrameStarted,
    YamuxProtocolError,
    encode_header,
)

logger = logging.getLogger("fednode.net.libp2p")

RECEIVE_WINDOW = 16 * 1024 * 1024
"""Largest receive window a stream grows to (go-yamux's maximum)."""
FIRST_WINDOW = 1024 * 1024
"""Receive window a stream starts with (granted with its SYN or ACK); it doubles with each
update the reader's progress triggers, so only a stream that is being read grows."""
CREDIT_STEP = 2 * 1024 * 1024
"""Credit goes back once half the window, or this much, has been read: a sender keeps at least
14 MiB of credit at the largest window (go-yamux's half-window rule leaves it 8 MiB)."""
MAX_DATA_PAYLOAD = MAX_PLAINTEXT - HEADER_SIZE
"""65,507: a DATA frame this size and its header fill one Noise message exactly."""
WINDOW_WAIT = 5.0
"""How long ``write`` waits for credit before failing, as stock (fednode waits on its own)."""
_GO_AWAY_GRACE = 1.0


class ChunkBuffer:
    """A stream's received bytes: slices of decrypted messages, in order."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: memoryview) -> None:
        self._chunks.append(data)
        self._size += len(data)

    def extend(self, data: Buffer) -> None:  # bytearray's name, for stock code paths
        if data:
            self.append(memoryview(bytes(data)))

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0

    def take_into(self, out: memoryview) -> int:
        """Move up to ``len(out)`` bytes from the front into ``out``; returns how many."""
        count = min(len(out), self._size)
        chunks = self._chunks
        filled = 0
        while filled < count:
            chunk = chunks[0]
            part = min(len(chunk), count - filled)
            out[filled : filled + part] = chunk[:part]
            if part == len(chunk):
                chunks.popleft()
            else:
                chunks[0] = chunk[part:]
            filled += part
        self._size -= count
        return count

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes from the front (all of them if ``n`` is negative)."""
        if n < 0 or n > self._size:
            n = self._size
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= n:
            data = bytes(first[:n])
            if len(first) == n:
                chunks.popleft()
            else:
                chunks[0] = first[n:]
        else:
            parts: list[memoryview] = []
            left = n
            while left:
                chunk = chunks.popleft()
                if len(chunk) > left:
                    chunks.appendleft(chunk[left:])
                    chunk = chunk[:left]
                parts.append(chunk)
                left -= len(chunk)
            data = b"".join(parts)
        self._size -= n
        return data


class FastYamuxStream(YamuxStream):
    """A yamux stream with batched writes, event-driven window waits and batched credit."""

    def __init__(self, stream_id: int, conn: FastYamux, is_initiator: bool) -> None:
        super().__init__(stream_id, conn, is_initiator)
        self.conn: FastYamux = conn
        self.recv_window = FIRST_WINDOW  # the grant goes out with our SYN or ACK
        self._window = FIRST_WINDOW  # what the peer may have in flight once credit is back
        self._unreturned = 0  # bytes read whose credit the peer has not had back yet

    # -- sending -----------------------------------------------------------------------------

    async def wait_send_window(self) -> None:
        """Return once the send window is open, or the stream can no longer send."""
        conn = self.conn
        while self.send_window <= 0 and not (self.closed or self.send_closed):
            if conn.event_shutting_down.is_set():
                return
            await conn.credit_changed.wait()

    async def write(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        sent = 0
        while sent < len(view):
            if self.send_closed:
                raise MuxedStreamError("Stream is closed for sending")
            if self.closed:
                raise MuxedStreamError("Stream is closed")
            if self.send_window <= 0:
                with trio.move_on_after(WINDOW_WAIT) as waiting:
                    await self.wait_send_window()
                if waiting.cancelled_caught:
                    raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")
                continue
            count = min(self.send_window, len(view) - sent)
            self.send_window -= count
            await self.conn.send_data(self.stream_id, view[sent : sent + count])
            sent += count

    # -- receiving ---------------------------------------------------------------------------

    async def read(self, n: int | None = -1) -> bytes:
        if n is None:
            n = -1
        if n == 0:
            return b""
        buffer = await self._readable()
        data = buffer.take(n)
        self._consumed(buffer, len(data))
        return data

    async def read_into(self, out: memoryview) -> int:
        """Like ``read(len(out))``, copying straight into ``out``; returns the count (> 0)."""
        if not out:
            return 0
        buffer = await self._readable()
        count = buffer.take_into(out)
        self._consumed(buffer, count)
        return count

    async def _readable(self) -> ChunkBuffer:
        """The stream's buffer once it holds data; raises at its end, with stock's outcomes
        (``YamuxStream.read`` then ``Yamux.read_stream``: a reader already waiting when the
        connection dies sees an end of stream, a later one a reset; fednode tells the two
        apart by ``reset_received``, see (g))."""
        conn = self.conn
        sid = self.stream_id
        if self.recv_closed and not conn.stream_buffers.get(sid):
            if self.reset_received:
                raise MuxedStreamReset("Stream was reset")
            raise MuxedStreamEOF("Stream is closed for receiving")
        while True:
            buffer = conn.stream_buffers.get(sid)
            if sid not in conn.streams or conn.event_shutting_down.is_set():
                raise MuxedStreamEOF("Stream closed")
            if buffer is None:
                if self.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                raise MuxedStreamEOF("Stream buffer closed")
            if buffer and (self.recv_closed or not self.reset_received):
                return buffer
            if self.reset_received:
                raise MuxedStreamReset("Stream was reset")
            if self.recv_closed:
                raise MuxedStreamEOF("Stream is closed for receiving")
            if self.closed:
                raise MuxedStreamReset("Stream is reset or closed")
            arrived = trio.Event()
            conn.stream_events[sid] = arrived
            await arrived.wait()

    def _consumed(self, buffer: ChunkBuffer, count: int) -> None:
        self._return_credit(count)
        if self.closed and not buffer:
            self.conn._finalize_stream_locked(self, fully_closed=True)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self.conn._wake_writers()

    async def reset(self) -> None:
        try:
            await super().reset()
        finally:
            self.conn._wake_writers()

    def _return_credit(self, count: int) -> None:
        """Give the peer its credit back once half the window or :data:`CREDIT_STEP` has been
        read (a bulk transfer costs one WINDOW_UPDATE per 2 MiB instead of one per read), and
        double the window each time, up to :data:`RECEIVE_WINDOW`: only a reader that keeps
        up gets the room to buffer 16 MiB."""
        self._unreturned += count
        if self._unreturned >= min(self._window // 2, CREDIT_STEP) and not self.recv_closed:
            increment, self._unreturned = self._unreturned, 0
            if self._window < RECEIVE_WINDOW:
                increment += self._window
                self._window *= 2
            self.recv_window += increment
            self.conn.queue_control(encode_header(TYPE_WINDOW_UPDATE, 0, self.stream_id, increment))


class FastYamux(Yamux):
    """A yamux connection whose reader decodes whole socket reads and never waits to write."""

    def __init__(self, secured_conn: FastNoiseSession, peer_id: Any, **kwargs: Any) -> None:
        super().__init__(secured_conn, peer_id, **kwargs)
        self.secured_conn: FastNoiseSession = secured_conn
        self.stream_buffers: dict[int, ChunkBuffer] = {}  # type: ignore[assignment]
        self._outbox: list[bytes] = []
        self._outbox_ready = trio.Event()
        self._decoder = FrameDecoder(max_data=RECEIVE_WINDOW)
        #: Set (and replaced) whenever a send window grows or a stream or the connection ends.
        self.credit_changed = trio.Event()

    def _wake_writers(self) -> None:
        self.credit_changed.set()
        self.credit_changed = trio.Event()

    # -- writing -----------------------------------------------------------------------------

    def queue_control(self, frame: bytes) -> None:
        """Send a small frame soon, without waiting: with the next write, or by the control
        task. The reader's replies go this way, so it never blocks behind a full socket."""
        self._outbox.append(frame)
        self._outbox_ready.set()

    def _take_outbox(self) -> list[Message]:
        """The queued control frames, packed several to a Noise message."""
        messages: list[Message] = []
        current: list[bytes] = []
        size = 0
        for frame in self._outbox:
            if size + len(frame) > MAX_PLAINTEXT:
                messages.append(current)
                current, size = [], 0
            current.append(frame)
            size += len(frame)
        if current:
            messages.append(current)
        self._outbox.clear()
        return messages

    async def _send_messages(self, messages: list[Message]) -> None:
        async with held(self._write_lock):
            batch = self._take_outbox() + messages if self._outbox else messages
            if not batch:
                return
            await self.secured_conn.write_messages(batch)

    async def send_data(self, stream_id: int, data: memoryview) -> None:
        """``data`` (within the send window) as DATA frames, in one batch."""
        frames: list[Message] = []
        for offset in range(0, len(data), MAX_DATA_PAYLOAD):
            payload = data[offset : offset + MAX_DATA_PAYLOAD]
            frames.append((encode_header(TYPE_DATA, 0, stream_id, len(payload)), payload))
        await self._send_messages(frames)

    async def _write_frame(self, data: bytes) -> None:
        """Stock entry point (FIN, RST, SYN, pings, GO_AWAY): queued control frames first."""
        await self._send_messages([(data,)])

    async def _control_writer(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            try:
                await self._send_messages([])
            except Exception as exc:  # the connection broke; the reader sees it too
                logger.debug("yamux control write to %s failed: %r", self.peer_id, exc)
                return

    # -- streams -----------------------------------------------------------------------------

    async def open_stream(self) -> FastYamuxStream:
        await self.stream_backlog_semaphore.acquire()
        async with self.streams_lock:
            if self.event_shutting_down.is_set():
                self.stream_backlog_semaphore.release()
                raise MuxedStreamError("Connection is shutting down")
            stream_id = self.next_stream_id
            self.next_stream_id += 2
            stream = FastYamuxStream(stream_id, self, True)
            stream._owns_backlog_slot = True
            self._register(stream)
        grant = FIRST_WINDOW - INITIAL_WINDOW
        try:
            await self._write_frame(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, grant))
        except Exception as exc:
            self.stream_backlog_semaphore.release()
            stream._backlog_slot_released = True
            self.streams.pop(stream_id, None)
            self.stream_buffers.pop(stream_id, None)
            self.stream_events.pop(stream_id, None)
            raise MuxedStreamError(f"Failed to send SYN: {exc}") from exc
        return stream

    def _register(self, stream: FastYamuxStream) -> None:
        self.streams[stream.stream_id] = stream
        self.stream_buffers[stream.stream_id] = ChunkBuffer()
        self.stream_events[stream.stream_id] = trio.Event()

    # -- reading -----------------------------------------------------------------------------

    async def handle_incoming(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._control_writer)
            try:
                await self._read_loop()
            finally:
                nursery.cancel_scope.cancel()
        self._connection_lost()
        await self._cleanup_on_error()

    def _connection_lost(self) -> None:
        """Mark every stream reset at once, before anything else runs: stock marks them only
        once its cleanup gets the streams lock, and a reader scheduled in between saw a
        shutting-down connection without the reset mark, a clean end of stream (see (g))."""
        self.event_shutting_down.set()
        for stream in self.streams.values():
            stream.closed = stream.send_closed = stream.recv_closed = True
            stream.reset_received = True
            event = self.stream_events.get(stream.stream_id)
            if event is not None:
                event.set()
        self._wake_writers()

    async def _read_loop(self) -> None:
        receive = self.secured_conn.receive_messages
        while not self.event_shutting_down.is_set():
            try:
                messages = await receive()
            except NoiseDecryptError as exc:
                logger.warning("closing the connection to %s: %s", self.peer_id, exc)
                return
            except Exception as exc:
                logger.debug("connection to %s ended: %r", self.peer_id, exc)
                return
            if not messages:
                return
            decoder = self._decoder
            try:
                for message in messages:
                    whole = decoder.whole_data_frame(message)
                    if whole is not None and not whole[1]:  # one DATA frame, no flags
                        self._on_data(whole[0], whole[2])
                        continue
                    for event in decoder.feed(message):
                        accepted = self._on_event(event)
                        if accepted is not None:
                            await self.new_stream_send_channel.send(accepted)
                    if self.event_shutting_down.is_set():
                        return  # GO_AWAY
            except YamuxProtocolError as exc:
                logger.warning("closing the connection to %s: %s", self.peer_id, exc)
                await self._go_away(GO_AWAY_PROTOCOL_ERROR)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # nobody accepts streams any more: we are closing

    async def _go_away(self, code: int) -> None:
        with trio.move_on_after(_GO_AWAY_GRACE):
            try:
                await self._write_frame(encode_header(TYPE_GO_AWAY, 0, 0, code))
            except Exception as exc:
                logger.debug("GO_AWAY to %s failed: %r", self.peer_id, exc)

    def _on_data(self, sid: int, data: memoryview) -> None:
        """A whole DATA frame without flags, for stream ``sid``."""
        stream = self.streams.get(sid)
        if not isinstance(stream, FastYamuxStream):
            return  # a stream already gone: its frames are dropped
        if len(data) > stream.recv_window:
            raise YamuxProtocolError(
                f"stream {sid}: {len(data)} bytes sent into a window of {stream.recv_window}"
            )
        stream.recv_window -= len(data)
        if data:
            self.stream_buffers[sid].append(data)
            self.stream_events[sid].set()

    def _on_event(self, event: object) -> FastYamuxStream | None:
        """Apply one decoded event; returns a stream the peer opened, to be accepted."""
        if type(event) is DataReceived:
            buffer = self.stream_buffers.get(event.stream_id)
            if buffer is not None:
                buffer.append(event.data)
                self.stream_events[event.stream_id].set()
            return None
        if type(event) is DataEnded:
            self._apply_flags(event.header)
            return None
        assert isinstance(event, FrameStarted)
        header = event.header
        if header.type == TYPE_DATA or header.type == TYPE_WINDOW_UPDATE:
            return self._on_stream_frame(header)
        if header.type == TYPE_PING:
            self._on_ping(header)
        else:  # TYPE_GO_AWAY
            logger.debug("GO_AWAY from %s (code %d)", self.peer_id, header.length)
            self._connection_lost()
        return None

    def _on_stream_frame(self, header: FrameHeader) -> FastYamuxStream | None:
        sid = header.stream_id
        accepted: FastYamuxStream | None = None
        if header.flags & FLAG_SYN:
            if sid in self.streams:
                self.queue_control(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
                return None
            accepted = FastYamuxStream(sid, self, False)
            self._register(accepted)
            if not header.flags & FLAG_RST:
                grant = FIRST_WINDOW - INITIAL_WINDOW
                self.queue_control(encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, sid, grant))
        stream = self.streams.get(sid)
        if not isinstance(stream, FastYamuxStream):
            return None  # a stream already gone: its frames are dropped
        if header.type == TYPE_DATA:
            if header.length > stream.recv_window:
                raise YamuxProtocolError(
                    f"stream {sid}: {header.length} bytes sent into a window of "
                    f"{stream.recv_window}"
                )
            stream.recv_window -= header.length
        else:
            if header.length:
                stream.send_window += header.length
                self._wake_writers()
            self._apply_flags(header)
        return accepted

    def _apply_flags(self, header: FrameHeader) -> None:
        """FIN and RST, as stock applies them (on DATA frames once the body is in)."""
        if not header.flags & (FLAG_FIN | FLAG_RST):
            return
        stream = self.streams.get(header.stream_id)
        if stream is None:
            return
        if header.flags & FLAG_FIN:
            stream.recv_closed = True
            if stream.send_closed:
                stream.closed = True
        if header.flags & FLAG_RST:
            stream.closed = True
            stream.reset_received = True
        event = self.stream_events.get(header.stream_id)
        if event is not None:
            event.set()
        self._wake_writers()
        if stream.closed:
            self._finalize_stream_locked(stream, fully_closed=True)

    def _on_ping(self, header: FrameHeader) -> None:
        if header.flags & FLAG_SYN:
            self.queue_control(encode_header(TYPE_PING, FLAG_ACK, 0, header.length))
        elif header.flags & FLAG_ACK:
            rtt = trio.current_time() - self._ping_sent_time
            self._rtt = rtt if self._rtt == 0.0 else (self._rtt + rtt) / 2
            self._ping_event.set()

    async def _cleanup_on_error(self) -> None:
        try:
            await super()._cleanup_on_error()
        finally:
            self._wake_writers()

    async def close(self, error_code: int = 0) -> None:
        try:
            await super().close(error_code)
        finally:
            self._wake_writers()


class FastMuxerMultistream(MuxerMultistream):
    """Negotiates muxers exactly as stock, but builds the negotiated class (stock 0.8.1 builds
    its own ``Yamux`` whatever class was registered for ``/yamux/1.0.0``)."""

    async def new_conn(self, conn: Any, peer_id: Any) -> Any:
        protocol, transport_class = await self._selector.select(
            conn, conn.is_initiator, self.negotiate_timeout
        )
        if transport_class is FastYamux and not isinstance(conn, FastNoiseSession):
            transport_class = Yamux  # batching needs the fast session underneath
        return self._annotate_connection(transport_class(conn, peer_id), conn, protocol)
