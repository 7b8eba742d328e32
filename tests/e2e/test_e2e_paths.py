"""How the data gets there: through a real TURN relay, and on while signaling is gone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import MVPCTL, Daemons, SignalServer, TurnServer, sha256, wait_until

pytestmark = pytest.mark.slow

PIPE_SIZE = 20 * 1024 * 1024


def test_relay_policy_goes_through_coturn_and_status_says_relayed(
    turn_server: TurnServer, daemons: Daemons
) -> None:
    alice, bob = daemons.many("alice", "bob", env=turn_server.daemon_env())
    assert alice.ctl_ok("connect", "bob").strip() == "bob: connected"
    alice.ctl_ok("send", "bob", "via the relay")
    assert bob.ctl_ok("recv", "alice", "-F", "-n", "1") == "via the relay\n"
    bob.send("alice", text="and back via the relay")
    assert alice.messages("bob", 1) == ["and back via the relay"]
    for daemon, other in ((alice, "bob"), (bob, "alice")):
        peer = daemon.peers()[other]
        assert peer["state"] == "connected"
        assert peer["path"] == "relayed"
        assert "typ relay" in peer["local_candidate"]
    assert "relayed" in alice.ctl_ok("peers")  # the human table says so too
    # and coturn saw the allocations (nothing went around it)
    # coturn's own log (it adds the date to the name) shows the allocations
    log = "".join(p.read_text(errors="replace") for p in turn_server.workdir.glob("turn*.log"))
    assert "ALLOCATE processed, success" in log, log[-2000:]

    # With the relay gone, a disconnect still returns at once (aiortc alone would wait
    # about a minute for coturn to confirm the allocation's deletion) and bob hears of it.
    turn_server.stop()
    alice.ctl_ok("disconnect", "bob", timeout=30)
    wait_until(lambda: bob.peer_state("alice") is None, what="bob to drop alice")


def test_data_keeps_flowing_while_signaling_dies_and_connects_work_after_restart(
    daemons: Daemons, signal_server: SignalServer, tmp_path: Path
) -> None:
    alice, bob = daemons.many("alice", "bob")
    alice.ctl_ok("connect", "bob")
    wait_until(lambda: bob.peer_state("alice") == "connected", what="bob to see alice")

    source, copy = tmp_path / "file.bin", tmp_path / "copy.bin"
    source.write_bytes(os.urandom(PIPE_SIZE))
    with copy.open("wb") as out, source.open("rb") as src:
        reader = subprocess.Popen(
            [*MVPCTL, "--socket", str(bob.socket), "pipe", "alice"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
        )
        writer = subprocess.Popen(
            [*MVPCTL, "--socket", str(alice.socket), "pipe", "bob"],
            stdin=src, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            # Once the bytes flow, pull the signaling server out from under both daemons.
            wait_until(lambda: bob.peers()["alice"]["bytes_in"] > 1024 * 1024, timeout=60,
                       interval=0.02, what="the transfer to start")
            signal_server.kill()
            assert writer.poll() is None, "the transfer ended before signaling was killed"
            assert bob.peers()["alice"]["bytes_in"] < PIPE_SIZE
            _, werr = writer.communicate(timeout=90)
            _, rerr = reader.communicate(timeout=30)
        finally:
            for proc in (reader, writer):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert writer.returncode == 0, werr
    assert reader.returncode == 0, rerr
    assert sha256(copy) == sha256(source)

    # The daemons noticed the server is gone; the peers stayed connected meanwhile.
    for daemon in (alice, bob):
        wait_until(lambda d=daemon: d.call("status")["signaling"]["state"] != "connected",
                   what=f"{daemon.agent_id} to notice signaling is down")
    assert alice.peer_state("bob") == bob.peer_state("alice") == "connected"
    alice.send("bob", text="no server needed")
    assert bob.messages("alice", 1) == ["no server needed"]
    # A new connection needs signaling: refused at once, with the reason, not after a timeout.
    refused = alice.ctl("connect", "carol", "--timeout", "60")
    assert refused.returncode == 1
    assert "signaling server" in refused.stderr and "not reachable" in refused.stderr
    assert alice.peer_state("bob") == "connected"

    # The same port again: both clients come back by themselves and a NEW connect works.
    signal_server.start(signal_server.port)
    for daemon in (alice, bob):
        wait_until(lambda d=daemon: d.call("status")["signaling"]["state"] == "connected",
                   timeout=40, what=f"{daemon.agent_id} to reconnect to signaling")
    alice.ctl_ok("disconnect", "bob")
    wait_until(lambda: bob.peer_state("alice") is None, what="bob to drop alice")
    assert alice.ctl_ok("connect", "bob", "--mode", "json").strip() == "bob: connected"
    bob.send("alice", json={"after": "restart"})
    assert alice.messages("bob", 1) == [{"after": "restart"}]
    assert alice.peers()["bob"]["mode"] == bob.peers()["alice"]["mode"] == "json"  # a new one
