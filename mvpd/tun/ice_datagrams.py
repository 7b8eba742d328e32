"""Raw datagrams on an aiortc peer connection's nominated ICE pair, beside DTLS.

What this needs of aiortc's and aioice's insides (the DTLS session's keying material and
role, the nominated candidate pair, each local candidate's ``datagram_received``) comes from
:mod:`mvpd.rtc.aiortc_internals`, behind its version gate, like everything else of theirs
that mvpd reaches.

Receiving: :class:`IceDatagramSocket` hooks each local candidate's protocol
(:func:`~mvpd.rtc.aiortc_internals.hook_datagrams`) to take datagrams whose first byte is
:data:`~mvpd.tun.datagram.PACKET_TYPE` and pass everything else on unchanged. That is the
RFC 7983 demultiplexer RTCDtlsTransport runs on the same stream later (it ignores our byte),
moved in front of aioice's STUN parser (which would raise on each of ours) and its receive
queue (a queue hop and a task switch per datagram). Datagrams are taken from any source
address, as aioice does: the AEAD tag, not the address, decides what is ours. Sending: on a
host or server-reflexive pair, straight on the UDP socket under the pair's transport
(``get_extra_info("socket")``, a duplicate descriptor), a batch at a time with UDP
segmentation offload (:mod:`mvpd.udp_batch`), while the event loop's transport has nothing
buffered (else behind it, to keep the order); through a TURN relay, ``sendto`` on aioice's
TURN transport, which wraps each datagram in ChannelData. Nothing here changes what DTLS,
SCTP or STUN see.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from ..rtc import aiortc_internals as internals
from ..rtc.errors import UnsupportedLibrary
from ..udp_batch import TransportBatchSenders, UdpBatchSender
from .datagram import PACKET_TYPE

log = logging.getLogger(__name__)

#: Off: every tun connection stays on its data channel (benchmarks, tests).
ENABLED = True
#: The path MTU assumed for the outer datagrams (Ethernet).
PATH_MTU = 1500
#: Bytes a TURN relay adds (a UDP ChannelData header; over TCP it is padded to 4 bytes).
TURN_OVERHEAD = 4
#: Socket buffers asked for the ICE socket carrying datagrams (the kernel may cap them).
SOCKET_BUFFER = 4 * 1024 * 1024
#: Datagrams wait in the event loop's buffer beyond the socket's only up to this much; more
#: are dropped (a full interface queue), so the buffer never grows without bound.
MAX_WRITE_BUFFER = 256 * 1024
#: Off: one ``sendto`` per datagram on the event loop's transport (benchmarks, tests).
BATCH_SEND = True

_ICE_COMPONENT = 1


def unavailable_reason() -> str | None:
    """Why the datagram path cannot be used in this process, or None."""
    if not ENABLED:
        return "turned off"
    try:
        internals.check_versions()
    except UnsupportedLibrary as exc:
        return str(exc)
    return None


class IceDatagramSocket:
    """Datagrams on the nominated candidate pair of the connection under one data channel.

    Build it with :meth:`for_channel` once the channel is open; ``on_datagram`` is called
    (synchronously, from aioice's protocol) with each received datagram of ours. :meth:`close`
    unhooks it.
    """

    def __init__(self, dtls: Any, on_datagram: Callable[[bytes], None]) -> None:
        self._dtls = dtls
        #: The nominated pair of each ICE component (aiortc_internals.nominated_pairs).
        self._nominated = internals.nominated_pairs(dtls.transport)
        #: A batch sender per pair transport with a UDP socket (not a TURN relay's).
        self._senders = TransportBatchSenders(on_new=_enlarge_buffers)
        self.closed = False
        #: Called with each received datagram of ours (may be replaced, e.g. by the link).
        self.on_datagram = on_datagram
        # SCTP's synchronous receive path may have hooked the selected pair already
        # (aiortc_internals.receive_data_now): it gets our leftovers, and is put back when
        # we unhook. Raises LookupError when hooked already.
        self._hooks = internals.hook_datagrams(dtls.transport, self._hook)

    def _hook(self, original: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
        def datagram_received(data: bytes, addr: Any) -> None:
            if data and data[0] == PACKET_TYPE and not self.closed:
                try:
                    self.on_datagram(data)
                except Exception:  # never let it reach aioice's protocol
                    log.exception("TUN datagram handler failed")
                return
            original(data, addr)

        return datagram_received

    @classmethod
    def for_channel(
        cls, channel: Any, on_datagram: Callable[[bytes], None]
    ) -> IceDatagramSocket:
        """Hook the connection under ``channel`` (an open aiortc RTCDataChannel); raises
        :class:`LookupError` saying why when it cannot."""
        reason = unavailable_reason()
        if reason is not None:
            raise LookupError(reason)
        try:
            dtls = channel.transport.transport
            if not internals.dtls_connected(dtls):
                raise LookupError("the DTLS connection is not established")
            return cls(dtls, on_datagram)
        except AttributeError as exc:
            raise LookupError(f"unexpected aiortc internals: {exc}") from exc

    # --- keys ----------------------------------------------------------------------------

    @property
    def dtls_client(self) -> bool:
        """Whether this end is the DTLS client (picks the sending key)."""
        return internals.dtls_role(self._dtls) == "client"

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        """RFC 5705 keying material of the DTLS connection (no context)."""
        return internals.export_keying_material(self._dtls, label, length)

    # --- sending -------------------------------------------------------------------------

    def _pair(self) -> Any:
        if self.closed:
            return None
        return self._nominated.get(_ICE_COMPONENT)

    def send(self, datagrams: list[bytes]) -> int:
        """Send each datagram on the nominated pair; return how many were not sent (no pair,
        transport closing, the event loop's buffer full, or a send error)."""
        pair = self._pair()
        if pair is None:
            return len(datagrams)
        transport = pair.protocol.transport
        addr = pair.remote_addr
        # aioice's TURN transport has neither (it sends each datagram in a task of its own).
        is_closing = getattr(transport, "is_closing", None)
        buffered = getattr(transport, "get_write_buffer_size", None)
        if is_closing is not None and is_closing():
            return len(datagrams)
        waiting = buffered() if buffered is not None else 0
        if waiting > MAX_WRITE_BUFFER:  # once per batch
            return len(datagrams)
        sender = self._senders.get(transport)  # made (and its socket tuned) on first use
        if sender is not None and BATCH_SEND and not waiting:
            return sender.send(datagrams, addr)
        sendto = transport.sendto
        for datagram in datagrams:
            sendto(datagram, addr)
        return 0

    def max_datagram_size(self) -> int:
        """The largest datagram that crosses a :data:`PATH_MTU` path unfragmented on the
        current pair (IPv4 or IPv6, and a TURN relay's header)."""
        pair = self._pair()
        if pair is None:
            return PATH_MTU - 40 - 8 - TURN_OVERHEAD
        ip_header = 40 if ":" in str(pair.remote_addr[0]) else 20
        relay = TURN_OVERHEAD if self.local_type() == "relay" else 0
        return PATH_MTU - ip_header - 8 - relay

    def local_type(self) -> str | None:
        """The nominated pair's local candidate type (host, srflx, prflx, relay)."""
        pair = self._pair()
        return None if pair is None else str(pair.protocol.local_candidate.type)

    def describe(self) -> str:
        """The nominated pair, for status."""
        pair = self._pair()
        if pair is None:
            return "no nominated ICE pair"
        local = pair.protocol.local_candidate
        return (f"{local.type} {local.host}:{local.port} -> "
                f"{pair.remote_candidate.type} {pair.remote_addr[0]}:{pair.remote_addr[1]}")

    def batch_senders(self) -> list[UdpBatchSender]:
        """The batch senders made so far (one per pair transport with a UDP socket)."""
        return self._senders.senders()

    def close(self) -> None:
        """Give aioice's protocols their own ``datagram_received`` back."""
        if self.closed:
            return
        self.closed = True
        self._senders.close()
        self._hooks.remove()


def _enlarge_buffers(sock: socket.socket) -> None:
    """Larger buffers for the socket that now carries a tunnel's packets (beyond
    net.core.rmem_max/wmem_max where the daemon may: CAP_NET_ADMIN)."""
    for option, forced in ((socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
                           (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None))):
        for opt in (forced, option):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                break
            except OSError:  # FORCE needs CAP_NET_ADMIN
                continue
