"""TUN mode: IP packets between a TUN device and one peer's data channel.

The channel is unordered with ``maxRetransmits=0`` (IP above it does its own recovery; no
TCP-over-TCP). Packets read from the device are routed by destination through a
:class:`~mvpd.proto.ippacket.PacketFilter`, packed several to a message
(:func:`~mvpd.proto.ippacket.encode_batch`) and sent; packets from the peer are accepted
only when their source is in the peer's allowed IPs, then written to the device.

Backpressure: when the channel's send buffer reaches the high watermark, reading the device
pauses (the kernel queues, then drops, as a congested link would) and resumes on
``bufferedamountlow``. Every dropped packet is counted by reason in :attr:`TunTransport.drops`.

The peer layer builds the transport with no arguments; the daemon then gives it a device:
:meth:`TunTransport.open_device` (a device of its own, removed when the channel closes) or
:meth:`TunTransport.attach_device` (a device the caller owns). Importing this module does not
register the mode; whoever enables TUN mode calls
``register_transport("tun", TunTransport)`` (``mvpd.transports``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

from ..netdev import DEFAULT_NAME_TEMPLATE, TunDevice
from ..proto.errors import TransportError, TunError
from ..proto.ippacket import AllowedIPs, DropCounters, DropReason, IPNetwork, PacketFilter
from .base import ChannelOptions, DataChannelLike, Transport

log = logging.getLogger(__name__)

#: Largest message one batch of packets becomes. aiortc cuts messages into 1160-byte SCTP
#: chunks and with maxRetransmits=0 one lost chunk loses the whole message, so batches stay
#: modest.
DEFAULT_BATCH_SIZE = 8192
#: Allowed IPs when none are configured: the peer may use any address (point-to-point).
ANY_ADDRESS = ("0.0.0.0/0", "::/0")


class TunTransport(Transport[bytes]):
    """One peer's IP packets over an unreliable, unordered data channel."""

    mode = "tun"
    channel_options: ClassVar[ChannelOptions] = ChannelOptions(ordered=False, max_retransmits=0)

    def __init__(
        self,
        *,
        peer_id: str = "peer",
        allowed_ips: Iterable[str | IPNetwork] = ANY_ADDRESS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("queue_size", 0)  # packets go to the device, never to recv()
        kwargs.setdefault("high_watermark", 512 * 1024)
        kwargs.setdefault("low_watermark", 128 * 1024)
        super().__init__(**kwargs)
        self.peer_id = peer_id
        self.batch_size = min(batch_size, self.max_message_size)
        table = AllowedIPs()
        table.replace_peer(peer_id, allowed_ips)
        self.filter = PacketFilter(table)
        self.device: TunDevice | None = None
        self._owns_device = False
        self.add_close_listener(self._stop)

    # --- the device -------------------------------------------------------------------

    @property
    def drops(self) -> DropCounters:
        """Dropped packets by reason."""
        return self.filter.drops

    def set_allowed_ips(self, networks: Iterable[str | IPNetwork]) -> None:
        """Replace the networks this peer may send from and that are routed to it."""
        self.filter.allowed_ips.replace_peer(self.peer_id, networks)

    def attach_device(self, device: TunDevice) -> None:
        """Exchange packets with ``device`` (owned by the caller; not closed here)."""
        if self.device is not None:
            raise TransportError("a TUN device is already attached to this transport")
        self.device = device
        if self.is_open:
            self._start_reading()

    async def open_device(
        self,
        name: str = DEFAULT_NAME_TEMPLATE,
        *,
        address: str | ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None,
        mtu: int | None = None,
        routes: Iterable[str | IPNetwork] = (),
    ) -> TunDevice:
        """Create, configure and attach a device of this transport's own (removed when the
        channel closes). ``routes``: networks behind the peer to route through it, typically
        its configured allowed IPs (never the match-all defaults)."""
        device = TunDevice.create(name)
        try:
            await device.configure(address, mtu=mtu)
            for network in routes:
                await device.add_route(network)
        except BaseException:
            device.close()
            raise
        self._owns_device = True
        self.attach_device(device)
        return device

    def on_open(self) -> None:
        if self.device is not None:
            self._start_reading()

    def attach_channel(self, channel: DataChannelLike) -> None:
        super().attach_channel(channel)
        channel.on("bufferedamountlow", self._resume_reading)

    def _start_reading(self) -> None:
        assert self.device is not None
        if not self.device.reading and not self.device.closed:
            self.device.start_reading(self._from_device, on_error=self._device_failed)

    def _resume_reading(self) -> None:
        if self.device is not None and self.is_open:
            self.device.resume_reading()

    def _device_failed(self, error: TunError) -> None:
        log.warning("peer %s: %s; closing the TUN channel", self.peer_id, error)
        self.report_error("device", str(error))
        self.close()

    def _stop(self) -> None:
        device = self.device
        if device is None:
            return
        device.pause_reading()
        if self._owns_device:
            device.close()

    # --- device -> peer -------------------------------------------------------------------

    def _from_device(self, packets: list[bytes]) -> None:
        route = self.filter.route_outgoing  # counts malformed, too-big and no-route drops
        ours = [p for p in packets if route(p) == self.peer_id]
        if not ours:
            return
        if not self.is_open:
            self.drops.add(DropReason.NOT_CONNECTED, len(ours))
            return
        limit = self.batch_size
        messages = self.filter.pack_messages([p for p in ours if len(p) <= limit], limit)
        big = [p for p in ours if len(p) > limit]  # alone, up to the channel's limit
        if big:
            messages += self.filter.pack_messages(big, self.max_message_size)
        for message in messages:
            try:
                self._send(message)
            except TransportError as exc:
                self.drops.add(DropReason.NOT_CONNECTED)
                log.debug("peer %s: send failed: %s", self.peer_id, exc)
                return
        if self.buffered_amount >= self.high_watermark and self.device is not None:
            self.device.pause_reading()

    # --- peer -> device -----------------------------------------------------------------

    def receive(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.drops.add(DropReason.MALFORMED)
            self.report_error("malformed", "text message on the TUN channel")
            return
        packets = self.filter.incoming_message(self.peer_id, data)
        if self.device is None or self.device.closed:
            self.drops.add(DropReason.NOT_CONNECTED, len(packets))
            return
        for packet in packets:
            if not self.device.write(packet):
                self.drops.add(DropReason.WRITE_FAILED)

    def decode(self, data: str | bytes) -> bytes:
        return data.encode() if isinstance(data, str) else data

    # --- status -----------------------------------------------------------------------

    def tun_status(self) -> dict[str, Any]:
        """Device name, traffic and drops, for status output."""
        device = self.device
        return {
            "device": device.name if device is not None and not device.closed else None,
            "allowed_ips": [str(n) for n in self.filter.allowed_ips.networks(self.peer_id)],
            "device_stats": vars(device.stats).copy() if device is not None else {},
            "drops": self.drops.as_dict(),
        }
