"""ControlProtocol, the daemon's side of one control connection, without I/O: bytes in,
events and bytes out."""

from __future__ import annotations

from typing import Any

from mvpd.proto.control import (
    CallReceived,
    CallRefused,
    ConnectionLedger,
    ConnectionState,
    ControlLimits,
    ControlProtocol,
    HelloReceived,
    HelloRefused,
)
from mvpd.proto.rpc import ConnectParams, FrameDecoder, encode_frame, result_message
from mvpd.proto.rpcwire import HEADER, client_hello, request

HELLO = encode_frame(client_hello("test 1"))


def protocol(access: Any = "write", **kw: Any) -> ControlProtocol:
    return ControlProtocol(access=access, server_name="mvpd 9", agent_id="alice",
                           forbidden_text="go away", write_hint="ask root", **kw)


def replies(p: ControlProtocol) -> list[dict[str, Any]]:
    return FrameDecoder().feed(p.data_to_send())


def test_hello_then_a_call_in_one_chunk_byte_by_byte() -> None:
    p = protocol()
    data = HELLO + encode_frame(request(7, "connect", {"peer": "bob"}))
    for i in range(len(data)):  # any chunking gives the same result
        p.receive_data(data[i:i + 1])
    events = p.events_received()
    assert events[0] == HelloReceived("test 1", "write")
    call = events[1]
    assert isinstance(call, CallReceived) and call.id == 7 and call.method == "connect"
    assert call.params == ConnectParams(peer="bob") and call.spec.access == "write"
    assert replies(p) == [{"hello": 1, "server": "mvpd 9", "agent_id": "alice",
                           "access": "write"}]
    assert p.state == ConnectionState.READY and p.events_received() == []


def test_the_first_frame_must_be_a_hello() -> None:
    p = protocol()
    p.receive_data(encode_frame(request(1, "status", {})))
    assert p.closing and p.events_received() == []
    [reply] = replies(p)
    assert reply["id"] is None and reply["error"]["code"] == "bad-request"
    p.receive_data(HELLO)  # nothing more is read
    assert p.data_to_send() == b"" and p.events_received() == []


def test_a_caller_without_access_is_told_once_and_closed() -> None:
    p = protocol(access=None)
    p.receive_data(HELLO)
    assert p.events_received() == [HelloRefused("test 1")]
    assert p.closing
    assert replies(p) == [{"id": None, "error": {"code": "forbidden", "message": "go away"}}]


def test_one_access_rule_for_every_request() -> None:
    p = protocol(access="read")
    p.receive_data(HELLO)
    p.data_to_send()
    assert p.events_received() == [HelloReceived("test 1", "read")]
    p.receive_data(encode_frame(request(1, "status", {}))
                   + encode_frame(request(2, "send", {"peer": "bob", "text": "x"}))
                   + encode_frame(request(3, "cancel", {"sub": 1})))
    events = p.events_received()
    assert [type(e) for e in events] == [CallReceived, CallRefused, CallReceived]
    assert events[1] == CallRefused(2, "send")
    [error] = replies(p)
    assert error == {"id": 2, "error": {"code": "forbidden",
                                        "message": "send needs write access: ask root"}}
    # The I/O layer may lower (or raise) the access as group membership changes.
    p.access = "write"
    p.receive_data(encode_frame(request(4, "send", {"peer": "bob", "text": "x"})))
    assert isinstance(p.events_received()[0], CallReceived)


def test_bad_requests_are_answered_here_and_never_reach_the_daemon() -> None:
    p = protocol()
    p.receive_data(HELLO)
    p.events_received()
    p.data_to_send()
    bad_payload = b"\xc1"  # never valid msgpack
    p.receive_data(
        encode_frame({"id": "x", "method": "status"})
        + encode_frame(request(2, "nope", {}))
        + encode_frame(request(3, "connect", {"peer": "Not An Id"}))
        + HEADER.pack(len(bad_payload)) + bad_payload
        + encode_frame(request(4, "status", {}))
    )
    codes = [(r["id"], r["error"]["code"]) for r in replies(p)]
    assert codes == [(None, "bad-request"), (2, "unknown-method"), (3, "invalid-params"),
                     (None, "bad-frame")]
    [call] = p.events_received()
    assert isinstance(call, CallReceived) and call.id == 4
    assert not p.closing


def test_frame_limits_by_access_and_an_oversize_header_ends_it() -> None:
    p = protocol(access="read", read_only_max_frame=8192)
    p.receive_data(HEADER.pack(5000))  # over 4 KiB before the hello
    assert p.closing and replies(p)[0]["error"]["code"] == "too-large"
    p = protocol(access="read", read_only_max_frame=8192)
    p.receive_data(HELLO)
    p.data_to_send()
    p.receive_data(HEADER.pack(8193))
    assert p.closing and replies(p)[0]["error"]["code"] == "too-large"


def test_hello_timeout_and_replies_too_large_for_a_frame() -> None:
    p = protocol()
    p.hello_timed_out()
    assert p.closing
    assert replies(p)[0]["error"]["message"] == "no hello received in time"
    p = protocol()
    p.receive_data(HELLO)
    p.data_to_send()
    p.send(result_message(9, {"blob": b"x" * (17 * 1024 * 1024)}))
    [reply] = replies(p)
    assert reply["id"] == 9 and reply["error"]["code"] == "too-large"


def test_the_ledger_keeps_root_and_the_group_reachable() -> None:
    limits = ControlLimits(max_connections=10, reserved_for_root=2, max_connections_per_uid=6,
                           max_pre_hello_per_uid=4, max_read_only_connections=3,
                           max_read_only_per_uid=2)
    ledger = ConnectionLedger(limits, "mvp")
    # A user outside the group: two connections, then refused (per uid), and three such
    # users together at most.
    for _ in range(2):
        assert ledger.refusal(1001, "read") is None
        ledger.admit(1, 1001, 1001, "read")
    assert "read-only control connections from uid 1001" in (ledger.refusal(1001, "read") or "")
    ledger.admit(2, 1002, 1002, "read")
    assert "outside group 'mvp'" in (ledger.refusal(1003, None) or "")
    # A group member: four waiting for their hello at most, then the hello frees a slot.
    member = [ledger.admit(3, 1100, 100, "write") for _ in range(4)]
    assert "still without their hello" in (ledger.refusal(1100, "write") or "")
    member[0].hello_pending = False
    assert ledger.refusal(1100, "write") is None
    ledger.admit(3, 1100, 100, "write")
    # 8 of 10 in use: the last two are root's.
    assert len(ledger) == 8
    assert "try again later" in (ledger.refusal(1200, "write") or "")
    assert ledger.refusal(0, "write") is None
    ledger.admit(4, 0, 0, "write")
    ledger.admit(4, 0, 0, "write")
    assert ledger.refusal(0, "write") == "too many control connections; try again later"
    for admission in member:
        ledger.release(admission)
    assert len(ledger) == 6 and ledger.refusal(1200, "write") is None
