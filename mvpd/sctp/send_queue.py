"""Messages waiting to be sent: one FIFO per outgoing stream, served round-robin.

A message is cut into DATA fragments only when the association has room for one (so a
fragment fills what is left of the packet), straight from the message's bytes through a
``memoryview`` (no copies, no object per fragment).  All fragments of a message get
consecutive TSNs (RFC 9260 without I-DATA does not interleave messages), so the queue keeps
serving the message it started before it turns to the next stream.

Partial reliability: a message whose lifetime ran out before it started is dropped when it
reaches the head of its queue; one that expires or is abandoned midway has its remaining
bytes dropped at once.  Nothing walks the queues to find expired messages.
"""

from __future__ import annotations

from collections import deque

INFINITE = float("inf")


class OutgoingMessage:
    """A user message and its partial-reliability state, shared by all its fragments."""

    __slots__ = (
        "abandoned", "data", "expires_at", "first_tsn", "max_retransmits", "offset",
        "ordered", "ppid", "ssn", "stream_id", "tsn_count",
    )

    def __init__(
        self, stream_id: int, ppid: int, data: bytes, ordered: bool, max_retransmits: int,
        expires_at: float,
    ) -> None:
        self.stream_id = stream_id
        self.ppid = ppid
        self.data = memoryview(data)
        self.ordered = ordered
        #: Transmissions allowed after the first; -1: unlimited (reliable).
        self.max_retransmits = max_retransmits
        #: Monotonic deadline after which the message is abandoned (``inf``: never).
        self.expires_at = expires_at
        #: Stream sequence number, assigned when the first fragment is taken.
        self.ssn = 0
        #: Bytes already cut into fragments.
        self.offset = 0
        #: TSN of the first fragment and number of fragments taken so far.
        self.first_tsn = 0
        self.tsn_count = 0
        self.abandoned = False


class OutgoingStream:
    """One outgoing stream's queue, sequence number and buffered-amount bookkeeping."""

    __slots__ = ("buffered", "closing", "low_threshold", "messages", "next_ssn", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.messages: deque[OutgoingMessage] = deque()
        self.next_ssn = 0
        #: Bytes of this stream's messages not yet cut into fragments.
        self.buffered = 0
        self.low_threshold = 0
        #: A reset was asked for: no new messages; the request goes once the queue is empty.
        self.closing = False


class SendQueue:
    """Outgoing streams and the round-robin order among those with messages."""

    def __init__(self) -> None:
        self.streams: dict[int, OutgoingStream] = {}
        self._ready: deque[OutgoingStream] = deque()
        #: The message being fragmented; it is finished before any other starts.
        self.current: OutgoingMessage | None = None
        self.total_buffered = 0
        #: Streams whose buffered amount fell to their threshold since the last drain.
        self.low_events: list[int] = []

    def stream(self, stream_id: int) -> OutgoingStream:
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = OutgoingStream(stream_id)
        return stream

    def add(self, message: OutgoingMessage) -> None:
        """Queue ``message`` on its stream."""
        stream = self.stream(message.stream_id)
        if not stream.messages:
            self._ready.append(stream)
        stream.messages.append(message)
        size = len(message.data)
        stream.buffered += size
        self.total_buffered += size

    def buffered_amount(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        return stream.buffered if stream is not None else 0

    @property
    def has_data(self) -> bool:
        return self.current is not None or bool(self._ready)

    def _consumed(self, stream: OutgoingStream, size: int) -> None:
        before = stream.buffered
        stream.buffered = after = before - size
        self.total_buffered -= size
        if after <= stream.low_threshold < before:
            self.low_events.append(stream.stream_id)

    def _next_message(self, now: float) -> OutgoingMessage | None:
        ready = self._ready
        while ready:
            stream = ready.popleft()
            message = stream.messages.popleft()
            if stream.messages:
                ready.append(stream)
            if message.expires_at <= now:
                message.abandoned = True  # never sent: no TSN, no SSN, nothing to forward
                self._consumed(stream, len(message.data))
                continue
            message.ssn = stream.next_ssn
            if message.ordered:
                stream.next_ssn = (stream.next_ssn + 1) & 0xFFFF
            return message
        return None

    def head(self, now: float) -> OutgoingMessage | None:
        """The message the next fragment comes from (started or next in turn)."""
        message = self.current
        if message is None:
            message = self.current = self._next_message(now)
        return message

    def next_fragment(
        self, max_payload: int, now: float
    ) -> tuple[OutgoingMessage, int, int] | None:
        """Take the next fragment of at most ``max_payload`` bytes: ``(message, offset,
        length)``, or ``None`` when nothing is left.  The caller assigns the TSN; the last
        fragment of a message is the one with ``offset + length == len(message.data)``."""
        message = self.head(now)
        if message is None:
            return None
        offset = message.offset
        length = min(max_payload, len(message.data) - offset)
        message.offset = end = offset + length
        if end == len(message.data):
            self.current = None
        self._consumed(self.stream(message.stream_id), length)
        return message, offset, length

    def drop_rest(self, message: OutgoingMessage) -> None:
        """Abandon the part of ``message`` not yet fragmented (it was abandoned midway)."""
        rest = len(message.data) - message.offset
        if rest:
            message.offset = len(message.data)
            self._consumed(self.stream(message.stream_id), rest)
        if self.current is message:
            self.current = None

    def drained(self, stream_id: int) -> bool:
        """No part of the stream's messages is left to fragment."""
        stream = self.streams.get(stream_id)
        current = self.current
        return (stream is None or not stream.messages) and (
            current is None or current.stream_id != stream_id
        )

    def take_low_events(self) -> list[int]:
        events = self.low_events
        self.low_events = []
        return events
