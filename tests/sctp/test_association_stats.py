"""Association.stats(): the counters ``mvpctl stats`` and the metrics show, moved by traffic
over a clean and a lossy link in memory."""

from __future__ import annotations

from mvpd.sctp import Association

from .harness import Link, Pair

COUNTERS = ("packets_sent", "packets_received", "data_packets_received", "sacks_sent",
            "sacks_received", "retransmissions", "fast_retransmits", "t3_expirations",
            "abandoned", "unreliable_losses_ignored")


def _quiet(pair: Pair) -> None:
    """Run until both sides have nothing outstanding and no timer but the heartbeat's."""
    def settled() -> bool:
        for side in (pair.a, pair.b):
            association = side.association
            rtx = association.retransmissions
            deadline = association.next_deadline()
            if rtx is None or rtx.outstanding or association.send_queue.has_data:
                return False
            if deadline is not None and deadline < pair.now + 1.0:
                return False  # a delayed SACK, a retransmission: not quiet yet
        return True
    pair.run(settled, timeout=300)


def test_before_the_handshake_there_are_no_windows_and_no_counts() -> None:
    stats = Association().stats()
    assert stats["state"] == "closed"
    assert all(stats[key] == 0 for key in COUNTERS)
    assert stats["cwnd"] is stats["flight_size"] is stats["peer_rwnd"] is None
    assert stats["our_rwnd"] == 1024 * 1024 and stats["srtt_ms"] is None


def test_a_clean_link_counts_every_packet_and_sack_on_both_sides() -> None:
    pair = Pair(receive_window=256 * 1024)
    pair.connect()
    a, b = pair.a.association, pair.b.association
    for i in range(200):
        a.send(1, 53, bytes([i]) * 3000, now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == 200)
    _quiet(pair)
    sa, sb = a.stats(), b.stats()
    # Nothing lost or duplicated: each side received exactly what the other sent.
    assert sa["packets_sent"] == pair.a.packets_out == sb["packets_received"]
    assert sb["packets_sent"] == pair.b.packets_out == sa["packets_received"]
    assert sb["sacks_sent"] == sa["sacks_received"] > 0
    assert sb["data_packets_received"] >= 200 * 3000 // a.mtu
    assert sa["retransmissions"] == sa["fast_retransmits"] == sa["t3_expirations"] == 0
    assert sa["abandoned"] == 0
    assert sa["state"] == "established" and sa["flight_size"] == 0
    assert sa["cwnd"] > 4 * a.mtu  # type: ignore[operator]  # it grew with the traffic
    assert sa["peer_rwnd"] == sb["our_rwnd"] == 256 * 1024  # everything read: all open
    assert sa["srtt_ms"] is not None and sa["srtt_ms"] > 0


def test_losses_show_as_retransmitted_chunks_and_abandoned_ones_stay_counted() -> None:
    pair = Pair(Link(loss=0.1, seed=7), Link(seed=8), rto_min=0.05)
    pair.connect()
    a = pair.a.association
    for i in range(300):
        a.send(1, 53, i.to_bytes(4, "big") * 300, now=pair.now)  # reliable
        a.send(2, 53, i.to_bytes(4, "big") * 300, max_retransmits=0, now=pair.now)
    pair.run(lambda: len([m for m in pair.b.messages() if m.stream_id == 1]) == 300,
             timeout=300)
    _quiet(pair)
    stats = a.stats()
    assert pair.link_ab.lost > 0
    assert stats["fast_retransmits"] > 0  # type: ignore[operator]
    # Each loss event sends at least one chunk again (the reliable stream's).
    assert stats["retransmissions"] >= stats["fast_retransmits"]  # type: ignore[operator]
    delivered = len([m for m in pair.b.messages() if m.stream_id == 2])
    assert delivered < 300
    # Every chunk given up stays counted once the peer's ack point moved past it (the
    # retransmission queue then holds no abandoned chunk any more).
    assert stats["abandoned"] >= 300 - delivered > 0  # type: ignore[operator]
    assert a.retransmissions is not None and a.retransmissions.outstanding == 0


def test_packets_since_sack_and_loss_reported_say_what_the_next_sack_is_for() -> None:
    """What a driver reads to decide whether a SACK may wait for the end of a burst: the DATA
    packets it would cover, and whether it reports a gap (which must go at once)."""
    pair = Pair()
    pair.connect()
    a, b = pair.a.association, pair.b.association
    assert b.packets_since_sack == 0 and not b.loss_reported
    for i in range(3):
        a.send(1, 53, bytes([i]) * 1000, now=pair.now)  # one DATA packet each
    packets = a.packets_to_send()
    assert len(packets) == 3
    b.receive_packet(packets[0], pair.now)
    assert b.packets_since_sack == 1 and not b.loss_reported
    b.receive_packet(packets[2], pair.now)  # the second is missing: a gap
    assert b.packets_since_sack == 2 and b.loss_reported
    b.receive_packet(packets[1], pair.now)
    assert b.packets_since_sack == 3 and not b.loss_reported  # filled
    assert b.packets_to_send()  # the SACK
    assert b.packets_since_sack == 0
