"""The sans-I/O datagram protection: round trip, replay and tamper drops, window edges, rekeying,
per-direction keys, the hello exchange."""

from __future__ import annotations

import os

import pytest

from mvpd.tun.datagram import (
    EXPORTER_LENGTH,
    HELLO,
    OVERHEAD,
    PACKET_TYPE,
    REPLY,
    DatagramProtection,
    ReplayWindow,
)

# A minimal IPv4 header's worth of bytes (version nibble 4) and an IPv6 one.
PACKET = bytes([0x45]) + os.urandom(59)
PACKET6 = bytes([0x60]) + os.urandom(79)


def pair(rekey_after: int = 1 << 23) -> tuple[DatagramProtection, DatagramProtection]:
    """Both ends of one connection (the same exporter output, opposite DTLS roles)."""
    material = os.urandom(EXPORTER_LENGTH)
    return (
        DatagramProtection(material, dtls_client=True, rekey_after=rekey_after),
        DatagramProtection(material, dtls_client=False, rekey_after=rekey_after),
    )


def test_round_trip_both_ways_and_counted() -> None:
    client, server = pair()
    datagram = client.seal(PACKET)
    assert datagram[0] == PACKET_TYPE and len(datagram) == len(PACKET) + OVERHEAD
    assert server.open(datagram) == PACKET
    assert client.open(server.seal(PACKET6)) == PACKET6
    assert (client.stats.packets_out, client.stats.bytes_out) == (1, len(PACKET))
    assert (server.stats.packets_in, server.stats.bytes_in) == (1, len(PACKET))
    assert server.peer_confirmed and client.peer_confirmed
    assert client.session_id == server.session_id and len(client.session_id) == 16


def test_first_byte_is_in_no_one_elses_rfc7983_range() -> None:
    # 0-3 STUN, 16-19 ZRTP, 20-63 DTLS, 64-127 TURN/QUIC, 128-191 RTP, 192-255 QUIC.
    assert 4 <= PACKET_TYPE <= 15


def test_never_parses_as_stun_in_aioice() -> None:
    from aioice import stun

    client, _ = pair()
    for datagram in (client.seal(b""), client.hello(), client.seal(PACKET)):
        with pytest.raises(ValueError):
            stun.parse_message(datagram)


def test_keys_differ_per_direction() -> None:
    client, _ = pair()
    # The client cannot open what it sealed itself: the two directions use different keys.
    own = client.seal(PACKET)
    assert client.open(own) is None
    assert client.stats.undecryptable == 1
    # Same counter, same plaintext, different ciphertext per direction.
    c2, s2 = pair()
    first_c, first_s = c2.seal(PACKET), s2.seal(PACKET)
    assert first_c[:12] == first_s[:12] and first_c[12:] != first_s[12:]


def test_keys_differ_per_connection() -> None:
    a, _ = pair()
    _, other_server = pair()
    assert other_server.open(a.seal(PACKET)) is None
    assert other_server.stats.undecryptable == 1


def test_replayed_packet_dropped_and_counted() -> None:
    client, server = pair()
    datagram = client.seal(PACKET)
    assert server.open(datagram) == PACKET
    assert server.open(datagram) is None
    assert server.stats.replayed == 1 and server.stats.packets_in == 1


@pytest.mark.parametrize("where", [1, 2, 3, 4, 11, 12, 40, -1])
def test_tampered_byte_dropped_and_counted(where: int) -> None:
    client, server = pair()
    datagram = bytearray(client.seal(PACKET))
    datagram[where] ^= 0x01
    assert server.open(bytes(datagram)) is None
    assert server.stats.undecryptable == 1 and server.stats.packets_in == 0
    assert not server.peer_confirmed
    # The genuine one still goes through afterwards (a forgery does not burn its counter).
    assert server.open(client.seal(PACKET)) == PACKET


@pytest.mark.parametrize("datagram", [b"", b"\x0c", bytes([PACKET_TYPE]) + bytes(26),
                                      bytes([0x17]) + bytes(60)])
def test_short_or_foreign_datagrams_dropped(datagram: bytes) -> None:
    _, server = pair()
    assert server.open(datagram) is None
    assert server.stats.undecryptable == 1


def test_reordered_packets_inside_the_window_accepted() -> None:
    client, server = pair()
    datagrams = [client.seal(PACKET) for _ in range(100)]
    for d in reversed(datagrams):
        assert server.open(d) == PACKET
    assert all(server.open(d) is None for d in datagrams)
    assert server.stats.replayed == 100


def test_window_edges() -> None:
    window = ReplayWindow()
    top = 10_000
    assert window.check(top)
    window.update(top)
    oldest = top - ReplayWindow.SIZE + 1
    assert window.check(oldest)  # the oldest counter still inside
    assert not window.check(oldest - 1)  # one further back is too old
    window.update(oldest)
    assert not window.check(oldest)
    # Jumping far ahead forgets everything behind the new window, including stale bits.
    far = top + 10 * ReplayWindow.SIZE
    window.update(far)
    assert not window.check(top)
    assert window.check(far - 1) and not window.check(far)
    # A block that wraps around the ring is cleared: the counter 2048 places ahead of a
    # recorded one is new.
    w = ReplayWindow()
    w.update(5)
    assert w.check(5 + ReplayWindow.BLOCKS * ReplayWindow.BLOCK_BITS)
    w.update(5 + ReplayWindow.BLOCKS * ReplayWindow.BLOCK_BITS)
    assert not w.check(5)


def test_window_matches_a_naive_model() -> None:
    import random

    rng = random.Random(7)
    window, seen, top = ReplayWindow(), set(), -1
    for _ in range(20_000):
        counter = max(0, top + rng.randint(-2500, 40))
        fresh = counter not in seen and (counter > top or top - counter < ReplayWindow.SIZE)
        assert window.check(counter) == fresh, (counter, top)
        if fresh:
            window.update(counter)
            seen.add(counter)
            top = max(top, counter)


def test_too_old_packet_counted_as_replayed() -> None:
    client, server = pair()
    first = client.seal(PACKET)
    for _ in range(ReplayWindow.SIZE + 1):
        assert server.open(client.seal(PACKET)) == PACKET
    assert server.open(first) is None
    assert server.stats.replayed == 1


def test_rekey_changes_epoch_and_keeps_the_previous_key_for_in_flight_packets() -> None:
    client, server = pair(rekey_after=4)
    old = [client.seal(PACKET) for _ in range(4)]
    assert client.send_epoch == 0
    new = client.seal(PACKET)
    assert client.send_epoch == 1 and client.stats.rekeys == 1
    assert new[1] == 1 and int.from_bytes(new[4:12], "big") == 0  # counter restarts
    assert server.open(new) == PACKET  # the next epoch is adopted
    assert server.receive_epoch == 1
    for d in old:  # late packets of the previous epoch still count
        assert server.open(d) == PACKET
    assert server.open(old[0]) is None and server.stats.replayed == 1


def test_epochs_two_apart_are_refused_and_the_previous_key_goes() -> None:
    client, server = pair(rekey_after=2)
    epoch0 = [client.seal(PACKET) for _ in range(2)]
    epoch1 = [client.seal(PACKET) for _ in range(2)]
    epoch2 = [client.seal(PACKET) for _ in range(2)]
    assert server.open(epoch2[0]) is None  # two epochs ahead: not derived, dropped
    assert server.stats.undecryptable == 1
    assert server.open(epoch1[0]) == PACKET
    assert server.open(epoch2[0]) == PACKET
    assert server.receive_epoch == 2
    assert server.open(epoch1[1]) == PACKET  # previous: still kept
    assert server.open(epoch0[1]) is None  # two back: gone
    assert server.stats.undecryptable == 2


def test_many_rekeys_wrap_the_epoch_byte() -> None:
    client, server = pair(rekey_after=1)
    for _ in range(600):
        assert server.open(client.seal(PACKET)) == PACKET
    assert client.send_epoch == 599 and server.receive_epoch == 599


def test_forged_next_epoch_does_not_move_the_receiver() -> None:
    client, server = pair()
    forged = bytearray(client.seal(PACKET))
    forged[1] = 1
    assert server.open(bytes(forged)) is None
    assert server.receive_epoch == 0
    assert server.open(client.seal(PACKET)) == PACKET


def test_hello_is_answered_once_and_confirms_both_ends() -> None:
    client, server = pair()
    assert not client.peer_confirmed and not server.peer_confirmed
    assert server.open(client.hello()) is None
    assert server.peer_confirmed and server.replies_due == 1
    assert client.open(server.reply()) is None
    assert server.replies_due == 0
    assert client.peer_confirmed and client.replies_due == 0  # a reply is not answered
    assert client.stats.packets_in == 0 and client.stats.dropped == 0


def test_authentic_non_ip_plaintext_dropped() -> None:
    client, server = pair()
    assert server.open(client.seal(b"\x00\x09junk")) is None
    assert server.open(client.seal(b"")) is None
    assert server.stats.dropped == 2 and server.stats.packets_in == 0


def test_bad_material_refused() -> None:
    with pytest.raises(ValueError):
        DatagramProtection(b"short", dtls_client=True)
    with pytest.raises(ValueError):
        DatagramProtection(os.urandom(EXPORTER_LENGTH), dtls_client=True, rekey_after=0)


def test_reply_constant_differs_from_hello() -> None:
    assert HELLO != REPLY and HELLO[0] >> 4 == 0 == REPLY[0] >> 4
