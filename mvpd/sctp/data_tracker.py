"""Which TSNs the receiver has: the cumulative TSN, the TSNs received beyond it, the
duplicates, and when a SACK is due (RFC 9260 6.2 delayed acknowledgement)."""

from __future__ import annotations

import struct

from .chunks import SACK, SackChunk
from .tsn import TSN_MASK

#: A SACK without gap blocks or duplicates: chunk header, cumulative TSN, a_rwnd, 0, 0.
_PLAIN_SACK = struct.Struct("!BBHIIHH")


class DataTracker:
    """Receiver-side TSN bookkeeping and the delayed-SACK decision."""

    def __init__(self, peer_initial_tsn: int) -> None:
        #: Highest TSN received with no gap before it.
        self.cumulative_tsn = (peer_initial_tsn - 1) & TSN_MASK
        #: TSNs received above the cumulative TSN (plain ints).
        self._above: set[int] = set()
        self._duplicates: list[int] = []
        #: Packets with DATA received since the last SACK went out.
        self.packets_since_sack = 0
        #: A SACK must go out with the next packets (gap, duplicate, every second packet).
        self.sack_now = False
        #: Data arrived that no SACK acknowledged yet (delayed-SACK timer runs).
        self.sack_pending = False

    def new_distance(self, tsn: int) -> int:
        """How far ``tsn`` is beyond the cumulative TSN if it was not received before;
        0 for a duplicate (at or before the cumulative TSN, or received above it)."""
        d = (tsn - self.cumulative_tsn) & TSN_MASK
        if d >= 0x80000000 or tsn in self._above:
            return 0
        return d

    def duplicate(self, tsn: int) -> None:
        """``tsn`` arrived again: report it and acknowledge at once (RFC 9260 6.2)."""
        if len(self._duplicates) < 32:
            self._duplicates.append(tsn)
        self.sack_now = True

    def received(self, tsn: int) -> None:
        """Record a new TSN (the caller checked :meth:`new_distance`)."""
        cumulative = self.cumulative_tsn
        if tsn == (cumulative + 1) & TSN_MASK:
            cumulative = tsn
            above = self._above
            if above:
                nxt = (cumulative + 1) & TSN_MASK
                while nxt in above:
                    above.remove(nxt)
                    cumulative = nxt
                    nxt = (nxt + 1) & TSN_MASK
            self.cumulative_tsn = cumulative
        else:
            self._above.add(tsn)

    def reports_loss(self) -> bool:
        """The next SACK carries gap blocks or duplicate TSNs."""
        return bool(self._above or self._duplicates)

    def packet_received(self) -> None:
        """A packet with DATA was processed: decide whether the SACK can wait."""
        self.sack_pending = True
        self.packets_since_sack += 1
        if self.packets_since_sack >= 2 or self._above:
            # Every second packet, and at once while there are gaps (RFC 9260 6.2, 6.7).
            self.sack_now = True

    def forward_to(self, new_cumulative_tsn: int) -> bool:
        """FORWARD TSN: treat everything up to ``new_cumulative_tsn`` as received.
        Returns whether the cumulative TSN moved."""
        if ((new_cumulative_tsn - self.cumulative_tsn) & TSN_MASK) >= 0x80000000 or (
            new_cumulative_tsn == self.cumulative_tsn
        ):
            return False
        above = self._above
        cumulative = new_cumulative_tsn
        if above:
            self._above = above = {
                t for t in above if ((t - cumulative) & TSN_MASK) < 0x80000000 and t != cumulative
            }
            nxt = (cumulative + 1) & TSN_MASK
            while nxt in above:
                above.remove(nxt)
                cumulative = nxt
                nxt = (nxt + 1) & TSN_MASK
        self.cumulative_tsn = cumulative
        return True

    def gap_blocks(self) -> list[tuple[int, int]]:
        """Gap ack blocks as offsets from the cumulative TSN (at most 64 of them)."""
        if not self._above:
            return []
        cumulative = self.cumulative_tsn
        offsets = sorted((t - cumulative) & TSN_MASK for t in self._above)
        blocks: list[tuple[int, int]] = []
        start = end = offsets[0]
        for offset in offsets[1:]:
            if offset == end + 1:
                end = offset
                continue
            blocks.append((start, end))
            if len(blocks) == 64:
                return blocks
            start = end = offset
        blocks.append((start, end))
        return blocks

    @property
    def has_gaps(self) -> bool:
        return bool(self._above)

    def make_sack(self, a_rwnd: int) -> bytes:
        """The encoded SACK chunk to send now; resets the delayed-SACK state."""
        self.packets_since_sack = 0
        self.sack_now = False
        self.sack_pending = False
        if not self._above and not self._duplicates:
            return _PLAIN_SACK.pack(SACK, 0, 16, self.cumulative_tsn, a_rwnd, 0, 0)
        gaps = [(s, e) for s, e in self.gap_blocks() if e <= 0xFFFF]
        sack = SackChunk(self.cumulative_tsn, a_rwnd, gaps, self._duplicates)
        self._duplicates = []
        return sack.encode()
