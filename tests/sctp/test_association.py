"""Two associations in memory: handshake, reliable data, SACK."""

from __future__ import annotations

import random

import pytest

from mvpd.proto.errors import ProtocolError
from mvpd.sctp import (
    Association,
    AssociationClosed,
    AssociationEstablished,
    AssociationLost,
    AssociationNotOpen,
    BufferedAmountLow,
    InvalidStream,
    MalformedPacket,
    MessageTooLarge,
    OutgoingStreamsReset,
    SctpError,
    SendError,
    State,
    StreamClosing,
    StreamsReset,
)
from mvpd.sctp.crc32c import crc32c

from .harness import Endpoint, Link, Pair


def test_handshake_establishes_both_sides() -> None:
    pair = Pair()
    pair.connect()
    assert pair.a.association.state is State.ESTABLISHED
    assert pair.b.association.state is State.ESTABLISHED
    assert pair.a.of_type(AssociationEstablished) and pair.b.of_type(AssociationEstablished)


def test_simultaneous_open() -> None:
    pair = Pair()
    pair.connect(both=True)
    assert pair.a.association.peer_tag == pair.b.association.local_tag
    assert pair.b.association.peer_tag == pair.a.association.local_tag


def test_reliable_messages_arrive_in_order() -> None:
    pair = Pair()
    pair.connect()
    sent = [bytes([i % 251]) * (1 + i * 997 % 70000) for i in range(50)]
    for data in sent:
        pair.a.association.send(1, 53, data, now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == len(sent))
    assert [m.data for m in pair.b.messages()] == sent
    assert all(m.stream_id == 1 and m.ppid == 53 for m in pair.b.messages())
    pair.run(lambda: pair.a.association.retransmissions is not None
             and pair.a.association.retransmissions.outstanding == 0)


def _lossy(loss: float, seed: int, *, reorder: float = 0.0, duplicate: float = 0.0,
           delay: float = 0.01) -> Link:
    return Link(loss=loss, reorder=reorder, duplicate=duplicate, seed=seed, delay=delay)


def _outstanding(endpoint: Endpoint) -> int:
    rtx = endpoint.association.retransmissions
    return rtx.outstanding if rtx is not None else 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_loss_reordering_duplication_deliver_exactly_once(seed: int) -> None:
    pair = Pair(_lossy(0.2, seed, reorder=0.2, duplicate=0.1),
                _lossy(0.2, seed + 100, reorder=0.2, duplicate=0.1), rto_min=0.05)
    pair.connect()
    a = pair.a.association
    rng = random.Random(seed)
    expected: dict[int, list[bytes]] = {1: [], 2: [], 3: []}
    for i in range(300):
        stream = rng.choice([1, 2, 3])
        data = i.to_bytes(4, "big") * rng.choice([1, 10, 300, 1000, 5000])
        a.send(stream, 53, data, ordered=stream != 3, now=pair.now)
        expected[stream].append(data)
    # And some the other way, so SACKs ride with DATA.
    for i in range(50):
        pair.b.association.send(2, 51, b"x" * (i * 37 + 1), now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == 300 and len(pair.a.messages()) == 50,
             timeout=600)
    for stream in (1, 2):
        got = [m.data for m in pair.b.messages() if m.stream_id == stream]
        assert got == expected[stream]
    unordered = [m.data for m in pair.b.messages() if m.stream_id == 3]
    assert sorted(unordered) == sorted(expected[3])
    assert [m.data for m in pair.a.messages()] == [b"x" * (i * 37 + 1) for i in range(50)]
    pair.run(lambda: _outstanding(pair.a) == 0 and _outstanding(pair.b) == 0)
    assert pair.link_ab.lost > 0 and pair.a.association.retransmissions is not None
    assert pair.a.association.retransmissions.fast_retransmits > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_partial_reliability_delivers_at_most_once_and_moves_on(seed: int) -> None:
    pair = Pair(_lossy(0.2, seed, reorder=0.1, duplicate=0.05), _lossy(0.2, seed + 50),
                rto_min=0.05)
    pair.connect()
    a = pair.a.association
    for i in range(400):
        payload = i.to_bytes(4, "big") * (1 + (i % 7) * 300)
        a.send(1, 53, payload, max_retransmits=0, now=pair.now)
        a.send(2, 53, payload, ordered=False, lifetime=0.05, now=pair.now)
        if i % 20 == 0:
            a.send(3, 53, payload, now=pair.now)  # reliable, behind the others
    pair.run(lambda: len([m for m in pair.b.messages() if m.stream_id == 3]) == 20,
             timeout=300)
    pair.run(lambda: _outstanding(pair.a) == 0, timeout=300)
    for stream in (1, 2):
        ids = [int.from_bytes(m.data[:4], "big") for m in pair.b.messages()
               if m.stream_id == stream]
        assert len(ids) == len(set(ids))  # at most once
        assert 0 < len(ids) < 400
        for m in pair.b.messages():
            if m.stream_id == stream:
                i = int.from_bytes(m.data[:4], "big")
                assert m.data == i.to_bytes(4, "big") * (1 + (i % 7) * 300)
    ordered_ids = [int.from_bytes(m.data[:4], "big") for m in pair.b.messages()
                   if m.stream_id == 1]
    assert ordered_ids == sorted(ordered_ids)
    # A reliable message after the abandoned ones still gets through afterwards.
    a.send(1, 53, b"after", now=pair.now)
    pair.run(lambda: pair.b.messages()[-1].data == b"after")


def test_stream_reset_after_queued_messages() -> None:
    pair = Pair(_lossy(0.1, 5), _lossy(0.1, 6), rto_min=0.05)
    pair.connect()
    a = pair.a.association
    for i in range(20):
        a.send(7, 53, bytes([i]) * 3000, now=pair.now)
    a.reset_streams([7], pair.now)
    with pytest.raises(StreamClosing):
        a.send(7, 53, b"too late", now=pair.now)
    pair.run(lambda: bool(pair.a.of_type(OutgoingStreamsReset)), timeout=60)
    kinds = [type(e).__name__ for e in pair.b.events]
    assert kinds.count("MessageReceived") == 20
    assert kinds[-1] == "StreamsReset"
    reset = pair.b.of_type(StreamsReset)[0]
    assert isinstance(reset, StreamsReset) and reset.stream_ids == [7]
    done = pair.a.of_type(OutgoingStreamsReset)[0]
    assert isinstance(done, OutgoingStreamsReset) and done.succeeded
    # The stream is usable again, its sequence numbers starting over on both sides.
    a.send(7, 53, b"reopened", now=pair.now)
    pair.run(lambda: pair.b.messages()[-1].data == b"reopened")


def test_graceful_shutdown_delivers_everything_first() -> None:
    pair = Pair(_lossy(0.1, 8), _lossy(0.1, 9), rto_min=0.05)
    pair.connect()
    a = pair.a.association
    for i in range(30):
        a.send(0, 53, bytes([i]) * 4000, now=pair.now)
    a.shutdown(pair.now)
    with pytest.raises(AssociationNotOpen):
        a.send(0, 53, b"no", now=pair.now)
    pair.run(lambda: bool(pair.a.of_type(AssociationClosed))
             and bool(pair.b.of_type(AssociationClosed)), timeout=60)
    assert [m.data for m in pair.b.messages()] == [bytes([i]) * 4000 for i in range(30)]
    assert pair.a.association.closed and pair.b.association.closed
    assert pair.a.association.next_deadline() is None


def test_abort_tells_the_peer_why() -> None:
    pair = Pair()
    pair.connect()
    pair.a.association.abort("going away", pair.now)
    pair.run(lambda: bool(pair.b.of_type(AssociationLost)))
    lost = pair.b.of_type(AssociationLost)[0]
    assert isinstance(lost, AssociationLost) and "going away" in lost.reason
    assert lost.by_peer
    local = pair.a.of_type(AssociationLost)[0]
    assert isinstance(local, AssociationLost) and not local.by_peer
    assert pair.b.association.closed and pair.a.association.closed
    with pytest.raises(AssociationNotOpen):
        pair.a.association.send(0, 53, b"x", now=pair.now)


def test_unreachable_peer_is_lost_after_retransmissions() -> None:
    pair = Pair(rto_min=0.05, rto_max=1.0)
    pair.connect()
    pair.link_ab.loss = 1.0
    pair.a.association.send(0, 53, b"into the void", now=pair.now)
    pair.run(lambda: bool(pair.a.of_type(AssociationLost)), timeout=120)
    assert pair.a.association.closed


def test_handshake_survives_lost_init_and_cookie() -> None:
    dropped: list[int] = []

    def drop_first_two(packet: bytes) -> bool:
        if len(dropped) < 2:
            dropped.append(packet[12])
            return True
        return False

    pair = Pair(Link(drop=drop_first_two))
    pair.connect()
    assert dropped == [1, 1]  # the INIT, twice: T1-init retransmitted it


def test_receiver_window_stops_a_sender_whose_peer_does_not_read() -> None:
    window = 64 * 1024
    pair = Pair(receive_window=window)
    pair.connect()
    pair.b.reading = False
    a = pair.a.association
    for _ in range(64):
        a.send(1, 53, b"z" * 16384, now=pair.now)  # 1 MiB
    pair.run(lambda: pair.now >= 5.0, timeout=10)
    held = pair.b.association.reassembly.buffered + pair.b.association.reassembly.delivered
    assert held <= window
    assert a.buffered_amount(1) > 1024 * 1024 - 2 * window  # the rest waits at the sender
    pair.b.reading = True
    pair.run(lambda: len(pair.b.messages()) == 64, timeout=60)
    assert all(m.data == b"z" * 16384 for m in pair.b.messages())


def test_delayed_sack_acknowledges_every_second_packet() -> None:
    pair = Pair(Link(rate=10e6), Link(seed=2, rate=10e6))
    pair.connect()
    a, b = pair.a.association, pair.b.association
    for _ in range(100):
        a.send(1, 53, b"q" * 65536, now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == 100)
    ratio = b.sacks_sent / b.data_packets_received
    assert 0.45 <= ratio <= 0.6, ratio
    # Full packets: 6.5 MB in 1200-byte packets need at least 5500 of them.
    assert a.packets_sent < 6 * 6_553_600 // 1100


def test_buffered_amount_and_low_event() -> None:
    pair = Pair()
    pair.connect()
    a = pair.a.association
    a.set_buffered_amount_low_threshold(4, 10_000)
    assert a.send(4, 53, b"m" * 50_000, now=pair.now) == 50_000
    assert a.buffered_amount(4) == 50_000
    pair.run(lambda: bool(pair.a.of_type(BufferedAmountLow)))
    low = pair.a.of_type(BufferedAmountLow)[0]
    assert isinstance(low, BufferedAmountLow) and low.stream_id == 4
    assert a.buffered_amount(4) <= 10_000


def test_send_refuses_what_it_cannot_take() -> None:
    pair = Pair(max_message_size=1000)
    pair.connect()
    a = pair.a.association
    with pytest.raises(MessageTooLarge):
        a.send(0, 53, b"x" * 1001, now=pair.now)
    a.peer_max_message_size = 2000  # the peer's SDP allows more
    a.send(0, 53, b"x" * 1001, now=pair.now)
    with pytest.raises(SendError):
        a.send(0, 53, b"", now=pair.now)
    with pytest.raises(InvalidStream):
        a.send(70000, 53, b"x", now=pair.now)
    assert issubclass(MessageTooLarge, SctpError) and issubclass(SctpError, ProtocolError)


def test_oversized_incoming_message_is_refused_and_counted_the_streams_go_on() -> None:
    from mvpd.sctp.events import MessageRefused

    pair = Pair(peer_max_message_size=262144)
    pair.b.association = Association(max_message_size=5000)  # and says so in its SDP...
    pair.connect()
    a = pair.a.association
    a.send(0, 53, b"y" * 20000, now=pair.now)  # ...which a ignores
    a.send(0, 53, b"after it", now=pair.now)
    a.send(1, 53, b"another stream", now=pair.now)
    a.send(0, 53, b"z" * 4000, now=pair.now)  # fragmented, within the limit
    pair.run(lambda: len(pair.b.messages()) == 3)
    reassembly = pair.b.association.reassembly
    assert reassembly.refused == 1 and reassembly.buffered == 0
    by_stream = [(m.stream_id, m.data) for m in pair.b.messages()]
    assert [d for s, d in by_stream if s == 0] == [b"after it", b"z" * 4000]
    assert (1, b"another stream") in by_stream
    assert not pair.b.of_type(AssociationLost) and not pair.a.of_type(AssociationLost)
    (refused,) = pair.b.of_type(MessageRefused)
    assert refused.stream_id == 0 and 5000 < refused.received <= 5000 + 1200  # type: ignore[attr-defined]


def test_a_refused_message_whose_end_comes_first_still_frees_its_place() -> None:
    """Reassembly, fed directly: the last fragment of an oversized message arrives before
    the rest; the message after it waits for the refusal, then is delivered."""
    from mvpd.sctp.chunks import DATA_BEGINNING, DATA_END
    from mvpd.sctp.events import Event, MessageReceived
    from mvpd.sctp.reassembly import Reassembly

    events: list[Event] = []
    r = Reassembly(1000, events)
    r.add(13, 0, 1, DATA_BEGINNING | DATA_END, 53, b"next")  # SSN 1 waits for SSN 0
    r.add(12, 0, 0, DATA_END, 53, b"c" * 600)
    r.add(10, 0, 0, DATA_BEGINNING, 53, b"a" * 600)  # 1200 > 1000: refused
    assert r.refused == 1 and not [e for e in events if isinstance(e, MessageReceived)]
    r.add(11, 0, 0, 0, 53, b"b" * 600)  # the middle: dropped, and SSN 0 is done
    assert [e.data for e in events if isinstance(e, MessageReceived)] == [b"next"]
    assert r.buffered == 0


def test_unreliable_losses_can_leave_cwnd_alone() -> None:
    def transfer(reduce: bool) -> tuple[int, int]:
        pair = Pair(_lossy(0.05, 11), Link(seed=12), rto_min=0.05,
                    unreliable_losses_reduce_cwnd=reduce)
        pair.connect()
        a = pair.a.association
        for i in range(1500):
            a.send(1, 53, i.to_bytes(4, "big") * 250, ordered=False, max_retransmits=0,
                   now=pair.now)
        pair.run(lambda: not a.send_queue.has_data and _outstanding(pair.a) == 0,
                 timeout=120)
        rtx = a.retransmissions
        assert rtx is not None
        return rtx.congestion.cwnd, rtx.ignored_unreliable_losses

    cwnd_reduced, ignored_reduced = transfer(True)
    cwnd_kept, ignored_kept = transfer(False)
    assert ignored_reduced == 0 and ignored_kept > 0
    assert cwnd_kept > 2 * cwnd_reduced


def test_packets_with_a_wrong_verification_tag_are_ignored() -> None:
    pair = Pair()
    pair.connect()
    b = pair.b.association
    # A valid packet for a's association, re-addressed with a bad tag.
    pair.a.association.send(0, 53, b"hello", now=pair.now)
    packet = bytearray(pair.a.association.packets_to_send()[0])
    packet[4:8] = (b.local_tag ^ 1).to_bytes(4, "big")
    packet[8:12] = b"\x00\x00\x00\x00"
    packet[8:12] = crc32c(bytes(packet)).to_bytes(4, "little")
    b.receive_packet(bytes(packet), pair.now)
    assert not b.events()
    with pytest.raises(MalformedPacket):
        b.receive_packet(bytes(packet[:-1]) + b"\x01", pair.now)  # checksum now wrong


def test_shutdown_completes_when_shutdown_complete_is_lost() -> None:
    dropped: list[int] = []

    def drop_first_shutdown_complete(packet: bytes) -> bool:
        if packet[12] == 14 and not dropped:
            dropped.append(14)
            return True
        return False

    pair = Pair(link_ba=Link(seed=2, drop=drop_first_shutdown_complete), rto_min=0.05)
    pair.connect()
    pair.a.association.send(0, 53, b"bye", now=pair.now)
    pair.b.association.shutdown(pair.now)
    pair.run(lambda: bool(pair.a.of_type(AssociationClosed))
             and bool(pair.b.of_type(AssociationClosed)), timeout=30)
    assert dropped == [14]
    assert not pair.a.of_type(AssociationLost) and not pair.b.of_type(AssociationLost)


def test_peer_reset_waits_for_the_data_sent_before_it() -> None:
    dropped: list[bytes] = []

    def drop_last_message_once(packet: bytes) -> bool:
        if b"final message" in packet and not dropped:
            dropped.append(packet)
            return True
        return False

    pair = Pair(Link(drop=drop_last_message_once), rto_min=0.05)
    pair.connect()
    a = pair.a.association
    a.send(3, 53, b"final message", now=pair.now)
    a.reset_streams([3], pair.now)
    pair.run(lambda: bool(pair.b.of_type(StreamsReset)), timeout=30)
    assert dropped  # the RE-CONFIG overtook the DATA: b deferred the reset
    kinds = [type(e).__name__ for e in pair.b.events]
    assert kinds.index("MessageReceived") < kinds.index("StreamsReset")
    pair.run(lambda: bool(pair.a.of_type(OutgoingStreamsReset)))


def test_messages_that_fit_a_packet_are_not_split() -> None:
    pair = Pair()
    pair.connect()
    a = pair.a.association
    for _ in range(200):
        a.send(1, 53, b"p" * 1000, ordered=False, max_retransmits=0, now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == 200)
    rtx = a.retransmissions
    assert rtx is not None
    assert (rtx.next_tsn - a.local_initial_tsn) & 0xFFFFFFFF == 200  # one chunk each


def test_without_forward_tsn_partially_reliable_messages_go_reliably() -> None:
    pair = Pair(_lossy(0.2, 21), _lossy(0.2, 22), rto_min=0.05)
    pair.b.association = Association(rto_min=0.05, forward_tsn=False)
    a = pair.a.association
    sent = [i.to_bytes(4, "big") * 500 for i in range(100)]
    for data in sent[:50]:  # queued before we know what the peer supports
        a.send(1, 53, data, max_retransmits=0, now=pair.now)
    pair.connect()
    assert not a.peer_supports_forward_tsn
    for data in sent[50:]:
        a.send(1, 53, data, max_retransmits=0, lifetime=10.0, now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == 100, timeout=300)
    assert [m.data for m in pair.b.messages()] == sent


def test_packet_size_can_change_until_the_association_is_established() -> None:
    sizes: list[int] = []

    class MeasuredLink(Link):
        def schedule(self, now: float, packet: bytes) -> list[float]:
            sizes.append(len(packet))
            return super().schedule(now, packet)

    pair = Pair(MeasuredLink())
    pair.a.association.set_mtu(1500)
    pair.b.association.set_mtu(1500)
    pair.connect()
    a = pair.a.association
    for _ in range(20):
        a.send(1, 53, b"m" * 6000, now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == 20)
    assert max(sizes) == 1500  # full packets of the new size, never larger
    with pytest.raises(ValueError, match="established"):
        a.set_mtu(1200)
    with pytest.raises(ValueError, match="at least 256"):
        Association().set_mtu(100)
