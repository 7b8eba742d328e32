"""A lossless, flow-controlled byte stream over its own data channel (``mvpctl pipe``).

Framing: every message starts with a one-byte type.

* ``DATA`` (0x00) + payload bytes;
* ``EOF`` (0x01): the sender will write no more (half close);
* ``CREDIT`` (0x02) + 4-byte big-endian count: the receiver may take that many more payload
  bytes;
* ``EOF-ACK`` (0x03): the receiver's reader has taken everything up to ``EOF``.

Each side starts by granting :data:`DEFAULT_WINDOW` bytes and grants more only as its local
reader consumes data, so a sender never overruns a receiver whose reader is slow or has not
attached yet: the receiver buffers at most one window, the sender waits. The channel is
reliable and ordered, so the stream is lossless and ``EOF`` arrives after the last data.

Ending: a channel that closes before ``EOF`` is a truncated stream, never a clean end, for the
reader (:class:`ConnectionClosed`). The writer learns that its reader took the whole stream
from ``EOF-ACK``; a channel that closes before that means the far side went away (its reader
quit, or the connection to it was lost) and the writer must say so, not report success.

Where the stream stands (open, half closed, closed cleanly, broken) is the transition table of
:mod:`mvpd.proto.pipe_states`; this module asks it instead of keeping flags.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct

from ..proto.errors import ConnectionClosed, TransportError
from ..proto.modes import PIPE
from ..proto.pipe_states import PipeEvent, PipeState, eof_received, eof_sent, pipe_machine
from .base import ChannelOptions, Transport

log = logging.getLogger(__name__)

PIPE_LABEL = "mvp-pipe"

FRAME_DATA = 0x00
FRAME_EOF = 0x01
FRAME_CREDIT = 0x02
FRAME_EOF_ACK = 0x03

#: Bytes a receiver is willing to buffer for its reader.
DEFAULT_WINDOW = 1024 * 1024
#: Payload bytes per DATA frame (well under the 256 KiB message limit).
DEFAULT_CHUNK = 64 * 1024
_CREDIT = struct.Struct("!BI")


class PipeTransport(Transport[bytes]):
    """A byte stream with end-to-end EOF and credit-based flow control.

    The transport can carry data both ways; mvpd uses each pipe channel for one direction
    (the side that opened it writes, the other reads) and returns credit on the same channel.

    Writer side: :meth:`write` (waits for credit and buffer room) and :meth:`write_eof`.
    Reader side: :meth:`read` returns ``b""`` at EOF and raises :class:`ConnectionClosed`
    when the channel closes before EOF (a truncated stream).
    """

    mode = PIPE
    channel_options = ChannelOptions(ordered=True)

    def __init__(
        self,
        *,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = DEFAULT_CHUNK,
        high_watermark: int = 512 * 1024,
        low_watermark: int = 128 * 1024,
    ) -> None:
        super().__init__(
            high_watermark=high_watermark, low_watermark=low_watermark, queue_size=0
        )
        if not 0 < chunk_size < self.max_message_size:
            raise ValueError("chunk_size must be between 1 and the message size limit")
        self.window = window
        self.chunk_size = min(chunk_size, window)
        # Receiving: data for the local reader, at most `window` bytes.
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._granted = 0  # bytes the peer may still send us
        self._consumed = 0  # bytes read since the last grant
        self._data_event = asyncio.Event()
        # Sending.
        self._credit = 0
        self._credit_event = asyncio.Event()
        self._stream = pipe_machine()
        # The acknowledgments confirm one direction each; they are facts about a direction,
        # not states of the stream (see mvpd.proto.pipe_states).
        self._eof_ack_sent = False
        self._eof_acknowledged = False
        self._write_lock = asyncio.Lock()
        self.payload_in = 0
        self.payload_out = 0

    # --- reading ---------------------------------------------------------------------------

    @property
    def stream_state(self) -> PipeState:
        """Where the stream stands (see :mod:`mvpd.proto.pipe_states`)."""
        return self._stream.state

    @property
    def at_eof(self) -> bool:
        """The peer sent EOF and every byte has been read."""
        return eof_received(self._stream.state) and not self._buffer

    @property
    def eof_sent(self) -> bool:
        """We told the peer that no more data follows."""
        return eof_sent(self._stream.state)

    @property
    def eof_acknowledged(self) -> bool:
        """The peer's reader has taken everything we wrote, up to our EOF."""
        return self._eof_acknowledged

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet (never more than :attr:`window`)."""
        return self._buffered

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (any amount when ``n < 0``); ``b""`` at EOF."""
        while not self._buffer:
            if eof_received(self._stream.state):
                self._acknowledge_eof()
                return b""
            if self.is_closed:
                raise ConnectionClosed("the pipe closed before end of stream")
            self._data_event.clear()
            await self._data_event.wait()
        buffer = self._buffer
        head = buffer.popleft()
        if n > len(head) and buffer:
            # Several frames wait (the reader fell behind): hand over as many as fit in one
            # piece, so a slow reader's calls grow instead of multiplying.
            parts = [head]
            size = len(head)
            while buffer and size + len(buffer[0]) <= n:
                part = buffer.popleft()
                parts.append(part)
                size += len(part)
            head = b"".join(parts)
        if 0 <= n < len(head):
            head, rest = head[:n], head[n:]
            buffer.appendleft(rest)
        self._buffered -= len(head)
        self._consumed += len(head)
        self._maybe_grant()
        return head

    async def read_all(self) -> bytes:
        """Everything until EOF (tests and small transfers)."""
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def _acknowledge_eof(self) -> None:
        # Tells the writer that the stream arrived whole (see the module docstring).
        if self._eof_ack_sent or not self.is_open:
            return
        self._stream.handle(PipeEvent.EOF_ACK_SENT)
        self._eof_ack_sent = True
        try:
            self._send(bytes([FRAME_EOF_ACK]))
        except (TransportError, ConnectionClosed) as exc:
            log.debug("pipe %r: cannot acknowledge EOF: %s", self.label, exc)

    def _maybe_grant(self) -> None:
        # Grant in batches (a quarter window) so credit frames stay rare.
        if self._consumed >= max(self.window // 4, 1) and self.is_open:
            self._grant(self._consumed)
            self._consumed = 0

    def _grant(self, amount: int) -> None:
        try:
            self._send(_CREDIT.pack(FRAME_CREDIT, amount))
        except (TransportError, ConnectionClosed) as exc:
            log.debug("pipe %r: cannot grant credit: %s", self.label, exc)
            return
        self._granted += amount

    def on_open(self) -> None:
        if self._stream.accepts(PipeEvent.OPENED):
            self._stream.handle(PipeEvent.OPENED)
        self._grant(self.window)

    def receive(self, data: str | bytes) -> None:
        if isinstance(data, str) or not data:
            self.report_error("bad-frame", "pipe frames are non-empty binary messages")
            return
        kind = data[0]
        if kind == FRAME_DATA:
            payload = data[1:]
            if eof_received(self._stream.state):
                self._violation("data after EOF")
                return
            if len(payload) > self._granted:
                self._violation(f"{len(payload)} bytes sent with {self._granted} granted")
                return
            self._granted -= len(payload)
            if payload:
                self._buffer.append(payload)
                self._buffered += len(payload)
                self.payload_in += len(payload)
            self._data_event.set()
        elif kind == FRAME_EOF and len(data) == 1:
            if not self._stream.accepts(PipeEvent.EOF_RECEIVED):
                self._violation(f"EOF in state {self._stream.state.value}")
                return
            self._stream.handle(PipeEvent.EOF_RECEIVED)
            self._data_event.set()
        elif kind == FRAME_CREDIT and len(data) == _CREDIT.size:
            _, amount = _CREDIT.unpack(data)
            self._credit += amount
            self._credit_event.set()
        elif kind == FRAME_EOF_ACK and len(data) == 1:
            if not self._stream.accepts(PipeEvent.EOF_ACK_RECEIVED):
                self._violation(f"EOF-ACK in state {self._stream.state.value}")
                return
            self._stream.handle(PipeEvent.EOF_ACK_RECEIVED)
            self._eof_acknowledged = True
            self._credit_event.set()
        else:
            self.report_error("bad-frame", f"unknown pipe frame type {kind} ({len(data)} bytes)")

    def _violation(self, detail: str) -> None:
        # The peer broke the flow-control contract: buffering more would make memory
        # unbounded and dropping would lose data, so the stream ends.
        self.report_error("credit-violation", detail)
        log.warning("pipe %r: %s; closing the pipe", self.label, detail)
        self._stream.handle(PipeEvent.FAILED)
        self.close()

    # --- writing ---------------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting for credit from the peer and for buffer room."""
        view = memoryview(bytes(data) if not isinstance(data, bytes) else data)
        async with self._write_lock:
            if self.eof_sent:
                raise TransportError("cannot write to the pipe after EOF")
            while view:
                await self._wait_credit()
                size = min(len(view), self.chunk_size, self._credit)
                frame = bytes([FRAME_DATA]) + view[:size]
                await self.wait_writable()
                self._send(frame)
                self._credit -= size
                self.payload_out += size
                view = view[size:]

    async def write_eof(self) -> None:
        """Tell the peer no more data follows (after everything written so far)."""
        async with self._write_lock:
            if self.eof_sent:
                return
            await self.wait_writable()
            self._send(bytes([FRAME_EOF]))
            self._stream.handle(PipeEvent.EOF_SENT)

    async def wait_eof_acknowledged(self) -> None:
        """Wait until the peer's reader has taken the whole stream (after :meth:`write_eof`);
        :class:`ConnectionClosed` if the channel closes first: the stream did not get there
        whole."""
        while not self._eof_acknowledged:
            if self.is_closed:
                raise ConnectionClosed("the pipe closed before the reader took the whole stream")
            self._credit_event.clear()
            await self._credit_event.wait()

    async def _wait_credit(self) -> None:
        while self._credit <= 0:
            if self.is_closed:
                raise ConnectionClosed("the pipe closed while waiting for the reader")
            self._credit_event.clear()
            await self._credit_event.wait()

    def _on_channel_close(self) -> None:
        if self._eof_acknowledged and self._stream.accepts(PipeEvent.EOF_RECEIVED):
            # The reader took our whole stream and closed its channel: its end of stream.
            self._stream.handle(PipeEvent.EOF_RECEIVED)
        else:
            self._stream.handle(PipeEvent.CHANNEL_CLOSED)
        super()._on_channel_close()
        self._data_event.set()
        self._credit_event.set()
