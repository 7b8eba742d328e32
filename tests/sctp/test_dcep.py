"""DCEP (RFC 8832) and data channel payloads (RFC 8831), sans I/O."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvpd.proto.errors import ProtocolError
from mvpd.sctp import dcep
from mvpd.sctp.dcep import (
    ChannelAcknowledged,
    ChannelMessage,
    ChannelParameters,
    ChannelState,
    DataChannelProtocol,
    DcepError,
    ProtocolViolation,
    RemoteChannelOpened,
    StreamIdAllocator,
)

# --- codec ---------------------------------------------------------------------------------


def test_open_message_layout_matches_rfc_8832() -> None:
    params = ChannelParameters(label="chat", protocol="json", ordered=False, max_retransmits=3,
                               priority=dcep.PRIORITY_HIGH)
    message = dcep.encode_open(params)
    assert message == struct.pack("!BBHIHH", 0x03, 0x81, 512, 3, 4, 4) + b"chatjson"
    assert dcep.decode_open(message) == params


@pytest.mark.parametrize(
    ("params", "channel_type", "reliability"),
    [
        (ChannelParameters(), 0x00, 0),
        (ChannelParameters(ordered=False), 0x80, 0),
        (ChannelParameters(max_retransmits=0), 0x01, 0),
        (ChannelParameters(ordered=False, max_retransmits=7), 0x81, 7),
        (ChannelParameters(max_packet_lifetime=150), 0x02, 150),
        (ChannelParameters(ordered=False, max_packet_lifetime=0), 0x82, 0),
    ],
)
def test_channel_types(params: ChannelParameters, channel_type: int, reliability: int) -> None:
    message = dcep.encode_open(params)
    assert message[1] == channel_type
    assert struct.unpack_from("!I", message, 4)[0] == reliability
    assert dcep.decode_open(message) == params


@given(
    label=st.text(max_size=40),
    protocol=st.text(max_size=40),
    ordered=st.booleans(),
    reliability=st.one_of(
        st.none(),
        st.tuples(st.sampled_from(["rexmit", "timed"]), st.integers(0, 2**32 - 1)),
    ),
    priority=st.integers(0, 0xFFFF),
)
def test_open_round_trip(
    label: str, protocol: str, ordered: bool, reliability: tuple[str, int] | None, priority: int
) -> None:
    rexmit = reliability[1] if reliability and reliability[0] == "rexmit" else None
    timed = reliability[1] if reliability and reliability[0] == "timed" else None
    params = ChannelParameters(label, protocol, ordered, rexmit, timed, priority)
    assert dcep.decode_open(dcep.encode_open(params)) == params


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"\x03\x00", "shorter than its header"),
        (struct.pack("!BBHIHH", 0x02, 0, 0, 0, 0, 0), "not DATA_CHANNEL_OPEN"),
        (struct.pack("!BBHIHH", 0x03, 0x03, 0, 0, 0, 0), "unknown data channel type"),
        (struct.pack("!BBHIHH", 0x03, 0x00, 0, 0, 5, 0) + b"abc", "lengths say"),
        (struct.pack("!BBHIHH", 0x03, 0x00, 0, 0, 1, 0) + b"ab", "lengths say"),
        (struct.pack("!BBHIHH", 0x03, 0x00, 0, 0, 2, 0) + b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_open_is_a_dcep_error(message: bytes, match: str) -> None:
    with pytest.raises(DcepError, match=match) as info:
        dcep.decode_open(message)
    assert isinstance(info.value, ProtocolError)


@given(st.binary(max_size=64))
def test_decode_open_never_raises_anything_but_dcep_error(message: bytes) -> None:
    with contextlib.suppress(DcepError):
        dcep.decode_open(message)


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        ChannelParameters(max_retransmits=1, max_packet_lifetime=1)
    with pytest.raises(ValueError, match="max_retransmits"):
        ChannelParameters(max_retransmits=-1)
    with pytest.raises(ValueError, match="priority"):
        ChannelParameters(priority=70000)
    with pytest.raises(ValueError, match="65535 bytes"):
        ChannelParameters(label="x" * 70000)


@pytest.mark.parametrize(
    ("data", "ppid", "payload"),
    [
        ("héllo", 51, "héllo".encode()),
        (b"\x00\x01", 53, b"\x00\x01"),
        ("", 56, b"\x00"),
        (b"", 57, b"\x00"),
    ],
)
def test_payload_ppids(data: str | bytes, ppid: int, payload: bytes) -> None:
    assert dcep.encode_payload(data) == (ppid, payload)
    assert dcep.decode_payload(ppid, payload) == data
    assert dcep.payload_size(data) == len(payload)


def test_bad_payloads() -> None:
    with pytest.raises(DcepError, match="not UTF-8"):
        dcep.decode_payload(dcep.PPID_STRING, b"\xc3")
    with pytest.raises(DcepError, match="unknown payload protocol identifier 99"):
        dcep.decode_payload(99, b"x")
    with pytest.raises(DcepError, match="deprecated"):
        dcep.decode_payload(dcep.PPID_BINARY_PARTIAL, b"x")
    # The byte under an empty PPID is ignored whatever it is.
    assert dcep.decode_payload(dcep.PPID_STRING_EMPTY, b"\x07") == ""


# --- stream ids ----------------------------------------------------------------------------


def test_stream_id_parity_follows_the_dtls_role() -> None:
    client, server = StreamIdAllocator("client"), StreamIdAllocator("server")
    assert [client.allocate() for _ in range(3)] == [0, 2, 4]
    assert [server.allocate() for _ in range(3)] == [1, 3, 5]
    assert client.is_local(6) and not client.is_local(7)
    with pytest.raises(ValueError, match="'client' or 'server'"):
        StreamIdAllocator("auto")


def test_stream_ids_are_reused_after_release_and_run_out() -> None:
    streams = StreamIdAllocator("server", max_streams=6)
    assert [streams.allocate() for _ in range(3)] == [1, 3, 5]
    with pytest.raises(DcepError, match="in use"):
        streams.allocate()
    streams.release(3)
    assert streams.allocate() == 3
    with pytest.raises(DcepError, match="already in use"):
        streams.reserve(5)
    with pytest.raises(DcepError, match="outside"):
        streams.reserve(6)


# --- the channel table ---------------------------------------------------------------------


def pair() -> tuple[DataChannelProtocol, DataChannelProtocol]:
    return DataChannelProtocol("client"), DataChannelProtocol("server")


def deliver(to: DataChannelProtocol, out: dcep.Outgoing) -> dcep.DcepEvent | None:
    return to.receive(out.stream_id, out.ppid, out.payload)


def test_open_ack_and_messages_both_ways() -> None:
    client, server = pair()
    params = ChannelParameters(label="main", protocol="chat", ordered=False)
    sid, open_message = client.open_channel(params)
    assert sid == 0 and client.state(sid) == ChannelState.CONNECTING
    assert open_message.ppid == dcep.PPID_DCEP and open_message.ordered
    assert open_message.max_retransmits is None and open_message.lifetime is None

    # Before the ACK, user data goes ordered so it cannot overtake the OPEN.
    early = client.outgoing(sid, "early")
    assert early.ordered

    opened = deliver(server, open_message)
    assert isinstance(opened, RemoteChannelOpened)
    assert opened.parameters == params and server.state(sid) == ChannelState.OPEN
    assert deliver(server, early) == ChannelMessage(sid, "early")

    assert deliver(client, opened.ack) == ChannelAcknowledged(sid)
    assert client.state(sid) == ChannelState.OPEN
    late = client.outgoing(sid, b"")
    assert not late.ordered and late.ppid == dcep.PPID_BINARY_EMPTY
    assert deliver(server, late) == ChannelMessage(sid, b"")
    assert deliver(client, server.outgoing(sid, "")) == ChannelMessage(sid, "")


def test_partial_reliability_reaches_the_association() -> None:
    client, _ = pair()
    sid, _ = client.open_channel(ChannelParameters(max_retransmits=0))
    out = client.outgoing(sid, b"x")
    assert (out.max_retransmits, out.lifetime) == (0, None)
    sid, _ = client.open_channel(ChannelParameters(max_packet_lifetime=250))
    out = client.outgoing(sid, b"x")
    assert (out.max_retransmits, out.lifetime) == (None, 250)


def test_data_from_the_peer_counts_as_an_implicit_ack_for_ordering() -> None:
    client, server = pair()
    sid, open_message = client.open_channel(ChannelParameters(ordered=False))
    deliver(server, open_message)
    assert deliver(client, server.outgoing(sid, "hi")) == ChannelMessage(sid, "hi")
    assert not client.outgoing(sid, "x").ordered
    assert client.state(sid) == ChannelState.CONNECTING  # readyState waits for the ACK


def test_both_sides_open_at_once_without_collision() -> None:
    client, server = pair()
    a, open_a = client.open_channel(ChannelParameters(label="a"))
    b, open_b = server.open_channel(ChannelParameters(label="b"))
    assert a != b
    assert isinstance(deliver(server, open_a), RemoteChannelOpened)
    assert isinstance(deliver(client, open_b), RemoteChannelOpened)
    assert sorted(client.stream_ids) == sorted(server.stream_ids) == [0, 1]


@pytest.mark.parametrize(
    ("stream_id", "ppid", "payload", "reason"),
    [
        (1, dcep.PPID_DCEP, b"", "empty DCEP message"),
        (1, dcep.PPID_DCEP, b"\x09", "unknown DCEP message type"),
        (1, dcep.PPID_DCEP, b"\x02", "ACK for no channel we opened"),
        (0, dcep.PPID_DCEP, dcep.encode_open(ChannelParameters()), "of our parity"),
        (1, dcep.PPID_DCEP, b"\x03\x00", "shorter than its header"),
        (1, dcep.PPID_STRING, b"x", "without a data channel"),
    ],
)
def test_hostile_messages_become_violations(
    stream_id: int, ppid: int, payload: bytes, reason: str
) -> None:
    client = DataChannelProtocol("client")
    event = client.receive(stream_id, ppid, payload)
    assert isinstance(event, ProtocolViolation) and reason in event.reason
    assert client.stream_ids == []


def test_second_open_on_a_stream_and_bad_text_are_violations() -> None:
    client, server = pair()
    sid, open_message = client.open_channel(ChannelParameters())
    deliver(server, open_message)
    again = deliver(server, open_message)
    assert isinstance(again, ProtocolViolation) and "already has a channel" in again.reason
    bad = server.receive(sid, dcep.PPID_STRING, b"\xff")
    assert isinstance(bad, ProtocolViolation) and "UTF-8" in bad.reason
    assert server.state(sid) == ChannelState.OPEN  # the channel survives


@given(st.integers(0, 65534), st.integers(0, 2**32 - 1), st.binary(max_size=40))
def test_receive_never_raises(stream_id: int, ppid: int, payload: bytes) -> None:
    table = DataChannelProtocol("server")
    table.receive(stream_id, ppid, payload)
    table.receive(stream_id, dcep.PPID_DCEP, payload)


def test_close_frees_the_stream_id_once_both_directions_are_reset() -> None:
    client, server = pair()
    sid, open_message = client.open_channel(ChannelParameters())
    ack = deliver(server, open_message)
    assert isinstance(ack, RemoteChannelOpened)
    assert client.start_closing(sid)
    assert not client.start_closing(sid)  # one reset per channel
    with pytest.raises(DcepError, match="closing"):
        client.outgoing(sid, "late")
    # An ACK that arrives while closing does not open the channel again.
    assert deliver(client, ack.ack) is None
    assert client.state(sid) == ChannelState.CLOSING
    assert client.closed(sid) and not client.closed(sid)
    assert client.state(sid) == ChannelState.CLOSED
    assert sid not in client.streams.in_use


def test_negotiated_channels_are_open_without_dcep() -> None:
    client = DataChannelProtocol("client")
    client.add_negotiated(ChannelParameters(label="n"), 5)
    assert client.state(5) == ChannelState.OPEN
    assert client.outgoing(5, "x").ppid == dcep.PPID_STRING
    with pytest.raises(DcepError, match="already in use"):
        client.add_negotiated(ChannelParameters(), 5)
    with pytest.raises(DcepError, match="no data channel"):
        client.outgoing(7, "x")
