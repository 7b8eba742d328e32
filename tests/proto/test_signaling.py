"""Signaling message models: the seed's wire format, round trips and hostile input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvpd.proto.errors import MalformedMessage, SignalingError, UnknownMessageType
from mvpd.proto.signaling import (
    Answer,
    Bye,
    Candidate,
    Error,
    IceCandidate,
    Offer,
    Register,
    Registered,
    dump_message,
    parse_message,
)

SEED_EXAMPLES: list[dict[str, Any]] = [
    {"type": "register", "id": "agent-123", "token": "optional-token"},
    {"type": "offer", "from": "alice", "to": "bob", "sdp": "v=0\r\no=alice..."},
    {"type": "answer", "from": "bob", "to": "alice", "sdp": "v=0\r\no=bob..."},
    {
        "type": "candidate",
        "from": "alice",
        "to": "bob",
        "candidate": {
            "candidate": "candidate:1 1 UDP 2113667326 192.168.1.100 54400 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
        },
    },
    {"type": "bye", "from": "alice", "to": "bob"},
]


@pytest.mark.parametrize("wire", SEED_EXAMPLES, ids=lambda w: str(w["type"]))
def test_seed_examples_parse_and_serialise_unchanged(wire: dict[str, Any]) -> None:
    message = parse_message(json.dumps(wire))
    assert json.loads(dump_message(message)) == wire


def test_models_expose_fields() -> None:
    offer = parse_message('{"type":"offer","from":"a","to":"b","sdp":"x"}')
    assert isinstance(offer, Offer)
    assert (offer.sender, offer.to, offer.sdp) == ("a", "b", "x")
    cand = parse_message('{"type":"candidate","to":"b","candidate":null}')
    assert isinstance(cand, Candidate) and cand.is_end_of_candidates
    cand2 = parse_message('{"type":"candidate","to":"b","candidate":{"candidate":""}}')
    assert isinstance(cand2, Candidate) and cand2.is_end_of_candidates


def test_register_repr_hides_token() -> None:
    assert "s3cret" not in repr(Register(id="a", token="s3cret"))


def test_bytes_input_is_accepted() -> None:
    assert isinstance(parse_message(b'{"type":"bye","to":"b"}'), Bye)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        '"offer"',
        "{",
        '{"type": null}',
        '{"type": "offer"}',
        '{"type": "offer", "to": "b", "sdp": 5}',
        '{"type": "offer", "to": "bad id", "sdp": "x"}',
        '{"type": "offer", "to": "b", "sdp": "x", "extra": NaN}',
        '{"type": "offer", "to": "b", "sdp": "x", "extra": "\\ud800"}',
        '{"type": "register", "id": "' + "a" * 65 + '"}',
        '{"type": "candidate", "to": "b", "candidate": {"sdpMLineIndex": -1}}',
        "[" * 100_000,
        b"\xff",
    ],
)
def test_malformed_input_raises_malformed_message(text: str | bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_message(text)


def test_unknown_type_is_its_own_error() -> None:
    with pytest.raises(UnknownMessageType) as info:
        parse_message('{"type":"hello","x":1}')
    assert info.value.message_type == "hello"
    assert info.value.code == "unknown-type"


# --- properties --------------------------------------------------------------------------------

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}\Z")
texts = st.text(max_size=200)
maybe_ids = st.none() | ids

messages = st.one_of(
    st.builds(Register, id=ids, token=st.none() | texts.filter(bool)),
    st.builds(Offer, sender=maybe_ids, to=ids, sdp=texts),
    st.builds(Answer, sender=maybe_ids, to=ids, sdp=texts),
    st.builds(
        Candidate,
        sender=maybe_ids,
        to=ids,
        candidate=st.none()
        | st.builds(
            IceCandidate,
            candidate=texts,
            sdpMid=st.none() | st.text(max_size=10),
            sdpMLineIndex=st.none() | st.integers(0, 1024),
        ),
    ),
    st.builds(Bye, sender=maybe_ids, to=ids, reason=st.none() | st.text(max_size=50)),
    st.builds(Registered, id=ids),
    st.builds(Error, code=st.sampled_from(["offline", "bad-token"]), message=texts, peer=maybe_ids),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_round_trip_is_identity(message: Any) -> None:
    wire = dump_message(message)
    again = parse_message(wire)
    assert again == message
    assert dump_message(again) == wire


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
message_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["register", "offer", "answer", "candidate", "bye", "registered", "error", "hello", ""]
        )
        | st.text(max_size=5)
    },
    optional={
        "id": json_values | ids,
        "from": json_values | ids,
        "to": json_values | ids,
        "sdp": json_values,
        "token": json_values,
        "candidate": json_values,
        "code": json_values,
        "x": json_values,
    },
)


@given(
    st.one_of(
        st.text(),
        st.binary(),
        json_values.map(json.dumps),
        message_like.map(json.dumps),
        message_like,
    )
)
@settings(max_examples=300, deadline=None)
def test_parse_never_raises_anything_but_signaling_errors(data: Any) -> None:
    try:
        message = parse_message(data)
    except SignalingError:
        return
    # Whatever parses can go back on the wire, and its wire form is stable from then on
    # (null extra fields are dropped on the first trip).
    wire = dump_message(message)
    assert dump_message(parse_message(wire)) == wire
