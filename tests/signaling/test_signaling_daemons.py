"""Signaling attacks against real ``mvpd run`` daemons and a real ``mvpd signal`` server,
with the attacker as a plain WebSocket client: id takeover, traffic theft, forged log lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.e2e.harness import (
    Daemons,
    SignalServer,
    running_daemons,
    running_signal_server,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SignalServer]:
    with running_signal_server(tmp_path) as signal_server:
        yield signal_server


@pytest.fixture
def daemons(tmp_path: Path, server: SignalServer) -> Iterator[Daemons]:
    with running_daemons(tmp_path, server.url) as factory:
        yield factory


@contextlib.contextmanager
def attacker(
    server: SignalServer, agent_id: str
) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    """A bare WebSocket client registering ``agent_id``: it and the first reply."""
    with connect(server.url) as ws:
        ws.send(json.dumps({"type": "register", "id": agent_id}))
        yield ws, json.loads(ws.recv(timeout=15))


def drain(ws: ClientConnection) -> list[dict[str, Any]]:
    """Everything that reached ``ws`` until now."""
    got: list[dict[str, Any]] = []
    try:
        while True:
            got.append(json.loads(ws.recv(timeout=0.5)))
    except (TimeoutError, ConnectionClosed):
        return got


def test_a_live_daemon_keeps_its_id_and_an_attacker_gets_none_of_its_traffic(
    server: SignalServer, daemons: Daemons
) -> None:
    alice, bob = daemons.many("alice", "bob")
    assert alice.ctl_ok("connect", "bob").strip() == "bob: connected"

    with attacker(server, "bob") as (taker, reply):
        assert (reply["type"], reply["code"]) == ("error", "id-in-use")
        with pytest.raises(ConnectionClosed):
            taker.recv(timeout=5)
        assert taker.close_code == 4010

    # Registered under its own name, it cannot speak for bob either: the server stamps `from`.
    with attacker(server, "mallory") as (mallory, reply):
        assert reply == {"type": "registered", "id": "mallory"}
        offer = {"type": "offer", "from": "bob", "to": "alice", "sdp": "v=0\r\n"}
        mallory.send(json.dumps(offer))
        wait_until(lambda: "mallory" in alice.log.read_text(), timeout=10, what="alice to see it")
        alice.ctl_ok("send", "bob", "for bob only")
        assert bob.messages("alice", 1) == ["for bob only"]
        assert alice.peer_state("bob") == "connected"
        assert bob.status()["signaling"]["state"] == "connected"
        got = drain(mallory)
    assert all(m.get("to") == "mallory" and m.get("from") == "alice" for m in got), got
    assert "rejected" not in bob.log.read_text()


def test_a_frozen_daemon_is_replaced_then_comes_back_when_the_other_goes(
    server: SignalServer, daemons: Daemons
) -> None:
    """SIGSTOP leaves bob's TCP connection up but silent, as a vanished host would: the server's
    liveness ping lets a new connection take the id. Resumed, bob is told ``replaced``, keeps
    trying (``id-in-use`` while the other lives) and registers again once it is gone."""
    alice, bob = daemons.many("alice", "bob")
    with contextlib.ExitStack() as stack:
        os.kill(bob.pid, signal.SIGSTOP)
        try:
            _, reply = stack.enter_context(attacker(server, "bob"))
            assert reply == {"type": "registered", "id": "bob"}
        finally:
            os.kill(bob.pid, signal.SIGCONT)
        wait_until(lambda: "taking over our id" in bob.log.read_text(), timeout=20,
                   what="bob to warn about the takeover")
        log = bob.log.read_text()
        assert server.url in log.split("taking over our id")[0].rsplit("\n", 1)[-1]
        # While the other holds the id, bob's tries are refused; it never gives up.
        wait_until(lambda: bob.log.read_text().count("taking over our id") >= 2, timeout=20,
                   what="bob to try again")
    wait_until(lambda: alice.ctl("connect", "bob", "--timeout", "5").returncode == 0,
               timeout=60, interval=1, what="alice to reach bob again")
    assert bob.status()["signaling"]["state"] == "connected"
    alice.ctl_ok("send", "bob", "welcome back")
    assert bob.messages("alice", 1) == ["welcome back"]


def real_offer() -> str:
    """A valid data-channel offer from aiortc (no ICE servers: nothing leaves loopback)."""

    async def make() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("mvp", protocol="chat")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def test_a_peer_cannot_forge_log_lines(server: SignalServer, daemons: Daemons) -> None:
    alice = daemons("alice")
    with attacker(server, "mallory") as (mallory, reply):
        assert reply["type"] == "registered"
        mallory.send(json.dumps({"type": "offer", "to": "alice", "sdp": real_offer()}))
        wait_until(lambda: "mallory" in alice.peers(), timeout=10, what="alice to answer")
        bye = {"type": "bye", "to": "alice", "reason": "x\nFAKE LINE\x1b[31m"}
        mallory.send(json.dumps(bye))
        wait_until(lambda: "said bye" in alice.log.read_text(), timeout=10, what="the bye")
    text = alice.log.read_text()
    assert "\x1b" not in text
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    (line,) = [line for line in text.splitlines() if "said bye" in line]
    assert "mallory said bye: x\\nFAKE LINE\\x1b[31m" in line
