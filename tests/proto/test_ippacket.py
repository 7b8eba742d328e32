"""IP header parsing, allowed IPs, batch framing and the packet filter (sans-I/O)."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvpd.proto.errors import MalformedPacket, ProtocolError
from mvpd.proto.ippacket import (
    BATCH_TAG,
    AllowedIPs,
    DropReason,
    PacketFilter,
    decode_message,
    encode_batch,
    parse_header,
)


def ipv4(
    src: str, dst: str, payload: bytes = b"", *, proto: int = 1, options: bytes = b""
) -> bytes:
    """An IPv4 packet (checksum left zero: the parser does not look at it)."""
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total,
        0,
        0,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + payload


def ipv6(src: str, dst: str, payload: bytes = b"", *, next_header: int = 58) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        next_header,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


# --- parse_header -------------------------------------------------------------------------


def test_parses_ipv4() -> None:
    header = parse_header(ipv4("10.0.0.1", "10.0.0.2", b"x" * 12))
    assert header.version == 4
    assert header.src_address == ipaddress.ip_address("10.0.0.1")
    assert header.dst_address == ipaddress.ip_address("10.0.0.2")
    assert header.total_length == 32


def test_parses_ipv4_with_options_and_memoryview() -> None:
    packet = ipv4("192.168.1.9", "10.9.8.7", b"abc", options=b"\x01" * 8)
    header = parse_header(memoryview(packet))
    assert header.total_length == len(packet) == 31
    assert str(header.dst_address) == "10.9.8.7"


def test_parses_ipv6() -> None:
    header = parse_header(ipv6("fd00::1", "fd00::2", b"p" * 8))
    assert header.version == 6
    assert header.src_address == ipaddress.ip_address("fd00::1")
    assert header.dst_address == ipaddress.ip_address("fd00::2")
    assert header.total_length == 48


@pytest.mark.parametrize(
    ("packet", "words"),
    [
        (b"", "empty"),
        (b"\x45" + b"\x00" * 10, "shorter than a header"),
        (b"\x60" + b"\x00" * 30, "shorter than a header"),
        (b"\x00" * 40, "not an IP packet"),
        (b"\xff" * 40, "not an IP packet"),
        (b"\x44" + ipv4("1.1.1.1", "2.2.2.2")[1:], "header length 16"),
        (ipv4("1.1.1.1", "2.2.2.2", b"abcd")[:-1], "truncated"),
        (ipv4("1.1.1.1", "2.2.2.2", b"abcd") + b"zz", "after its length"),
        (ipv6("::1", "::2", b"abcd")[:-2], "truncated"),
        (ipv6("::1", "::2", b"") + b"jumbo", "after its length"),
    ],
)
def test_malformed_packets_raise_typed_errors(packet: bytes, words: str) -> None:
    with pytest.raises(MalformedPacket, match=words) as caught:
        parse_header(packet)
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.code == "malformed-packet"


def test_ipv4_total_length_smaller_than_header() -> None:
    packet = bytearray(ipv4("1.1.1.1", "2.2.2.2", b"abcd"))
    packet[2:4] = (12).to_bytes(2, "big")
    with pytest.raises(MalformedPacket, match="smaller than its header"):
        parse_header(packet)


@given(st.binary(max_size=200))
@settings(max_examples=400)
def test_hostile_bytes_parse_or_raise_malformed(data: bytes) -> None:
    try:
        header = parse_header(data)
    except MalformedPacket:
        return
    assert header.total_length == len(data)
    assert header.version in (4, 6)


# --- AllowedIPs ---------------------------------------------------------------------------


def test_longest_prefix_wins() -> None:
    table = AllowedIPs()
    table.insert("10.0.0.0/8", "wide")
    table.insert("10.1.0.0/16", "mid")
    table.insert("10.1.2.3/32", "host")
    table.insert("0.0.0.0/0", "default")
    assert table.lookup("10.1.2.3") == "host"
    assert table.lookup("10.1.2.4") == "mid"
    assert table.lookup("10.200.0.1") == "wide"
    assert table.lookup("192.0.2.1") == "default"
    table.remove("0.0.0.0/0")
    assert table.lookup("192.0.2.1") is None


def test_ipv4_and_ipv6_are_separate() -> None:
    table = AllowedIPs()
    table.insert("fd00::/64", "six")
    table.insert("0.0.0.0/0", "four")
    assert table.lookup("fd00::5") == "six"
    assert table.lookup("fd01::5") is None
    # ::ffff:10.0.0.1 is an IPv6 address and must not match the IPv4 default route.
    assert table.lookup("::ffff:10.0.0.1") is None


def test_host_bits_are_masked_and_bare_addresses_are_hosts() -> None:
    table = AllowedIPs()
    table.insert("10.0.0.77/24", "a")
    table.insert("10.0.1.5", "b")
    assert table.networks("a") == [ipaddress.ip_network("10.0.0.0/24")]
    assert table.networks("b") == [ipaddress.ip_network("10.0.1.5/32")]
    assert table.lookup("10.0.1.6") is None


def test_insert_moves_a_network_and_reports_the_previous_owner() -> None:
    table = AllowedIPs()
    assert table.insert("10.0.0.0/24", "alice") is None
    assert table.insert("10.0.0.0/24", "alice") is None
    assert table.insert("10.0.0.0/24", "bob") == "alice"
    assert table.lookup("10.0.0.9") == "bob"
    assert table.networks("alice") == []
    assert len(table) == 1


def test_cache_does_not_outlive_changes() -> None:
    table = AllowedIPs()
    table.insert("10.0.0.0/8", "a")
    assert table.lookup("10.0.0.1") == "a"
    table.insert("10.0.0.0/24", "b")
    assert table.lookup("10.0.0.1") == "b"
    table.remove_peer("b")
    assert table.lookup("10.0.0.1") == "a"
    table.remove("10.0.0.0/8")
    assert table.lookup("10.0.0.1") is None


def test_replace_peer_and_peers_and_source_check() -> None:
    table = AllowedIPs()
    table.replace_peer("alice", ["10.0.0.2/32", "fd00::2/128"])
    table.replace_peer("bob", ["10.0.0.3/32"])
    assert table.peers() == {"alice", "bob"}
    assert table.source_allowed("alice", "10.0.0.2")
    assert not table.source_allowed("alice", "10.0.0.3")
    assert not table.source_allowed("carol", "10.0.0.2")
    table.replace_peer("alice", ["10.0.0.4/32"])
    assert table.networks("alice") == [ipaddress.ip_network("10.0.0.4/32")]
    assert table.remove_peer("alice") == [ipaddress.ip_network("10.0.0.4/32")]
    assert table.peers() == {"bob"}


def test_replace_peer_with_a_bad_network_changes_nothing() -> None:
    table = AllowedIPs()
    table.replace_peer("alice", ["10.0.0.2/32"])
    with pytest.raises(ValueError):
        table.replace_peer("alice", ["10.0.0.9/32", "not-a-network"])
    assert table.networks("alice") == [ipaddress.ip_network("10.0.0.2/32")]


def test_removing_unknown_networks_is_harmless() -> None:
    table = AllowedIPs()
    assert table.remove("10.0.0.0/24") is None
    table.insert("10.0.0.0/24", "a")
    assert table.remove("10.0.1.0/24") is None
    assert table.remove_peer("nobody") == []


def test_cache_stays_bounded() -> None:
    table = AllowedIPs()
    table.insert("10.0.0.0/8", "a")
    for i in range(AllowedIPs.CACHE_SIZE * 2 + 7):
        table.lookup_int(4, 0x0A000000 + i)
    assert len(table._cache) <= AllowedIPs.CACHE_SIZE


@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.sampled_from("abcd")),
        max_size=30,
    ),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
)
def test_lookup_matches_a_linear_scan(
    entries: list[tuple[int, int, str]], addresses: list[int]
) -> None:
    table = AllowedIPs()
    expected: dict[ipaddress.IPv4Network, str] = {}
    for value, plen, peer in entries:
        net = ipaddress.IPv4Network((value, plen), strict=False)
        table.insert(net, peer)
        expected[net] = peer
    for value in addresses:
        addr = ipaddress.IPv4Address(value)
        matches = [net for net in expected if addr in net]
        best = max(matches, key=lambda n: n.prefixlen) if matches else None
        assert table.lookup(addr) == (expected[best] if best else None)
    assert sorted(map(str, table.networks())) == sorted(map(str, expected))


# --- batch framing ------------------------------------------------------------------------


def test_single_packet_goes_raw_and_round_trips() -> None:
    packet = ipv4("10.0.0.1", "10.0.0.2", b"hello")
    message = encode_batch([packet])
    assert message == packet
    assert decode_message(message) == [packet]


def test_batch_round_trips() -> None:
    packets = [ipv4("10.0.0.1", "10.0.0.2", bytes([i]) * i) for i in range(1, 6)]
    packets.append(ipv6("fd00::1", "fd00::2", b"six"))
    message = encode_batch(packets)
    assert message[0] == BATCH_TAG
    assert len(message) == 1 + sum(2 + len(p) for p in packets)
    assert decode_message(message) == packets


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (b"", "empty message"),
        (b"\x00", "empty batch"),
        (b"\x17abc", "unknown message tag"),
        (b"\x00\x00", "inside a length prefix"),
        (b"\x00\x00\x00", "zero-length frame"),
        (b"\x00\x00\x05abc", "claims 5 bytes, 3 left"),
        (b"\x00\x00\x01a\x00", "inside a length prefix"),
        (b"\x00\xff\xff", "claims 65535 bytes, 0 left"),
    ],
)
def test_bad_batches_raise_typed_errors(message: bytes, words: str) -> None:
    with pytest.raises(MalformedPacket, match=words):
        decode_message(message)


def test_encode_refuses_what_it_cannot_frame() -> None:
    with pytest.raises(MalformedPacket):
        encode_batch([])
    with pytest.raises(MalformedPacket):
        encode_batch([b"\x45", b""])
    with pytest.raises(MalformedPacket):
        encode_batch([b"\x45", b"\x45" * 65536])


def test_a_single_non_ip_packet_is_framed_not_sent_raw() -> None:
    message = encode_batch([b"\x00junk"])
    assert decode_message(message) == [b"\x00junk"]


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=12))
def test_any_packets_round_trip(packets: list[bytes]) -> None:
    assert decode_message(encode_batch(packets)) == packets


@given(st.binary(max_size=400))
@settings(max_examples=400)
def test_hostile_messages_decode_or_raise_malformed(data: bytes) -> None:
    try:
        packets = decode_message(data)
    except MalformedPacket:
        return
    assert all(packets)
    assert sum(len(p) for p in packets) <= len(data)


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=2, max_size=8), st.data())
def test_mutilated_batches_never_escape_as_other_errors(
    packets: list[bytes], data: st.DataObject
) -> None:
    message = bytearray(encode_batch(packets))
    cut = data.draw(st.integers(0, len(message)))
    flips = data.draw(st.lists(st.integers(0, len(message) - 1), max_size=4))
    for index in flips:
        message[index] ^= 0xFF
    try:
        decoded = decode_message(bytes(message[:cut]))
    except MalformedPacket:
        return
    assert all(decoded)
    assert sum(len(p) for p in decoded) <= cut


# --- PacketFilter -------------------------------------------------------------------------


def make_filter() -> PacketFilter:
    table = AllowedIPs()
    table.replace_peer("alice", ["10.0.0.2/32", "192.168.50.0/24"])
    table.replace_peer("bob", ["10.0.0.3/32", "fd00::3/128"])
    return PacketFilter(table, max_packet_size=1500)


def test_route_batch_groups_by_peer_in_order_with_the_same_checks_as_one_by_one() -> None:
    a1, a2 = ipv4("10.0.0.1", "192.168.50.7", b"1"), ipv4("10.0.0.1", "192.168.50.7", b"2")
    a3 = ipv4("10.0.0.1", "10.0.0.2", b"3")
    b1, b6 = ipv4("10.0.0.1", "10.0.0.3", b"4"), ipv6("fd00::1", "fd00::3")
    with_options = ipv4("10.0.0.1", "192.168.50.7", b"5", options=b"\x01" * 4)
    nowhere = ipv4("10.0.0.1", "10.0.0.99")
    too_big = ipv4("10.0.0.1", "192.168.50.7", b"x" * 1500)
    # Same destination as the packet before, but broken: the checks still apply.
    truncated = a1[:-1]
    longer = a1 + b"\0"
    batch = [a1, a2, truncated, longer, too_big, b1, a3, with_options, nowhere, b6, a1, a2]
    flt, one_by_one = make_filter(), make_filter()
    expected: dict[str, list[bytes]] = {}
    for packet in batch:
        peer = one_by_one.route_outgoing(packet)
        if peer is not None:
            expected.setdefault(peer, []).append(packet)
    assert flt.route_batch(batch) == expected == {
        "alice": [a1, a2, a3, with_options, a1, a2], "bob": [b1, b6]}
    assert flt.drops.as_dict() == one_by_one.drops.as_dict()
    assert flt.drops.as_dict()["malformed"] == 2 and flt.drops.as_dict()["too-big"] == 1


def test_accept_incoming_decides_plain_ipv4_as_the_full_parser_does() -> None:
    """Plain IPv4 skips parse_header; broken or unusual packets still get its checks."""
    flt = make_filter()
    flt.destinations = AllowedIPs()
    flt.destinations.insert("10.0.0.1/32", "local")
    good = ipv4("10.0.0.2", "10.0.0.1", b"p")
    cases = {
        "accepted": [good, ipv4("10.0.0.2", "10.0.0.1", b"o", options=b"\x01" * 4)],
        "malformed": [good[:-1], good + b"\0", good[:19], b"\x45"],
        "too-big": [ipv4("10.0.0.2", "10.0.0.1", b"x" * 1500)],
        "source-not-allowed": [ipv4("10.0.0.3", "10.0.0.1"), ipv4("10.0.0.9", "10.0.0.1")],
        "destination-not-allowed": [ipv4("10.0.0.2", "10.0.0.7")],
    }
    for outcome, packets in cases.items():
        for packet in packets:
            assert flt.accept_incoming("alice", packet) == (outcome == "accepted"), packet
    drops = flt.drops.as_dict()
    assert all(drops[k] == len(v) for k, v in cases.items() if k != "accepted"), drops


def test_route_outgoing_by_destination() -> None:
    flt = make_filter()
    assert flt.route_outgoing(ipv4("10.0.0.1", "192.168.50.7")) == "alice"
    assert flt.route_outgoing(ipv6("fd00::1", "fd00::3")) == "bob"
    assert flt.route_outgoing(ipv4("10.0.0.1", "10.0.0.99")) is None
    assert flt.route_outgoing(b"\x45garbage") is None
    assert flt.route_outgoing(ipv4("10.0.0.1", "10.0.0.2", b"x" * 1500)) is None
    assert flt.drops.as_dict() == {
        "malformed": 1,
        "source-not-allowed": 0,
        "destination-not-allowed": 0,
        "no-route": 1,
        "too-big": 1,
        "not-connected": 0,
        "congested": 0,
        "write-failed": 0,
    }
    assert flt.drops.total == 3


def test_accept_incoming_checks_the_source_against_the_sending_peer() -> None:
    flt = make_filter()
    assert flt.accept_incoming("alice", ipv4("192.168.50.9", "10.0.0.1"))
    assert not flt.accept_incoming("alice", ipv4("10.0.0.3", "10.0.0.1"))  # bob's address
    assert not flt.accept_incoming("mallory", ipv4("10.0.0.2", "10.0.0.1"))
    assert not flt.accept_incoming("alice", b"")
    assert not flt.accept_incoming("alice", ipv4("10.0.0.2", "10.0.0.1", b"y" * 1500))
    assert flt.drops[DropReason.SOURCE_NOT_ALLOWED] == 2
    assert flt.drops[DropReason.MALFORMED] == 1
    assert flt.drops[DropReason.TOO_BIG] == 1
    assert "source-not-allowed" in repr(flt.drops)


def test_accept_incoming_checks_the_destination_when_given_a_table() -> None:
    destinations = AllowedIPs()
    destinations.insert("10.0.0.1/32", "(local)")
    destinations.insert("172.16.0.0/16", "forward")
    flt = PacketFilter(make_filter().allowed_ips, destinations=destinations)
    assert flt.accept_incoming("alice", ipv4("10.0.0.2", "10.0.0.1"))
    assert flt.accept_incoming("alice", ipv4("10.0.0.2", "172.16.9.9"))
    assert not flt.accept_incoming("alice", ipv4("10.0.0.2", "192.0.2.1"))  # a host address
    assert not flt.accept_incoming("alice", ipv4("10.0.0.2", "10.0.0.3"))  # not forwarded
    assert not flt.accept_incoming("bob", ipv6("fd00::3", "fd00::1"))
    assert not flt.accept_incoming("alice", ipv4("10.9.9.9", "10.0.0.1"))  # source first
    assert flt.drops[DropReason.DESTINATION_NOT_ALLOWED] == 3
    assert flt.drops[DropReason.SOURCE_NOT_ALLOWED] == 1


def test_incoming_message_keeps_good_packets_of_a_batch() -> None:
    flt = make_filter()
    good = ipv4("10.0.0.2", "10.0.0.1", b"ok")
    spoofed = ipv4("10.0.0.3", "10.0.0.1", b"no")
    message = encode_batch([good, spoofed, b"\x45broken", good])
    assert flt.incoming_message("alice", message) == [good, good]
    assert flt.drops[DropReason.SOURCE_NOT_ALLOWED] == 1
    assert flt.drops[DropReason.MALFORMED] == 1
    assert flt.incoming_message("alice", b"\x00\x00\x09short") == []
    assert flt.drops[DropReason.MALFORMED] == 2


def test_pack_messages_respects_the_size_limit_and_order() -> None:
    flt = PacketFilter()
    rng = random.Random(7)
    packets = [ipv4("10.0.0.1", "10.0.0.2", bytes(rng.randrange(0, 1400))) for _ in range(50)]
    packets.append(ipv4("10.0.0.1", "10.0.0.2", bytes(5000)))  # cannot fit
    packets.append(b"")  # not a packet
    packets.append(b"\x00notip")
    messages = flt.pack_messages(packets, 4096)
    assert all(len(m) <= 4096 for m in messages)
    assert len(messages) < 50
    decoded = [p for m in messages for p in decode_message(m)]
    assert decoded == packets[:50]
    assert flt.drops[DropReason.TOO_BIG] == 1
    assert flt.drops[DropReason.MALFORMED] == 2


def test_pack_messages_sends_a_packet_alone_when_it_only_fits_raw() -> None:
    flt = PacketFilter()
    big = ipv4("10.0.0.1", "10.0.0.2", bytes(1000))
    messages = flt.pack_messages([big, big], len(big))
    assert messages == [big, big]
    assert flt.pack_messages([], 1000) == []


@given(
    st.lists(st.integers(0, 3000), max_size=40),
    st.integers(100, 70000),
)
def test_pack_messages_never_exceeds_the_limit(sizes: list[int], limit: int) -> None:
    flt = PacketFilter()
    packets = [ipv4("10.0.0.1", "10.0.0.2", bytes(n)) for n in sizes]
    messages = flt.pack_messages(packets, limit)
    assert all(len(m) <= limit for m in messages)
    decoded = [p for m in messages for p in decode_message(m)]
    assert decoded == [p for p in packets if len(p) <= limit]
    assert flt.drops.total == len(packets) - len(decoded)
