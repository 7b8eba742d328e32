"""TUN mode and peer identity: a tunnel only to a peer whose key is pinned; someone else
answering in its name (another key under its id, as a hostile signaling server or a holder
of the shared token can arrange) gets no device and no route."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mvpd.identity import IdentityStore
from tests.e2e_tun.harness import dump_logs, ping, tun_lab, wait_until
from tests.netns import require_tun

pytestmark = pytest.mark.root


def test_tunnel_only_to_the_pinned_key_and_no_route_for_an_impostor(tmp_path: Path) -> None:
    require_tun()
    ids = {name: IdentityStore(tmp_path / f"{name}.state").load().fingerprint
           for name in ("alice", "bob")}
    configs = {
        "alice": "tun:\n  address: 10.78.0.1/24\n"
                 f"peers:\n  bob:\n    allowed_ips: [10.78.0.2/32]\n"
                 f"    fingerprints: ['{ids['bob']}']\n",
        "bob": "tun:\n  address: 10.78.0.2/24\n"
               f"peers:\n  alice:\n    allowed_ips: [10.78.0.1/32]\n"
               f"    fingerprints: ['{ids['alice']}']\n",
    }
    with tun_lab(tmp_path, ["alice", "bob"], configs) as lab:
        alice, bob = lab["alice"], lab["bob"]
        lab.connect("alice", "bob")
        ping(alice.ns, "10.78.0.2")
        assert alice.peer("bob")["identity"] == "pinned"  # type: ignore[index]
        alice.call("disconnect", peer="bob")
        wait_until(lambda: alice.tun_links() == [] and bob.tun_links() == [], 15,
                   what="both devices to go")

        # "bob" now answers with another key.
        bob.stop()
        state = tmp_path / "bob.state"
        shutil.rmtree(state)
        assert IdentityStore(state).load().fingerprint != ids["bob"]
        bob.start(lab.url)
        done = alice.ctl("connect", "bob", "--mode", "tun", "--timeout", "15")
        assert done.returncode != 0 and "identity refused" in done.stderr, (
            done.stderr + dump_logs(lab))
        assert alice.tun_links() == []
        routes = alice.ns.ip_json("route", "show")
        assert not any(r.get("dst", "").startswith("10.78.0.") for r in routes), routes
        assert f"expected {ids['bob']}" in alice.log.read_text()
