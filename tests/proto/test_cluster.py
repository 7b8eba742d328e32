"""The router in cluster mode and the servers' wire format: synchronous, no Redis."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvpd.proto.cluster import (
    CheckHolder,
    ClusterKeys,
    ClusterMessageError,
    Deliver,
    HolderChecked,
    Undeliverable,
    decode,
    encode,
    new_server_id,
)
from mvpd.proto.router import (
    CLOSE_ID_IN_USE,
    CLOSE_TRY_AGAIN,
    CheckLiveness,
    ClaimId,
    Close,
    Forward,
    ReleaseId,
    Send,
    SignalingRouter,
)

Router = SignalingRouter[str]


def texts(actions: list[Any], conn: str) -> list[dict[str, Any]]:
    return [json.loads(a.text) for a in actions if isinstance(a, Send) and a.conn == conn]


def register(router: Router, conn: str, agent_id: str) -> list[Any]:
    router.connect(conn)
    return router.receive(conn, json.dumps({"type": "register", "id": agent_id}), 0.0)


def registered(router: Router, conn: str, agent_id: str) -> None:
    assert register(router, conn, agent_id) == [ClaimId(conn, agent_id)]
    actions = router.claim_settled(conn, agent_id, "granted", 0.0)
    assert texts(actions, conn) == [{"type": "registered", "id": agent_id}]


def test_without_cluster_nothing_changes() -> None:
    router = Router()
    router.connect("a")
    actions = router.receive("a", '{"type":"register","id":"alice"}', 0.0)
    assert texts(actions, "a") == [{"type": "registered", "id": "alice"}]
    assert router.disconnect("a") == []
    router.connect("b")
    router.receive("b", '{"type":"register","id":"bob"}', 0.0)
    actions = router.receive("b", '{"type":"bye","to":"nobody"}', 0.0)
    assert texts(actions, "b")[0]["code"] == "offline"


def test_a_registration_waits_for_the_cluster_claim() -> None:
    router = Router(cluster=True)
    assert register(router, "a", "alice") == [ClaimId("a", "alice")]
    assert router.holder("alice") is None
    # A second claimant while the first is pending is refused at once.
    actions = register(router, "b", "alice")
    assert texts(actions, "b")[0]["code"] == "id-in-use"
    assert Close("b", CLOSE_ID_IN_USE, "'alice' is in use") in actions
    actions = router.claim_settled("a", "alice", "granted", 0.0)
    assert texts(actions, "a") == [{"type": "registered", "id": "alice"}]
    assert router.holder("alice") == "a"
    # Registering the same id again on the same connection needs no claim.
    actions = router.receive("a", '{"type":"register","id":"alice"}', 0.0)
    assert texts(actions, "a") == [{"type": "registered", "id": "alice"}]


@pytest.mark.parametrize(
    ("outcome", "code", "close"), [("in-use", "id-in-use", 4010), ("unavailable", "unavailable",
                                                                   CLOSE_TRY_AGAIN)]
)
def test_a_refused_claim_is_answered_and_closed(outcome: Any, code: str, close: int) -> None:
    router = Router(cluster=True)
    register(router, "a", "alice")
    actions = router.claim_settled("a", "alice", outcome, 0.0)
    assert texts(actions, "a")[0]["code"] == code
    assert [a.code for a in actions if isinstance(a, Close)] == [close]
    assert router.holder("alice") is None
    assert router.receive("a", '{"type":"bye","to":"x"}', 0.0) == []  # closing


def test_a_claim_granted_after_the_claimant_left_is_given_back() -> None:
    router = Router(cluster=True)
    register(router, "a", "alice")
    assert router.disconnect("a") == []
    assert router.claim_settled("a", "alice", "granted", 0.0) == [ReleaseId("alice")]
    assert router.claim_settled("a", "alice", "in-use", 0.0) == []


def test_ids_leaving_are_released() -> None:
    router = Router(cluster=True)
    registered(router, "a", "alice")
    # Changing id: a claim for the new id; the old one is released once it is granted.
    assert router.receive("a", '{"type":"register","id":"alicia"}', 0.0) == [
        ClaimId("a", "alicia")
    ]
    actions = router.claim_settled("a", "alicia", "granted", 0.0)
    assert actions[0] == ReleaseId("alice")
    assert router.disconnect("a") == [ReleaseId("alicia")]


def test_a_local_claimant_inherits_the_id_without_a_release() -> None:
    router = Router(cluster=True)
    registered(router, "a", "alice")
    assert register(router, "b", "alice") == [CheckLiveness("a")]
    actions = router.disconnect("a")
    assert texts(actions, "b") == [{"type": "registered", "id": "alice"}]
    assert not any(isinstance(a, ReleaseId) for a in actions)


def test_messages_for_other_servers_are_forwarded_with_from_set() -> None:
    router = Router(cluster=True)
    registered(router, "a", "alice")
    registered(router, "b", "bob")
    local = router.receive("a", '{"type":"bye","to":"bob"}', 0.0)
    assert texts(local, "b") == [{"type": "bye", "from": "alice", "to": "bob"}]
    [forward] = router.receive("a", '{"type":"offer","to":"carol","from":"eve","sdp":"x"}', 0.0)
    assert isinstance(forward, Forward)
    assert (forward.conn, forward.sender, forward.to, forward.about) == (
        "a", "alice", "carol", "offer"
    )
    assert json.loads(forward.text) == {"type": "offer", "to": "carol", "from": "alice",
                                        "sdp": "x"}
    assert router.stats.messages_forwarded == 1 and router.stats.messages_routed == 1
    actions = router.forward_failed("alice", "carol", "offer")
    [err] = texts(actions, "a")
    assert (err["code"], err["peer"], err["about"]) == ("offline", "carol", "offer")
    assert router.forward_failed("nobody", "carol", "offer") == []


def test_deliver_and_evict() -> None:
    router = Router(cluster=True)
    registered(router, "a", "alice")
    assert router.deliver("alice", '{"type":"bye"}') == [Send("a", '{"type":"bye"}')]
    assert router.deliver("bob", "x") == []
    actions = router.evict("alice", 0.0)
    assert texts(actions, "a")[0]["code"] == "replaced"
    assert [a.code for a in actions if isinstance(a, Close)] == [4009]
    assert actions[-1] == ReleaseId("alice")
    assert router.holder("alice") is None
    assert router.evict("alice", 0.0) == []


def test_evict_refuses_a_local_claim_waiting_for_the_holder() -> None:
    router = Router(cluster=True)
    registered(router, "a", "alice")
    assert register(router, "b", "alice") == [CheckLiveness("a")]
    actions = router.evict("alice", 0.0)  # another server's claimant won
    assert texts(actions, "b")[0]["code"] == "id-in-use"
    assert actions[-1] == ReleaseId("alice")
    assert router.liveness_checked("a", False, 0.0) == []


# --- the wire format -----------------------------------------------------------------------


def test_round_trip() -> None:
    server = new_server_id()
    for message in (
        Deliver(to="bob", text='{"type":"bye"}', origin=server, sender="alice", about="bye"),
        Undeliverable(to="alice", peer="bob", about="offer"),
        CheckHolder(id="alice", origin=server, nonce="n1"),
        HolderChecked(id="alice", nonce="n1", alive=False),
    ):
        assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "text",
    [
        "not json", "[]", '{"op":"nope"}', '{"op":"deliver"}',
        '{"op":"deliver","to":"bob\\n","text":"x","origin":"s1","sender":"a","about":"bye"}',
        '{"op":"deliver","to":"bob","text":"x","origin":"s:1","sender":"a","about":"bye"}',
        '{"op":"checked","id":"alice","nonce":"n","alive":"yes"}',
        '{"op":"check","id":"alice","origin":"s1","nonce":' + json.dumps("n" * 65) + "}",
        "x" * 300_000,
    ],
)
def test_malformed_messages_are_refused(text: str) -> None:
    with pytest.raises(ClusterMessageError):
        decode(text)


@given(st.text(max_size=200))
def test_decode_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(ClusterMessageError):
        decode(text)


def test_key_names() -> None:
    keys = ClusterKeys("p:")
    assert keys.id_key("alice") == "p:id:alice"
    assert keys.agent_of(keys.id_key("a:b@c")) == "a:b@c"
    assert keys.server_channel("abc") == "p:srv:abc"
