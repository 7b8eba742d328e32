"""Peers coming and going: a killed daemon is noticed, three peers at once in three modes,
glare through the daemons, offers from peers that are not allowed."""

from __future__ import annotations

import base64
import json
import subprocess
import time

import pytest

from mvpctl.client import Client
from mvpd.config import AgentSettings
from tests.e2e.harness import MVPCTL, Daemon, Daemons, wait_until

pytestmark = pytest.mark.slow

#: The shipped default of ``peer_timeout``; the killed peer must be noticed within
#: 1.2 x that (checks every peer_timeout/5 s), plus a margin for a loaded machine.
PEER_TIMEOUT = float(AgentSettings.model_fields["peer_timeout"].default)
NOTICE_BOUND = PEER_TIMEOUT * 1.2
MARGIN = 4.0


def test_a_killed_peer_is_noticed_within_the_peer_timeout(pair: tuple[Daemon, Daemon]) -> None:
    alice, bob = pair
    alice.ctl_ok("connect", "bob")
    wait_until(lambda: bob.peer_state("alice") == "connected", what="bob to see alice")
    alice.send("bob", text="still there?")
    assert bob.messages("alice", 1) == ["still there?"]

    bob.kill()  # no bye, no closed channel: bob just stops answering
    killed = time.monotonic()
    gone = wait_until(lambda: alice.peer_state("bob") is None, timeout=NOTICE_BOUND + 20,
                      interval=0.2, what="alice to notice that bob died")
    noticed = time.monotonic() - killed
    assert gone
    assert noticed <= NOTICE_BOUND + MARGIN, (
        f"took {noticed:.1f} s, documented {NOTICE_BOUND:g} s for peer_timeout {PEER_TIMEOUT:g}"
    )
    log = alice.log.read_text()
    assert "bob stopped answering" in log
    failed = alice.ctl("send", "bob", "hello?")
    assert failed.returncode == 1 and "not connected to bob" in failed.stderr


def test_three_peers_at_once_in_chat_json_and_bytes(daemons: Daemons) -> None:
    hub, chat, jsn, raw = daemons.many("hub", "p-chat", "p-json", "p-bytes")
    connects = [
        subprocess.Popen([*MVPCTL, "--socket", str(hub.socket), "connect", peer.agent_id,
                          "--mode", mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for peer, mode in ((chat, "chat"), (jsn, "json"), (raw, "bytes"))
    ]
    for proc in connects:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip().endswith(": connected")
    peers = hub.peers()
    assert {p: (v["state"], v["mode"]) for p, v in peers.items()} == {
        "p-chat": ("connected", "chat"),
        "p-json": ("connected", "json"),
        "p-bytes": ("connected", "bytes"),
    }

    hub.ctl_ok("send", "p-chat", "plain text")
    hub.ctl_ok("send", "p-json", "--json", '{"k": [1, 2]}')
    blob = bytes(range(256)) * 3
    (hub.workdir / "blob.bin").write_bytes(blob)
    hub.ctl_ok("send", "p-bytes", "--file", str(hub.workdir / "blob.bin"))

    assert chat.ctl_ok("recv", "hub", "-F", "-n", "1") == "plain text\n"
    assert json.loads(jsn.ctl_ok("recv", "hub", "-F", "-n", "1")) == {"k": [1, 2]}
    (line,) = raw.ctl_ok("recv", "hub", "--json", "-F", "-n", "1").splitlines()
    message = json.loads(line)
    assert message["kind"] == "bytes"
    assert base64.b64decode(message["data"]["base64"]) == blob

    # and back, each in its own mode, all to the one hub (over RPC: quicker than mvpctl)
    chat.send("hub", text="from chat")
    jsn.send("hub", json={"n": 42})
    raw.send("hub", data=b"\x00\xffraw")
    raw.send("hub", text="text is bytes too")
    assert hub.messages("p-chat", 1) == ["from chat"]
    assert hub.messages("p-json", 1) == [{"n": 42}]
    assert hub.messages("p-bytes", 2) == [b"\x00\xffraw", b"text is bytes too"]

    # one goes away; the others stay
    raw.stop()
    wait_until(lambda: "p-bytes" not in hub.peers(), what="hub to drop p-bytes")
    assert {p: v["state"] for p, v in hub.peers().items()} == {
        "p-chat": "connected", "p-json": "connected"
    }
    chat.send("hub", text="still here")
    assert hub.messages("p-chat", 1) == ["still here"]


def connect_both_at_once(alice: Daemon, bob: Daemon) -> None:
    """Both daemons get ``connect`` within a millisecond (what two people running ``mvpctl
    connect`` at the same moment send; mvpctl's own start-up jitter would blur it)."""
    with Client.connect(alice.socket) as a, Client.connect(bob.socket) as b:
        ids = a.request("connect", peer="bob", wait=True), b.request("connect", peer="alice",
                                                                   wait=True)
        results = a.wait(ids[0], timeout=60), b.wait(ids[1], timeout=60)
    assert [r["state"] for r in results] == ["connected", "connected"]


def test_glare_through_the_daemons_ends_in_one_connection(pair: tuple[Daemon, Daemon]) -> None:
    alice, bob = pair
    for _ in range(3):  # the offers almost always cross; make sure they did at least once
        connect_both_at_once(alice, bob)
        a_view, b_view = alice.peers(), bob.peers()
        assert list(a_view) == ["bob"] and list(b_view) == ["alice"]
        assert a_view["bob"]["state"] == b_view["alice"]["state"] == "connected"
        # one connection: the same candidate pair seen from both ends
        assert a_view["bob"]["local_candidate"] == b_view["alice"]["remote_candidate"]
        assert a_view["bob"]["remote_candidate"] == b_view["alice"]["local_candidate"]
        alice.send("bob", text="after glare")
        bob.send("alice", text="and back")
        assert bob.messages("alice", 1) == ["after glare"]
        assert alice.messages("bob", 1) == ["and back"]
        if "both sides offered" in alice.log.read_text():
            break
        alice.call("disconnect", peer="bob")
        wait_until(lambda: bob.peer_state("alice") is None, what="bob to drop alice")
    else:
        raise AssertionError("the offers never crossed")
    # "alice" < "bob": alice threw her offer away and answered bob's (bob may not even have
    # seen hers, when she yielded before it left); bob never yields
    assert "alice < bob, so we answer" in alice.log.read_text()
    assert "so we answer" not in bob.log.read_text()
    # and it stays one: nothing is torn down a moment later
    time.sleep(1)
    assert alice.peer_state("bob") == bob.peer_state("alice") == "connected"
    assert alice.call("status")["peers"][0]["messages_in"] == 1


def test_an_offer_from_a_peer_that_is_not_allowed_is_refused(daemons: Daemons) -> None:
    alice, mallory = daemons.many("alice", "mallory", env={"MVPD_ALLOWED_PEERS": "carol"})
    done = mallory.ctl("connect", "alice")
    assert done.returncode != 0
    assert "alice said bye: offer refused" in done.stderr, done.stderr
    assert "does not accept connections from you" in done.stderr
    assert mallory.peer_state("alice") is None and alice.peers() == {}
    assert "refused an offer from mallory" in alice.log.read_text()
