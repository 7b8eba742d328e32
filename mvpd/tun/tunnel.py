"""The shared TUN device: one layer-3 device for every peer connected in tun mode.

WireGuard's model: one interface, many peers, each owning a set of networks (its *allowed
IPs*). A packet read from the device goes to the peer whose allowed IPs hold its destination
(longest prefix wins); a packet from a peer is written to the device only when its source is
in that peer's allowed IPs. Everything else is dropped and counted by reason.

Lifetime
--------
The device is created (``tun.name``, ``tun.address``, ``tun.mtu``, link up) when the first
tun peer's channel appears, gets a route for each peer's allowed IPs, loses a peer's routes
when that peer goes, and is deleted with the last peer and at shutdown. mvpd's devices are
not persistent, so the kernel deletes one with its routes even when the daemon is killed
with SIGKILL; :meth:`Tunnel.start` still removes persistent leftovers with our name prefix
(``mvpd.tun.device.cleanup_stale``).

Who may join, and with which addresses
--------------------------------------
Only a peer with ``peers.<id>.allowed_ips`` (or covered by a ``peers."*"`` entry that has
them) may join: the config says so (``mvpd.config``), the answering session refuses any
other peer's tun channel before a transport exists, and :meth:`Tunnel.attach` checks again.
Allowed IPs never default to the tunnel subnet. A peer's networks may not overlap another
joined peer's (one owner per address, by prefix, not just equal networks) nor hold this
agent's own tunnel address.

What a peer's packets may reach
-------------------------------
A packet from a peer is written to the device only when its source is in that peer's allowed
IPs *and* its destination is this agent's tunnel address or in ``tun.forward_to``. The
kernel would otherwise deliver a packet for any of the host's addresses that arrives on the
device (Linux accepts a packet for any local address on any interface), so a peer could
reach services bound to the LAN or loopback addresses just by sending to them; with IP
forwarding on, it could also reach whatever the host routes to. Dropped packets are counted
(``source-not-allowed``, ``destination-not-allowed``).

Failures (no ``/dev/net/tun``, not root, a route that belongs to another interface) fail
that peer's session with a clear reason, sent to the peer in the ``bye``; the daemon and
its other peers carry on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import AgentSettings
from ..proto.errors import MvpError, TunError
from ..proto.ippacket import AllowedIPs, DropReason, IPNetwork, PacketFilter
from ..transports.base import Transport
from ..transports.tun import TunTransport
from .device import TunDevice, cleanup_stale, name_prefix
from .writer import DeviceWriter

log = logging.getLogger(__name__)

#: Owner of our own tunnel address in the allowed-IPs table: not a valid agent id, so no
#: peer may ever send from it.
LOCAL_OWNER = "(local)"


class SessionLike(Protocol):
    """What the tunnel needs from :class:`mvpd.peer.PeerSession`."""

    peer_id: str

    async def close(
        self, reason: str = ..., *, failed: bool = ..., send_bye: bool = ...
    ) -> None: ...


@dataclass
class TunPeer:
    """One peer behind the device."""

    peer_id: str
    transport: TunTransport
    session: SessionLike
    networks: list[IPNetwork]


def _as_network(value: Any) -> IPNetwork:
    return ipaddress.ip_network(str(value), strict=False)


class Tunnel:
    """One TUN device shared by every tun-mode peer (see the module docstring).

    The daemon calls :meth:`start` once, passes :meth:`check` and :meth:`attach` to the core
    (``AgentCore.add_connect_check`` / ``add_transport_hook``) and calls :meth:`close` at
    shutdown.
    """

    def __init__(self, settings: AgentSettings, *, batch_size: int | None = None) -> None:
        self.settings = settings
        self.batch_size = batch_size
        self.table = AllowedIPs()
        #: Where a peer's packets may go: our tunnel address and ``tun.forward_to``.
        self.destinations = AllowedIPs()
        tun = settings.tun
        if tun.address is not None:
            self.destinations.insert(ipaddress.ip_network(tun.address.ip), LOCAL_OWNER)
        for net in tun.forward_to:
            self.destinations.insert(net, "forward")
        #: Drops on the device side no single peer can be blamed for (no route, malformed).
        self.filter = PacketFilter(self.table)
        self.device: TunDevice | None = None
        #: Writes what peers send to the device from a thread (mvpd.tun.writer).
        self.writer: DeviceWriter | None = None
        self._peers: dict[str, TunPeer] = {}
        self._congested: set[str] = set()
        self._configured: asyncio.Future[bool] | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closing = False
        #: The ``peers`` settings the joined peers were admitted under; a reload replaces
        #: the object (see :meth:`_peers_reloaded`).
        self._peers_config = settings.peers

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Remove stale persistent devices with our name prefix; return their names."""
        prefix = name_prefix(self.settings.tun.name)
        if not prefix:
            return []
        try:
            removed = await cleanup_stale(prefix)
        except Exception as exc:  # no netlink access: TUN mode will say why when used
            log.debug("stale TUN device check skipped: %s", exc)
            return []
        for name in removed:
            log.info("removed stale TUN device %s left by an earlier run", name)
        return removed

    async def close(self) -> None:
        """Delete the device (peers' routes go with it) and stop background work."""
        self._closing = True
        self._remove_device("mvpd stopping")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._peers.clear()

    @property
    def peers(self) -> dict[str, TunPeer]:
        """The peers behind the device, by id."""
        return dict(self._peers)

    # --- peers -----------------------------------------------------------------------------

    def allowed_networks(self, peer_id: str) -> list[IPNetwork]:
        """The networks ``peer_id`` may use (see the module docstring); :class:`TunError`
        when it has none, or they overlap another peer's or hold our own address."""
        networks = [_as_network(n) for n in self.settings.tun_networks(peer_id)]
        if not networks:
            raise TunError(
                f"peer {peer_id} may not use TUN mode here: give it its tunnel addresses in "
                f"peers.{peer_id}.allowed_ips (e.g. [10.0.0.2/32]) and mode: tun"
            )
        address = self.settings.tun.address
        for wanted in networks:
            if address is not None and address.ip in wanted:
                raise TunError(f"peers.{peer_id}.allowed_ips {wanted} holds this agent's own "
                               f"tunnel address {address.ip}")
            owner = self._owner_overlapping(wanted, peer_id)
            if owner is not None:
                raise TunError(
                    f"{wanted} overlaps the allowed IPs of tun peer {owner}: each tunnel "
                    "address belongs to one peer; give each its own peers.<id>.allowed_ips"
                )
        return networks

    def _owner_overlapping(self, network: IPNetwork, peer_id: str) -> str | None:
        """Another joined peer whose networks overlap ``network``, if any."""
        for net, owner in self.table:
            if owner not in (peer_id, LOCAL_OWNER) and net.version == network.version \
                    and net.overlaps(network):
                return owner
        return None

    def check(self, peer_id: str, mode: str) -> None:
        """Before connecting: raise :class:`TunError` when a tun connection to ``peer_id``
        cannot work here (no allowed IPs, no /dev/net/tun, no CAP_NET_ADMIN)."""
        if mode != TunTransport.mode:
            return
        self.allowed_networks(peer_id)
        if self.device is None or self.device.closed:
            TunDevice.create(self.settings.tun.name).close()  # a trial; cheap

    def attach(self, session: SessionLike, transport: Transport[Any]) -> None:
        """Give a new tun transport of ``session`` its place behind the device (the core's
        transport hook). Other transports are ignored."""
        if not isinstance(transport, TunTransport):
            return
        peer = session.peer_id
        if self._closing:
            self._fail(session, "mvpd is stopping")
            return
        try:
            networks = self.allowed_networks(peer)
            device = self._ensure_device()
        except MvpError as exc:
            self._fail(session, f"TUN mode is unavailable on {self.settings.agent_id}: "
                                f"{exc.message}")
            return
        old = self._peers.pop(peer, None)
        if old is not None:
            self._congested.discard(peer)
        self.table.replace_peer(peer, networks)
        self._peers[peer] = TunPeer(peer, transport, session, networks)
        transport.bind(peer, self, PacketFilter(self.table, destinations=self.destinations))
        if self.batch_size is not None:
            transport.batch_size = min(self.batch_size, transport.max_message_size)
        log.info("peer %s joins TUN device %s with allowed IPs %s", peer, device.name,
                 ", ".join(map(str, networks)))
        self._spawn(self._add_routes(device, peer, networks))

    def detach(self, transport: TunTransport) -> None:
        """Forget the peer of ``transport`` (its channel closed): its networks and routes go;
        the device goes with the last peer."""
        peer = transport.peer_id
        entry = self._peers.get(peer) if peer is not None else None
        if entry is None or entry.transport is not transport:
            return
        del self._peers[entry.peer_id]
        self.table.remove_peer(entry.peer_id)
        self.resume_for(transport)
        device = self.device
        if not self._peers:
            self._remove_device(f"the last tun peer ({entry.peer_id}) left")
        elif device is not None:
            self._spawn(self._remove_routes(device, entry.networks))

    # --- the device ------------------------------------------------------------------------

    def _ensure_device(self) -> TunDevice:
        if self.device is not None and not self.device.closed:
            return self.device
        tun = self.settings.tun
        device = TunDevice.create(tun.name)
        self.device = device
        self.writer = DeviceWriter(device.fd, device.name, asyncio.get_running_loop())
        self._congested.clear()
        if tun.address is not None:
            own = ipaddress.ip_network(tun.address.ip)
            self.table.insert(own, LOCAL_OWNER)
        device.start_reading(self._from_device, on_error=self._device_failed)
        self._configured = self._spawn(self._configure(device))
        return device

    async def _configure(self, device: TunDevice) -> bool:
        tun = self.settings.tun
        async with self._lock:
            if device.closed:
                return False
            try:
                await device.configure(tun.address, mtu=tun.mtu)
            except TunError as exc:
                self._fail_all(f"cannot configure TUN device {device.name}: {exc.message}")
                return False
        return True

    async def _add_routes(self, device: TunDevice, peer: str, networks: list[IPNetwork]) -> None:
        configured = self._configured
        if configured is None or not await asyncio.shield(configured):
            return
        async with self._lock:
            for net in networks:
                entry = self._peers.get(peer)
                if device is not self.device or device.closed or entry is None:
                    return
                try:
                    await device.add_route(net)
                except TunError as exc:
                    self._peers.pop(peer, None)
                    self.table.remove_peer(peer)
                    self._fail(entry.session, exc.message)
                    return

    async def _remove_routes(self, device: TunDevice, networks: list[IPNetwork]) -> None:
        async with self._lock:
            for net in networks:
                if device.closed:
                    return
                if net in device.routes:  # never the kernel's connected route
                    try:
                        await device.remove_route(net)
                    except TunError as exc:
                        log.warning("%s", exc)

    def _peers_reloaded(self) -> None:
        """A reload replaced ``peers``: a joined peer that no longer has allowed IPs loses
        its addresses at once (before the packet at hand is looked at) and its session.
        Changed allowed IPs apply from the peer's next connection."""
        self._peers_config = self.settings.peers
        for entry in list(self._peers.values()):
            if not self.settings.tun_networks(entry.peer_id):
                self.table.remove_peer(entry.peer_id)
                self._fail(entry.session, "TUN mode was withdrawn from this peer by a "
                                          f"configuration reload on {self.settings.agent_id}")

    def _remove_device(self, why: str) -> None:
        device, self.device = self.device, None
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
        self.table.remove_peer(LOCAL_OWNER)
        self._congested.clear()
        if device is not None and not device.closed:
            device.close()
            log.info("TUN device %s removed: %s", device.name, why)

    def _device_failed(self, error: TunError) -> None:
        self._fail_all(error.message)
        self._remove_device(error.message)

    def _fail(self, session: SessionLike, reason: str) -> None:
        log.warning("peer %s: %s", session.peer_id, reason)
        self._spawn(session.close(reason, failed=True, send_bye=True))

    def _fail_all(self, reason: str) -> None:
        for entry in list(self._peers.values()):
            self._fail(entry.session, reason)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- the data plane --------------------------------------------------------------------

    def _from_device(self, packets: list[bytes]) -> None:
        if self.settings.peers is not self._peers_config:
            self._peers_reloaded()
        # Counts malformed, too-big and no-route.
        for peer, ours in self.filter.route_batch(packets).items():
            entry = self._peers.get(peer)
            if entry is None:  # our own address: the kernel never sends it here
                self.filter.drops.add(DropReason.NO_ROUTE, len(ours))
                continue
            entry.transport.send_packets(ours)

    def from_peer(self, transport: TunTransport, message: bytes) -> None:
        """Write the acceptable packets of one message from a peer to the device."""
        assert transport.filter is not None and transport.peer_id is not None
        if self.settings.peers is not self._peers_config:
            self._peers_reloaded()
        packets = transport.filter.incoming_message(transport.peer_id, message)
        if packets:
            self._write(transport, packets)

    def from_peer_packet(self, transport: TunTransport, packet: bytes) -> None:
        """Write one IP packet from a peer's datagram path to the device, if acceptable."""
        assert transport.filter is not None and transport.peer_id is not None
        if self.settings.peers is not self._peers_config:
            self._peers_reloaded()
        if transport.filter.accept_incoming(transport.peer_id, packet):
            self._write(transport, (packet,))

    def _write(self, transport: TunTransport, packets: Sequence[bytes]) -> None:
        writer = self.writer
        if writer is None:
            transport.drops.add(DropReason.NOT_CONNECTED, len(packets))
            return
        traffic = transport.traffic
        for packet in packets:
            if writer.write(packet):
                traffic.packets_in += 1
                traffic.bytes_in += len(packet)
            else:
                transport.drops.add(DropReason.WRITE_FAILED)

    def pause_for(self, transport: TunTransport) -> None:
        """Stop reading the device while ``transport``'s send buffer is full."""
        if transport.peer_id is None:
            return
        self._congested.add(transport.peer_id)
        if self.device is not None:
            self.device.pause_reading()

    def resume_for(self, transport: TunTransport) -> None:
        """Read again once no peer's send buffer is full."""
        if transport.peer_id is not None:
            self._congested.discard(transport.peer_id)
        if not self._congested and self.device is not None and not self.device.closed:
            self.device.resume_reading()

    # --- status ----------------------------------------------------------------------------

    def device_info(self) -> dict[str, Any]:
        """Device name, addresses, MTU and device-side drops (nonzero only)."""
        device = self.device
        alive = device is not None and not device.closed
        return {
            "device": device.name if device is not None and alive else None,
            "addresses": [str(a) for a in device.addresses] if device is not None else [],
            "mtu": device.mtu if device is not None else None,
            "drops": {k: v for k, v in self._device_drops().items() if v},
        }

    def _device_drops(self) -> dict[str, int]:
        drops = self.filter.drops.as_dict()
        writer = self.writer
        if writer is not None:  # refused by the kernel, or beyond the writer's queue
            key = DropReason.WRITE_FAILED.value
            drops[key] = drops.get(key, 0) + writer.dropped
        return drops

    def status(self) -> dict[str, Any]:
        """The device and every peer behind it."""
        return {
            **self.device_info(),
            "peers": {peer: e.transport.tun_status() for peer, e in sorted(self._peers.items())},
        }
