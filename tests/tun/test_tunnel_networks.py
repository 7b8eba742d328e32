"""The networks our tunnels carry, which ICE must not use: from the configuration, and from
the kernel for every device named like ours (a real one inside a namespace)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import ifaddr
import pytest

from mvpd.tun.tunnel_networks import device_networks, routes_through, tunnel_networks
from tests.netns import namespace, require_tun
from tests.peerlink import make_settings
from tests.tun.test_device import run_child

net = ipaddress.ip_network

# /proc/net/route and /proc/net/ipv6_route as a little-endian kernel writes them.
ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
mvp-tun0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
mvp-tun0\t0032A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
mvp-tun1\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0
other-tun\t0000580A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
IPV6_ROUTE = (
    "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "fd000077000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001 mvp-tun0\n"
    "garbage line\n"
)


def proc_net(tmp_path: Path) -> Path:
    (tmp_path / "route").write_text(ROUTE)
    (tmp_path / "ipv6_route").write_text(IPV6_ROUTE)
    return tmp_path


def test_routes_through_devices_named_like_ours(tmp_path: Path) -> None:
    assert routes_through("mvp-tun", proc_net(tmp_path)) == [
        net("10.77.0.0/24"), net("192.168.50.0/24"), net("0.0.0.0/0"), net("fd00:77::/64"),
    ]
    assert routes_through("mvp-tun", tmp_path / "nothing") == []  # no /proc: nothing


def test_device_addresses_count_with_their_subnets(tmp_path: Path) -> None:
    adapters = [
        ifaddr.Adapter("eth0", "eth0", [ifaddr.IP("192.0.2.2", 24, "eth0")]),
        ifaddr.Adapter("mvp-tun3", "mvp-tun3", [
            ifaddr.IP("10.88.0.1", 30, "mvp-tun3"), ifaddr.IP(("fd88::1", 0, 0), 64, "mvp-tun3"),
        ]),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert device_networks("mvp-tun", proc_net=empty, adapters=adapters) == [
        net("10.88.0.0/30"), net("fd88::/64"),
    ]


def test_configured_networks_count_even_without_a_device(tmp_path: Path) -> None:
    settings = make_settings(
        "alice", tun={"address": "10.77.0.1/24"},
        peers={"bob": {"mode": "tun", "allowed_ips": ["10.77.0.2/32", "192.168.60.0/24"]},
               "carol": {"mode": "chat"}},
    )
    found = tunnel_networks(settings, proc_net=proc_net(tmp_path))
    # Configuration first, then the devices named mvp-tun*, less mvp-tun1's default route.
    assert found[:3] == [net("10.77.0.0/24"), net("10.77.0.2/32"), net("192.168.60.0/24")]
    assert net("192.168.50.0/24") in found and net("fd00:77::/64") in found
    assert net("0.0.0.0/0") not in found and net("10.88.0.0/24") not in found
    assert len(found) == len(set(found))


@pytest.mark.root
def test_a_real_device_of_another_mvpd_counts_with_its_routes() -> None:
    """A TUN device named like ours that this agent's configuration knows nothing about (as
    another mvpd in the same namespace would have): its subnet and routes count."""
    require_tun()
    body = r"""
from mvpd.tun.tunnel_networks import tunnel_networks
from tests.peerlink import make_settings

async def main():
    dev = TunDevice.create("mvp-tun%d")
    await dev.configure("10.66.0.1/24")
    await dev.add_route("192.168.66.0/24")
    found = tunnel_networks(make_settings("x"))
    dev.close()
    after = tunnel_networks(make_settings("x"))
    report({"found": [str(n) for n in found], "after": [str(n) for n in after]})

asyncio.run(main())
"""
    with namespace("tnets") as ns:
        result = run_child(ns, body)
    assert set(result["found"]) == {"10.66.0.0/24", "192.168.66.0/24"}, result
    assert result["after"] == []
