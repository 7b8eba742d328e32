"""Turning received DATA fragments back into messages, per stream, in order where asked.

Ordered messages are keyed by ``(stream, SSN)``: a message is complete when its first and
last fragments are in and every TSN between them, counted in O(1) per fragment.  Unordered
multi-fragment messages are found by their consecutive TSNs.

An ordered message growing past the maximum message size is refused as it grows, never
buffered whole: its fragments are dropped, so are the ones still to come, the stream goes
on after it and ``refused`` counts it (a peer's oversized message must not end the
association and every other channel with it).  An unordered one is a
:class:`ProtocolViolation`.

``buffered`` counts the bytes held here plus :data:`ENTRY_COST` per fragment or message
held, for the advertised receive window, so the window also bounds how many objects a peer
can make us keep.
"""

from __future__ import annotations

from .chunks import DATA_BEGINNING, DATA_END
from .errors import ProtocolViolation
from .events import Event, MessageReceived, MessageRefused
from .tsn import SSN_MASK, TSN_MASK, ssn_le

#: What one held fragment or message costs beyond its payload, in window bytes.
ENTRY_COST = 64
#: The PPID of a refused message's place in the delivery order (nothing is delivered).
_REFUSED = (-1, b"")


class _Partial:
    """Fragments of one ordered message received so far."""

    __slots__ = ("count", "first_tsn", "fragments", "last_tsn", "ppid", "refused", "size")

    def __init__(self) -> None:
        self.first_tsn = -1
        self.last_tsn = -1
        self.fragments: dict[int, bytes] = {}
        self.size = 0
        self.ppid = 0
        #: Fragments received (kept or, once refused, dropped).
        self.count = 0
        self.refused = False


class _IncomingStream:
    __slots__ = ("complete", "next_ssn", "partial")

    def __init__(self) -> None:
        self.next_ssn = 0
        self.partial: dict[int, _Partial] = {}
        #: Complete messages waiting for an earlier SSN: ssn -> (ppid, data).
        self.complete: dict[int, tuple[int, bytes]] = {}


class Reassembly:
    """Reassembly queues of all incoming streams."""

    def __init__(self, max_message_size: int, events: list[Event]) -> None:
        self.max_message_size = max_message_size
        #: Fragments allowed per message (senders cut at the path MTU, ~1100 bytes).
        self.max_fragments = max(64, max_message_size // 256)
        self._events = events
        self._streams: dict[int, _IncomingStream] = {}
        #: Unordered fragments: tsn -> (flags, stream id, ppid, payload).
        self._unordered: dict[int, tuple[int, int, int, bytes]] = {}
        #: Bytes held in fragments and in complete messages not yet deliverable.
        self.buffered = 0
        #: Bytes delivered as MessageReceived events since the user last drained them.
        self.delivered = 0
        #: Ordered messages refused for exceeding the maximum message size.
        self.refused = 0

    def _stream(self, stream_id: int) -> _IncomingStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _IncomingStream()
        return stream

    def _deliver(self, stream_id: int, ppid: int, data: bytes) -> None:
        self.delivered += len(data)
        self._events.append(MessageReceived(stream_id, ppid, data))

    def add(self, tsn: int, stream_id: int, ssn: int, flags: int, ppid: int,
            payload: bytes) -> None:
        """One new (not duplicate) DATA fragment."""
        if flags & 4:
            self._add_unordered(tsn, stream_id, flags, ppid, payload)
            return
        stream = self._stream(stream_id)
        if flags & 3 == 3:
            if ssn == stream.next_ssn:
                self._deliver(stream_id, ppid, payload)
                stream.next_ssn = (ssn + 1) & SSN_MASK
                if stream.complete:
                    self._deliver_ready(stream_id, stream)
            elif ssn not in stream.complete and not ssn_le(ssn, (stream.next_ssn - 1) & SSN_MASK):
                stream.complete[ssn] = (ppid, payload)
                self.buffered += len(payload) + ENTRY_COST
            return
        partial = stream.partial.get(ssn)
        if partial is None:
            partial = stream.partial[ssn] = _Partial()
        partial.count += 1
        if not partial.refused:
            partial.fragments[tsn] = payload
            partial.size += len(payload)
            self.buffered += len(payload) + ENTRY_COST
            if partial.size > self.max_message_size or partial.count > self.max_fragments:
                # Refused: what was kept goes, what is still to come is only counted.
                self._events.append(MessageRefused(stream_id, partial.size))
                self.buffered -= partial.size + ENTRY_COST * len(partial.fragments)
                partial.fragments.clear()
                partial.size = 0
                partial.refused = True
                self.refused += 1
        if flags & DATA_BEGINNING:
            partial.first_tsn = tsn
            partial.ppid = ppid
        if flags & DATA_END:
            partial.last_tsn = tsn
        first = partial.first_tsn
        last = partial.last_tsn
        if first < 0 or last < 0 or partial.count != ((last - first) & TSN_MASK) + 1:
            return
        del stream.partial[ssn]
        if partial.refused:
            # Its place in the order passes without a delivery.
            if ssn == stream.next_ssn:
                stream.next_ssn = (ssn + 1) & SSN_MASK
                if stream.complete:
                    self._deliver_ready(stream_id, stream)
            else:
                stream.complete[ssn] = _REFUSED
                self.buffered += ENTRY_COST
            return
        fragments = partial.fragments
        parts = [fragments.get((first + i) & TSN_MASK) for i in range(len(fragments))]
        if None in parts:
            raise ProtocolViolation(f"fragments of a message on stream {stream_id} are not "
                                    "consecutive TSNs")
        data = b"".join(parts)  # type: ignore[arg-type]
        self.buffered -= partial.size + ENTRY_COST * len(fragments)
        if ssn == stream.next_ssn:
            self._deliver(stream_id, partial.ppid, data)
            stream.next_ssn = (ssn + 1) & SSN_MASK
            if stream.complete:
                self._deliver_ready(stream_id, stream)
        else:
            stream.complete[ssn] = (partial.ppid, data)
            self.buffered += len(data) + ENTRY_COST

    def _deliver_ready(self, stream_id: int, stream: _IncomingStream) -> None:
        complete = stream.complete
        ssn = stream.next_ssn
        while ssn in complete:
            ppid, data = complete.pop(ssn)
            self.buffered -= len(data) + ENTRY_COST
            if ppid != _REFUSED[0]:
                self._deliver(stream_id, ppid, data)
            ssn = (ssn + 1) & SSN_MASK
        stream.next_ssn = ssn

    def _add_unordered(self, tsn: int, stream_id: int, flags: int, ppid: int,
                       payload: bytes) -> None:
        if flags & 3 == 3:
            self._deliver(stream_id, ppid, payload)
            return
        fragments = self._unordered
        fragments[tsn] = (flags, stream_id, ppid, payload)
        self.buffered += len(payload) + ENTRY_COST
        # Look for the first fragment before and the last one after, over consecutive TSNs;
        # a message has at most max_fragments of them, which bounds each search.
        size = len(payload)
        count = 1
        limit = self.max_fragments
        first = tsn
        entry = fragments[tsn]
        while not entry[0] & DATA_BEGINNING:
            previous = fragments.get((first - 1) & TSN_MASK)
            if previous is None or previous[0] & DATA_END or previous[1] != stream_id:
                return
            first = (first - 1) & TSN_MASK
            entry = previous
            size += len(previous[3])
            count += 1
            if count > limit:
                break
        last = tsn
        entry = fragments[tsn]
        while not entry[0] & DATA_END and count <= limit:
            following = fragments.get((last + 1) & TSN_MASK)
            if following is None or following[0] & DATA_BEGINNING or following[1] != stream_id:
                if size > self.max_message_size:
                    break
                return
            last = (last + 1) & TSN_MASK
            entry = following
            size += len(following[3])
            count += 1
        if count > limit:
            raise ProtocolViolation(
                f"unordered message on stream {stream_id} in more than {limit} fragments"
            )
        if size > self.max_message_size:
            raise ProtocolViolation(
                f"unordered message on stream {stream_id} exceeds the maximum message size "
                f"{self.max_message_size}"
            )
        count = ((last - first) & TSN_MASK) + 1
        parts = [fragments.pop((first + i) & TSN_MASK)[3] for i in range(count)]
        self.buffered -= size + ENTRY_COST * count
        self._deliver(stream_id, ppid, b"".join(parts))

    def forward(self, new_cumulative_tsn: int, streams: list[tuple[int, int]]) -> None:
        """FORWARD TSN (RFC 3758 3.6): drop fragments up to ``new_cumulative_tsn`` and skip
        the ordered messages up to each listed ``(stream, ssn)``."""
        if self._unordered:
            for tsn in [t for t in self._unordered
                        if ((new_cumulative_tsn - t) & TSN_MASK) < 0x80000000]:
                self.buffered -= len(self._unordered.pop(tsn)[3]) + ENTRY_COST
        for stream_id, skipped in streams:
            stream = self._streams.get(stream_id)
            if stream is None:
                stream = self._stream(stream_id)
            for ssn in [s for s in stream.partial if ssn_le(s, skipped)]:
                partial = stream.partial.pop(ssn)
                self.buffered -= partial.size + ENTRY_COST * len(partial.fragments)
            # Messages before the skipped one that did arrive whole are still delivered.
            next_ssn = stream.next_ssn
            for ssn in sorted((s for s in stream.complete if ssn_le(s, skipped)),
                              key=lambda s: (s - next_ssn) & SSN_MASK):
                ppid, data = stream.complete.pop(ssn)
                self.buffered -= len(data) + ENTRY_COST
                if ppid != _REFUSED[0]:
                    self._deliver(stream_id, ppid, data)
            if ssn_le(stream.next_ssn, skipped):
                stream.next_ssn = (skipped + 1) & SSN_MASK
            self._deliver_ready(stream_id, stream)

    def reset_streams(self, stream_ids: list[int]) -> None:
        """The peer reset these outgoing streams: sequence numbers start again at 0."""
        for stream_id in stream_ids or list(self._streams):
            stream = self._streams.pop(stream_id, None)
            if stream is None:
                continue
            for partial in stream.partial.values():
                self.buffered -= partial.size + ENTRY_COST * len(partial.fragments)
            for _ppid, data in stream.complete.values():
                self.buffered -= len(data) + ENTRY_COST

