"""TUN mode: one peer's IP packets over an unreliable, unordered data channel.

The channel is unordered with ``maxRetransmits=0`` (IP above it does its own recovery; no
TCP-over-TCP). The transport is the per-peer end of a shared tunnel (``mvpd.tun.tunnel``): the
tunnel owns the TUN device and the allowed-IPs table, reads packets from the device, routes
each by destination and hands a peer's packets to :meth:`TunTransport.send_packets`; what
the peer sends comes back through :meth:`PacketSink.from_peer`, which checks the source
against the peer's allowed IPs before writing to the device.

Each IP packet travels in a message of its own by default. The batch format of
:func:`~mvpd.proto.ippacket.encode_batch` (several length-prefixed packets in one message) is
always understood on receipt and can be turned on with ``batch_size``, but measured through
mvpd it was not faster and made RTT jitter 5-10x worse (BENCHMARKS.md, "TUN mode"): aiortc's
SCTP still cuts a batch into 1160-byte chunks and sends one SACK per chunk.

Datagram path: when the channel opens, :class:`~mvpd.tun.link.DatagramLink` hooks the peer
connection's ICE path and advertises the feature to the peer; once the peer answers (a newer
mvpd), packets travel as AEAD-protected datagrams beside DTLS instead of on the channel
(WireGuard's data path, keyed from the DTLS connection: see :mod:`mvpd.tun.datagram`), and
only packets too big for one unfragmented datagram still take the channel. What arrives that
way meets the same allowed-IPs check. A peer that never answers (an older mvpd, a browser)
sees nothing of it and stays on the channel.

Backpressure: when the channel's send buffer reaches the high watermark, the transport asks
the tunnel to pause reading the device (the kernel queues, then drops, as a congested link
would); ``bufferedamountlow`` lets it resume. Every dropped packet is counted by reason.

The peer layer builds the transport with no arguments (``create_transport("tun")``); the
tunnel then binds it to a peer id with :meth:`TunTransport.bind`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..proto.errors import TransportError
from ..proto.ippacket import DropCounters, DropReason, PacketFilter
from ..tun.link import DatagramLink
from .base import ChannelOptions, DataChannelLike, Transport

log = logging.getLogger(__name__)

#: Largest message a batch of packets becomes; 0 sends one packet per message (the default,
#: chosen by measurement: see the module docstring). With maxRetransmits=0 one lost SCTP
#: chunk loses a whole message, so batches, when enabled, should stay modest (e.g. 8192).
DEFAULT_BATCH_SIZE = 0


class PacketSink(Protocol):
    """The tunnel side of a bound :class:`TunTransport`."""

    def from_peer(self, transport: TunTransport, message: bytes) -> None:
        """One message from the peer (a packet or a batch)."""

    def from_peer_packet(self, transport: TunTransport, packet: bytes) -> None:
        """One IP packet from the peer's datagram path."""

    def pause_for(self, transport: TunTransport) -> None:
        """The peer's send buffer is full: stop reading the device for now."""

    def resume_for(self, transport: TunTransport) -> None:
        """The peer's send buffer drained below the low watermark."""

    def detach(self, transport: TunTransport) -> None:
        """The channel closed: forget the peer."""

    def device_info(self) -> dict[str, Any]:
        """Device name, addresses and device-side drops, for status."""


@dataclass
class TunTraffic:
    """IP packets exchanged with one peer (after filtering)."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0


class TunTransport(Transport[bytes]):
    """One peer's IP packets over an unreliable, unordered data channel."""

    mode = "tun"
    channel_options: ClassVar[ChannelOptions] = ChannelOptions(ordered=False, max_retransmits=0)

    def __init__(self, *, batch_size: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("queue_size", 0)  # packets go to the device, never to recv()
        kwargs.setdefault("high_watermark", 512 * 1024)
        kwargs.setdefault("low_watermark", 128 * 1024)
        super().__init__(**kwargs)
        size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        #: 0 (or anything below one packet) sends every packet in a message of its own.
        self.batch_size = min(size, self.max_message_size)
        self.peer_id: str | None = None
        self.sink: PacketSink | None = None
        #: Checks what this peer sends; shares the tunnel's allowed-IPs table.
        self.filter: PacketFilter | None = None
        self.traffic = TunTraffic()
        self._drops = DropCounters()
        self._paused = False
        #: The datagram path, once the channel is open and the connection has one.
        self.datagrams: DatagramLink | None = None
        self._no_datagrams = "the channel is not open yet"
        self.add_close_listener(self._closed_channel)

    @property
    def drops(self) -> DropCounters:
        """Packets to or from this peer dropped, by reason."""
        return self.filter.drops if self.filter is not None else self._drops

    def bind(self, peer_id: str, sink: PacketSink, packet_filter: PacketFilter) -> None:
        """Exchange packets for ``peer_id`` with ``sink`` (the tunnel)."""
        if self.sink is not None:
            raise TransportError("this TUN transport is already bound to a tunnel")
        self.peer_id = peer_id
        self.sink = sink
        packet_filter.drops.add(DropReason.MALFORMED, self._drops[DropReason.MALFORMED])
        self.filter = packet_filter

    def attach_channel(self, channel: DataChannelLike) -> None:
        super().attach_channel(channel)
        channel.on("bufferedamountlow", self._buffer_drained)

    def on_open(self) -> None:
        if self.sink is None:
            log.warning("TUN channel %r opened with no tunnel bound: packets are dropped",
                        self.label)
        if self.datagrams is None and not self.is_closed:
            try:
                self.datagrams = DatagramLink.open(self.channel, self._datagram_received)
            except LookupError as exc:
                self._no_datagrams = str(exc)
                log.info("peer %s: TUN packets stay on the data channel: %s", self.peer_id, exc)

    def _buffer_drained(self) -> None:
        if self._paused:
            self._paused = False
            if self.sink is not None:
                self.sink.resume_for(self)

    def _closed_channel(self) -> None:
        self._paused = False
        if self.datagrams is not None:
            self.datagrams.close()
        if self.sink is not None:
            self.sink.detach(self)

    # --- device -> peer -------------------------------------------------------------------

    def send_packets(self, packets: list[bytes]) -> None:
        """Send packets routed to this peer, batched; drops are counted, never raised."""
        drops = self.drops
        if not self.is_open:
            drops.add(DropReason.NOT_CONNECTED, len(packets))
            return
        if self.filter is None:
            drops.add(DropReason.NOT_CONNECTED, len(packets))
            return
        link = self.datagrams
        if link is not None and link.active:
            rest = link.send_packets(packets)  # all but those too big for one datagram
            self.traffic.packets_out += len(packets) - len(rest)
            self.traffic.bytes_out += sum(map(len, packets)) - sum(map(len, rest))
            if not rest:
                return
            packets = rest
        limit = self.batch_size
        if limit <= 1:
            messages = []
            for packet in packets:
                if len(packet) > self.max_message_size:
                    drops.add(DropReason.TOO_BIG)
                else:
                    messages.append(bytes(packet))
        else:
            small = [p for p in packets if len(p) <= limit]
            messages = self.filter.pack_messages(small, limit) if small else []
            if len(small) != len(packets):  # alone, up to the channel's limit
                big = [p for p in packets if len(p) > limit]
                messages += self.filter.pack_messages(big, self.max_message_size)
        for message in messages:
            try:
                self._send(message)
            except TransportError as exc:
                drops.add(DropReason.NOT_CONNECTED)
                log.debug("peer %s: send failed: %s", self.peer_id, exc)
                return
        self.traffic.packets_out += len(packets)
        self.traffic.bytes_out += sum(len(p) for p in packets)
        if self.buffered_amount >= self.high_watermark and not self._paused:
            self._paused = True
            if self.sink is not None:
                self.sink.pause_for(self)

    # --- peer -> device -----------------------------------------------------------------

    def receive(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.drops.add(DropReason.MALFORMED)
            self.report_error("malformed", "text message on the TUN channel")
            return
        if self.sink is None:
            self.drops.add(DropReason.NOT_CONNECTED)
            return
        self.sink.from_peer(self, data)

    def _datagram_received(self, packet: bytes) -> None:
        """One authenticated packet from the datagram path: checked like any other."""
        if self.sink is None:
            self.drops.add(DropReason.NOT_CONNECTED)
            return
        self.sink.from_peer_packet(self, packet)

    def decode(self, data: str | bytes) -> bytes:
        return data.encode() if isinstance(data, str) else data

    # --- status -----------------------------------------------------------------------

    def tun_status(self) -> dict[str, Any]:
        """Device, addresses, this peer's allowed IPs, packets and bytes in and out, drops
        by reason (this peer's, and the device's that no peer can be blamed for)."""
        info = self.sink.device_info() if self.sink is not None else {}
        allowed = (
            [str(n) for n in self.filter.allowed_ips.networks(self.peer_id)]
            if self.filter is not None and self.peer_id is not None
            else []
        )
        return {
            "device": info.get("device"),
            "addresses": info.get("addresses", []),
            "mtu": info.get("mtu"),
            "allowed_ips": allowed,
            "packets_in": self.traffic.packets_in,
            "bytes_in": self.traffic.bytes_in,
            "packets_out": self.traffic.packets_out,
            "bytes_out": self.traffic.bytes_out,
            "drops": {k: v for k, v in self.drops.as_dict().items() if v},
            "device_drops": info.get("drops", {}),
            **self.path_status(),
        }

    def path_status(self) -> dict[str, Any]:
        """``path`` ("datagram" or "channel") and ``datagram``: that path's state and counters,
        or why there is none."""
        link = self.datagrams
        if link is None:
            return {"path": "channel", "datagram": {"unavailable": self._no_datagrams}}
        state = link.status()
        if not link.active:
            state["unavailable"] = "the peer has not answered (no datagram support)"
        return {"path": "datagram" if link.active else "channel", "datagram": state}
