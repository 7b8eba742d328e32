"""Every use of aiortc's and aioice's private attributes, in one place, behind one version gate.

aiortc's ORTC objects (RTCIceGatherer, RTCIceTransport, RTCDtlsTransport) are public, but
composing them with an SCTP stack of our own, and carrying the tunnel's datagrams beside DTLS
(:mod:`mvpd.tun.ice_datagrams`), needs a few of their insides:

* the ICE role, which aiortc sets on its aioice ``Connection`` from RTCPeerConnection;
* the DTLS role, set with ``RTCDtlsTransport._set_role`` and read from ``_role``;
* DTLS application data: ``_register_data_receiver`` (the receiver's ``_handle_data`` gets
  each decrypted datagram) and ``_send_data``, or, synchronously, the DTLS ``SSL.Connection``
  (``_ssl``; its records sealed and opened through pyOpenSSL's own OpenSSL bindings, see
  :data:`RAW_RECORDS_PYOPENSSL`) and the nominated pair's protocol and its transport
  (:func:`send_data_now`), and the selected pair's ``datagram_received``
  (:func:`receive_data_now`);
* the nominated candidate pair (``Connection._nominated``) for status, STUN checks on it
  for liveness, and the tunnel's datagrams (:func:`nominated_pairs`);
* RFC 5705 keying-material export on the DTLS ``SSL.Connection`` (``_ssl``);
* the candidates' UDP sockets (``Connection._protocols``), for their buffer sizes;
* every local candidate's ``datagram_received`` (``Connection._protocols``), which the TUN
  datagram path hooks to take its datagrams before aioice's STUN parser
  (:func:`hook_datagrams`);
* the gathered local candidates (``Connection._local_candidates``) and their sockets, to
  drop those ICE must not use (:func:`drop_local_candidates`): aioice 0.13 gathers on every
  interface address and has no filter of its own;
* the connection's handler of incoming STUN checks (``Connection.request_received``), to
  refuse checks from addresses ICE must not use (:func:`refuse_checks_from`), which aioice
  would otherwise learn as peer-reflexive candidates.

What that reaches, from a data channel::

    DataChannel.transport               mvpd's SCTP transport (or aiortc's RTCSctpTransport)
      .transport                        RTCDtlsTransport      (public)
        ._ssl, ._role, ._state          its pyOpenSSL Connection, role and state
        .transport                      RTCIceTransport       (public)
          ._connection                  aioice Connection
            ._nominated[1]              the nominated CandidatePair: .protocol.transport is
                                        the UDP (or TURN) transport, .remote_addr the peer
            ._protocols                 its StunProtocols, one per local candidate, whose
                                        datagram_received gets every datagram (a TURN
                                        relay's unwrapped ones too)

Two hooks may sit on a protocol's ``datagram_received`` at once, SCTP's fast receiver and
the tunnel's, in either order: each passes on what it does not take to what it replaced,
and, when removed, puts back exactly that, or, if hooked over since, stays in the chain
passing everything on (:func:`_put_in_front`, :func:`_take_out`).

They are only valid for the aiortc and aioice versions in :data:`SUPPORTED`, the ones the
tests ran with (pyproject.toml pins the same ranges). :func:`check_versions` refuses others
(a peer connection checks when it is made, the TUN datagram path before it hooks), and
:func:`check_objects` verifies that the attributes are where this module expects them.
"""

from __future__ import annotations

import importlib.metadata
import socket
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aioice.ice import StunProtocol
from aioice.stun import TransactionError
from aiortc import RTCDtlsTransport, RTCIceGatherer, RTCIceTransport
from aiortc.rtcdtlstransport import State as DtlsState
from OpenSSL import SSL

from ..udp_batch import TransportBatchSenders
from .errors import RtcError, UnsupportedLibrary

#: Distribution -> the (major, minor) versions whose insides this module knows.
SUPPORTED: dict[str, tuple[int, int]] = {"aiortc": (1, 16), "aioice": (0, 13)}


def parse_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``1.16.0`` or ``0.13.0rc1``."""
    parts = text.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "x")
    except (IndexError, ValueError):
        raise UnsupportedLibrary(f"cannot read the version {text!r}") from None


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Raise :class:`UnsupportedLibrary` unless aiortc and aioice are supported versions.

    ``installed`` maps distribution names to versions (default: what is installed, checked
    once per process).
    """
    global _checked
    if installed is None and _checked:
        return
    for name, wanted in SUPPORTED.items():
        fix = f"pip install '{name}>={wanted[0]}.{wanted[1]},<{wanted[0]}.{wanted[1] + 1}'"
        try:
            version = (
                installed[name] if installed is not None else importlib.metadata.version(name)
            )
        except importlib.metadata.PackageNotFoundError:
            raise UnsupportedLibrary(f"{name} is not installed ({fix})") from None
        if parse_version(version) != wanted:
            raise UnsupportedLibrary(
                f"{name} {version} is installed, but mvpd's WebRTC stack uses private parts "
                f"of {name} {wanted[0]}.{wanted[1]}.x only; install that ({fix})"
            )
    if installed is None:
        _checked = True


_checked = False


class DataReceiver(Protocol):
    """What aiortc's DTLS transport hands decrypted application data to."""

    async def _handle_data(self, data: bytes) -> None: ...


def check_objects(
    gatherer: RTCIceGatherer, ice: RTCIceTransport, dtls: RTCDtlsTransport
) -> None:
    """Raise :class:`UnsupportedLibrary` if the private attributes used here are missing."""
    connection = getattr(gatherer, "_connection", None)
    missing = [
        f"{type(obj).__name__}.{name}"
        for obj, names in (
            (gatherer, ("_connection",)),
            (ice, ("_connection", "_role_set")),
            (dtls, ("_set_role", "_register_data_receiver", "_unregister_data_receiver",
                    "_send_data", "_role", "_state", "_ssl")),
            (connection, ("ice_controlling", "_nominated", "build_request",
                          "remote_password", "_local_candidates", "_protocols",
                          "request_received")),
        )
        for name in names
        if not hasattr(obj, name)
    ]
    if missing:
        raise UnsupportedLibrary(f"aiortc/aioice lack {', '.join(missing)}")


# --- ICE -----------------------------------------------------------------------------------


def set_ice_controlling(ice: RTCIceTransport, controlling: bool) -> None:
    """Set the ICE role before ``ice.start()`` (RFC 8445: the offerer controls)."""
    ice._connection.ice_controlling = controlling
    ice._role_set = True


@dataclass(frozen=True)
class CandidateInfo:
    """One side of the selected candidate pair."""

    type: str  # host, srflx, prflx, relay
    protocol: str
    address: str
    port: int
    sdp: str


@dataclass(frozen=True)
class SelectedPair:
    """The candidate pair ICE nominated."""

    local: CandidateInfo
    remote: CandidateInfo

    @property
    def path(self) -> str:
        """``relayed`` when either end is a TURN relay, else ``direct``."""
        return "relayed" if "relay" in (self.local.type, self.remote.type) else "direct"


def selected_pair(ice: RTCIceTransport) -> SelectedPair | None:
    """The nominated pair of component 1, once ICE has one."""
    nominated = getattr(ice._connection, "_nominated", None) or {}
    pair = nominated.get(1)
    if pair is None:
        return None
    return SelectedPair(
        _candidate_info(pair.local_candidate), _candidate_info(pair.remote_candidate)
    )


#: What :func:`probe_selected_pair` raises when the check went unanswered.
ProbeUnanswered = TransactionError


async def probe_selected_pair(ice: RTCIceTransport, *, retransmissions: int) -> bool:
    """One authenticated STUN binding check on the selected pair, as consent freshness
    sends (RFC 7675); the remote ICE agent answers it however busy its channels are.

    ``True`` once answered, ``False`` when there is no selected pair yet; raises
    :data:`ProbeUnanswered` when no answer came after
    ``retransmissions`` retransmissions.
    """
    connection = ice._connection
    pair = connection._nominated.get(1)
    if pair is None or connection.remote_password is None:
        return False
    request = connection.build_request(pair, nominate=False)
    await pair.protocol.request(
        request,
        pair.remote_addr,
        integrity_key=connection.remote_password.encode("utf8"),
        retransmissions=retransmissions,
    )
    return True


#: The SCTP packet size of WebRTC stacks when the path is unknown: with IPv6, UDP and DTLS
#: it fits the 1280-byte minimum MTU of IPv6, so it crosses any path unfragmented.
DEFAULT_SCTP_PACKET_SIZE = 1200
#: aiortc reads at most 1500 bytes of each DTLS record's plaintext: no larger SCTP packet.
MAX_SCTP_PACKET_SIZE = 1500
#: IPv6 (40) and UDP (8) headers, and a DTLS 1.2 record's worst overhead among aiortc's
#: cipher suites (AES-CBC with SHA-1: 13 header + 16 IV + 20 MAC + up to 16 padding).
_PACKET_OVERHEAD = 40 + 8 + 80
_IP_MTU, _IPV6_MTU = 14, 24  # Linux getsockopt options (not in Python's socket module)


def sctp_packet_size(ice: RTCIceTransport) -> int:
    """The SCTP packet size for the selected pair: the path MTU less IP, UDP and DTLS
    overhead (at most :data:`MAX_SCTP_PACKET_SIZE`) when both candidates are host
    candidates, so the route to the peer's address is this host's own (a LAN, loopback,
    a veth); :data:`DEFAULT_SCTP_PACKET_SIZE` otherwise (NAT, relays, unknown links).

    The path MTU is what the kernel's routing knows for the peer's address (IP_MTU of a
    UDP socket connected to it: the interface MTU, or a smaller learnt path MTU).
    """
    pair = selected_pair(ice)
    if pair is None or pair.local.type != "host" or pair.remote.type != "host":
        return DEFAULT_SCTP_PACKET_SIZE
    if pair.local.protocol.lower() != "udp":
        return DEFAULT_SCTP_PACKET_SIZE
    try:
        family = socket.AF_INET6 if ":" in pair.remote.address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((pair.remote.address, pair.remote.port))  # sends nothing
            level, option = ((socket.IPPROTO_IPV6, _IPV6_MTU) if family == socket.AF_INET6
                             else (socket.IPPROTO_IP, _IP_MTU))
            mtu = sock.getsockopt(level, option)
    except OSError:
        return DEFAULT_SCTP_PACKET_SIZE
    return max(DEFAULT_SCTP_PACKET_SIZE, min(MAX_SCTP_PACKET_SIZE, mtu - _PACKET_OVERHEAD))


def set_socket_buffers(ice: RTCIceTransport, size: int) -> int:
    """Set SO_RCVBUF and SO_SNDBUF to ``size`` on the UDP sockets of the local candidates
    (the kernel caps them at net.core.rmem_max/wmem_max); the number of sockets set.

    SCTP sends a window of packets in a burst: with the default ~200 KiB receive buffer a
    busy receiver drops part of it, and each drop costs a retransmission.
    """
    count = 0
    for protocol in getattr(ice._connection, "_protocols", []):
        transport = getattr(protocol, "transport", None)
        try:
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is None or sock.type != socket.SOCK_DGRAM:
                continue  # a TURN relay's TCP/TLS connection, or no socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except (AttributeError, OSError):
            continue
        count += 1
    return count


def drop_local_candidates(
    gatherer: RTCIceGatherer, excluded: Callable[[str], bool]
) -> list[CandidateInfo]:
    """Forget the gathered local candidates whose address, or base (the related address
    of a server-reflexive or relayed one), ``excluded`` says ICE must not use, and close
    the sockets of those that had one of their own; the candidates dropped.

    Call it after gathering and before the description is made: nothing has been paired
    with these candidates yet (aioice pairs every socket in ``_protocols`` with each remote
    candidate), and the peer never hears of them.
    """
    connection = gatherer._connection

    def unusable(candidate: Any) -> bool:
        related = getattr(candidate, "related_address", None)
        return excluded(str(candidate.host)) or (related is not None and excluded(str(related)))

    dropped = [c for c in connection._local_candidates if unusable(c)]
    if not dropped:
        return []
    connection._local_candidates = [
        c for c in connection._local_candidates if not unusable(c)
    ]
    kept_protocols = []
    for protocol in connection._protocols:
        candidate = getattr(protocol, "local_candidate", None)
        if candidate is not None and unusable(candidate):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.close()
        else:
            kept_protocols.append(protocol)
    connection._protocols = kept_protocols
    return [_candidate_info(c) for c in dropped]


def refuse_checks_from(ice: RTCIceTransport, excluded: Callable[[str], bool]) -> None:
    """Ignore incoming STUN checks whose source address ``excluded`` says ICE must not use:
    no answer, and no peer-reflexive candidate learnt from them."""
    connection = ice._connection
    handle = connection.request_received

    def request_received(message: Any, addr: tuple[Any, ...], protocol: Any) -> None:
        if excluded(str(addr[0])):
            return
        handle(message, addr, protocol)

    connection.request_received = request_received  # type: ignore[method-assign]


def _candidate_info(candidate: Any) -> CandidateInfo:
    return CandidateInfo(
        type=str(candidate.type),
        protocol=str(candidate.transport),
        address=str(candidate.host),
        port=int(candidate.port),
        sdp=str(candidate.to_sdp()),
    )


# --- DTLS ----------------------------------------------------------------------------------


def set_dtls_role(dtls: RTCDtlsTransport, role: str) -> None:
    """``client`` or ``server``, before ``dtls.start()`` (from a=setup, RFC 8842)."""
    if role not in ("client", "server"):
        raise ValueError(f"the DTLS role is 'client' or 'server', not {role!r}")
    dtls._set_role(role)


def dtls_role(dtls: RTCDtlsTransport) -> str:
    """``client`` or ``server`` (``auto`` until the role is set or DTLS starts)."""
    return str(dtls._role)


def register_data_receiver(dtls: RTCDtlsTransport, receiver: DataReceiver) -> None:
    """Have ``receiver._handle_data(data)`` called with each DTLS application datagram."""
    dtls._register_data_receiver(receiver)


def unregister_data_receiver(dtls: RTCDtlsTransport, receiver: DataReceiver) -> None:
    dtls._unregister_data_receiver(receiver)


async def send_data(dtls: RTCDtlsTransport, data: bytes) -> None:
    """Encrypt ``data`` as one DTLS record and send it on the selected pair.

    Raises ``ConnectionError`` when DTLS or ICE is not connected. ``data`` must fit one
    datagram with DTLS overhead (aiortc reads 1500 bytes per record).
    """
    await dtls._send_data(data)


#: The largest DTLS record read back from OpenSSL: one SCTP packet (at most 64 KiB) plus
#: the record's header, IV, MAC and padding.
_MAX_RECORD = 65536 + 256


# --- DTLS records straight through OpenSSL --------------------------------------------------

#: The pyOpenSSL (major, minor) whose ``Connection`` insides (``_ssl``, ``_from_ssl``,
#: ``_into_ssl``) and cffi bindings (``OpenSSL._util.lib``/``ffi``) :func:`seal_record` and
#: :func:`open_record` call directly: about 2 us less per record each way than the public
#: methods, which check and convert around the same OpenSSL calls. Other versions take the
#: public methods (same records, same errors as far as mvpd tells them apart).
RAW_RECORDS_PYOPENSSL = (26, 4)
_RAW_FUNCTIONS = ("SSL_write", "SSL_read", "BIO_read", "BIO_write", "ERR_clear_error")


def _load_raw_openssl() -> tuple[Any, Any] | None:
    try:
        if parse_version(importlib.metadata.version("pyOpenSSL")) != RAW_RECORDS_PYOPENSSL:
            return None
        from OpenSSL._util import ffi, lib
    except (ImportError, importlib.metadata.PackageNotFoundError, UnsupportedLibrary):
        return None
    if not all(hasattr(lib, name) for name in _RAW_FUNCTIONS):
        return None
    return lib, ffi


#: OpenSSL's ``lib`` and ``ffi`` as pyOpenSSL binds them, or None: use the public methods.
raw_openssl = _load_raw_openssl()
_buffers = threading.local()


def _record_buffer() -> Any:
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        assert raw_openssl is not None
        buffer = _buffers.buffer = raw_openssl[1].new("unsigned char[]", _MAX_RECORD)
    return buffer


def seal_record(ssl: SSL.Connection, packet: bytes) -> bytes | None:
    """``packet`` as one DTLS application-data record of the connection ``ssl`` (None when
    OpenSSL wrote nothing); ``ConnectionError`` when the session cannot send (closing)."""
    raw = raw_openssl
    if raw is None:
        try:
            ssl.send(packet)
        except SSL.Error as exc:
            raise ConnectionError(f"DTLS cannot send: {exc}") from None
        try:
            return ssl.bio_read(_MAX_RECORD)
        except SSL.Error:
            return None  # as aiortc's _write_ssl: nothing to send
    lib, ffi = raw
    if type(packet) is not bytes:
        packet = bytes(packet)
    if lib.SSL_write(ssl._ssl, packet, len(packet)) <= 0:
        lib.ERR_clear_error()  # what pyOpenSSL would have turned into the exception
        raise ConnectionError("DTLS cannot send (the session is closing)")
    buffer = _record_buffer()
    size = lib.BIO_read(ssl._from_ssl, buffer, _MAX_RECORD)
    if size <= 0:
        lib.ERR_clear_error()
        return None
    return ffi.buffer(buffer, size)[:]  # type: ignore[no-any-return]


def open_record(ssl: SSL.Connection, record: bytes) -> bytes | None:
    """The plaintext of the DTLS record ``record`` received on ``ssl``; None when there is
    none (not authentic, a replay, a fragment: OpenSSL drops it)."""
    raw = raw_openssl
    if raw is None:
        ssl.bio_write(record)
        try:
            return ssl.recv(_MAX_RECORD)
        except SSL.Error:
            return None
    lib, ffi = raw
    lib.BIO_write(ssl._into_ssl, record, len(record))
    buffer = _record_buffer()
    size = lib.SSL_read(ssl._ssl, buffer, _MAX_RECORD)
    if size <= 0:
        lib.ERR_clear_error()
        return None
    return ffi.buffer(buffer, size)[:]  # type: ignore[no-any-return]


def send_data_now(
    dtls: RTCDtlsTransport, packets: Sequence[bytes],
    senders: TransportBatchSenders | None = None,
) -> bool:
    """Encrypt each of ``packets`` as one DTLS record and hand the records to the selected
    pair's socket now, without the four coroutine layers of :func:`send_data`; ``False``
    (nothing done) when the pair's protocol is not aioice's plain
    :class:`~aioice.ice.StunProtocol`: use :func:`send_data` then.  Raises
    ``ConnectionError`` when DTLS or ICE is not connected.

    It is what ``_send_data`` does, step by step: ``_write_ssl`` reads the record from the
    memory BIO, the ICE connection's ``send`` looks up the nominated pair and its protocol's
    ``send_data`` calls ``transport.sendto``, all without ever waiting.  With ``senders``
    the records of a batch leave in as few system calls as the kernel allows (UDP
    segmentation offload on a duplicate of the pair's socket,
    :class:`~mvpd.udp_batch.TransportBatchSenders`), still one datagram per record on the
    wire; while the event loop's transport holds unsent datagrams they go behind those,
    through its ``sendto``, so the order is kept.  A relayed pair's transport is aioice's
    ``TurnTransport`` (no socket of its own), whose ``sendto`` wraps each record for the
    TURN server (ChannelData, binding the channel first) as before.
    """
    ssl = dtls._ssl
    if dtls._state != DtlsState.CONNECTED or ssl is None:
        raise ConnectionError("Cannot send encrypted data, not connected")
    pair = dtls.transport._connection._nominated.get(1)
    if pair is None:
        raise ConnectionError("Cannot send data, not connected")
    protocol = pair.protocol
    transport = protocol.transport
    if type(protocol) is not StunProtocol or transport is None:
        return False
    records = []
    for packet in packets:
        record = seal_record(ssl, packet)
        if record is not None:
            records.append(record)
    addr = pair.remote_addr
    sender = senders.get(transport) if senders is not None else None
    # A UDP transport has it (only aioice's TURN transport has not, and no sender either).
    if sender is not None and not getattr(transport, "get_write_buffer_size", int)():
        sender.send(records, addr)
    else:
        sendto = transport.sendto
        for record in records:
            sendto(record, addr)
    return True


#: What aioice's protocols call with each datagram and its source address.
DatagramReceived = Callable[[bytes, Any], None]


def _put_in_front(protocol: Any, hook: DatagramReceived) -> DatagramReceived | None:
    """Make ``hook`` the ``datagram_received`` of aioice's ``protocol``; the instance
    attribute it replaced (None: aioice's class method). ``hook`` must pass on what it does
    not take to what ``protocol.datagram_received`` was before."""
    replaced: DatagramReceived | None = vars(protocol).get("datagram_received")
    protocol.datagram_received = hook
    return replaced


def _take_out(protocol: Any, hook: DatagramReceived, replaced: DatagramReceived | None) -> None:
    """Undo :func:`_put_in_front`: put back exactly what ``hook`` replaced, unless another
    hook went over it since; then ``hook`` stays in that chain and must pass everything on."""
    if vars(protocol).get("datagram_received") is not hook:
        return
    if replaced is None:
        del protocol.datagram_received
    else:
        protocol.datagram_received = replaced


#: The DTLS content type of application data (RFC 6347 4.1, RFC 5246 6.2.1).
_APPLICATION_DATA = b"\x17"


class _FastReceiver:
    """The selected pair's ``datagram_received`` while :func:`receive_data_now` is on.

    It decrypts DTLS application data for ``receiver`` and hands everything else to the
    method it replaced: aioice's own, or a hook that was there first (the TUN datagram
    path's). Once stopped it passes everything on, so a hook installed over it later keeps
    working."""

    def __init__(
        self, dtls: RTCDtlsTransport, protocol: Any, receiver: Callable[[bytes], None]
    ) -> None:
        self.dtls = dtls
        self.protocol = protocol
        self.receiver = receiver
        self.next = protocol.datagram_received
        self.active = True
        #: What :func:`_put_in_front` replaced, to be put back.
        self.replaced = _put_in_front(protocol, self)

    def __call__(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        dtls = self.dtls
        ssl = dtls._ssl
        if (not self.active or type(data) is not bytes or data[:1] != _APPLICATION_DATA
                or dtls._state != DtlsState.CONNECTED or ssl is None):
            self.next(data, addr)
            return
        plaintext = open_record(ssl, data)  # None: dropped, as aiortc does
        if plaintext:
            self.receiver(plaintext)

    def stop(self) -> None:
        self.active = False
        _take_out(self.protocol, self, self.replaced)


#: The fast receivers on, per DTLS transport.
_fast_receivers: weakref.WeakKeyDictionary[RTCDtlsTransport, _FastReceiver] = (
    weakref.WeakKeyDictionary()
)


def receive_data_now(dtls: RTCDtlsTransport, receiver: Callable[[bytes], None]) -> bool:
    """Decrypt application-data records as the socket delivers them and call
    ``receiver(plaintext)`` at once, instead of aioice's STUN parse attempt, its queue and
    aiortc's receive coroutine (four awaits per datagram).  Call it once DTLS is connected;
    ``False`` (nothing changed) when there is no selected pair on aioice's
    :class:`~aioice.ice.StunProtocol` then.

    It takes over the selected pair's ``datagram_received`` (a relayed pair's protocol gets
    its datagrams from aioice's TURN client through the same method): DTLS application
    data (content type 23) is decrypted here; everything else (STUN consent checks,
    handshake records, alerts such as close_notify) goes on to what was there before
    (aioice, and aiortc behind it).  :func:`stop_receiving_now` undoes it.
    """
    pair = dtls.transport._connection._nominated.get(1)
    if pair is None or type(pair.protocol) is not StunProtocol:
        return False
    stop_receiving_now(dtls)
    _fast_receivers[dtls] = _FastReceiver(dtls, pair.protocol, receiver)
    return True


def stop_receiving_now(dtls: RTCDtlsTransport) -> None:
    """Every datagram takes the path it took before :func:`receive_data_now` again (hooks
    installed over it since stay)."""
    hook = _fast_receivers.pop(dtls, None)
    if hook is not None:
        hook.stop()


# --- Datagrams of our own beside DTLS (the TUN datagram path) -------------------------------

#: The attribute that marks a hook of :func:`hook_datagrams`.
_DATAGRAM_HOOK = "mvpd_datagram_hook"


def dtls_connected(dtls: RTCDtlsTransport) -> bool:
    """Whether the DTLS session is established, as client or server (keys can be exported)."""
    return (dtls._ssl is not None and dtls._role in ("client", "server")
            and dtls.state == "connected")


def nominated_pairs(ice: RTCIceTransport) -> Mapping[int, Any]:
    """The nominated pair of each ICE component (WebRTC has component 1 only): aioice's
    ``CandidatePair``, whose ``protocol.transport`` is the pair's UDP transport (or aioice's
    TURN transport, which wraps each datagram in ChannelData), ``remote_addr`` the peer's
    address, ``local_candidate`` and ``remote_candidate`` its ends; none before nomination
    or after close.

    Fetch it once and look it up per send: aioice fills and clears this same dict for the
    connection's whole life."""
    nominated: Mapping[int, Any] = ice._connection._nominated
    return nominated


class DatagramHooks:
    """The hooks :func:`hook_datagrams` put on one ICE connection's protocols."""

    def __init__(self, hooked: list[tuple[Any, DatagramReceived, DatagramReceived | None]]) -> None:
        #: (protocol, hook, what it replaced).
        self._hooked = hooked

    def remove(self) -> None:
        """Give each protocol what the hook replaced back (see :func:`_take_out`)."""
        for protocol, hook, replaced in self._hooked:
            _take_out(protocol, hook, replaced)
        self._hooked = []


def hook_datagrams(
    ice: RTCIceTransport, wrap: Callable[[DatagramReceived], DatagramReceived]
) -> DatagramHooks:
    """Put ``wrap(received)`` in front of the ``datagram_received`` of each local
    candidate's protocol, where ``received`` is what was there (aioice's method, or SCTP's
    :func:`receive_data_now` hook): every datagram on any pair of those sockets, a TURN
    relay's unwrapped ones too, reaches the hook before aioice's STUN parser.

    The hook takes the datagrams that are its own and passes every other one to
    ``received`` unchanged; once its user is done with it, it passes everything on (it may
    stay in a chain: see :func:`_take_out`). ``wrap`` returns a function (it gets marked,
    so that a second :func:`hook_datagrams` raises :class:`LookupError`: hooked already).
    """
    protocols = list(ice._connection._protocols)
    if any(getattr(p.datagram_received, _DATAGRAM_HOOK, False) for p in protocols):
        raise LookupError("the ICE connection is already hooked")
    hooked = []
    for protocol in protocols:
        hook = wrap(protocol.datagram_received)
        setattr(hook, _DATAGRAM_HOOK, True)
        hooked.append((protocol, hook, _put_in_front(protocol, hook)))
    return DatagramHooks(hooked)


def export_keying_material(
    dtls: RTCDtlsTransport, label: bytes, length: int, context: bytes | None = None
) -> bytes:
    """RFC 5705 keying material from the DTLS session (both ends derive the same bytes)."""
    ssl = getattr(dtls, "_ssl", None)
    if ssl is None or dtls.state != "connected":
        raise RtcError("keying material needs a connected DTLS transport")
    return bytes(ssl.export_keying_material(label, length, context))
