"""The WebRTC data channel layer over SCTP, sans-I/O: DCEP (RFC 8832) and the payload
protocol identifiers of RFC 8831.

A data channel is one SCTP stream id used in both directions. Whoever opens it sends a
DATA_CHANNEL_OPEN on that stream (label, protocol, ordering and reliability); the other side
answers DATA_CHANNEL_ACK. The DTLS client uses even stream ids and the DTLS server odd ones,
so both sides can open channels at once without colliding (RFC 8832 section 6).

:class:`DataChannelProtocol` keeps the table of channels of one association. It does no I/O:
the caller hands it what the association received (:meth:`DataChannelProtocol.receive`) and
gets back events and :class:`Outgoing` messages to pass to the association's ``send``.
Anything a hostile peer sends becomes a :class:`ProtocolViolation` event (or a
:class:`DcepError` from the codec) and never an exception from :meth:`receive`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .errors import SctpError

# --- payload protocol identifiers (RFC 8831 section 8, RFC 8832 section 8.1) ---------------

PPID_DCEP = 50
PPID_STRING = 51
PPID_BINARY = 53
PPID_STRING_EMPTY = 56
PPID_BINARY_EMPTY = 57
#: Deprecated PPIDs for partial messages (RFC 8831 section 6.6): a receiver that sees
#: them talks to a very old implementation and cannot reassemble its messages.
PPID_STRING_PARTIAL = 54
PPID_BINARY_PARTIAL = 52

# --- DCEP message and channel types (RFC 8832 section 5) -----------------------------------

MESSAGE_ACK = 0x02
MESSAGE_OPEN = 0x03

CHANNEL_RELIABLE = 0x00
CHANNEL_PARTIAL_RELIABLE_REXMIT = 0x01
CHANNEL_PARTIAL_RELIABLE_TIMED = 0x02
#: Set in the channel type for unordered delivery.
CHANNEL_UNORDERED_BIT = 0x80
_KNOWN_CHANNEL_TYPES = frozenset(
    base | order
    for base in (
        CHANNEL_RELIABLE,
        CHANNEL_PARTIAL_RELIABLE_REXMIT,
        CHANNEL_PARTIAL_RELIABLE_TIMED,
    )
    for order in (0, CHANNEL_UNORDERED_BIT)
)

#: Priorities of RFC 8832 section 5.1 (the W3C's very-low/low/medium/high).
PRIORITY_BELOW_NORMAL = 128
PRIORITY_NORMAL = 256
PRIORITY_HIGH = 512
PRIORITY_EXTRA_HIGH = 1024

_OPEN_HEADER = struct.Struct("!BBHIHH")
#: Stream ids are 16 bits; 65535 is reserved (RFC 8831 section 6.5).
MAX_STREAM_ID = 65534


class DcepError(SctpError):
    """A DCEP message or a data channel payload that does not follow RFC 8831/8832, or a
    channel operation that the channel table does not allow."""

    code = "dcep"


# --- the OPEN message ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelParameters:
    """What a DATA_CHANNEL_OPEN carries: how the channel's messages are delivered.

    At most one of ``max_retransmits`` and ``max_packet_lifetime`` (milliseconds) is set;
    neither means reliable.
    """

    label: str = ""
    protocol: str = ""
    ordered: bool = True
    max_retransmits: int | None = None
    max_packet_lifetime: int | None = None
    priority: int = PRIORITY_NORMAL

    def __post_init__(self) -> None:
        if self.max_retransmits is not None and self.max_packet_lifetime is not None:
            raise ValueError("set maxRetransmits or maxPacketLifeTime, not both")
        for name in ("max_retransmits", "max_packet_lifetime"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} must be between 0 and 2**32-1, not {value}")
        if not 0 <= self.priority <= 0xFFFF:
            raise ValueError(f"priority must be between 0 and 65535, not {self.priority}")
        for name in ("label", "protocol"):
            if len(getattr(self, name).encode("utf-8")) > 0xFFFF:
                raise ValueError(f"the {name} is longer than 65535 bytes in UTF-8")

    @property
    def reliable(self) -> bool:
        return self.max_retransmits is None and self.max_packet_lifetime is None

    @property
    def channel_type(self) -> int:
        if self.max_retransmits is not None:
            kind = CHANNEL_PARTIAL_RELIABLE_REXMIT
        elif self.max_packet_lifetime is not None:
            kind = CHANNEL_PARTIAL_RELIABLE_TIMED
        else:
            kind = CHANNEL_RELIABLE
        return kind if self.ordered else kind | CHANNEL_UNORDERED_BIT

    @property
    def reliability_parameter(self) -> int:
        if self.max_retransmits is not None:
            return self.max_retransmits
        return self.max_packet_lifetime or 0


def encode_open(parameters: ChannelParameters) -> bytes:
    """The DATA_CHANNEL_OPEN message for ``parameters``."""
    label = parameters.label.encode("utf-8")
    protocol = parameters.protocol.encode("utf-8")
    header = _OPEN_HEADER.pack(
        MESSAGE_OPEN,
        parameters.channel_type,
        parameters.priority,
        parameters.reliability_parameter,
        len(label),
        len(protocol),
    )
    return header + label + protocol


def encode_ack() -> bytes:
    """The DATA_CHANNEL_ACK message."""
    return bytes([MESSAGE_ACK])


def decode_open(message: bytes) -> ChannelParameters:
    """The parameters in a DATA_CHANNEL_OPEN; :class:`DcepError` when it is malformed."""
    if len(message) < _OPEN_HEADER.size:
        raise DcepError(f"DATA_CHANNEL_OPEN of {len(message)} bytes is shorter than its header")
    kind, channel_type, priority, reliability, label_length, protocol_length = (
        _OPEN_HEADER.unpack_from(message)
    )
    if kind != MESSAGE_OPEN:
        raise DcepError(f"message type {kind:#04x} is not DATA_CHANNEL_OPEN")
    if channel_type not in _KNOWN_CHANNEL_TYPES:
        raise DcepError(f"unknown data channel type {channel_type:#04x}")
    end = _OPEN_HEADER.size + label_length + protocol_length
    if len(message) != end:
        raise DcepError(
            f"DATA_CHANNEL_OPEN is {len(message)} bytes, its lengths say {end}"
        )
    label_end = _OPEN_HEADER.size + label_length
    try:
        label = message[_OPEN_HEADER.size : label_end].decode("utf-8")
        protocol = message[label_end:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DcepError(f"label or protocol is not UTF-8: {exc}") from None
    base = channel_type & ~CHANNEL_UNORDERED_BIT
    return ChannelParameters(
        label=label,
        protocol=protocol,
        ordered=not channel_type & CHANNEL_UNORDERED_BIT,
        max_retransmits=reliability if base == CHANNEL_PARTIAL_RELIABLE_REXMIT else None,
        max_packet_lifetime=reliability if base == CHANNEL_PARTIAL_RELIABLE_TIMED else None,
        priority=priority,
    )


# --- user message payloads -----------------------------------------------------------------


def encode_payload(data: str | bytes) -> tuple[int, bytes]:
    """The PPID and SCTP payload for one user message.

    SCTP cannot carry an empty message, so an empty one goes as a single zero byte with the
    "empty" PPID, which tells the receiver to ignore the byte (RFC 8831 section 6.6).
    """
    if isinstance(data, str):
        return (PPID_STRING, data.encode("utf-8")) if data else (PPID_STRING_EMPTY, b"\x00")
    return (PPID_BINARY, bytes(data)) if data else (PPID_BINARY_EMPTY, b"\x00")


def decode_payload(ppid: int, payload: bytes) -> str | bytes:
    """The user message in an SCTP payload; :class:`DcepError` for an unknown PPID or text
    that is not UTF-8."""
    if ppid == PPID_BINARY:
        return payload
    if ppid == PPID_STRING:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DcepError(f"text message is not UTF-8: {exc}") from None
    if ppid == PPID_STRING_EMPTY:
        return ""
    if ppid == PPID_BINARY_EMPTY:
        return b""
    if ppid in (PPID_STRING_PARTIAL, PPID_BINARY_PARTIAL):
        raise DcepError(f"deprecated partial-message PPID {ppid} is not supported")
    raise DcepError(f"unknown payload protocol identifier {ppid}")


def payload_size(data: str | bytes) -> int:
    """Bytes ``data`` takes in SCTP (at least one: see :func:`encode_payload`)."""
    size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
    return max(size, 1)


# --- stream ids ----------------------------------------------------------------------------


class StreamIdAllocator:
    """Stream ids of one association: ours have the parity of our DTLS role (even for the
    client, odd for the server), the peer's the other one."""

    def __init__(self, dtls_role: str, max_streams: int = MAX_STREAM_ID + 1) -> None:
        if dtls_role not in ("client", "server"):
            raise ValueError(f"the DTLS role is 'client' or 'server', not {dtls_role!r}")
        if not 1 <= max_streams <= MAX_STREAM_ID + 1:
            raise ValueError(f"max_streams must be between 1 and {MAX_STREAM_ID + 1}")
        self.parity = 0 if dtls_role == "client" else 1
        self.max_streams = max_streams
        self._used: set[int] = set()
        self._next = self.parity

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._used)

    def is_local(self, stream_id: int) -> bool:
        """Whether ``stream_id`` belongs to the ids we hand out."""
        return stream_id % 2 == self.parity

    def allocate(self) -> int:
        """The lowest free stream id of our parity at or after the last one given."""
        for _ in range(self.max_streams // 2 + 1):
            candidate = self._next
            self._next += 2
            if self._next >= self.max_streams:
                self._next = self.parity
            if candidate < self.max_streams and candidate not in self._used:
                self._used.add(candidate)
                return candidate
        raise DcepError(f"all {self.max_streams // 2} stream ids of this side are in use")

    def reserve(self, stream_id: int) -> None:
        """Mark ``stream_id`` used (a channel the peer opened, or a negotiated one)."""
        if not 0 <= stream_id < self.max_streams:
            raise DcepError(f"stream id {stream_id} is outside 0..{self.max_streams - 1}")
        if stream_id in self._used:
            raise DcepError(f"stream id {stream_id} is already in use")
        self._used.add(stream_id)

    def release(self, stream_id: int) -> None:
        """Make ``stream_id`` free again (both directions of its stream were reset)."""
        self._used.discard(stream_id)


# --- the channel table ---------------------------------------------------------------------


class ChannelState(str, enum.Enum):
    """The W3C ``readyState`` values."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class Outgoing:
    """One message for the association's ``send``: ``lifetime`` in milliseconds."""

    stream_id: int
    ppid: int
    payload: bytes
    ordered: bool = True
    max_retransmits: int | None = None
    lifetime: int | None = None


@dataclass(frozen=True)
class RemoteChannelOpened:
    """The peer opened a channel; the DATA_CHANNEL_ACK in ``ack`` must be sent."""

    stream_id: int
    parameters: ChannelParameters
    ack: Outgoing


@dataclass(frozen=True)
class ChannelAcknowledged:
    """The peer acknowledged a channel we opened: it is open."""

    stream_id: int


@dataclass(frozen=True)
class ChannelMessage:
    """A user message on an open channel."""

    stream_id: int
    data: str | bytes


@dataclass(frozen=True)
class ProtocolViolation:
    """Something the peer sent that could not be used; the message was dropped."""

    stream_id: int
    reason: str


DcepEvent = RemoteChannelOpened | ChannelAcknowledged | ChannelMessage | ProtocolViolation


@dataclass
class _Channel:
    parameters: ChannelParameters
    state: ChannelState
    #: We opened it and the ACK has not arrived yet: send ordered (RFC 8832 section 6).
    awaiting_ack: bool


class DataChannelProtocol:
    """The data channels of one SCTP association (sans-I/O).

    ``dtls_role`` decides which stream ids are ours. ``max_streams`` is the lower of the
    stream counts both sides announced in INIT/INIT-ACK (65535 when not known yet).
    """

    def __init__(self, dtls_role: str, max_streams: int = MAX_STREAM_ID + 1) -> None:
        self.streams = StreamIdAllocator(dtls_role, max_streams)
        self._channels: dict[int, _Channel] = {}

    def state(self, stream_id: int) -> ChannelState:
        channel = self._channels.get(stream_id)
        return channel.state if channel is not None else ChannelState.CLOSED

    def parameters(self, stream_id: int) -> ChannelParameters:
        return self._require(stream_id).parameters

    @property
    def stream_ids(self) -> list[int]:
        return list(self._channels)

    # --- opening ---------------------------------------------------------------------------

    def open_channel(
        self, parameters: ChannelParameters, stream_id: int | None = None
    ) -> tuple[int, Outgoing]:
        """Open a channel with DCEP: its stream id and the DATA_CHANNEL_OPEN to send."""
        if stream_id is None:
            stream_id = self.streams.allocate()
        else:
            self.streams.reserve(stream_id)
        self._channels[stream_id] = _Channel(parameters, ChannelState.CONNECTING, True)
        return stream_id, Outgoing(stream_id, PPID_DCEP, encode_open(parameters))

    def add_negotiated(self, parameters: ChannelParameters, stream_id: int) -> None:
        """A channel both sides agreed on out of band (``negotiated: true``): open at once,
        no DCEP."""
        self.streams.reserve(stream_id)
        self._channels[stream_id] = _Channel(parameters, ChannelState.OPEN, False)

    # --- receiving -------------------------------------------------------------------------

    def receive(self, stream_id: int, ppid: int, payload: bytes) -> DcepEvent | None:
        """Handle one message the association delivered; ``None`` when there is nothing to
        report (an ignored message on a closing channel)."""
        if ppid == PPID_DCEP:
            return self._receive_dcep(stream_id, payload)
        channel = self._channels.get(stream_id)
        if channel is None:
            return ProtocolViolation(stream_id, "message on a stream without a data channel")
        if channel.state == ChannelState.CLOSED:
            return None
        try:
            data = decode_payload(ppid, payload)
        except DcepError as exc:
            return ProtocolViolation(stream_id, exc.message)
        if channel.awaiting_ack:
            # Only the peer can have sent this, after it saw our OPEN: an implicit ACK.
            channel.awaiting_ack = False
        return ChannelMessage(stream_id, data)

    def _receive_dcep(self, stream_id: int, payload: bytes) -> DcepEvent | None:
        if not payload:
            return ProtocolViolation(stream_id, "empty DCEP message")
        kind = payload[0]
        if kind == MESSAGE_OPEN:
            if stream_id in self._channels:
                return ProtocolViolation(
                    stream_id, "DATA_CHANNEL_OPEN for a stream that already has a channel"
                )
            if self.streams.is_local(stream_id):
                return ProtocolViolation(
                    stream_id, "DATA_CHANNEL_OPEN on a stream id of our parity (wrong DTLS role?)"
                )
            try:
                parameters = decode_open(payload)
                self.streams.reserve(stream_id)
            except DcepError as exc:
                return ProtocolViolation(stream_id, exc.message)
            self._channels[stream_id] = _Channel(parameters, ChannelState.OPEN, False)
            ack = Outgoing(stream_id, PPID_DCEP, encode_ack())
            return RemoteChannelOpened(stream_id, parameters, ack)
        if kind == MESSAGE_ACK:
            channel = self._channels.get(stream_id)
            if channel is None or not self.streams.is_local(stream_id):
                return ProtocolViolation(stream_id, "DATA_CHANNEL_ACK for no channel we opened")
            if len(payload) != 1:
                return ProtocolViolation(stream_id, "DATA_CHANNEL_ACK with trailing bytes")
            channel.awaiting_ack = False
            if channel.state != ChannelState.CONNECTING:
                return None  # closing already (W3C: a closing channel is not opened again)
            channel.state = ChannelState.OPEN
            return ChannelAcknowledged(stream_id)
        return ProtocolViolation(stream_id, f"unknown DCEP message type {kind:#04x}")

    # --- sending ---------------------------------------------------------------------------

    def outgoing(self, stream_id: int, data: str | bytes) -> Outgoing:
        """The association message for one user message on ``stream_id``.

        Allowed while connecting (the message follows the OPEN on the same stream, sent
        ordered until the ACK) and open; :class:`DcepError` otherwise.
        """
        channel = self._require(stream_id)
        if channel.state not in (ChannelState.CONNECTING, ChannelState.OPEN):
            raise DcepError(f"data channel {stream_id} is {channel.state.value}")
        ppid, payload = encode_payload(data)
        parameters = channel.parameters
        return Outgoing(
            stream_id,
            ppid,
            payload,
            ordered=parameters.ordered or channel.awaiting_ack,
            max_retransmits=parameters.max_retransmits,
            lifetime=parameters.max_packet_lifetime,
        )

    # --- closing ---------------------------------------------------------------------------

    def start_closing(self, stream_id: int) -> bool:
        """Mark the channel closing; ``True`` when its outgoing stream must now be reset."""
        channel = self._channels.get(stream_id)
        if channel is None or channel.state in (ChannelState.CLOSING, ChannelState.CLOSED):
            return False
        channel.state = ChannelState.CLOSING
        return True

    def closed(self, stream_id: int) -> bool:
        """Both directions of the stream are reset: forget the channel and free its id.
        ``True`` if there was a channel."""
        channel = self._channels.pop(stream_id, None)
        self.streams.release(stream_id)
        if channel is None:
            return False
        channel.state = ChannelState.CLOSED
        return True

    def _require(self, stream_id: int) -> _Channel:
        channel = self._channels.get(stream_id)
        if channel is None:
            raise DcepError(f"no data channel on stream {stream_id}")
        return channel
