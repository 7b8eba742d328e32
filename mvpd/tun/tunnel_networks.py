"""The networks our TUN tunnels carry: what ICE must never use to reach a peer.

aioice gathers every address of every interface, a TUN device's too, and takes any remote
candidate it is given. A candidate pair on a tunnel address would carry a peer connection
through a tunnel (another peer's, or the very one it carries) and die with it, or loop; so
:class:`mvpd.rtc.PeerConnection` drops local and remote candidates inside
:func:`tunnel_networks`.

Those are, from the configuration (so they hold before the device exists, and while it is
being set up):

* the subnet of ``tun.address``;
* every ``peers.<id>.allowed_ips`` (routed to the device while that peer is joined);

and from the kernel, for every device whose name starts like ``tun.name`` (ours, and those
of other mvpd instances in this network namespace):

* its addresses with their subnets;
* the routes through it (``/proc/net/route``, ``/proc/net/ipv6_route``).

Default routes (prefix length 0) never count: they say nothing about any one address, and a
"full tunnel" setup keeps a more specific route to the peer outside the tunnel. Nor do the
link-local and multicast routes the kernel gives every IPv6 device (``fe80::/64``,
``ff00::/8``): they are per interface, and ICE does not use them. A network
that is only partly routed to the tunnel (allowed IPs wider than a LAN with a more specific
route of its own) is excluded as a whole.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

import ifaddr

from ..config import AgentSettings
from ..proto.ippacket import IPNetwork
from .device import name_prefix

log = logging.getLogger(__name__)

PROC_NET = Path("/proc/net")


def tunnel_networks(settings: AgentSettings, *, proc_net: Path = PROC_NET) -> list[IPNetwork]:
    """The networks of ``settings``' tunnel and of this namespace's mvpd TUN devices (see
    the module docstring), without duplicates, default routes, link-local or multicast
    networks."""
    found: list[IPNetwork] = []
    address = settings.tun.address
    if address is not None:
        found.append(address.network)
    for peer in settings.peers.values():
        found.extend(peer.allowed_ips)
    prefix = name_prefix(settings.tun.name)
    if prefix:
        try:
            found.extend(device_networks(prefix, proc_net=proc_net))
        except OSError as exc:  # no /proc: the configured networks still hold
            log.debug("cannot list the TUN devices' networks: %s", exc)
    return _unique(
        net for net in found
        if net.prefixlen > 0 and not (net.is_link_local or net.is_multicast)
    )


def device_networks(
    prefix: str, *, proc_net: Path = PROC_NET, adapters: Iterable[ifaddr.Adapter] | None = None
) -> list[IPNetwork]:
    """The subnets of the addresses of interfaces named ``prefix...`` and the routes through
    them (``adapters``: ``ifaddr.get_adapters()`` by default)."""
    found: list[IPNetwork] = []
    for adapter in adapters if adapters is not None else ifaddr.get_adapters():
        if not adapter.name.startswith(prefix):
            continue
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            found.append(ipaddress.ip_interface(f"{address}/{ip.network_prefix}").network)
    found.extend(routes_through(prefix, proc_net))
    return _unique(found)


def routes_through(prefix: str, proc_net: Path = PROC_NET) -> list[IPNetwork]:
    """Destinations of the main-table IPv4 routes and of the IPv6 routes whose device is
    named ``prefix...``."""
    found: list[IPNetwork] = []
    for line in _lines(proc_net / "route")[1:]:
        # Iface Destination Gateway Flags RefCnt Use Metric Mask ...: host-order hex.
        fields = line.split()
        if len(fields) < 8 or not fields[0].startswith(prefix):
            continue
        try:
            dest = socket.inet_ntoa(struct.pack("=I", int(fields[1], 16)))
            mask = socket.inet_ntoa(struct.pack("=I", int(fields[7], 16)))
            found.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
        except (ValueError, struct.error):
            continue
    for line in _lines(proc_net / "ipv6_route"):
        # dest plen src plen next-hop metric refcnt use flags device: hex, network order.
        fields = line.split()
        if len(fields) < 10 or not fields[9].startswith(prefix):
            continue
        try:
            dest6 = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            found.append(ipaddress.IPv6Network(f"{dest6}/{int(fields[1], 16)}", strict=False))
        except ValueError:
            continue
    return found


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:  # no IPv6 in this kernel
        return []


def _unique(networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    return list(dict.fromkeys(networks))
