"""A hostile peer that follows the packet format but not the protocol's spirit."""

from __future__ import annotations

import time

from mvpd.sctp import AssociationLost
from mvpd.sctp.chunks import DataChunk, SackChunk
from mvpd.sctp.packet import PacketWriter

from .harness import Pair


def _established() -> Pair:
    pair = Pair()
    pair.connect()
    return pair


def _forge(tag: int, chunks: list[bytes]) -> bytes:
    """A packet from the peer's address with verification tag ``tag``."""
    writer = PacketWriter(5000, 5000, 65536)
    writer.start(tag)
    for chunk in chunks:
        writer.add(chunk)
    return writer.finish()


def test_overlapping_gap_blocks_cost_one_pass() -> None:
    pair = _established()
    b = pair.b.association
    rtx = b.retransmissions
    assert rtx is not None
    rtx.congestion.cwnd = 1 << 30  # as if grown over a long transfer
    for _ in range(600):
        b.send(1, 53, b"x" * 1000, now=pair.now)
    b.packets_to_send()  # in flight, never delivered
    assert rtx.outstanding == 600
    count = rtx.outstanding
    cumulative = (rtx.base_tsn - 1) & 0xFFFFFFFF
    sack = SackChunk(cumulative, 1 << 20, [(2, count)] * 16000).encode()
    started = time.process_time()
    b.receive_packet(_forge(b.local_tag, [sack]), pair.now)
    assert time.process_time() - started < 1.0
    assert rtx.flight == 1000  # all but the first chunk acknowledged by the gap blocks


def test_endless_unordered_middle_fragments_end_the_association() -> None:
    pair = _established()
    b = pair.b.association
    assert b.tracker is not None
    tsn = (b.tracker.cumulative_tsn + 1) & 0xFFFFFFFF
    limit = b.reassembly.max_fragments
    started = time.process_time()
    sent = 0
    while sent <= limit + 10 and not b.closed:
        chunks = [DataChunk((tsn + sent + i) & 0xFFFFFFFF, 1, 0, 53, b"m", flags=4).encode()
                  for i in range(50)]
        sent += 50
        b.receive_packet(_forge(b.local_tag, chunks), pair.now)
    assert b.closed
    lost = [e for e in b.events() if isinstance(e, AssociationLost)]
    assert lost and "fragments" in lost[0].reason
    assert time.process_time() - started < 5.0


def test_window_full_of_fragments_still_takes_the_one_they_wait_for() -> None:
    pair = Pair(receive_window=65536)
    pair.connect()
    b = pair.b.association
    assert b.tracker is not None
    first = (b.tracker.cumulative_tsn + 1) & 0xFFFFFFFF
    pieces = [bytes([i]) * 1100 for i in range(62)]  # 68 KB: more than the window
    flags = [2] + [0] * 60 + [1]
    # Everything but the first fragment, until the window refuses more.
    for i in range(1, 62):
        chunk = DataChunk((first + i) & 0xFFFFFFFF, 1, 0, 53, pieces[i], flags=flags[i])
        b.receive_packet(_forge(b.local_tag, [chunk.encode()]), pair.now)
    assert b.reassembly.buffered > 65536 // 2
    held_before = b.reassembly.buffered
    # The first fragment is taken although the window is full...
    chunk = DataChunk(first, 1, 0, 53, pieces[0], flags=2)
    b.receive_packet(_forge(b.local_tag, [chunk.encode()]), pair.now)
    assert b.tracker.cumulative_tsn != (first - 1) & 0xFFFFFFFF
    assert b.reassembly.buffered > held_before
    # ...but what the window refused is not: it must come again (as the sender would).
    assert b.tracker.has_gaps or b.tracker.cumulative_tsn != (first + 61) & 0xFFFFFFFF


def test_immediate_bit_asks_for_a_sack_at_once() -> None:
    pair = Pair()
    pair.connect()
    b = pair.b.association
    assert b.tracker is not None
    tsn = (b.tracker.cumulative_tsn + 1) & 0xFFFFFFFF
    plain = DataChunk(tsn, 1, 0, 53, b"one", flags=3).encode()
    b.receive_packet(_forge(b.local_tag, [plain]), pair.now)
    assert b.packets_to_send() == []  # one packet: the SACK waits (delayed SACK)
    b.handle_timeout(pair.now + 0.25)
    assert len(b.packets_to_send()) == 1  # the delayed SACK
    urgent = DataChunk((tsn + 1) & 0xFFFFFFFF, 1, 1, 53, b"two", flags=3 | 8).encode()
    b.receive_packet(_forge(b.local_tag, [urgent]), pair.now)
    assert len(b.packets_to_send()) == 1
