"""The mvp-ping probe format: encoding, parsing, the echo rule, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvpd.proto.errors import ProtocolError
from mvpd.proto.ping import (
    HEADER_SIZE,
    MAX_PROBE_SIZE,
    REPLY,
    REQUEST,
    encode_request,
    parse_probe,
    reply_to,
)


def test_a_request_round_trips_and_its_reply_differs_only_in_the_type() -> None:
    data = encode_request(7, 123456789, padding=10)
    assert len(data) == HEADER_SIZE + 10
    probe = parse_probe(data)
    assert (probe.kind, probe.sequence, probe.timestamp, probe.padding) == (
        REQUEST, 7, 123456789, 10)
    reply = reply_to(data)
    assert reply is not None and reply[0] == REPLY and reply[1:] == data[1:]
    assert parse_probe(reply).kind == REPLY


def test_replies_and_junk_get_no_reply() -> None:
    request = encode_request(1, 2)
    reply = reply_to(request)
    assert reply is not None
    assert reply_to(reply) is None  # no ping-pong between two agents
    assert reply_to(b"") is None
    assert reply_to(request[:-1]) is None
    assert reply_to(bytes([3]) + request[1:]) is None  # unknown type
    assert reply_to(request[:1] + bytes([9]) + request[2:]) is None  # unknown version
    assert reply_to(request + bytes(MAX_PROBE_SIZE)) is None  # too big


def test_padding_is_bounded() -> None:
    encode_request(1, 1, padding=MAX_PROBE_SIZE - HEADER_SIZE)
    with pytest.raises(ValueError):
        encode_request(1, 1, padding=MAX_PROBE_SIZE - HEADER_SIZE + 1)


def test_text_is_not_a_probe() -> None:
    with pytest.raises(ProtocolError):
        parse_probe("hello")  # type: ignore[arg-type]


@given(st.binary(max_size=2 * MAX_PROBE_SIZE))
def test_any_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        probe = parse_probe(data)
    except ProtocolError:
        assert reply_to(data) is None
        return
    assert HEADER_SIZE <= len(data) <= MAX_PROBE_SIZE
    assert (reply_to(data) is not None) == probe.is_request
