"""A sans-I/O SCTP association for WebRTC data channels (RFC 9260, RFC 3758, RFC 6525,
RFC 8831/8841).

The association does no I/O and reads no clock: the caller feeds it packets
(:meth:`Association.receive_packet`) and the time (``now``, float seconds, any monotonic
origin), sends what :meth:`Association.packets_to_send` returns, calls
:meth:`Association.handle_timeout` at :meth:`Association.next_deadline`, and drains
:meth:`Association.events`.  Each packet it returns is a whole SCTP packet of at most
``mtu`` bytes, for example for a DTLS transport.  A driver, after anything it did::

    association.receive_packet(datagram, now)      # or send(), handle_timeout(), ...
    for packet in association.packets_to_send():
        dtls.send(packet)
    for event in association.events():
        ...                                        # MessageReceived, StreamsReset, ...
    rearm_timer(association.next_deadline())

Call :meth:`Association.packets_to_send` after every received packet (not once per batch):
the delayed-SACK rule counts packets, and a SACK waiting for a batch delays the sender.
"""

from __future__ import annotations

import os
import struct

from .chunks import (
    ABORT,
    COOKIE_ACK,
    COOKIE_ECHO,
    DATA,
    DATA_HEADER_SIZE,
    DATA_IMMEDIATE,
    ERROR,
    FLAG_T,
    FORWARD_TSN,
    HEARTBEAT,
    HEARTBEAT_ACK,
    INIT,
    INIT_ACK,
    RECONFIG,
    SACK,
    SHUTDOWN,
    SHUTDOWN_ACK,
    SHUTDOWN_COMPLETE,
    AbortChunk,
    CookieAckChunk,
    CookieEchoChunk,
    ErrorChunk,
    ForwardTsnChunk,
    HeartbeatAckChunk,
    HeartbeatChunk,
    InitAckChunk,
    InitChunk,
    ReconfigChunk,
    SackChunk,
    ShutdownAckChunk,
    ShutdownChunk,
    ShutdownCompleteChunk,
)
from .congestion import CongestionControl, RtoEstimator
from .cookie import FEATURE_FORWARD_TSN, FEATURE_RECONFIG, CookieState
from .data_tracker import DataTracker
from .errors import (
    AssociationNotOpen,
    InvalidStream,
    MalformedPacket,
    MessageTooLarge,
    ProtocolViolation,
    SendError,
    StreamClosing,
)
from .events import (
    AssociationClosed,
    AssociationEstablished,
    AssociationLost,
    BufferedAmountLow,
    Event,
)
from .packet import COMMON_HEADER_SIZE, PacketWriter, build_packet, parse_packet
from .parameters import (
    CAUSE_NO_USER_DATA,
    CAUSE_PROTOCOL_VIOLATION,
    CAUSE_UNRECOGNIZED_CHUNK,
    CAUSE_USER_INITIATED_ABORT,
    PARAM_FORWARD_TSN_SUPPORTED,
    PARAM_OUTGOING_SSN_RESET_REQUEST,
    PARAM_RECONFIG_RESPONSE,
    PARAM_STATE_COOKIE,
    PARAM_SUPPORTED_EXTENSIONS,
    RESULT_DENIED,
    TLV,
    OutgoingSsnResetRequest,
    ReconfigResponse,
    cause_text,
)
from .reassembly import ENTRY_COST, Reassembly
from .retransmission_queue import RetransmissionQueue
from .send_queue import INFINITE, OutgoingMessage, SendQueue
from .state import (
    OPENING,
    RECEIVES_DATA,
    RECEIVES_SACK,
    SENDS_DATA,
    State,
    Trigger,
    next_state,
)
from .stream_reset import StreamResets
from .timers import Timer
from .tsn import TSN_MASK

_DATA_FIELDS = struct.Struct("!IHHI")
_PLAIN_SACK = struct.Struct("!IIHH")
_NO_GAPS: list[tuple[int, int]] = []
_HEARTBEAT_INFO = struct.Struct("!dQ")
#: DATA further than this beyond the cumulative TSN is dropped (gap blocks are 16-bit).
_MAX_TSN_AHEAD = 0xFFFF

__all__ = ["Association"]


def _random_u32(nonzero: bool = False) -> int:
    while True:
        value = int.from_bytes(os.urandom(4), "big")
        if value or not nonzero:
            return value


def _extension_params(forward_tsn: bool) -> list[TLV]:
    if not forward_tsn:
        return [(PARAM_SUPPORTED_EXTENSIONS, bytes([RECONFIG]))]
    return [
        (PARAM_FORWARD_TSN_SUPPORTED, b""),
        (PARAM_SUPPORTED_EXTENSIONS, bytes([FORWARD_TSN, RECONFIG])),
    ]


def _peer_features(params: list[TLV]) -> int:
    """Which of our extensions the peer's INIT or INIT ACK says it supports."""
    features = 0
    for kind, value in params:
        if kind == PARAM_FORWARD_TSN_SUPPORTED:
            features |= FEATURE_FORWARD_TSN
        elif kind == PARAM_SUPPORTED_EXTENSIONS:
            if FORWARD_TSN in value:
                features |= FEATURE_FORWARD_TSN
            if RECONFIG in value:
                features |= FEATURE_RECONFIG
    return features


class Association:
    """One SCTP association over an unreliable datagram transport (DTLS for WebRTC).

    Either side may call :meth:`connect`; WebRTC endpoints both do, and the colliding
    INITs resolve into one association (RFC 9260 5.2).  A side that never calls
    :meth:`connect` answers the peer's INIT.

    ``unreliable_losses_reduce_cwnd=False`` keeps the congestion window when every chunk
    lost was of a ``max_retransmits=0`` message (the tunnel's channels, whose inner flows
    run their own congestion control).  The congestion control is CUBIC (RFC 9438) with
    RFC 9260's slow start and fast recovery; ``emulated_flows`` makes it respond to loss as
    that many flows together (see :mod:`mvpd.sctp.congestion`; 1: one flow).
    """

    def __init__(
        self,
        *,
        local_port: int = 5000,
        remote_port: int = 5000,
        max_message_size: int = 262144,
        peer_max_message_size: int | None = None,
        mtu: int = 1200,
        receive_window: int = 1024 * 1024,
        outbound_streams: int = 65535,
        inbound_streams: int = 65535,
        rto_initial: float = 1.0,
        rto_min: float = 0.4,
        rto_max: float = 60.0,
        max_retransmissions: int = 10,
        max_init_retransmissions: int = 8,
        delayed_ack_timeout: float = 0.2,
        heartbeat_interval: float = 30.0,
        cookie_lifetime: float = 60.0,
        unreliable_losses_reduce_cwnd: bool = True,
        emulated_flows: int = 1,
        forward_tsn: bool = True,
    ) -> None:
        if mtu < 256:
            raise ValueError("mtu must be at least 256 bytes")
        if receive_window < 4 * mtu:
            raise ValueError("receive_window must be at least 4 * mtu")
        if not 1 <= emulated_flows <= 8:
            raise ValueError("emulated_flows must be in 1..8")
        self.emulated_flows = emulated_flows
        #: Offer partial reliability (RFC 3758 FORWARD TSN) to the peer.
        self.forward_tsn = forward_tsn
        self.local_port = local_port
        self.remote_port = remote_port
        #: The largest message we accept (our SDP ``a=max-message-size``).
        self.max_message_size = max_message_size
        #: The largest message we send (the peer's ``a=max-message-size``; RFC 8841 6.1).
        self.peer_max_message_size = (
            max_message_size if peer_max_message_size is None else peer_max_message_size
        )
        self.mtu = mtu
        self.receive_window = receive_window
        self.max_retransmissions = max_retransmissions
        self.max_init_retransmissions = max_init_retransmissions
        self.delayed_ack_timeout = delayed_ack_timeout
        self.heartbeat_interval = heartbeat_interval
        self.cookie_lifetime = cookie_lifetime
        self.unreliable_losses_reduce_cwnd = unreliable_losses_reduce_cwnd
        self._our_outbound_streams = outbound_streams
        self._our_inbound_streams = inbound_streams

        self.state = State.CLOSED
        # Cached membership of the state in the sets of state.py (Enum hashing is slow).
        self._receives_data = self._receives_sack = self._sends_data = False
        self._ended = False
        self.local_tag = _random_u32(nonzero=True)
        self.local_initial_tsn = _random_u32()
        self.peer_tag = 0
        self._secret = os.urandom(32)
        self._now = 0.0

        self.outbound_streams = outbound_streams
        self.inbound_streams = inbound_streams
        self.peer_supports_forward_tsn = False
        self.peer_supports_reconfig = False
        # Peer parameters learnt from INIT ACK, used once COOKIE ACK arrives.
        self._pending_peer: CookieState | None = None

        self._events: list[Event] = []
        self._control: list[tuple[int, bytes]] = []  # (verification tag, encoded chunk)
        self._out: list[bytes] = []
        self._writer = PacketWriter(local_port, remote_port, mtu)
        self._open_tag = -1
        self._error_count = 0

        self._rto = RtoEstimator(rto_initial, rto_min, rto_max)
        self.send_queue = SendQueue()
        self.reassembly = Reassembly(max_message_size, self._events)
        self.tracker: DataTracker | None = None
        self.retransmissions: RetransmissionQueue | None = None
        self._advertised_rwnd = receive_window

        self._t1 = Timer("t1-init")
        self._t1_chunk = b""
        self._t2 = Timer("t2-shutdown")
        self._t2_chunk = b""
        self._t3 = Timer("t3-rtx")
        self._delayed_ack = Timer("delayed-ack")
        self._heartbeat = Timer("heartbeat")
        self._heartbeat_nonce = -1
        self._reconfig_timer = Timer("reconfig")
        self._fast_retransmit_due = False
        self._forward_tsn_sent: tuple[int, float] = (-1, 0.0)
        self._forward_tsn_force = False

        self.resets = StreamResets(
            self.local_initial_tsn, self.send_queue, self.reassembly, self._events
        )

        #: Statistics: packets and SACKs sent, DATA packets received.
        self.packets_sent = 0
        self.sacks_sent = 0
        self.data_packets_received = 0

    # -- user API ---------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Send INIT (the client side; in WebRTC both sides may)."""
        self._now = now
        target = next_state(self.state, Trigger.CONNECT)
        if target is None or self._ended:
            raise AssociationNotOpen(f"cannot connect in state {self.state.value}")
        init = InitChunk(
            self.local_tag, self.receive_window, self._our_outbound_streams,
            self._our_inbound_streams, self.local_initial_tsn,
            _extension_params(self.forward_tsn),
        )
        self._t1_chunk = init.encode()
        self._control.append((0, self._t1_chunk))
        self._t1.start(now, self._rto.rto_initial)
        self._set_state(target)

    def send(
        self,
        stream_id: int,
        ppid: int,
        data: bytes,
        *,
        ordered: bool = True,
        max_retransmits: int | None = None,
        lifetime: float | None = None,
        now: float,
    ) -> int:
        """Queue a message; returns the stream's buffered amount.

        ``max_retransmits`` and ``lifetime`` (seconds) make it partially reliable (when the
        peer supports FORWARD TSN).  Messages queued before the association is established
        go out once it is.  Raises :class:`MessageTooLarge`, :class:`AssociationNotOpen`,
        :class:`StreamClosing`, :class:`InvalidStream` or :class:`SendError` (empty message:
        WebRTC sends empty messages as one byte with an "empty" PPID).
        """
        self._now = now
        if self._ended or (self.state not in OPENING and self.state is not State.ESTABLISHED):
            raise AssociationNotOpen(f"the association is {self.state.value}; cannot send")
        size = len(data)
        if size > self.peer_max_message_size:
            raise MessageTooLarge(
                f"message of {size} bytes exceeds the peer's maximum message size "
                f"{self.peer_max_message_size}"
            )
        if size == 0:
            raise SendError("SCTP cannot carry an empty message")
        if not 0 <= stream_id < self.outbound_streams:
            raise InvalidStream(
                f"stream {stream_id} is outside the {self.outbound_streams} outbound streams"
            )
        stream = self.send_queue.stream(stream_id)
        if stream.closing:
            raise StreamClosing(f"stream {stream_id} is being reset")
        if self.state is State.ESTABLISHED and not self.peer_supports_forward_tsn:
            max_retransmits = lifetime = None  # the peer cannot skip: send reliably
        message = OutgoingMessage(
            stream_id, ppid, data, ordered,
            -1 if max_retransmits is None else max(0, max_retransmits),
            INFINITE if lifetime is None else now + lifetime,
        )
        self.send_queue.add(message)
        return stream.buffered

    def set_mtu(self, mtu: int) -> None:
        """Change the packet size before the handshake (for example once the path is known).

        Raises :class:`ValueError` once the association is established or ``mtu`` is below
        256 bytes or too large for the receive window.
        """
        if self.retransmissions is not None or self._ended:
            raise ValueError("the packet size is fixed once the association is established")
        if mtu < 256 or self.receive_window < 4 * mtu:
            raise ValueError("mtu must be at least 256 bytes and at most receive_window / 4")
        self._flush()
        self.mtu = mtu
        self._writer = PacketWriter(self.local_port, self.remote_port, mtu)

    def buffered_amount(self, stream_id: int) -> int:
        """Bytes queued on ``stream_id`` not yet handed to the network."""
        return self.send_queue.buffered_amount(stream_id)

    def set_buffered_amount_low_threshold(self, stream_id: int, threshold: int) -> None:
        """Emit :class:`BufferedAmountLow` when the stream's buffered amount falls to
        ``threshold`` bytes or below."""
        self.send_queue.stream(stream_id).low_threshold = threshold

    def reset_streams(self, stream_ids: list[int], now: float) -> None:
        """Reset outgoing ``stream_ids`` (RFC 6525), for example to close data channels.

        Messages already queued on them are sent first; new ones are refused until
        :class:`OutgoingStreamsReset` reports the reset done.
        """
        self._now = now
        if self._ended or self.state is not State.ESTABLISHED:
            raise AssociationNotOpen(f"the association is {self.state.value}; cannot reset")
        if not self.peer_supports_reconfig:
            raise SendError("the peer does not support stream reset (RE-CONFIG)")
        self.resets.add(stream_ids)
        self._maybe_request_reset(now)

    def shutdown(self, now: float) -> None:
        """Close gracefully once everything sent is acknowledged (RFC 9260 9.2)."""
        self._now = now
        if self._ended:
            return
        if self.state in OPENING:
            self._end(now)
            self._events.append(AssociationClosed())
            return
        target = next_state(self.state, Trigger.SHUTDOWN)
        if target is None:
            return  # already shutting down
        self._set_state(target)
        self._maybe_drained(now)

    def abort(self, reason: str, now: float) -> None:
        """End the association at once, telling the peer ``reason`` (an ABORT chunk)."""
        self._now = now
        if self._ended:
            return
        if self.peer_tag:
            chunk = AbortChunk([(CAUSE_USER_INITIATED_ABORT, reason.encode()[:200])])
            self._control.append((self.peer_tag, chunk.encode()))
        self._end(now)
        self._events.append(AssociationLost(f"aborted locally: {reason}"))

    def events(self) -> list[Event]:
        """The events since the last call (delivering messages opens the receive window)."""
        low = self.send_queue.take_low_events()
        if low:
            self._events.extend(BufferedAmountLow(stream_id) for stream_id in low)
        events = self._events[:]
        self._events.clear()
        reassembly = self.reassembly
        if reassembly.delivered:
            reassembly.delivered = 0
            tracker = self.tracker
            if tracker is not None and self._advertised_rwnd < self.receive_window // 4 and (
                self._a_rwnd() >= self.receive_window // 2
            ):
                tracker.sack_now = True  # the window opened: tell the blocked sender
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must be called next (``None``: no timer armed)."""
        deadline: float | None = None
        for timer in (self._t1, self._t2, self._t3, self._delayed_ack, self._heartbeat,
                      self._reconfig_timer):
            d = timer.deadline
            if d is not None and (deadline is None or d < deadline):
                deadline = d
        return deadline

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def closed(self) -> bool:
        """The association ended (gracefully or not)."""
        return self._ended

    @property
    def rto(self) -> float:
        return self._rto.rto

    @property
    def srtt(self) -> float | None:
        return self._rto.srtt

    def _set_state(self, state: State) -> None:
        """Enter ``state`` (always one :func:`next_state` allowed)."""
        self.state = state
        self._receives_data = state in RECEIVES_DATA
        self._receives_sack = state in RECEIVES_SACK
        self._sends_data = state in SENDS_DATA

    # -- incoming packets -------------------------------------------------------------------

    def receive_packet(self, data: bytes, now: float) -> None:
        """Process one SCTP packet from the peer.

        Raises :class:`MalformedPacket` for bytes that are not a valid SCTP packet (the
        association is unchanged).  Packets that do not belong (wrong ports or verification
        tag) are dropped silently, as RFC 9260 8.5 asks.
        """
        self._now = now
        packet = parse_packet(data)
        if packet.dst_port != self.local_port or packet.src_port != self.remote_port:
            return
        if self._ended:
            # Our SHUTDOWN COMPLETE was lost: the peer repeats its SHUTDOWN ACK (RFC 9260 8.4).
            if packet.verification_tag == self.local_tag and any(
                span[0] == SHUTDOWN_ACK for span in packet.chunks
            ):
                self._control.append((self.local_tag, ShutdownCompleteChunk(FLAG_T).encode()))
            return
        chunks = packet.chunks
        first_type, first_flags = chunks[0][0], chunks[0][1]
        vtag = packet.verification_tag
        if first_type == INIT:
            if len(chunks) != 1 or vtag != 0:
                return
        elif first_type in (ABORT, SHUTDOWN_COMPLETE) and first_flags & FLAG_T:
            if vtag != self.peer_tag or not self.peer_tag:
                return
        elif vtag != self.local_tag:
            return
        data = packet.data
        data_seen = False
        for kind, flags, start, end in chunks:
            if self._ended:
                return
            if kind == DATA:
                self._on_data(data, start, end, now)
                data_seen = True
                continue
            if kind == SACK and end - start == 12:
                # No gap blocks, no duplicates: the common case, decoded in place.
                cumulative, a_rwnd, _, _ = _PLAIN_SACK.unpack_from(data, start)
                self._on_sack(cumulative, a_rwnd, _NO_GAPS, now)
                continue
            value = data[start:end]
            if kind == SACK:
                sack = SackChunk.decode(flags, value)
                self._on_sack(sack.cumulative_tsn, sack.a_rwnd, sack.gaps, now)
            elif kind == FORWARD_TSN:
                self._on_forward_tsn(ForwardTsnChunk.decode(flags, value), now)
                data_seen = True
            elif kind == INIT:
                self._on_init(InitChunk.decode(flags, value), now)
            elif kind == INIT_ACK:
                self._on_init_ack(InitAckChunk.decode(flags, value), now)
            elif kind == COOKIE_ECHO:
                self._on_cookie_echo(value, now)
            elif kind == COOKIE_ACK:
                self._on_cookie_ack(now)
            elif kind == HEARTBEAT:
                if self.peer_tag and len(value) <= 1024:
                    self._control.append((self.peer_tag, HeartbeatAckChunk(
                        HeartbeatChunk.decode(flags, value).info).encode()))
            elif kind == HEARTBEAT_ACK:
                self._on_heartbeat_ack(HeartbeatAckChunk.decode(flags, value), now)
            elif kind == ABORT:
                causes = AbortChunk.decode(flags, value).causes
                self._end(now)
                self._events.append(AssociationLost(
                    f"aborted by peer: {cause_text(causes)}", by_peer=True
                ))
                return
            elif kind == SHUTDOWN:
                self._on_shutdown(ShutdownChunk.decode(flags, value), now)
            elif kind == SHUTDOWN_ACK:
                self._on_shutdown_ack(now)
            elif kind == SHUTDOWN_COMPLETE:
                if next_state(self.state, Trigger.RECV_SHUTDOWN_COMPLETE) is not None:
                    self._end(now)
                    self._events.append(AssociationClosed())
                return
            elif kind == ERROR:
                ErrorChunk.decode(flags, value)  # reported causes need no action here
            elif kind == RECONFIG:
                self._on_reconfig(ReconfigChunk.decode(flags, value), now)
            else:
                action = kind >> 6
                if action in (1, 3) and self.peer_tag:
                    report = ErrorChunk([(CAUSE_UNRECOGNIZED_CHUNK, data[start - 4 : end])])
                    self._control.append((self.peer_tag, report.encode()))
                if action < 2:
                    break
        if data_seen and self.tracker is not None and not self._ended:
            self.data_packets_received += 1
            self.tracker.packet_received()
            if self.resets.has_deferred:
                self._perform_deferred_resets()
            if not self.tracker.sack_now and not self._delayed_ack.running:
                self._delayed_ack.start(now, self.delayed_ack_timeout)

    def _on_data(self, data: bytes, start: int, end: int, now: float) -> None:
        tracker = self.tracker
        if tracker is None or not self._receives_data:
            return
        if end - start < 12:
            raise MalformedPacket("DATA chunk shorter than its header")
        if end - start == 12:
            self._fail(CAUSE_NO_USER_DATA, b"", "peer sent a DATA chunk without data", now)
            return
        tsn, stream_id, ssn, ppid = _DATA_FIELDS.unpack_from(data, start)
        distance = tracker.new_distance(tsn)
        if not distance:
            tracker.duplicate(tsn)
            return
        if distance > _MAX_TSN_AHEAD:
            return
        size = end - start - 12
        reassembly = self.reassembly
        held = reassembly.buffered + reassembly.delivered
        # Out of room: drop (unacknowledged, the sender tries again).  Except the next TSN
        # in sequence while fragments waiting for it fill the window (it may complete
        # them), up to twice the window; not while unread messages fill it.
        window = self.receive_window
        if held + size + ENTRY_COST > window and (
            distance != 1 or reassembly.buffered < window // 2 or held > 2 * window
        ):
            tracker.sack_now = True  # dropped for lack of room: tell the sender our window
            return
        tracker.received(tsn)
        flags = data[start - 3]
        if flags & DATA_IMMEDIATE:
            tracker.sack_now = True  # the sender asks for an immediate SACK (RFC 7053)
        if stream_id >= self.inbound_streams:
            return  # acknowledged but not delivered: no such stream was negotiated
        try:
            reassembly.add(tsn, stream_id, ssn, flags & 7, ppid, data[start + 12 : end])
        except ProtocolViolation as exc:
            self._fail(CAUSE_PROTOCOL_VIOLATION, str(exc).encode(), str(exc), now)

    def _on_sack(self, cumulative_tsn: int, a_rwnd: int, gaps: list[tuple[int, int]],
                 now: float) -> None:
        rtx = self.retransmissions
        if rtx is None or not self._receives_sack:
            return
        advanced, abandon = rtx.on_sack(cumulative_tsn, a_rwnd, gaps, now)
        self._after_ack(advanced, abandon, now)

    def _after_ack(self, advanced: bool, abandon: list[OutgoingMessage], now: float) -> None:
        rtx = self.retransmissions
        assert rtx is not None
        self._error_count = 0  # the peer is reachable
        for message in abandon:
            self._abandon(message)
        if rtx.has_retransmissions:
            self._fast_retransmit_due = True
        if rtx.outstanding == 0:
            self._t3.stop()
        elif advanced:
            self._t3.start(now, self._rto.rto)
        if self.resets.pending:
            self._maybe_request_reset(now)
        self._maybe_drained(now)

    def _on_forward_tsn(self, chunk: ForwardTsnChunk, now: float) -> None:
        tracker = self.tracker
        if tracker is None or not self._receives_data or not self.forward_tsn:
            return  # (not offered: the peer must not skip anything)
        if tracker.forward_to(chunk.new_cumulative_tsn):
            self.reassembly.forward(chunk.new_cumulative_tsn, chunk.streams)
        tracker.sack_now = True  # RFC 3758 3.6: acknowledge a FORWARD TSN at once

    # -- handshake --------------------------------------------------------------------------

    def _on_init(self, init: InitChunk, now: float) -> None:
        if init.initiate_tag == 0 or init.outbound_streams == 0 or init.inbound_streams == 0:
            return
        if self.state not in OPENING and init.initiate_tag != self.peer_tag:
            return  # a restart: not supported (a new peer gets a new association)
        cookie = CookieState(
            self.local_tag, init.initiate_tag, self.local_initial_tsn, init.initial_tsn,
            init.a_rwnd, init.outbound_streams, init.inbound_streams,
            _peer_features(init.params), now,
        )
        params = [
            *_extension_params(self.forward_tsn),
            (PARAM_STATE_COOKIE, cookie.seal(self._secret)),
        ]
        ack = InitAckChunk(
            self.local_tag, self.receive_window, self._our_outbound_streams,
            self._our_inbound_streams, self.local_initial_tsn, params,
        )
        self._control.append((init.initiate_tag, ack.encode()))

    def _on_init_ack(self, ack: InitChunk, now: float) -> None:
        target = next_state(self.state, Trigger.RECV_INIT_ACK)
        if target is None or ack.initiate_tag == 0:
            return
        cookie = next((v for k, v in ack.params if k == PARAM_STATE_COOKIE), None)
        if cookie is None:
            return
        self._pending_peer = CookieState(
            self.local_tag, ack.initiate_tag, self.local_initial_tsn, ack.initial_tsn,
            ack.a_rwnd, ack.outbound_streams, ack.inbound_streams,
            _peer_features(ack.params), now,
        )
        self.peer_tag = ack.initiate_tag
        self._t1_chunk = CookieEchoChunk(cookie).encode()
        self._control.append((self.peer_tag, self._t1_chunk))
        self._t1.start(now, self._rto.rto_initial)
        self._set_state(target)

    def _on_cookie_echo(self, value: bytes, now: float) -> None:
        try:
            cookie = CookieState.open(self._secret, value)
        except MalformedPacket:
            return  # not a cookie of ours
        if cookie.local_tag != self.local_tag or now - cookie.created_at > self.cookie_lifetime:
            return
        if self.state not in OPENING:
            if cookie.peer_tag == self.peer_tag and self.state is State.ESTABLISHED:
                self._control.append((self.peer_tag, CookieAckChunk().encode()))
            return
        target = next_state(self.state, Trigger.RECV_VALID_COOKIE_ECHO)
        if target is None:
            return
        self.peer_tag = cookie.peer_tag
        self._control.append((self.peer_tag, CookieAckChunk().encode()))
        self._establish(cookie, now)
        self._set_state(target)

    def _on_cookie_ack(self, now: float) -> None:
        target = next_state(self.state, Trigger.RECV_COOKIE_ACK)
        if target is None or self._pending_peer is None:
            return
        self._establish(self._pending_peer, now)
        self._set_state(target)

    def _establish(self, peer: CookieState, now: float) -> None:
        self._t1.stop()
        self._t1_chunk = b""
        self._pending_peer = None
        self.outbound_streams = min(self._our_outbound_streams, peer.peer_inbound_streams)
        self.inbound_streams = min(self._our_inbound_streams, peer.peer_outbound_streams)
        self.peer_supports_forward_tsn = self.forward_tsn and bool(
            peer.features & FEATURE_FORWARD_TSN
        )
        self.peer_supports_reconfig = bool(peer.features & FEATURE_RECONFIG)
        self.tracker = DataTracker(peer.peer_initial_tsn)
        congestion = CongestionControl(
            self.mtu - COMMON_HEADER_SIZE, peer.peer_a_rwnd,
            emulated_flows=self.emulated_flows,
        )
        self.retransmissions = RetransmissionQueue(
            self.local_initial_tsn, congestion, self._rto, peer.peer_a_rwnd,
            unreliable_losses_reduce_cwnd=self.unreliable_losses_reduce_cwnd,
            partial_reliability=self.peer_supports_forward_tsn,
        )
        self.resets.established(peer.peer_initial_tsn)
        if self.heartbeat_interval > 0:
            self._heartbeat.start(now, self.heartbeat_interval)
        self._events.append(AssociationEstablished())

    # -- heartbeat --------------------------------------------------------------------------

    def _send_heartbeat(self, now: float) -> None:
        if self._heartbeat_nonce >= 0:
            self._error_count += 1  # the previous one went unanswered
            if self._error_count > self.max_retransmissions:
                self._lost("the peer stopped answering heartbeats", now)
                return
        self._heartbeat_nonce = _random_u32()
        info = _HEARTBEAT_INFO.pack(now, self._heartbeat_nonce)
        self._control.append((self.peer_tag, HeartbeatChunk(info).encode()))
        self._heartbeat.start(now, self.heartbeat_interval + self._rto.rto)

    def _on_heartbeat_ack(self, chunk: HeartbeatChunk, now: float) -> None:
        if len(chunk.info) != _HEARTBEAT_INFO.size:
            return
        sent_at, nonce = _HEARTBEAT_INFO.unpack(chunk.info)
        if nonce != self._heartbeat_nonce:
            return
        self._heartbeat_nonce = -1
        self._error_count = 0
        self._rto.observe(now - sent_at)

    # -- shutdown and abort -----------------------------------------------------------------

    def _maybe_drained(self, now: float) -> None:
        """In SHUTDOWN-PENDING or SHUTDOWN-RECEIVED, move on once all DATA is acked."""
        if self.state not in (State.SHUTDOWN_PENDING, State.SHUTDOWN_RECEIVED):
            return
        rtx = self.retransmissions
        if self.send_queue.has_data or (rtx is not None and rtx.outstanding):
            return
        target = next_state(self.state, Trigger.OUTSTANDING_DRAINED)
        if target is None:
            return
        if target is State.SHUTDOWN_SENT:
            self._send_shutdown(now)
        else:
            self._t2_chunk = ShutdownAckChunk().encode()
            self._control.append((self.peer_tag, self._t2_chunk))
            self._t2.start(now, self._rto.rto)
        self._set_state(target)

    def _send_shutdown(self, now: float) -> None:
        assert self.tracker is not None
        self._t2_chunk = ShutdownChunk(self.tracker.cumulative_tsn).encode()
        self._control.append((self.peer_tag, self._t2_chunk))
        self._t2.start(now, self._rto.rto)

    def _on_shutdown(self, chunk: ShutdownChunk, now: float) -> None:
        target = next_state(self.state, Trigger.RECV_SHUTDOWN)
        rtx = self.retransmissions
        if target is None or rtx is None:
            return
        # SHUTDOWN carries a cumulative TSN ack (RFC 9260 9.2).
        advanced, abandon = rtx.on_sack(
            chunk.cumulative_tsn, rtx.peer_rwnd + rtx.flight, [], now
        )
        previous = self.state
        self._set_state(target)
        self._after_ack(advanced, abandon, now)
        if target is State.SHUTDOWN_ACK_SENT and previous is not State.SHUTDOWN_ACK_SENT:
            self._t2_chunk = ShutdownAckChunk().encode()
            self._control.append((self.peer_tag, self._t2_chunk))
            self._t2.start(now, self._rto.rto)

    def _on_shutdown_ack(self, now: float) -> None:
        if next_state(self.state, Trigger.RECV_SHUTDOWN_ACK) is None:
            return
        self._control.append((self.peer_tag, ShutdownCompleteChunk().encode()))
        self._end(now)
        self._events.append(AssociationClosed())

    def _fail(self, cause: int, detail: bytes, reason: str, now: float) -> None:
        """End the association because of the peer's protocol error, telling it why."""
        if self.peer_tag:
            self._control.append((self.peer_tag, AbortChunk([(cause, detail[:200])]).encode()))
        self._end(now)
        self._events.append(AssociationLost(reason))

    def _lost(self, reason: str, now: float) -> None:
        """End the association because the peer is unreachable."""
        if self.peer_tag:
            chunk = AbortChunk([(CAUSE_PROTOCOL_VIOLATION, reason.encode())])
            self._control.append((self.peer_tag, chunk.encode()))
        self._end(now)
        self._events.append(AssociationLost(reason))

    def _end(self, now: float) -> None:
        target = next_state(self.state, Trigger.END)
        assert target is not None
        self._set_state(target)
        self._ended = True
        for timer in (self._t1, self._t2, self._t3, self._delayed_ack, self._heartbeat,
                      self._reconfig_timer):
            timer.stop()

    # -- stream reset (RFC 6525) ------------------------------------------------------------

    def _maybe_request_reset(self, now: float) -> None:
        rtx = self.retransmissions
        if rtx is None or self._ended:
            return
        if self.resets.next_request((rtx.next_tsn - 1) & TSN_MASK) is not None:
            self._send_reconfig_request(now)

    def _send_reconfig_request(self, now: float) -> None:
        request = self.resets.request
        assert request is not None
        self._control.append((self.peer_tag, ReconfigChunk([request.encode()]).encode()))
        self._reconfig_timer.start(now, self._rto.rto)

    def _on_reconfig(self, chunk: ReconfigChunk, now: float) -> None:
        tracker = self.tracker
        if self.state is not State.ESTABLISHED or tracker is None:
            return
        responses: list[TLV] = []
        for kind, value in chunk.params:
            if kind == PARAM_OUTGOING_SSN_RESET_REQUEST:
                request = OutgoingSsnResetRequest.decode(value)
                responses.append(
                    self.resets.handle_request(request, tracker.cumulative_tsn).encode()
                )
            elif kind == PARAM_RECONFIG_RESPONSE:
                settled = self.resets.handle_response(ReconfigResponse.decode(value))
                if settled is False:
                    self._reconfig_timer.start(now, self._rto.rto)  # ask again later
                elif settled:
                    self._reconfig_timer.stop()
                    self._maybe_request_reset(now)
            elif 13 <= kind <= 18 and len(value) >= 4:
                # Other requests (incoming reset, SSN/TSN reset, add streams): refuse.
                seq = int.from_bytes(value[:4], "big")
                responses.append(ReconfigResponse(seq, RESULT_DENIED).encode())
        if responses:
            self._control.append((self.peer_tag, ReconfigChunk(responses).encode()))

    def _perform_deferred_resets(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        done = self.resets.perform_deferred(tracker.cumulative_tsn)
        if done:
            chunk = ReconfigChunk([response.encode() for response in done])
            self._control.append((self.peer_tag, chunk.encode()))

    # -- partial reliability ----------------------------------------------------------------

    def _abandon(self, message: OutgoingMessage) -> None:
        rtx = self.retransmissions
        if rtx is not None:
            rtx.abandon(message)
        self.send_queue.drop_rest(message)

    # -- timers -----------------------------------------------------------------------------

    def handle_timeout(self, now: float) -> None:
        """Run the timers whose deadline is at or before ``now``."""
        self._now = now
        if self._ended:
            return
        if self._t1.expired(now):
            if self._t1.expirations > self.max_init_retransmissions:
                self._lost("the peer did not answer the association setup", now)
                return
            tag = 0 if self.state is State.COOKIE_WAIT else self.peer_tag
            self._control.append((tag, self._t1_chunk))
            self._t1.restart_backed_off(now, min(self._t1.duration * 2, self._rto.rto_max))
        if self._t3.expired(now):
            self._on_t3(now)
            if self._ended:
                return
        if self._t2.expired(now):
            self._error_count += 1
            if self._error_count > self.max_retransmissions:
                self._lost("the peer did not answer the shutdown", now)
                return
            if self.state is State.SHUTDOWN_SENT:
                self._send_shutdown(now)
            else:
                self._control.append((self.peer_tag, self._t2_chunk))
                self._t2.start(now, self._rto.rto)
        if self._delayed_ack.expired(now) and self.tracker is not None:
            self.tracker.sack_now = True
        if self._reconfig_timer.expired(now) and self.resets.request is not None:
            self._error_count += 1
            if self._error_count > self.max_retransmissions:
                self._lost("the peer did not answer a stream reset", now)
                return
            self._send_reconfig_request(now)
        if self._heartbeat.expired(now) and self.state is State.ESTABLISHED:
            self._send_heartbeat(now)

    def _on_t3(self, now: float) -> None:
        rtx = self.retransmissions
        if rtx is None or rtx.outstanding == 0:
            return
        self._error_count += 1
        if self._error_count > self.max_retransmissions:
            self._lost("too many retransmissions: the peer is unreachable", now)
            return
        for message in rtx.on_timeout(now):
            self._abandon(message)
        self._forward_tsn_force = True
        self._t3.start(now, self._rto.rto)

    # -- outgoing packets -------------------------------------------------------------------

    def _a_rwnd(self) -> int:
        reassembly = self.reassembly
        return max(0, self.receive_window - reassembly.buffered - reassembly.delivered)

    def _ensure(self, size: int, tag: int) -> None:
        """Make the open packet one for ``tag`` with ``size`` bytes of room."""
        writer = self._writer
        if self._open_tag != tag or writer.room < size:
            if self._open_tag >= 0 and not writer.empty:
                self._out.append(writer.finish())
            writer.start(tag)
            self._open_tag = tag

    def _put(self, tag: int, chunk: bytes) -> None:
        size = (len(chunk) + 3) & ~3
        if size > self.mtu - COMMON_HEADER_SIZE:
            self._flush()
            self._out.append(build_packet(self.local_port, self.remote_port, tag, chunk))
            return
        self._ensure(size, tag)
        self._writer.add(chunk)

    def _flush(self) -> None:
        if self._open_tag >= 0:
            if not self._writer.empty:
                self._out.append(self._writer.finish())
            self._open_tag = -1

    def packets_to_send(self) -> list[bytes]:
        """The packets to send now, each a whole SCTP packet of at most ``mtu`` bytes."""
        now = self._now
        control = self._control
        if control:
            self._control = []
            for tag, chunk in control:
                if chunk[0] == INIT:
                    self._flush()  # INIT travels alone
                    self._put(tag, chunk)
                    self._flush()
                else:
                    self._put(tag, chunk)
        rtx = self.retransmissions
        tracker = self.tracker
        if rtx is not None and tracker is not None and not self._ended:
            tag = self.peer_tag
            sending = self._sends_data and (
                rtx.has_retransmissions or (self.send_queue.has_data
                                            and rtx.flight < rtx.congestion.cwnd)
            )
            if tracker.sack_now or (tracker.sack_pending and sending):
                self._put(tag, tracker.make_sack(self._a_rwnd()))
                self._advertised_rwnd = self._a_rwnd()
                self._delayed_ack.stop()
                self.sacks_sent += 1
            if rtx.forward_tsn_due and self.peer_supports_forward_tsn:
                self._put_forward_tsn(rtx, now)
            if self._sends_data:
                self._put_data(rtx, now)
        self._flush()
        out = self._out
        self._out = []
        self.packets_sent += len(out)
        return out

    def _put_forward_tsn(self, rtx: RetransmissionQueue, now: float) -> None:
        forward = rtx.forward_tsn()
        if forward is None:
            return
        new_cumulative, streams = forward
        last, sent_at = self._forward_tsn_sent
        srtt = self._rto.srtt if self._rto.srtt is not None else self._rto.rto
        # The same FORWARD TSN again only after a round trip (or a T3 timeout).
        if new_cumulative == last and now - sent_at < srtt and not self._forward_tsn_force:
            return
        self._forward_tsn_force = False
        self._forward_tsn_sent = (new_cumulative, now)
        self._put(self.peer_tag, ForwardTsnChunk(new_cumulative, streams).encode())
        if not self._t3.running:
            self._t3.start(now, self._rto.rto)

    def _put_data(self, rtx: RetransmissionQueue, now: float) -> None:
        writer = self._writer
        tag = self.peer_tag
        congestion = rtx.congestion
        # Retransmissions first; after a fast retransmit, one packet of them regardless of
        # cwnd (RFC 9260 7.2.4).
        bonus = self.mtu if self._fast_retransmit_due else 0
        self._fast_retransmit_due = False
        while rtx.has_retransmissions and (rtx.flight < congestion.cwnd or bonus > 0):
            self._ensure(DATA_HEADER_SIZE + 4, tag)
            tsn = rtx.next_retransmission(writer.room)
            if tsn is None:
                if writer.empty or not rtx.has_retransmissions:
                    break
                self._flush()
                continue
            chunk = rtx.retransmitted(tsn)
            message = chunk.message
            offset = chunk.offset
            writer.add_data(chunk.flags, tsn, message.stream_id, message.ssn, message.ppid,
                            message.data[offset : offset + chunk.length])
            bonus -= DATA_HEADER_SIZE + chunk.length
        queue = self.send_queue
        min_room = DATA_HEADER_SIZE + 64
        whole_payload = (self.mtu - COMMON_HEADER_SIZE - DATA_HEADER_SIZE) & ~3
        while queue.has_data and rtx.flight < congestion.cwnd:
            if rtx.flight and rtx.peer_rwnd < min(self.mtu // 2, queue.total_buffered):
                break  # the peer's window is (nearly) closed: wait for it to open
            self._ensure(min_room, tag)
            max_payload = (writer.room - DATA_HEADER_SIZE) & ~3
            head = queue.head(now)
            if head is None:
                break
            size = len(head.data)
            if not head.offset and max_payload < size <= whole_payload and not writer.empty:
                # A message that fits a packet of its own is not split to fill this one.
                self._flush()
                continue
            if rtx.flight:
                max_payload = min(max_payload, rtx.peer_rwnd)
            fragment = queue.next_fragment(max_payload, now)
            if fragment is None:
                break
            message, offset, length = fragment
            if offset and message.expires_at <= now and rtx.partial_reliability:
                self._abandon(message)  # expired midway: drop the rest, forward the sent
                continue
            flags = (0 if offset else 2) | (1 if offset + length == len(message.data) else 0)
            if not message.ordered:
                flags |= 4
            tsn = rtx.add(message, offset, length, flags, now)
            if not offset:
                message.first_tsn = tsn
            message.tsn_count += 1
            writer.add_data(flags, tsn, message.stream_id, message.ssn, message.ppid,
                            message.data[offset : offset + length])
        if rtx.outstanding and not self._t3.running:
            self._t3.start(now, self._rto.rto)
        if self.resets.pending and self.resets.request is None:
            self._maybe_request_reset(now)
            if self._control:
                control = self._control
                self._control = []
                for chunk_tag, encoded in control:
                    self._put(chunk_tag, encoded)
