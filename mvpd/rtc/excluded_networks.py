"""Networks ICE must never use: candidates with an address inside them are dropped.

A peer connection whose candidate pair runs through one of the host's own tunnels would
depend on that tunnel (and loop when it is the tunnel the connection itself carries). The
owner of the connection says which networks those are (mvpd:
:func:`mvpd.tun.tunnel_networks.tunnel_networks`); :class:`ExcludedNetworks` looks them up
once, when the connection first needs them, and answers which network holds an address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from ..proto.ippacket import IPNetwork


class ExcludedNetworks:
    """The networks ``source()`` returns, asked for once (on first use)."""

    def __init__(self, source: Callable[[], Iterable[IPNetwork]]) -> None:
        self._source = source
        self._networks: tuple[IPNetwork, ...] | None = None

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        if self._networks is None:
            self._networks = tuple(self._source())
        return self._networks

    def holding(self, address: str | None) -> IPNetwork | None:
        """The excluded network ``address`` lies in; ``None`` when it lies in none, or is
        not an IP address (an mDNS name, empty)."""
        if not address:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # no IPv6 zone
        except ValueError:
            return None
        for network in self.networks:
            if ip.version == network.version and ip in network:
                return network
        return None
