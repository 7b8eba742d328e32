"""SignalingRouter: routing, identity, tokens, limits. Synchronous, with an injected clock."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvpd.proto.router import (
    CLOSE_BAD_TOKEN,
    CLOSE_ID_IN_USE,
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_SLOW_RECEIVER,
    CLOSE_TOO_BIG,
    CheckLiveness,
    Close,
    Send,
    SignalingRouter,
    source_key,
)

Router = SignalingRouter[str]


def sends(actions: list[Any], conn: str | None = None) -> list[dict[str, Any]]:
    """The JSON objects sent (to ``conn`` when given)."""
    return [
        json.loads(a.text)
        for a in actions
        if isinstance(a, Send) and (conn is None or a.conn == conn)
    ]


def closes(actions: list[Any]) -> list[Close[str]]:
    return [a for a in actions if isinstance(a, Close)]


def reg(
    router: Router,
    conn: str,
    agent_id: str,
    token: str | None = None,
    *,
    now: float = 0.0,
    source: str | None = None,
) -> list[Any]:
    router.connect(conn, now, source=source or f"10.0.0.{abs(hash(conn)) % 250 + 1}")
    msg: dict[str, Any] = {"type": "register", "id": agent_id}
    if token is not None:
        msg["token"] = token
    return router.receive(conn, json.dumps(msg), now)


def test_register_is_answered_and_routes_by_to() -> None:
    r = Router()
    assert sends(reg(r, "c1", "alice")) == [{"type": "registered", "id": "alice"}]
    reg(r, "c2", "bob")
    out = r.receive("c1", json.dumps({"type": "offer", "to": "bob", "sdp": "v=0"}), 1.0)
    assert out == [Send("c2", out[0].text)]
    assert json.loads(out[0].text) == {"type": "offer", "from": "alice", "to": "bob", "sdp": "v=0"}
    assert r.registered_ids() == ["alice", "bob"]
    assert r.stats.messages_routed == 1
    assert r.stats.routed_by_type["offer"] == 1


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "answer", "to": "bob", "sdp": "v=0"},
        {
            "type": "candidate",
            "to": "bob",
            "candidate": {
                "candidate": "candidate:1 1 UDP 1 127.0.0.1 5 typ host",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
            },
        },
        {"type": "candidate", "to": "bob", "candidate": None},
        {"type": "bye", "to": "bob"},
    ],
)
def test_every_routed_type_reaches_the_target(msg: dict[str, Any]) -> None:
    r = Router()
    reg(r, "c1", "alice")
    reg(r, "c2", "bob")
    [out] = sends(r.receive("c1", json.dumps(msg), 0.0), "c2")
    assert out == {**msg, "from": "alice"}


def test_spoofed_from_is_overwritten_and_extra_fields_kept() -> None:
    r = Router()
    reg(r, "c1", "mallory")
    reg(r, "c2", "bob")
    text = json.dumps({"type": "offer", "from": "alice", "to": "bob", "sdp": "x", "x-n": 1})
    [out] = sends(r.receive("c1", text, 0.0), "c2")
    assert out["from"] == "mallory"
    assert out["x-n"] == 1


def test_routed_before_register_is_refused_but_connection_kept() -> None:
    r = Router()
    reg(r, "c2", "bob")
    r.connect("c1")
    out = r.receive("c1", json.dumps({"type": "offer", "to": "bob", "sdp": "x"}), 0.0)
    assert sends(out) == [
        {
            "type": "error",
            "code": "not-registered",
            "message": "register before sending messages",
            "about": "offer",
        }
    ]
    assert not closes(out)
    # Registering afterwards works on the same connection.
    assert sends(r.receive("c1", '{"type":"register","id":"alice"}', 0.0))[0]["type"] == (
        "registered"
    )


def test_offline_target_names_the_peer() -> None:
    r = Router()
    reg(r, "c1", "alice")
    [err] = sends(r.receive("c1", '{"type":"bye","to":"carol"}', 0.0))
    assert err["code"] == "offline"
    assert err["peer"] == "carol"
    assert err["about"] == "bye"


def test_disconnect_frees_the_id() -> None:
    r = Router()
    reg(r, "c1", "alice")
    reg(r, "c2", "bob")
    assert r.disconnect("c2") == []
    [err] = sends(r.receive("c1", '{"type":"bye","to":"bob"}', 0.0))
    assert err["code"] == "offline"
    assert r.connection_count == 1


def test_a_live_holder_keeps_its_id_and_the_newcomer_is_refused() -> None:
    r = Router()
    reg(r, "real", "alice")
    out = reg(r, "attacker", "alice")
    # Nothing is decided yet: the holder is checked first, and nobody is told anything.
    assert out == [CheckLiveness("real")]
    assert r.agent_id("attacker") is None
    # While the check runs, another claimant is refused at once.
    [err] = sends(reg(r, "third", "alice"), "third")
    assert err["code"] == "id-in-use"
    out = r.liveness_checked("real", True, 1.0)
    [err] = sends(out, "attacker")
    assert (err["code"], err["peer"], err["about"]) == ("id-in-use", "alice", "register")
    assert "alive" in err["message"] and "agent_id" in err["message"]
    [close] = closes(out)
    assert (close.conn, close.code) == ("attacker", CLOSE_ID_IN_USE)
    assert sends(out, "real") == []  # the holder is not disturbed
    assert r.registered_ids() == ["alice"] and r.agent_id("real") == "alice"
    # Messages for alice still reach the real one.
    reg(r, "c3", "bob")
    assert sends(r.receive("c3", '{"type":"bye","to":"alice"}', 1.0), "real")[0]["from"] == "bob"
    assert r.stats.id_in_use == 2 and r.stats.replaced == 0


def test_a_holder_that_does_not_answer_is_replaced() -> None:
    r = Router()
    reg(r, "old", "alice")
    assert reg(r, "new", "alice") == [CheckLiveness("old")]
    out = r.liveness_checked("old", False, 3.0)
    assert sends(out, "old")[0]["code"] == "replaced"
    [close] = closes(out)
    assert (close.conn, close.code) == ("old", CLOSE_REPLACED)
    assert "replaced" in close.reason
    assert sends(out, "new") == [{"type": "registered", "id": "alice"}]
    # The old connection's late frames are ignored; its disconnect does not unregister alice.
    assert r.receive("old", '{"type":"bye","to":"alice"}', 3.0) == []
    r.disconnect("old")
    reg(r, "c3", "bob")
    assert sends(r.receive("c3", '{"type":"bye","to":"alice"}', 3.0), "new")[0]["from"] == "bob"
    assert r.stats.replaced == 1


def test_a_holder_that_leaves_during_the_check_hands_over_at_once() -> None:
    r = Router()
    reg(r, "old", "alice")
    assert reg(r, "new", "alice") == [CheckLiveness("old")]
    assert sends(r.disconnect("old"), "new") == [{"type": "registered", "id": "alice"}]
    assert r.liveness_checked("old", False, 1.0) == []  # too late, nothing left to do
    assert r.agent_id("new") == "alice"


def test_a_claimant_that_leaves_during_the_check_leaves_nothing_behind() -> None:
    r = Router()
    reg(r, "old", "alice")
    reg(r, "new", "alice")
    r.disconnect("new")
    assert r.liveness_checked("old", False, 1.0) == []
    assert r.agent_id("old") == "alice"
    assert reg(r, "later", "alice") == [CheckLiveness("old")]  # a new claim may start


def test_a_holder_already_closing_is_not_checked() -> None:
    r = Router(rate=1.0, burst=1, flood_close_after=1)
    reg(r, "old", "alice")
    r.receive("old", '{"type":"bye","to":"alice"}', 0.0)  # flooding: closed
    assert sends(reg(r, "new", "alice"), "new") == [{"type": "registered", "id": "alice"}]


def test_reregister_under_a_new_id_frees_the_old_one() -> None:
    r = Router()
    reg(r, "c1", "alice")
    r.receive("c1", '{"type":"register","id":"alice2"}', 0.0)
    assert r.registered_ids() == ["alice2"]
    assert r.agent_id("c1") == "alice2"


@pytest.mark.parametrize("token", [None, "", "wrong", "s3cret-but-longer", "sécret"])
def test_bad_token_gets_error_and_close(token: str | None) -> None:
    r = Router(token="s3cret")
    out = reg(r, "c1", "alice", token)
    [err] = sends(out)
    assert err["code"] == "bad-token"
    [close] = closes(out)
    assert close.code == CLOSE_BAD_TOKEN
    assert "token" in close.reason and "alice" in close.reason
    assert "s3cret" not in close.reason and "s3cret" not in err["message"]
    assert r.registered_ids() == []
    # Nothing more is accepted from it.
    assert r.receive("c1", '{"type":"register","id":"alice","token":"s3cret"}', 0.0) == []


def test_shared_and_per_agent_tokens() -> None:
    r = Router(token="shared", tokens={"alice": "a-tok"})
    assert sends(reg(r, "c1", "alice", "a-tok"))[0]["type"] == "registered"
    assert sends(reg(r, "c3", "bob", "shared"))[0]["type"] == "registered"
    assert sends(reg(r, "c4", "bob", "a-tok"))[0]["code"] == "bad-token"

    only_own = Router(tokens={"alice": "a-tok"})
    assert sends(reg(only_own, "c1", "alice", "a-tok"))[0]["type"] == "registered"
    assert sends(reg(only_own, "c2", "bob", "a-tok"))[0]["code"] == "bad-token"
    assert sends(reg(only_own, "c3", "bob"))[0]["code"] == "bad-token"


def test_the_shared_token_does_not_register_an_id_with_its_own_token() -> None:
    r = Router(token="shared", tokens={"alice": "a-tok"})
    out = reg(r, "mallory", "alice", "shared")
    assert sends(out)[0]["code"] == "bad-token"
    assert closes(out)[0].code == CLOSE_BAD_TOKEN
    assert r.registered_ids() == []
    assert sends(reg(r, "real", "alice", "a-tok"))[0]["type"] == "registered"


def test_failed_registrations_are_throttled_per_source() -> None:
    r = Router(token="right", failures_per_minute=5)
    for i in range(5):
        out = reg(r, f"guess{i}", "alice", f"wrong{i}", source="192.0.2.7")
        assert sends(out)[0]["code"] == "bad-token"
    # The sixth attempt is refused without looking at the token, even the right one.
    out = reg(r, "guess5", "alice", "right", source="192.0.2.7")
    [err] = sends(out)
    assert (err["code"], err["about"]) == ("rate-limited", "register")
    assert closes(out)[0].code == CLOSE_POLICY
    assert r.registered_ids() == []
    # Other addresses are not affected.
    assert sends(reg(r, "ok", "alice", "right", source="192.0.2.8"))[0]["type"] == "registered"
    # One attempt comes back every 12 s.
    assert sends(reg(r, "later", "bob", "right", now=12.5, source="192.0.2.7"))[0]["type"] == (
        "registered"
    )
    assert r.stats.bad_tokens == 5 and r.stats.throttled == 1


def test_id_conflicts_are_not_throttled_and_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A second agent with the same id keeps retrying: that must neither lock out other agents
    at its address nor flood the log."""
    caplog.set_level(logging.DEBUG, logger="mvpd.signaling.server")
    r = Router(failures_per_minute=2)
    reg(r, "real", "alice")
    for i in range(10):
        assert reg(r, f"a{i}", "alice", now=i, source="198.51.100.1") == [CheckLiveness("real")]
        assert sends(r.liveness_checked("real", True, i), f"a{i}")[0]["code"] == "id-in-use"
    assert sends(reg(r, "b", "bob", now=10, source="198.51.100.1"))[0]["type"] == "registered"
    loud = [rec for rec in caplog.records
            if rec.levelno == logging.WARNING and "holds it" in rec.getMessage()]
    assert len(loud) == 1
    reg(r, "late", "alice", now=70, source="198.51.100.1")
    r.liveness_checked("real", True, 70)
    assert len([rec for rec in caplog.records if rec.levelno == logging.WARNING]) == 2


def test_the_failure_table_is_bounded() -> None:
    r = Router(token="right", failures_per_minute=1, max_sources=3)
    for i in range(10):
        reg(r, f"c{i}", "alice", "wrong", source=f"203.0.113.{i}")
    assert len(r._failures) == 3
    # The most recent sources are the ones remembered.
    assert sends(reg(r, "x", "alice", "right", source="203.0.113.9"))[0]["code"] == (
        "rate-limited"
    )
    assert sends(reg(r, "y", "alice", "right", source="203.0.113.0"))[0]["type"] == (
        "registered"
    )


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "unknown"),
        ("not an address", "not an address"),
    ],
)
def test_source_key(address: str | None, key: str) -> None:
    assert source_key(address) == key


def test_open_server_ignores_tokens() -> None:
    r = Router()
    assert not r.auth_required
    assert sends(reg(r, "c1", "alice", "anything"))[0]["type"] == "registered"


def test_too_large_frame_gets_error_and_1009() -> None:
    r = Router(max_message_size=1024)
    reg(r, "c1", "alice")
    text = json.dumps({"type": "offer", "to": "alice", "sdp": "é" * 600})  # > 1024 bytes
    out = r.receive("c1", text, 0.0)
    assert sends(out)[0]["code"] == "too-large"
    assert closes(out)[0].code == CLOSE_TOO_BIG
    # Exactly at the limit is fine.
    r2 = Router(max_message_size=1024)
    reg(r2, "c1", "alice")
    base = json.dumps({"type": "offer", "to": "alice", "sdp": ""})
    exact = json.dumps({"type": "offer", "to": "alice", "sdp": "a" * (1024 - len(base))})
    assert sends(r2.receive("c1", exact, 0.0))[0]["type"] == "offer"


def test_rate_limit_drops_answers_once_then_recovers_with_time() -> None:
    r = Router(rate=2.0, burst=3, flood_close_after=100)
    reg(r, "c1", "alice")  # register spends one token
    reg(r, "c2", "bob")
    bye = '{"type":"bye","to":"bob"}'
    assert len(sends(r.receive("c1", bye, 0.0), "c2")) == 1
    assert len(sends(r.receive("c1", bye, 0.0), "c2")) == 1
    first_drop = r.receive("c1", bye, 0.0)
    assert sends(first_drop) == [
        {
            "type": "error",
            "code": "rate-limited",
            "message": "over 2 messages/s (burst 3); message dropped",
        }
    ]
    assert r.receive("c1", bye, 0.0) == []  # later drops are silent
    assert r.stats.rate_limited_dropped == 2
    # Half a second later one token is back.
    assert len(sends(r.receive("c1", bye, 0.5), "c2")) == 1
    # The other client is unaffected.
    assert len(sends(r.receive("c2", '{"type":"bye","to":"alice"}', 0.5), "c1")) == 1


def test_a_connection_that_keeps_flooding_is_closed() -> None:
    r = Router(rate=1.0, burst=2, flood_close_after=5)
    reg(r, "c1", "alice")
    actions: list[Any] = []
    for _ in range(10):
        actions += r.receive("c1", '{"type":"bye","to":"alice"}', 0.0)
    [close] = closes(actions)
    assert close.code == CLOSE_POLICY
    assert "rate limit" in close.reason
    assert r.stats.closed_for_flooding == 1


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "bad-message"),
        ("[1,2]", "bad-message"),
        ('{"type": 5}', "bad-message"),
        ('{"type":"offer","to":"bob"}', "bad-message"),
        ('{"type":"register","id":"has space"}', "bad-message"),
        ('{"type":"hello"}', "unknown-type"),
        ('{"type":"registered","id":"x"}', "bad-message"),
        ('{"type":"error","code":"x"}', "bad-message"),
        (b"\xff\xfe", "bad-message"),
    ],
)
def test_bad_frames_get_errors_never_exceptions(text: str | bytes, code: str) -> None:
    r = Router()
    reg(r, "c1", "alice")
    out = r.receive("c1", text, 0.0)
    [err] = sends(out)
    assert err["type"] == "error"
    assert err["code"] == code
    assert not closes(out)


def test_frame_from_unknown_connection_is_handled() -> None:
    r = Router()
    out = r.receive("ghost", '{"type":"register","id":"ghost"}', 0.0)
    assert sends(out)[0]["type"] == "registered"


def test_logs_registration_at_info_and_routing_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mvpd.signaling.server")
    r = Router(token="tok")
    reg(r, "c1", "alice", "tok")
    r.receive("c1", '{"type":"bye","to":"alice"}', 0.0)
    r.disconnect("c1")
    levels = {(rec.levelno, rec.getMessage()) for rec in caplog.records}
    assert (logging.INFO, "registered alice") in levels
    assert (logging.DEBUG, "routed bye from alice to alice") in levels
    assert (logging.INFO, "unregistered alice") in levels
    assert all("tok" not in rec.getMessage() for rec in caplog.records)


def test_stats_as_dict() -> None:
    r = Router()
    reg(r, "c1", "alice")
    r.receive("c1", '{"type":"bye","to":"nobody"}', 0.0)
    d = r.stats.as_dict()
    assert d["registrations"] == 1
    assert d["errors_by_code"] == {"offline": 1}
    assert d["connections_total"] == 1


frames = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["register", "offer", "answer", "candidate", "bye", "error", "x"]
            )
        },
        optional={
            "id": st.sampled_from(["alice", "bob", "", "a b"]) | st.integers(),
            "to": st.sampled_from(["alice", "bob", "carol"]) | st.none(),
            "from": st.text(max_size=5),
            "sdp": st.text(max_size=20) | st.integers(),
            "token": st.sampled_from(["tok", "bad", ""]) | st.none(),
            "candidate": st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
        },
    ).map(json.dumps),
)


@given(st.lists(st.tuples(st.sampled_from(["c1", "c2", "c3"]), frames), max_size=30))
@settings(max_examples=200, deadline=None)
def test_any_sequence_of_frames_never_raises(events: list[tuple[str, str | bytes]]) -> None:
    r = SignalingRouter[str](token="tok", rate=100.0, burst=10, max_message_size=200)
    for now, (conn, frame) in enumerate(events):
        for action in r.receive(conn, frame, float(now) / 10):
            assert isinstance(action, Send | Close | CheckLiveness)
            if isinstance(action, CheckLiveness):
                r.liveness_checked(action.conn, now % 2 == 0, float(now) / 10)
            if isinstance(action, Send):
                assert json.loads(action.text)["type"] in (
                    "registered",
                    "error",
                    "offer",
                    "answer",
                    "candidate",
                    "bye",
                )
    for conn in ("c1", "c2", "c3"):
        r.disconnect(conn)
    assert r.registered_ids() == []


def test_a_slow_receiver_is_unregistered_and_closed_and_its_senders_hear_offline() -> None:
    r = Router()
    reg(r, "a", "alice")
    reg(r, "b", "bob")
    routed = r.receive("a", '{"type":"offer","to":"bob","sdp":"v=0"}', 0.0)
    [send] = [x for x in routed if isinstance(x, Send)]
    assert (send.conn, send.origin, send.to, send.about) == ("b", "a", "bob", "offer")
    actions = r.slow_receiver("b")
    assert [(c.conn, c.code) for c in closes(actions)] == [("b", CLOSE_SLOW_RECEIVER)]
    assert r.slow_receiver("b") == []  # once
    assert r.holder("bob") is None and r.stats.closed_slow_receivers == 1
    # What was routed to it but not written, and whatever comes next, is answered offline.
    [late] = sends(r.undelivered("a", "bob", "offer"))
    assert (late["code"], late["peer"], late["about"]) == ("offline", "bob", "offer")
    [now] = sends(r.receive("a", '{"type":"bye","to":"bob"}', 0.0))
    assert (now["code"], now["peer"]) == ("offline", "bob")
    assert r.disconnect("b") == []
    # bob may come back on a new connection.
    assert sends(reg(r, "b2", "bob")) == [{"type": "registered", "id": "bob"}]


def test_a_forward_redis_could_not_route_is_unavailable_not_offline() -> None:
    r = Router(cluster=True)
    reg(r, "a", "alice")
    r.claim_settled("a", "alice", "granted", 0.0)
    [error] = sends(r.forward_failed("alice", "bob", "offer", unavailable=True))
    assert (error["code"], error["peer"], error["about"]) == ("unavailable", "bob", "offer")
    [error] = sends(r.forward_failed("alice", "bob", "offer"))
    assert error["code"] == "offline"
