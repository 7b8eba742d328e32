"""DATA sent but not yet cumulatively acknowledged: SACK processing, loss detection,
retransmission and partial-reliability abandonment (RFC 9260 6.2.1, 6.3, 7.2; RFC 3758).

Sent chunks sit in a list indexed by ``tsn - base_tsn`` (``base_tsn`` is the peer's
cumulative TSN ack + 1), so a SACK finds each TSN in O(1) and the cumulative ack pops from
the front.  A chunk record points at its message and a byte range of it; the bytes are never
copied out of the message, and retransmissions are written from the same range.
"""

from __future__ import annotations

from .congestion import CongestionControl, RtoEstimator
from .send_queue import OutgoingMessage
from .tsn import TSN_MASK

IN_FLIGHT = 0
ACKED = 1  # by a gap ack block (the cumulative ack removes the record)
TO_RETRANSMIT = 2
ABANDONED = 3

#: Miss indications that make a chunk lost (RFC 9260 7.2.4).
FAST_RETRANSMIT_MISSES = 3


class SentChunk:
    """One DATA chunk in flight: which bytes of which message, and its state."""

    __slots__ = ("flags", "length", "message", "misses", "nsent", "offset", "sent_seq", "state")

    def __init__(self, message: OutgoingMessage, offset: int, length: int, flags: int,
                 sent_seq: int) -> None:
        self.message = message
        self.offset = offset
        self.length = length
        self.flags = flags
        self.state = IN_FLIGHT
        self.nsent = 1
        self.misses = 0
        #: Order of the latest transmission among all transmissions of the association.
        self.sent_seq = sent_seq


class RetransmissionQueue:
    """Outstanding DATA of one association and the sender's view of the peer's window."""

    def __init__(
        self,
        initial_tsn: int,
        congestion: CongestionControl,
        rto: RtoEstimator,
        peer_rwnd: int,
        *,
        unreliable_losses_reduce_cwnd: bool = True,
        partial_reliability: bool = True,
    ) -> None:
        self.base_tsn = initial_tsn
        self.next_tsn = initial_tsn
        self._items: list[SentChunk] = []
        self._head = 0
        self.congestion = congestion
        self.rto = rto
        #: Payload bytes in flight (sent, neither acked nor deemed lost).
        self.flight = 0
        #: The peer's receive window as last advertised minus what was sent since.
        self.peer_rwnd = peer_rwnd
        self._to_retransmit: list[int] = []
        self._abandoned = 0
        #: A FORWARD TSN should be (re)sent: the peer's ack point can move past abandoned data.
        self.forward_tsn_due = False
        self._rtt_tsn = -1
        self._rtt_sent_at = 0.0
        self._send_seq = 0
        self.unreliable_losses_reduce_cwnd = unreliable_losses_reduce_cwnd
        #: The peer understands FORWARD TSN; without it nothing sent is ever abandoned.
        self.partial_reliability = partial_reliability
        #: Counters for tests and statistics: loss events (fast retransmits, T3-rtx
        #: timeouts), DATA chunks sent again and chunks given up, each in total.
        self.fast_retransmits = 0
        self.timeouts = 0
        self.ignored_unreliable_losses = 0
        self.chunks_retransmitted = 0
        self.chunks_abandoned = 0

    # -- queries --------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Chunks sent and not yet cumulatively acknowledged."""
        return len(self._items) - self._head

    @property
    def has_retransmissions(self) -> bool:
        return bool(self._to_retransmit)

    def chunk(self, tsn: int) -> SentChunk | None:
        index = (tsn - self.base_tsn) & TSN_MASK
        if index >= len(self._items) - self._head:
            return None
        return self._items[self._head + index]

    # -- sending --------------------------------------------------------------------------

    def add(self, message: OutgoingMessage, offset: int, length: int, flags: int,
            now: float) -> int:
        """Record a newly sent fragment; returns its TSN."""
        tsn = self.next_tsn
        self.next_tsn = (tsn + 1) & TSN_MASK
        self._send_seq = seq = self._send_seq + 1
        self._items.append(SentChunk(message, offset, length, flags, seq))
        self.flight += length
        self.peer_rwnd = max(0, self.peer_rwnd - length)
        if self._rtt_tsn < 0:
            self._rtt_tsn = tsn
            self._rtt_sent_at = now
        return tsn

    def next_retransmission(self, room: int) -> int | None:
        """The lowest TSN waiting for retransmission whose DATA chunk (header and payload)
        fits in ``room`` bytes, or ``None``.  Skips chunks acked or abandoned meanwhile."""
        pending = self._to_retransmit
        if not pending:
            return None
        pending.sort(key=lambda t: (t - self.base_tsn) & TSN_MASK)
        i = 0
        result: int | None = None
        while i < len(pending):
            tsn = pending[i]
            chunk = self.chunk(tsn)
            if chunk is None or chunk.state != TO_RETRANSMIT:
                del pending[i]
                continue
            if 16 + chunk.length <= room:
                del pending[i]
                result = tsn
                break
            i += 1
        return result

    def retransmitted(self, tsn: int) -> SentChunk:
        """Record that ``tsn`` (from :meth:`next_retransmission`) went out again."""
        chunk = self.chunk(tsn)
        assert chunk is not None
        chunk.state = IN_FLIGHT
        chunk.nsent += 1
        chunk.misses = 0
        self.chunks_retransmitted += 1
        self._send_seq = chunk.sent_seq = self._send_seq + 1
        self.flight += chunk.length
        self.peer_rwnd = max(0, self.peer_rwnd - chunk.length)
        if tsn == self._rtt_tsn:
            self._rtt_tsn = -1  # Karn: no RTT sample from a retransmitted chunk
        return chunk

    # -- acknowledgements -----------------------------------------------------------------

    def on_sack(
        self, cumulative_tsn: int, a_rwnd: int, gaps: list[tuple[int, int]], now: float
    ) -> tuple[bool, list[OutgoingMessage]]:
        """Process a SACK.  Returns whether the cumulative ack advanced and the messages
        to abandon (partial reliability exhausted for a lost chunk)."""
        items = self._items
        head = self._head
        base = self.base_tsn
        advance = (cumulative_tsn + 1 - base) & TSN_MASK
        count = len(items) - head
        if advance > count:
            # Older than our ack point (a reordered SACK), or acking TSNs never sent.
            if ((base - 1 - cumulative_tsn) & TSN_MASK) < 0x80000000:
                return False, []
            advance = count
        flight_before = self.flight
        acked_bytes = 0
        rtt_tsn = self._rtt_tsn
        rtt_index = (rtt_tsn - base) & TSN_MASK if rtt_tsn >= 0 else -1
        if rtt_index >= 0 and rtt_index < advance:
            self.rto.observe(now - self._rtt_sent_at)
            self._rtt_tsn = rtt_tsn = -1
        flight = self.flight
        newest_acked = 0  # the latest transmission this SACK newly acknowledges
        for i in range(head, head + advance):
            chunk = items[i]
            state = chunk.state
            if state == IN_FLIGHT:
                flight -= chunk.length
                acked_bytes += chunk.length
                if chunk.sent_seq > newest_acked:
                    newest_acked = chunk.sent_seq
            elif state == TO_RETRANSMIT:
                acked_bytes += chunk.length
            elif state == ABANDONED:
                self._abandoned -= 1
        head += advance
        base = (base + advance) & TSN_MASK
        # Gap ack blocks: offsets from the SACK's cumulative TSN.
        highest_newly_acked = advance - 1  # index relative to the old base
        count = len(items) - head
        covered = 0  # blocks are ascending: each offset is looked at once, whatever the SACK
        for start, end in gaps:
            low = max(start - 1, covered)
            high = min(end, count)
            if high <= low:
                continue
            covered = high
            for offset in range(low, high):
                chunk = items[head + offset]
                state = chunk.state
                if state in (IN_FLIGHT, TO_RETRANSMIT):
                    if state == IN_FLIGHT:
                        flight -= chunk.length
                    chunk.state = ACKED
                    acked_bytes += chunk.length
                    if offset + advance > highest_newly_acked:
                        highest_newly_acked = offset + advance
                    if chunk.sent_seq > newest_acked:
                        newest_acked = chunk.sent_seq
                    if rtt_tsn >= 0 and (rtt_tsn - base) & TSN_MASK == offset:
                        if chunk.nsent == 1:
                            self.rto.observe(now - self._rtt_sent_at)
                        self._rtt_tsn = rtt_tsn = -1
        self.flight = flight
        self._head = head
        self.base_tsn = base
        if head > 256 and head * 2 > len(items):
            del items[:head]
            self._head = 0
            head = 0
        cumulative_advanced = advance > 0
        congestion = self.congestion
        if cumulative_advanced:
            exit_tsn = congestion.fast_recovery_exit
            if exit_tsn is not None and ((cumulative_tsn - exit_tsn) & TSN_MASK) < 0x80000000:
                congestion.fast_recovery_exit = None
            srtt = self.rto.srtt
            congestion.on_cumulative_ack(acked_bytes, flight_before, now,
                                         self.rto.rto if srtt is None else srtt)
        # Miss indications for chunks below the highest newly acknowledged TSN (RFC 9260
        # 7.2.4) and sent before the newest transmission acknowledged: a retransmitted chunk
        # is not missed by SACKs for chunks that left before it, but a lost retransmission
        # is found like any other loss instead of waiting for the T3-rtx timer.
        abandon: list[OutgoingMessage] = []
        lost_reliable = False
        lost_any = False
        limit = highest_newly_acked - advance
        if limit > 0:
            for i in range(head, head + min(limit, len(items) - head)):
                chunk = items[i]
                if chunk.state != IN_FLIGHT or chunk.sent_seq > newest_acked:
                    continue
                chunk.misses += 1
                if chunk.misses < FAST_RETRANSMIT_MISSES:
                    continue
                lost_any = True
                self.flight -= chunk.length
                message = chunk.message
                if self._exhausted(message, chunk, now):
                    abandon.append(message)
                    if message.max_retransmits != 0:
                        lost_reliable = True
                    chunk.state = ABANDONED
                    self._abandoned += 1
                    self.chunks_abandoned += 1
                else:
                    lost_reliable = True
                    chunk.state = TO_RETRANSMIT
                    self._to_retransmit.append((base + i - head) & TSN_MASK)
        if lost_any:
            self.fast_retransmits += 1
            if lost_reliable or self.unreliable_losses_reduce_cwnd:
                congestion.on_fast_retransmit((self.next_tsn - 1) & TSN_MASK)
            else:
                self.ignored_unreliable_losses += 1
        self.peer_rwnd = max(0, a_rwnd - self.flight)
        if self._abandoned:
            self.forward_tsn_due = True
        return cumulative_advanced, abandon

    def _exhausted(self, message: OutgoingMessage, chunk: SentChunk, now: float) -> bool:
        if not self.partial_reliability:
            return False
        if message.abandoned:
            return True
        limit = message.max_retransmits
        return (limit >= 0 and chunk.nsent > limit) or message.expires_at <= now

    def on_timeout(self, now: float) -> list[OutgoingMessage]:
        """The T3-rtx timer expired: every chunk in flight is deemed lost (RFC 9260 6.3.3).
        Returns the messages to abandon."""
        self.timeouts += 1
        self.rto.back_off()
        self._rtt_tsn = -1
        abandon: list[OutgoingMessage] = []
        items = self._items
        base = self.base_tsn
        head = self._head
        lost_any = False
        lost_reliable = False
        for i in range(head, len(items)):
            chunk = items[i]
            if chunk.state != IN_FLIGHT:
                continue
            lost_any = True
            message = chunk.message
            if self._exhausted(message, chunk, now):
                chunk.state = ABANDONED
                self._abandoned += 1
                self.chunks_abandoned += 1
                abandon.append(message)
                if message.max_retransmits != 0:
                    lost_reliable = True
            else:
                lost_reliable = True
                chunk.state = TO_RETRANSMIT
                self._to_retransmit.append((base + i - head) & TSN_MASK)
        self.flight = 0
        if lost_reliable or (lost_any and self.unreliable_losses_reduce_cwnd):
            self.congestion.on_retransmission_timeout()
        elif lost_any:
            self.ignored_unreliable_losses += 1
        if self._abandoned:
            self.forward_tsn_due = True
        return abandon

    # -- partial reliability --------------------------------------------------------------

    def abandon(self, message: OutgoingMessage) -> None:
        """Abandon every sent fragment of ``message`` (RFC 3758 3.5 C3)."""
        message.abandoned = True
        base = self.base_tsn
        count = len(self._items) - self._head
        start = (message.first_tsn - base) & TSN_MASK
        if message.tsn_count == 0:
            return
        for k in range(message.tsn_count):
            index = (start + k) & TSN_MASK
            if index >= 0x80000000:  # before the ack point: already acknowledged
                continue
            if index >= count:
                break
            chunk = self._items[self._head + index]
            if chunk.state == ABANDONED:
                continue
            if chunk.state == IN_FLIGHT:
                self.flight -= chunk.length
            chunk.state = ABANDONED
            self._abandoned += 1
            self.chunks_abandoned += 1
        if self._abandoned:
            self.forward_tsn_due = True

    def forward_tsn(self) -> tuple[int, list[tuple[int, int]]] | None:
        """The FORWARD TSN to send (new cumulative TSN, ordered ``(stream, ssn)`` skipped),
        or ``None`` if the front of the queue holds no abandoned chunk."""
        items = self._items
        i = self._head
        streams: dict[int, int] = {}
        while i < len(items) and items[i].state == ABANDONED:
            message = items[i].message
            if message.ordered:
                streams[message.stream_id] = message.ssn
            i += 1
        if i == self._head:
            self.forward_tsn_due = False
            return None
        new_cumulative = (self.base_tsn + (i - self._head) - 1) & TSN_MASK
        return new_cumulative, sorted(streams.items())
