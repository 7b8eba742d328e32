"""One peer's TUN packets as protected datagrams on its ICE path, beside its tun channel.

:class:`DatagramLink` joins :class:`~mvpd.tun.datagram.DatagramProtection` (keys from the
DTLS exporter) and :class:`~mvpd.tun.ice_datagrams.IceDatagramSocket` for the tun transport
of one peer connection. It advertises the feature with hellos (at :data:`HELLO_DELAYS` after
the channel opens, until the peer answers) and is :attr:`~DatagramLink.active` once an
authenticated datagram came back; until then, and for good with a peer that never answers (an
older mvpd, a browser), the transport keeps sending on its data channel. Packets too big for
one unfragmented datagram on the current path also go on the channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .datagram import EXPORTER_LABEL, EXPORTER_LENGTH, OVERHEAD, DatagramProtection
from .ice_datagrams import IceDatagramSocket

log = logging.getLogger(__name__)

#: Seconds after the channel opened at which a hello goes out while the peer has not answered.
HELLO_DELAYS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class DatagramLink:
    """The datagram path of one tun transport (see the module docstring).

    ``deliver`` gets each authenticated IP packet; the caller checks it like any other
    packet from the peer (allowed IPs).
    """

    def __init__(
        self, sock: IceDatagramSocket, protection: DatagramProtection,
        deliver: Callable[[bytes], None],
    ) -> None:
        self.sock = sock
        self.protection = protection
        self._deliver = deliver
        self._hello_handles: list[asyncio.TimerHandle] = []
        self._confirmed = False
        self.closed = False

    @classmethod
    def open(cls, channel: Any, deliver: Callable[[bytes], None]) -> DatagramLink:
        """Hook the connection under ``channel`` (open) and start advertising; raises
        :class:`LookupError` saying why when there is no datagram path."""
        sock = IceDatagramSocket.for_channel(channel, lambda datagram: None)
        try:
            material = sock.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH)
            protection = DatagramProtection(material, dtls_client=sock.dtls_client)
        except Exception as exc:
            sock.close()
            raise LookupError(f"no DTLS keying material: {exc}") from exc
        link = cls(sock, protection, deliver)
        sock.on_datagram = link._received
        link._advertise()
        return link

    @property
    def active(self) -> bool:
        """The peer answered: packets go as datagrams."""
        return self.protection.peer_confirmed and not self.closed

    @property
    def max_packet_size(self) -> int:
        """The largest IP packet one unfragmented datagram carries on the current pair."""
        return self.sock.max_datagram_size() - OVERHEAD

    # --- sending -------------------------------------------------------------------------

    def send_packets(self, packets: list[bytes]) -> list[bytes]:
        """Send what fits in a datagram; return the packets that do not (for the channel).
        Datagrams the socket cannot take are dropped and counted."""
        limit = self.max_packet_size
        seal = self.protection.seal
        datagrams = []
        too_big = []
        for packet in packets:
            if len(packet) > limit:
                too_big.append(packet)
            else:
                datagrams.append(seal(packet))
        if datagrams:
            unsent = self.sock.send(datagrams)
            if unsent:
                self.protection.stats.dropped += unsent
        return too_big

    def _advertise(self) -> None:
        loop = asyncio.get_running_loop()
        self._hello_handles = [loop.call_later(delay, self._send_hello) for delay in HELLO_DELAYS]

    def _send_hello(self) -> None:
        if self.closed or self.protection.peer_confirmed:
            self._cancel_hellos()
            return
        self.sock.send([self.protection.hello()])

    def _cancel_hellos(self) -> None:
        for handle in self._hello_handles:
            handle.cancel()
        self._hello_handles = []

    # --- receiving -----------------------------------------------------------------------

    def _received(self, datagram: bytes) -> None:
        protection = self.protection
        packet = protection.open(datagram)
        if packet is not None:
            self._deliver(packet)
        elif protection.replies_due:
            self.sock.send([protection.reply() for _ in range(protection.replies_due)])
        if not self._confirmed and protection.peer_confirmed:
            self._confirmed = True
            self._cancel_hellos()
            log.info("TUN datagram path in use: %s", self.sock.describe())

    # --- status and end ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Path, session id (equal on both ends, new per connection), epochs, counters."""
        return {
            "active": self.active,
            "ice_pair": self.sock.describe(),
            "session_id": self.protection.session_id,
            "send_epoch": self.protection.send_epoch,
            "receive_epoch": self.protection.receive_epoch,
            "max_packet": self.max_packet_size,
            **self.protection.stats.as_dict(),
        }

    def close(self) -> None:
        """Stop advertising and unhook the ICE connection."""
        if self.closed:
            return
        self.closed = True
        self._cancel_hellos()
        self.sock.close()
