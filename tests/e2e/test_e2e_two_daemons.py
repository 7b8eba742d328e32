"""Two real daemons and a real signaling server, driven only through ``mvpctl``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import MVPCTL, Daemon, sha256, wait_until

pytestmark = pytest.mark.slow

PIPE_SIZE = 20 * 1024 * 1024


def pipe_file(sender: Daemon, receiver: Daemon, source: Path, copy: Path) -> None:
    """``receiver: mvpctl pipe SENDER > copy`` and ``sender: mvpctl pipe RECEIVER < source``,
    started together as two people at two terminals would."""
    with copy.open("wb") as out:
        reader = subprocess.Popen(
            [*_ctl(receiver), "pipe", sender.agent_id], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.PIPE, env=receiver.env(),
        )
        try:
            with source.open("rb") as src:
                sent = sender.ctl("pipe", receiver.agent_id, stdin=src,
                                  stdout=subprocess.DEVNULL, timeout=90)
            assert sent.returncode == 0, sent.stderr
            _, err = reader.communicate(timeout=60)
            assert reader.returncode == 0, err
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()


def _ctl(daemon: Daemon) -> list[str]:
    return [*MVPCTL, "--socket", str(daemon.socket)]


def test_connect_chat_json_pipe_status_and_disconnect(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    alice, bob = pair
    assert alice.ctl_ok("connect", "bob").strip() == "bob: connected"
    wait_until(lambda: bob.peer_state("alice") == "connected", what="bob to see alice")

    # chat, both ways
    alice.ctl_ok("send", "bob", "hello bob, this is alice")
    alice.ctl_ok("send", "bob", "héllo ✓ second line")
    assert bob.ctl_ok("recv", "alice", "--follow", "--limit", "2").splitlines() == [
        "hello bob, this is alice", "héllo ✓ second line"
    ]
    bob.ctl_ok("send", "alice", "hi alice")
    assert alice.ctl_ok("recv", "bob", "--follow", "--limit", "1") == (
        "hi alice\n"
    )
    assert bob.ctl_ok("recv", "alice") == ""  # taken: nothing left

    # status after the chat: state, mode, direct path and counters that add up
    status = alice.status()
    assert status["agent_id"] == "alice"
    assert status["signaling"]["state"] == "connected"
    (peer,) = status["peers"]
    assert (peer["peer"], peer["state"], peer["mode"], peer["path"]) == (
        "bob", "connected", "chat", "direct"
    )
    assert "typ host" in peer["local_candidate"] and "typ host" in peer["remote_candidate"]
    sent = len(b"hello bob, this is alice") + len("héllo ✓ second line".encode())
    assert (peer["messages_out"], peer["bytes_out"]) == (2, sent)
    assert (peer["messages_in"], peer["bytes_in"]) == (1, len(b"hi alice"))
    assert peer["dropped"] == {} and peer["error"] is None
    bob_view = bob.peers()["alice"]
    assert (bob_view["messages_in"], bob_view["bytes_in"]) == (2, sent)
    assert bob_view["path"] == "direct"

    # JSON: a new connection in json mode; the mode travels to bob
    alice.ctl_ok("disconnect", "bob")
    wait_until(lambda: bob.peer_state("alice") is None, what="bob to drop alice")
    alice.ctl_ok("connect", "bob", "--mode", "json")
    wait_until(lambda: bob.peer_state("alice") == "connected", what="bob to see alice again")
    assert bob.peers()["alice"]["mode"] == "json"
    value = {"op": "ping", "n": 1, "list": [1, 2.5, None, True], "text": "ünï"}
    alice.ctl_ok("send", "bob", "--json", json.dumps(value))
    (line,) = bob.ctl_ok("recv", "alice", "--json", "-F", "-n", "1").splitlines()
    assert json.loads(line) == {"peer": "alice", "kind": "json", "data": value}
    bob.ctl_ok("send", "alice", "--json", "[1, 2, 3]")
    assert json.loads(alice.ctl_ok("recv", "bob", "-F", "-n", "1")) == [1, 2, 3]
    refused = alice.ctl("send", "bob", "not json")
    assert refused.returncode == 1 and "json mode" in refused.stderr

    # 20 MiB through a pipe: both sides run `mvpctl pipe`, like netcat
    source, copy = tmp_path / "file.bin", tmp_path / "copy.bin"
    source.write_bytes(os.urandom(PIPE_SIZE))
    pipe_file(alice, bob, source, copy)
    assert copy.stat().st_size == PIPE_SIZE
    assert sha256(copy) == sha256(source)
    peer = alice.peers()["bob"]
    assert peer["bytes_out"] >= PIPE_SIZE and peer["state"] == "connected"
    assert bob.peers()["alice"]["bytes_in"] >= PIPE_SIZE

    # disconnect: both sides see it, within a few seconds
    bob.ctl_ok("disconnect", "alice")
    assert bob.peer_state("alice") is None
    wait_until(lambda: alice.peer_state("bob") is None, timeout=5, what="alice to drop bob")
    assert "no peers" in alice.ctl_ok("peers")
    again = alice.ctl("send", "bob", "anyone?")
    assert again.returncode == 1 and "not connected to bob" in again.stderr


def test_a_follower_keeps_following_across_a_reconnect(pair: tuple[Daemon, Daemon]) -> None:
    """`mvpctl recv --follow` (and `chat`) outlive the connection they started on."""
    from mvpctl.client import Client

    alice, bob = pair
    assert alice.ctl_ok("connect", "bob").strip() == "bob: connected"
    with Client.connect(bob.socket, timeout=30) as client:
        stream = client.subscribe("recv", peer="alice", follow=True, limit=2)
        alice.send("bob", text="before")
        alice.ctl_ok("disconnect", "bob")
        wait_until(lambda: bob.peer_state("alice") is None, what="bob to drop alice")
        assert alice.ctl_ok("connect", "bob").strip() == "bob: connected"
        alice.send("bob", text="after")
        found = []
        while not stream.ended:
            event = client.next_event(stream.sub, timeout=20)
            if stream.check(event) and event.event == "message":
                found.append(event.data["data"])
    assert found == ["before", "after"]
