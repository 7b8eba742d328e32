"""Chunk, parameter and packet codecs: round trips and refusals."""

from __future__ import annotations

import pytest

from mvpd.sctp import MalformedPacket
from mvpd.sctp.chunks import (
    AbortChunk,
    Chunk,
    CookieAckChunk,
    CookieEchoChunk,
    DataChunk,
    ErrorChunk,
    ForwardTsnChunk,
    HeartbeatAckChunk,
    HeartbeatChunk,
    InitAckChunk,
    InitChunk,
    ReconfigChunk,
    SackChunk,
    ShutdownAckChunk,
    ShutdownChunk,
    ShutdownCompleteChunk,
    UnknownChunk,
    decode_chunk,
)
from mvpd.sctp.cookie import CookieState
from mvpd.sctp.crc32c import crc32c, crc32c_extend, crc32c_extend_python, crc32c_python
from mvpd.sctp.packet import PacketWriter, build_packet, parse_packet
from mvpd.sctp.parameters import (
    PARAM_FORWARD_TSN_SUPPORTED,
    PARAM_STATE_COOKIE,
    OutgoingSsnResetRequest,
    ReconfigResponse,
    decode_tlvs,
    encode_tlvs,
)
from mvpd.sctp.tsn import ssn_le, ssn_lt, tsn_le, tsn_lt

CHUNKS: list[Chunk] = [
    DataChunk(0xFFFFFFFF, 7, 65535, 53, b"hello world", flags=0x07),
    DataChunk(1, 0, 0, 51, b"x", flags=0x02),
    InitChunk(0xDEADBEEF, 131072, 65535, 65535, 42,
              [(PARAM_FORWARD_TSN_SUPPORTED, b""), (0x8008, bytes([192, 130]))]),
    InitAckChunk(1, 2, 3, 4, 5, [(PARAM_STATE_COOKIE, b"cookie!")]),
    SackChunk(100, 65536, [(2, 3), (5, 9)], [99, 98]),
    SackChunk(0, 0),
    HeartbeatChunk(b"\x01\x02\x03"),
    HeartbeatAckChunk(b"info with odd length"),
    AbortChunk([(12, b"bye")], flags=1),
    ErrorChunk([(3, b"\x00\x00\x00\x01")]),
    ShutdownChunk(123456),
    ShutdownAckChunk(),
    CookieEchoChunk(b"opaque cookie"),
    CookieAckChunk(),
    ShutdownCompleteChunk(flags=1),
    ReconfigChunk([OutgoingSsnResetRequest(10, 20, 30, [1, 3, 5]).encode(),
                   ReconfigResponse(9, 1).encode()]),
    ForwardTsnChunk(77, [(1, 2), (3, 4)]),
    UnknownChunk(0xC1, 0xAA, b"unknown body"),
]


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: type(c).__name__)
def test_chunk_round_trip(chunk: Chunk) -> None:
    encoded = chunk.encode()
    assert int.from_bytes(encoded[2:4], "big") == len(encoded)
    packet = build_packet(5000, 5000, 0x1234, encoded)
    parsed = parse_packet(packet)
    assert (parsed.src_port, parsed.dst_port, parsed.verification_tag) == (5000, 5000, 0x1234)
    assert parsed.decoded() == [chunk]
    assert decode_chunk(encoded[0], encoded[1], encoded[4:]) == chunk


def test_writer_bundles_and_pads() -> None:
    writer = PacketWriter(1, 2, 1200)
    writer.start(99)
    writer.add(SackChunk(5, 1000).encode())
    writer.add_data(3, 10, 1, 0, 53, memoryview(b"abc"))
    writer.add(HeartbeatChunk(b"z").encode())
    packet = writer.finish()
    assert len(packet) % 4 == 0
    assert parse_packet(packet).decoded() == [
        SackChunk(5, 1000), DataChunk(10, 1, 0, 53, b"abc", flags=3), HeartbeatChunk(b"z"),
    ]


def test_reconfig_parameters_round_trip() -> None:
    request = OutgoingSsnResetRequest(1, 2, 3, [])
    assert OutgoingSsnResetRequest.decode(request.encode()[1]) == request
    response = ReconfigResponse(5, 6)
    assert ReconfigResponse.decode(response.encode()[1]) == response
    with pytest.raises(MalformedPacket):
        OutgoingSsnResetRequest.decode(b"\x00" * 13)
    with pytest.raises(MalformedPacket):
        ReconfigResponse.decode(b"\x00" * 4)


def test_tlvs_round_trip_and_refuse_bad_lengths() -> None:
    items = [(1, b""), (2, b"a"), (3, b"abcd"), (4, b"abcde")]
    assert decode_tlvs(encode_tlvs(items)) == items
    assert decode_tlvs(encode_tlvs(items)[:-3]) == items  # last padding may be missing
    for bad in (b"\x00\x01\x00\x03", b"\x00\x01\x00\x09abc", b"\x00\x01"):
        with pytest.raises(MalformedPacket):
            decode_tlvs(bad)


def test_cookie_is_authenticated() -> None:
    state = CookieState(1, 2, 3, 4, 5, 6, 7, 3, 8.5)
    secret = b"s" * 32
    sealed = state.seal(secret)
    opened = CookieState.open(secret, sealed)
    assert (opened.local_tag, opened.peer_tag, opened.features, opened.created_at) == (
        1, 2, 3, 8.5)
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    for bad, key in ((tampered, secret), (sealed, b"t" * 32), (sealed[:-1], secret)):
        with pytest.raises(MalformedPacket):
            CookieState.open(key, bad)


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x00" * 15,
        build_packet(1, 2, 3, SackChunk(1, 2).encode())[:-1],  # checksum and length wrong
        build_packet(1, 2, 3, b"\x03\x00\x00\x03"),  # chunk length below 4
        build_packet(1, 2, 3, b"\x03\x00\x00\x40" + b"\x00" * 12),  # length past the end
    ],
)
def test_bad_packets_are_refused(packet: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_packet(packet)


def test_bad_checksum_is_refused() -> None:
    packet = bytearray(build_packet(1, 2, 3, SackChunk(1, 2).encode()))
    packet[-1] ^= 0xFF
    with pytest.raises(MalformedPacket):
        parse_packet(bytes(packet))


def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == crc32c_python(b"123456789") == 0xE3069283
    assert crc32c_extend(crc32c(b"1234"), b"56789") == 0xE3069283
    assert crc32c_extend_python(crc32c_python(b"1234"), b"56789") == 0xE3069283


def test_serial_number_arithmetic_wraps() -> None:
    assert tsn_lt(0xFFFFFFFF, 0) and not tsn_lt(0, 0xFFFFFFFF)
    assert tsn_le(5, 5) and not tsn_lt(5, 5) and tsn_le(0x7FFFFFFF, 0xFFFFFFFE)
    assert ssn_lt(65535, 0) and ssn_le(0, 0) and not ssn_lt(1, 0)
