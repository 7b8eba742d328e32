"""The control RPC protocol, sans I/O: framing, hello, requests, replies, method table."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvpd.proto import rpc, rpcwire
from mvpd.proto.errors import (
    BadRequest,
    Forbidden,
    FrameError,
    FrameTooLarge,
    InvalidParams,
    MessageTooLarge,
    MvpError,
    NotFound,
    PeerError,
    RpcError,
    RpcTimeout,
    UnknownMethod,
    VersionMismatch,
)

# msgpack values the protocol carries: maps with string keys all the way down.
leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary()
values = st.recursive(
    leaves | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
maps = st.dictionaries(st.text(max_size=10), values, max_size=5)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


def _decode_all(chunks: list[bytes], max_frame: int = rpc.MAX_FRAME) -> list[Any]:
    """Messages and errors (as their type and code) in stream order."""
    decoder = rpc.FrameDecoder(max_frame)
    out: list[Any] = []
    for chunk in chunks:
        for item in decoder.feed_items(chunk):
            out.append((type(item).__name__, item.code) if isinstance(item, FrameError) else item)
        if decoder.broken:
            break
    return out


def test_frame_is_length_then_msgpack_map() -> None:
    frame = rpc.encode_frame({"id": 1, "method": "status", "params": {}})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"id": 1, "method": "status", "params": {}}


@given(st.lists(maps, max_size=5), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_chunking_decodes_like_whole_frames(
    messages: list[dict[str, Any]], cuts: list[int]
) -> None:
    stream = b"".join(rpc.encode_frame(m) for m in messages)
    assert _decode_all([stream]) == messages
    assert _decode_all(_split(stream, cuts)) == messages
    assert _decode_all([bytes([b]) for b in stream]) == messages


@settings(max_examples=300)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_decoder_raises_only_frame_errors_and_chunking_does_not_matter(
    data: bytes, cuts: list[int]
) -> None:
    whole = _decode_all([data], max_frame=1024)
    assert _decode_all(_split(data, cuts), max_frame=1024) == whole
    decoder = rpc.FrameDecoder(1024)
    with contextlib.suppress(FrameError):  # the only exception family allowed
        decoder.feed(data)


@given(maps, st.binary(max_size=40), maps)
def test_a_bad_frame_between_good_ones_loses_nothing(
    before: dict[str, Any], junk: bytes, after: dict[str, Any]
) -> None:
    bad = struct.pack(">I", len(junk) + 1) + b"\xc1" + junk  # 0xc1 is never valid msgpack
    stream = rpc.encode_frame(before) + bad + rpc.encode_frame(after)
    expected = [before, ("FrameError", "bad-frame"), after]
    assert _decode_all([stream]) == expected
    assert _decode_all([bytes([b]) for b in stream]) == expected
    # feed() itself: returns the first, raises for the bad one, then carries on.
    decoder = rpc.FrameDecoder()
    assert decoder.feed(stream) == [before]
    with pytest.raises(FrameError):
        decoder.feed(b"")
    assert decoder.feed(b"") == [after]


@pytest.mark.parametrize(
    "payload",
    [msgpack.packb([1, 2]), msgpack.packb("text"), msgpack.packb({1: 2}), b"", b"\x81"],
    ids=["list", "str", "int-key", "empty", "truncated-map"],
)
def test_payloads_that_are_not_maps_of_strings_are_refused(payload: bytes) -> None:
    decoder = rpc.FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(struct.pack(">I", len(payload)) + payload)
    assert not isinstance(info.value, FrameTooLarge)
    assert decoder.feed(rpc.encode_frame({"ok": True})) == [{"ok": True}]


def test_oversize_header_is_fatal_and_says_the_limit() -> None:
    decoder = rpc.FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge, match=r"101 bytes.*limit is 100"):
        decoder.feed(struct.pack(">I", 101))
    assert decoder.broken
    with pytest.raises(FrameTooLarge):
        decoder.feed(rpc.encode_frame({"a": 1}))


def test_encoding_past_the_limit_is_refused_clearly() -> None:
    with pytest.raises(FrameTooLarge, match="larger than the 100-byte frame limit"):
        rpc.encode_frame({"data": b"x" * 200}, max_frame=100)
    assert rpc.MAX_FRAME == 16 * 1024 * 1024
    with pytest.raises(RpcError, match="cannot encode"):
        rpc.encode_frame({"x": object()})


def test_hello_exchange() -> None:
    hello = rpc.client_hello("mvpctl")
    assert rpc.parse_client_hello(hello).client == "mvpctl"
    answer = rpc.server_hello("mvpd 0.1.0", "alice", "read")
    parsed = rpc.parse_server_hello(answer)
    assert (parsed.agent_id, parsed.access, parsed.hello) == ("alice", "read", rpc.PROTOCOL_VERSION)


def test_hello_version_mismatch_and_junk() -> None:
    with pytest.raises(VersionMismatch, match="version 99 is not supported"):
        rpc.parse_client_hello({"hello": 99, "client": "x"})
    with pytest.raises(BadRequest, match="first frame must be a hello"):
        rpc.parse_client_hello({"id": 1, "method": "status"})
    with pytest.raises(Forbidden, match="nope"):
        rpc.parse_server_hello({"id": None, "error": {"code": "forbidden", "message": "nope"}})
    with pytest.raises(VersionMismatch):
        rpc.parse_server_hello({"hello": 2, "access": "write"})


def test_server_hello_is_checked_without_pydantic() -> None:
    parsed = rpcwire.parse_server_hello({"hello": 1, "access": "write", "newer": [1, 2]})
    assert parsed == rpcwire.ServerHello(1, "", "", "write")
    assert rpcwire.parse_server_hello({"hello": 1}).access == "read"
    for bad in (
        {},
        {"hello": True},
        {"hello": "1"},
        {"hello": 1, "access": "admin"},
        {"hello": 1, "server": 5},
        {"hello": 1, "agent_id": None},
    ):
        with pytest.raises(BadRequest, match="hello is malformed"):
            rpcwire.parse_server_hello(bad)
    # The daemon-side module hands out the very same wire functions.
    assert rpc.parse_server_hello is rpcwire.parse_server_hello
    assert rpc.FrameDecoder is rpcwire.FrameDecoder


def test_the_wire_layer_imports_no_pydantic() -> None:
    code = (
        "import sys, mvpd.proto.rpcwire, mvpd.proto.ids\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_core'}),\n"
        "      'mvpd.proto.rpc' in sys.modules, 'mvpd.proto.signaling' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "False", "False"]


def test_request_envelope() -> None:
    req = rpc.parse_request(rpc.request(7, "peers", {}))
    assert (req.id, req.method, req.params) == (7, "peers", {})
    for bad in (
        {"id": "7", "method": "x"},
        {"id": 1},
        {"id": 1, "method": 5},
        {"id": -1, "method": "status"},
        {"id": 1, "method": "status", "params": [], "extra": 1},
    ):
        with pytest.raises(BadRequest):
            rpc.parse_request(bad)
    assert rpc.request_id_of({"id": 5, "method": 3}) == 5
    assert rpc.request_id_of({"id": True}) is None


def test_params_are_validated_strictly() -> None:
    params = rpc.validate_params("connect", {"peer": "bob", "timeout": 3})
    assert isinstance(params, rpc.ConnectParams) and params.timeout == 3.0 and params.wait
    with pytest.raises(InvalidParams, match="wait"):
        rpc.validate_params("connect", {"peer": "bob", "wait": "yes"})
    with pytest.raises(InvalidParams, match="peer"):
        rpc.validate_params("connect", {"peer": "bad id with spaces"})
    with pytest.raises(InvalidParams):
        rpc.validate_params("status", {"unexpected": 1})
    with pytest.raises(InvalidParams, match="mode"):
        rpc.validate_params("connect", {"peer": "bob", "mode": "tap"})
    with pytest.raises(UnknownMethod, match="known: cancel, connect"):
        rpc.validate_params("launch", {})


def test_send_takes_exactly_one_payload() -> None:
    assert rpc.validate_params("send", {"peer": "b", "text": "hi"}).kind == "text"  # type: ignore[attr-defined]
    json_null = rpc.validate_params("send", {"peer": "b", "json": None})
    assert isinstance(json_null, rpc.SendParams) and json_null.kind == "json"
    assert json_null.json_value is None
    data = rpc.validate_params("send", {"peer": "b", "data": b"\x00"})
    assert isinstance(data, rpc.SendParams) and data.kind == "bytes"
    for bad in (
        {"peer": "b"},
        {"peer": "b", "text": "a", "data": b"b"},
        {"peer": "b", "data": "str"},
    ):
        with pytest.raises(InvalidParams):
            rpc.validate_params("send", bad)


def test_method_table_access() -> None:
    assert {m for m, s in rpc.METHODS.items() if s.access == "read"} == {
        "status",
        "peers",
        "cancel",
        "stats",  # what status shows, in more detail; ping sends traffic: write
        "id",
    }
    for method in ("id.rotate", "trust", "forget"):
        with pytest.raises(Forbidden):
            rpc.check_access(method, "read")
    rpc.check_access("status", "read")
    rpc.check_access("connect", "write")
    with pytest.raises(Forbidden):
        rpc.check_access("connect", "read")
    with pytest.raises(Forbidden):
        rpc.check_access("status", None)
    assert rpc.METHODS["recv"].stream and rpc.METHODS["pipe.open"].stream


@pytest.mark.parametrize(
    ("exc", "code", "cls"),
    [
        (NotFound("no peer 'bob'"), "not-found", NotFound),
        (PeerError("ice failed"), "peer-error", RpcError),
        (MessageTooLarge("too big"), "too-large", FrameTooLarge),
        (RpcTimeout("slow"), "timeout", RpcTimeout),
        (TimeoutError(), "timeout", RpcTimeout),
        (MvpError("odd", code="config"), "config", RpcError),
        (ValueError("secret internals"), "internal", RpcError),
    ],
)
def test_errors_round_trip_through_the_wire(exc: BaseException, code: str, cls: type) -> None:
    message = rpc.error_message(3, exc)
    assert message["error"]["code"] == code
    if isinstance(exc, ValueError):
        assert "secret" not in message["error"]["message"]
    parsed = rpc.parse_server_message(message)
    assert isinstance(parsed, rpc.Response) and parsed.id == 3
    assert isinstance(parsed.error, cls) and parsed.error.code == code


def test_server_messages_are_classified() -> None:
    assert rpc.parse_server_message(rpc.result_message(1, {"a": 1})) == rpc.Response(
        1, {"a": 1}, None
    )
    assert rpc.parse_server_message(rpc.event_message(2, "data", {"data": b"x"})) == rpc.Event(
        2, "data", {"data": b"x"}
    )
    with pytest.raises(BadRequest):
        rpc.parse_server_message({"what": 1})
    assert isinstance(rpc.error_from_wire("junk"), BadRequest)


def test_results_become_plain_data() -> None:
    status = rpc.StatusResult(
        agent_id="a",
        version="1",
        uptime=1.5,
        signaling=rpc.SignalingStatus(url="ws://x", state="connected"),
        peers=[rpc.PeerStatus(peer="b", state="connected", dropped={"queue-full": 2})],
    )
    wire = rpc.to_wire(status)
    assert wire["peers"][0]["dropped"] == {"queue-full": 2}
    assert rpc.StatusResult.model_validate(msgpack.unpackb(msgpack.packb(wire))) == status
    assert rpc.to_wire([rpc.SendResult(bytes=3)]) == [{"bytes": 3}]
