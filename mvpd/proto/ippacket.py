"""IP packets in TUN mode, sans-I/O: header parsing, per-peer allowed IPs, batch framing, and
the drop counters of the data plane.

Nothing here touches a device or a socket. The TUN device (``mvpd.tun.device``) hands raw packets
in, the data channel hands messages in, and the functions below say where a packet goes and
why one was dropped.

Message format on the TUN data channel
--------------------------------------
A message is either

* one raw IP packet (its first byte has version nibble 4 or 6), or
* a batch: the tag byte ``0x00`` followed by one or more frames, each a 2-byte big-endian
  length and that many bytes of IP packet (lengths 1..65535).

The tag byte keeps the two apart (no IP packet starts with ``0x00``), so a peer that sends one
plain packet per message (like aiortc's VPN example) is understood too. Batching matters
because aiortc's SCTP costs about the same per message whatever its size (see DESIGN.md 9).

A malformed batch (bad tag, truncated frame, zero-length frame) drops the whole message; a
malformed packet inside a good batch drops only that packet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from enum import Enum
from typing import NamedTuple

from .errors import MalformedPacket

IPV4_MIN_HEADER = 20
IPV6_HEADER = 40
#: The largest IP packet a batch frame (and an IPv4/IPv6 length field) can describe.
MAX_PACKET_SIZE = 65535
#: First byte of a batch message.
BATCH_TAG = 0x00
FRAME_PREFIX = 2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Bytes = bytes | bytearray | memoryview

_BITS = {4: 32, 6: 128}
#: _MASKS[version][prefixlen] is the netmask of that prefix length as an int.
_MASKS = {
    version: [((1 << plen) - 1) << (bits - plen) for plen in range(bits + 1)]
    for version, bits in _BITS.items()
}


# --- headers ------------------------------------------------------------------------------


class IPHeader(NamedTuple):
    """What the data plane needs from an IP header. Addresses are ints (fast to compare and
    mask); ``src_address``/``dst_address`` give :mod:`ipaddress` objects."""

    version: int
    src: int
    dst: int
    total_length: int

    @property
    def src_address(self) -> IPAddress:
        """The source address as an :mod:`ipaddress` object."""
        return _address(self.version, self.src)

    @property
    def dst_address(self) -> IPAddress:
        """The destination address as an :mod:`ipaddress` object."""
        return _address(self.version, self.dst)


def _address(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def parse_header(packet: Bytes) -> IPHeader:
    """Read version, source, destination and total length of one IPv4 or IPv6 packet.

    Raises :class:`MalformedPacket` when the packet is empty, not IPv4/IPv6, shorter than its
    header, or when its length field disagrees with its size (a TUN read returns exactly one
    whole packet, so any disagreement means truncation or garbage).
    """
    size = len(packet)
    if size == 0:
        raise MalformedPacket("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if size < IPV4_MIN_HEADER:
            raise MalformedPacket(f"IPv4 packet of {size} bytes is shorter than a header (20)")
        header_length = (packet[0] & 0x0F) * 4
        if header_length < IPV4_MIN_HEADER:
            raise MalformedPacket(f"IPv4 header length {header_length} is below 20")
        total = (packet[2] << 8) | packet[3]
        if total < header_length:
            raise MalformedPacket(
                f"IPv4 total length {total} is smaller than its header ({header_length})"
            )
        src = int.from_bytes(packet[12:16], "big")
        dst = int.from_bytes(packet[16:20], "big")
    elif version == 6:
        if size < IPV6_HEADER:
            raise MalformedPacket(f"IPv6 packet of {size} bytes is shorter than a header (40)")
        total = IPV6_HEADER + ((packet[4] << 8) | packet[5])
        src = int.from_bytes(packet[8:24], "big")
        dst = int.from_bytes(packet[24:40], "big")
    else:
        raise MalformedPacket(f"not an IP packet (version {version}, first byte {packet[0]:#04x})")
    if total > size:
        raise MalformedPacket(f"IPv{version} packet truncated: {size} of {total} bytes")
    if total < size:
        # Covers IPv6 jumbograms (payload length 0), which never fit a TUN MTU anyway.
        raise MalformedPacket(
            f"IPv{version} packet has {size - total} bytes after its length ({total})"
        )
    return IPHeader(version, src, dst, total)


# --- allowed IPs --------------------------------------------------------------------------


def _network(value: str | IPNetwork) -> IPNetwork:
    """A network from ``10.0.0.0/24``-style text; host bits are masked off (as WireGuard
    does), a bare address is a /32 or /128."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    return ipaddress.ip_network(value, strict=False)


class AllowedIPs:
    """Longest-prefix-match table from networks to peer ids (WireGuard's AllowedIPs).

    Outgoing: :meth:`lookup` of a packet's destination names the peer to send it to.
    Incoming: a packet from peer P is accepted only when its *source* looks up to P
    (:meth:`source_allowed`), so a peer cannot spoof addresses it was not given.

    A network belongs to one peer at a time; inserting it for another peer moves it. Lookups
    try each prefix length in use, longest first (a handful in practice), and remember recent
    answers in a bounded cache that any change clears.
    """

    CACHE_SIZE = 4096

    def __init__(self) -> None:
        # version -> prefix length -> network int -> peer id
        self._tables: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}
        self._cache: dict[tuple[int, int], str | None] = {}

    def insert(self, network: str | IPNetwork, peer_id: str) -> str | None:
        """Route ``network`` to ``peer_id``; return the peer that had it before, if another."""
        net = _network(network)
        table = self._tables[net.version].setdefault(net.prefixlen, {})
        previous = table.get(int(net.network_address))
        table[int(net.network_address)] = peer_id
        self._changed(net.version)
        return previous if previous != peer_id else None

    def remove(self, network: str | IPNetwork) -> str | None:
        """Forget ``network``; return the peer it belonged to (None if it was not there)."""
        net = _network(network)
        table = self._tables[net.version].get(net.prefixlen)
        if table is None:
            return None
        peer = table.pop(int(net.network_address), None)
        if not table:
            del self._tables[net.version][net.prefixlen]
        self._changed(net.version)
        return peer

    def remove_peer(self, peer_id: str) -> list[IPNetwork]:
        """Forget every network of ``peer_id``; return them."""
        gone = self.networks(peer_id)
        for net in gone:
            self.remove(net)
        return gone

    def replace_peer(self, peer_id: str, networks: Iterable[str | IPNetwork]) -> None:
        """Make ``networks`` exactly the networks of ``peer_id``."""
        nets = [_network(n) for n in networks]  # parse all first: no half-done change
        self.remove_peer(peer_id)
        for net in nets:
            self.insert(net, peer_id)

    def lookup(self, address: str | IPAddress) -> str | None:
        """The peer whose most specific network contains ``address``, or None."""
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        return self.lookup_int(addr.version, int(addr))

    def lookup_int(self, version: int, address: int) -> str | None:
        """:meth:`lookup` for an address given as version and int (as in :class:`IPHeader`)."""
        key = (version, address)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found: str | None = None
        tables = self._tables[version]
        masks = _MASKS[version]
        for plen in self._lengths[version]:
            found = tables[plen].get(address & masks[plen])
            if found is not None:
                break
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = found
        return found

    def source_allowed(self, peer_id: str, address: str | IPAddress) -> bool:
        """Whether ``peer_id`` may send packets from ``address``."""
        return self.lookup(address) == peer_id

    def networks(self, peer_id: str | None = None) -> list[IPNetwork]:
        """The networks of ``peer_id`` (all networks when None), most specific first."""
        return [net for net, peer in self if peer_id is None or peer == peer_id]

    def peers(self) -> set[str]:
        """Every peer that has at least one network."""
        return {peer for _, peer in self}

    def __iter__(self) -> Iterator[tuple[IPNetwork, str]]:
        for version, lengths in self._lengths.items():
            for plen in lengths:
                for value, peer in self._tables[version][plen].items():
                    net: IPNetwork
                    if version == 4:
                        net = ipaddress.IPv4Network((value, plen))
                    else:
                        net = ipaddress.IPv6Network((value, plen))
                    yield net, peer

    def __len__(self) -> int:
        return sum(len(t) for tables in self._tables.values() for t in tables.values())

    def _changed(self, version: int) -> None:
        self._lengths[version] = sorted(self._tables[version], reverse=True)
        self._cache.clear()


# --- batch framing ------------------------------------------------------------------------


def _is_ip_start(first_byte: int) -> bool:
    return first_byte >> 4 in (4, 6)


def encode_batch(packets: Sequence[Bytes]) -> bytes:
    """One data-channel message carrying ``packets`` (see the module docstring).

    A single packet that looks like IP goes out as is; anything else is framed. Raises
    :class:`MalformedPacket` for an empty list, an empty packet or one over 65535 bytes.
    """
    if not packets:
        raise MalformedPacket("no packets to encode")
    if len(packets) == 1 and len(packets[0]) and _is_ip_start(packets[0][0]):
        return bytes(packets[0])
    parts: list[Bytes] = [bytes((BATCH_TAG,))]
    for packet in packets:
        size = len(packet)
        if not 0 < size <= MAX_PACKET_SIZE:
            raise MalformedPacket(f"cannot frame a packet of {size} bytes (1..65535)")
        parts.append(size.to_bytes(FRAME_PREFIX, "big"))
        parts.append(packet)
    return b"".join(parts)


def decode_message(message: Bytes) -> list[bytes]:
    """The IP packets in one data-channel message; :class:`MalformedPacket` when the message
    is neither a raw IP packet nor a well-formed batch. The packets themselves are not
    checked here (see :meth:`PacketFilter.accept_incoming`)."""
    size = len(message)
    if size == 0:
        raise MalformedPacket("empty message")
    first = message[0]
    if _is_ip_start(first):
        return [bytes(message)]
    if first != BATCH_TAG:
        raise MalformedPacket(f"unknown message tag {first:#04x}")
    if size == 1:
        raise MalformedPacket("empty batch")
    view = memoryview(message)
    packets: list[bytes] = []
    pos = 1
    while pos < size:
        if pos + FRAME_PREFIX > size:
            raise MalformedPacket(f"batch ends inside a length prefix at offset {pos}")
        length = (message[pos] << 8) | message[pos + 1]
        pos += FRAME_PREFIX
        if length == 0:
            raise MalformedPacket(f"zero-length frame at offset {pos - FRAME_PREFIX}")
        end = pos + length
        if end > size:
            raise MalformedPacket(
                f"frame at offset {pos - FRAME_PREFIX} claims {length} bytes, {size - pos} left"
            )
        packets.append(bytes(view[pos:end]))
        pos = end
    return packets


# --- drops --------------------------------------------------------------------------------


class DropReason(str, Enum):
    """Why the data plane dropped a packet (the key of :class:`DropCounters`)."""

    #: Not IPv4/IPv6, truncated, or a broken batch (counted once per message).
    MALFORMED = "malformed"
    #: From a peer, with a source address outside that peer's allowed IPs.
    SOURCE_NOT_ALLOWED = "source-not-allowed"
    #: From a peer, to a destination that is neither this agent's tunnel address nor a
    #: network it forwards to (another address of the host, say).
    DESTINATION_NOT_ALLOWED = "destination-not-allowed"
    #: From the device, to a destination no peer's allowed IPs cover.
    NO_ROUTE = "no-route"
    #: Larger than the data channel's message limit or the configured packet limit.
    TOO_BIG = "too-big"
    #: The route names a peer whose channel is not open.
    NOT_CONNECTED = "not-connected"
    #: The channel's send buffer is full (unreliable channel: drop, never queue forever).
    CONGESTED = "congested"
    #: The device refused the write (e.g. the kernel rejected the packet).
    WRITE_FAILED = "write-failed"


class DropCounters:
    """Counts of dropped packets by :class:`DropReason`."""

    def __init__(self) -> None:
        self._counts: dict[DropReason, int] = dict.fromkeys(DropReason, 0)

    def add(self, reason: DropReason, count: int = 1) -> None:
        """Count ``count`` more drops for ``reason``."""
        self._counts[reason] += count

    def __getitem__(self, reason: DropReason) -> int:
        return self._counts[reason]

    @property
    def total(self) -> int:
        """All drops, whatever the reason."""
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """``{"malformed": 0, "no-route": 3, ...}`` with every reason present (for status)."""
        return {reason.value: count for reason, count in self._counts.items()}

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.as_dict().items() if v}
        return f"DropCounters({nonzero})"


# --- the data-plane policy ----------------------------------------------------------------


class PacketFilter:
    """Where packets go and which ones are dropped, for one TUN device.

    ``route_outgoing`` takes a packet read from the device and names the peer to send it to;
    ``accept_incoming`` says whether a packet received from a peer may be written to the
    device: its source must belong to that peer and, when ``destinations`` is given, its
    destination must be in that table (any owner). Every refusal is counted in :attr:`drops`.
    """

    def __init__(
        self, allowed_ips: AllowedIPs | None = None, *, max_packet_size: int = MAX_PACKET_SIZE,
        destinations: AllowedIPs | None = None,
    ) -> None:
        self.allowed_ips = allowed_ips if allowed_ips is not None else AllowedIPs()
        self.destinations = destinations
        self.max_packet_size = max_packet_size
        self.drops = DropCounters()

    def route_outgoing(self, packet: Bytes) -> str | None:
        """The peer id for a packet read from the device, or None (dropped and counted)."""
        try:
            header = parse_header(packet)
        except MalformedPacket:
            self.drops.add(DropReason.MALFORMED)
            return None
        if header.total_length > self.max_packet_size:
            self.drops.add(DropReason.TOO_BIG)
            return None
        peer = self.allowed_ips.lookup_int(header.version, header.dst)
        if peer is None:
            self.drops.add(DropReason.NO_ROUTE)
        return peer

    def route_batch(self, packets: Iterable[bytes]) -> dict[str, list[bytes]]:
        """:meth:`route_outgoing` for packets read together: the routed ones by peer, in
        order. A packet to the same destination as the one before it, when both are plain
        IPv4 (no options) and whole, skips the lookup: one flow's packets cost one lookup
        per batch. The checks are those of :meth:`route_outgoing`."""
        by_peer: dict[str, list[bytes]] = {}
        max_size = self.max_packet_size
        route = self.route_outgoing
        last_dst: bytes | None = None
        last: list[bytes] | None = None
        for packet in packets:
            size = len(packet)
            plain = (20 <= size <= max_size and packet[0] == 0x45
                     and (packet[2] << 8 | packet[3]) == size)
            if plain and last is not None and packet[16:20] == last_dst:
                last.append(packet)
                continue
            peer = route(packet)
            if peer is None:
                last = last_dst = None
                continue
            last = by_peer.setdefault(peer, [])
            last.append(packet)
            last_dst = packet[16:20] if plain else None
        return by_peer

    def accept_incoming(self, peer_id: str, packet: Bytes) -> bool:
        """Whether a packet received from ``peer_id`` may go to the device (counted if not)."""
        size = len(packet)
        if 20 <= size <= self.max_packet_size and packet[0] == 0x45 \
                and (packet[2] << 8 | packet[3]) == size:
            # Plain, whole IPv4 (most packets): what parse_header would find, without it.
            version, src = 4, int.from_bytes(packet[12:16], "big")
            dst = int.from_bytes(packet[16:20], "big")
        else:
            try:
                header = parse_header(packet)
            except MalformedPacket:
                self.drops.add(DropReason.MALFORMED)
                return False
            if header.total_length > self.max_packet_size:
                self.drops.add(DropReason.TOO_BIG)
                return False
            version, src, dst = header.version, header.src, header.dst
        if self.allowed_ips.lookup_int(version, src) != peer_id:
            self.drops.add(DropReason.SOURCE_NOT_ALLOWED)
            return False
        if self.destinations is not None and \
                self.destinations.lookup_int(version, dst) is None:
            self.drops.add(DropReason.DESTINATION_NOT_ALLOWED)
            return False
        return True

    def incoming_message(self, peer_id: str, message: Bytes) -> list[bytes]:
        """The packets of one message from ``peer_id`` that may go to the device."""
        try:
            packets = decode_message(message)
        except MalformedPacket:
            self.drops.add(DropReason.MALFORMED)
            return []
        return [p for p in packets if self.accept_incoming(peer_id, p)]

    def pack_messages(self, packets: Iterable[Bytes], max_message_size: int) -> list[bytes]:
        """Pack ``packets`` (all for one peer) into as few messages of at most
        ``max_message_size`` bytes as possible, in order; packets that cannot fit even alone
        are dropped as too big."""
        messages: list[bytes] = []
        batch: list[Bytes] = []
        batch_size = 1  # the tag byte
        for packet in packets:
            size = len(packet)
            if size == 0 or not _is_ip_start(packet[0]):
                self.drops.add(DropReason.MALFORMED)
                continue
            if size > max_message_size or size > MAX_PACKET_SIZE:
                self.drops.add(DropReason.TOO_BIG)
                continue
            framed = FRAME_PREFIX + size
            if batch and batch_size + framed > max_message_size:
                messages.append(encode_batch(batch))
                batch, batch_size = [], 1
            batch.append(packet)
            batch_size += framed
        if batch:
            messages.append(encode_batch(batch))
        return messages
