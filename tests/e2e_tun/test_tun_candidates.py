"""ICE never runs a peer connection through a tunnel of the host: real daemons in namespaces;
a tunnel up between alice (in the signaling hub's namespace) and bob, then a new connection
from alice to carol; and a tunnel whose own ICE pair could have used the offerer's tunnel
address (the first ping after connecting then got no reply at all)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_tun.harness import ping, tun_lab
from tests.e2e_tun.test_tun_e2e import TWO
from tests.netns import require_tun

pytestmark = pytest.mark.root

TUNNEL = ipaddress.ip_network("10.77.0.0/24")
#: ``mvpd`` that gathers its candidates half a second late, when its TUN device already has
#: its address (the netlink thread outruns a loaded event loop), and lists the interface
#: addresses newest first, so the pair on that address is the first checked and nominated
#: (under load it may be, whatever the order).
MVPD_GATHERS_LATE_TUN_FIRST = (
    sys.executable, "-c",
    "import asyncio, aioice.ice as ice, mvpd.rtc.connection as c\n"
    "describe = c.PeerConnection._describe\n"
    "async def late(self, *args):\n"
    "    await asyncio.sleep(0.5)\n"
    "    return await describe(self, *args)\n"
    "c.PeerConnection._describe = late\n"
    "addresses = ice.get_host_addresses\n"
    "ice.get_host_addresses = lambda *a, **k: addresses(*a, **k)[::-1]\n"
    "from mvpd.cli import main; main()",
)
#: An address of carol's inside alice's tunnel subnet (a LAN of hers with the same numbers):
#: alice routes it into her TUN device, so a pair with it would loop through the tunnel.
CAROL_CLASHING = "10.77.0.9"


def in_tunnel(candidates: list[dict[str, Any]]) -> list[str]:
    return [c["address"] for c in candidates if ipaddress.ip_address(c["address"]) in TUNNEL]


def test_a_new_connection_uses_no_candidate_in_the_tunnel(tmp_path: Path) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob", "carol"], {**TWO, "carol": ""}) as lab:
        alice, carol = lab["alice"], lab["carol"]
        lab.connect("alice", "bob")
        ping(alice.ns, "10.77.0.2", count=1)  # the device has its address and routes
        carol.ns.run("ip", "addr", "add", f"{CAROL_CLASHING}/32", "dev", "lo")

        status = alice.call("connect", peer="carol", mode="chat", wait=True, timeout=30)
        assert status["state"] == "connected", status
        ours = alice.call("stats", peer="carol")
        theirs = carol.call("stats", peer="alice")

        # alice offered no candidate on her TUN device (10.77.0.1), and carol never saw one.
        assert in_tunnel(ours["candidates"]["local"]) == [], ours["candidates"]
        assert ours["candidates"]["local_excluded"] == 1
        assert in_tunnel(theirs["candidates"]["remote"]) == [], theirs["candidates"]
        # carol offered 10.77.0.9; alice ignored it, and learnt no peer-reflexive candidate
        # from carol's checks sent from there either.
        assert CAROL_CLASHING in [c["address"] for c in theirs["candidates"]["local"]]
        assert in_tunnel(ours["candidates"]["remote"]) == [], ours["candidates"]
        assert ours["candidates"]["remote_excluded"] >= 1
        assert f"remote candidate {CAROL_CLASHING} ignored" in alice.log_tail(50_000)
        # The pair both ends use is outside the tunnel.
        for pair in (ours["pair"], theirs["pair"]):
            assert in_tunnel([pair["local"], pair["remote"]]) == [], pair
        ping(alice.ns, "10.77.0.2", count=1)  # and the tunnel still works


def test_the_first_ping_works_when_the_offerer_gathers_after_its_tunnel_is_up(
    tmp_path: Path,
) -> None:
    """alice's device has 10.77.0.1 by the time she gathers: offered, and nominated, the pair
    on it worked until bob's device took 10.77.0.0/24; from then on everything bob sent to
    alice looped in bob's tunnel, and not one ping came back. It is never offered now."""
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO, mvpd=MVPD_GATHERS_LATE_TUN_FIRST) as lab:
        alice = lab["alice"]
        lab.connect("alice", "bob")
        ping(alice.ns, "10.77.0.2")
        ping(lab["bob"].ns, "10.77.0.1")
        stats = alice.call("stats", peer="bob")
        assert stats["candidates"]["local_excluded"] == 1, stats["candidates"]  # was there
        pair = stats["pair"]
        assert in_tunnel([pair["local"], pair["remote"]]) == [], pair
