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

This module is the facade: the user API, the state (changed only through the table of
:mod:`mvpd.sctp.state`), the timers and how the association ends.  Its parts do the rest
on the state it owns: :mod:`~mvpd.sctp.handshake` (INIT to COOKIE ACK),
:mod:`~mvpd.sctp.receiver` (the peer's packets, chunk by chunk), :mod:`~mvpd.sctp.sender`
(bundling what goes out into packets) and :mod:`~mvpd.sctp.shutdown` (the graceful close).
"""

from __future__ import annotations

import struct

from .chunks import AbortChunk, HeartbeatChunk, ReconfigChunk
from .congestion import RtoEstimator
from .data_tracker import DataTracker
from .errors import (
    AssociationNotOpen,
    InvalidStream,
    MessageTooLarge,
    SendError,
    StreamClosing,
)
from .events import (
    AssociationClosed,
    AssociationLost,
    BufferedAmountLow,
    Event,
)
from .handshake import Handshake, random_u32
from .parameters import CAUSE_PROTOCOL_VIOLATION, CAUSE_USER_INITIATED_ABORT
from .reassembly import Reassembly
from .receiver import Receiver
from .retransmission_queue import RetransmissionQueue
from .send_queue import INFINITE, OutgoingMessage, SendQueue
from .sender import Sender
from .shutdown import ShutdownSequence
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

_HEARTBEAT_INFO = struct.Struct("!dQ")

__all__ = ["Association"]


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
        self.local_tag = random_u32(nonzero=True)
        self.local_initial_tsn = random_u32()
        self.peer_tag = 0
        self._now = 0.0

        self.outbound_streams = outbound_streams
        self.inbound_streams = inbound_streams
        self.peer_supports_forward_tsn = False
        self.peer_supports_reconfig = False

        self._events: list[Event] = []
        #: Control chunks for the next packets, as (verification tag, encoded chunk).
        self._control: list[tuple[int, bytes]] = []
        self._error_count = 0

        self._rto = RtoEstimator(rto_initial, rto_min, rto_max)
        self.send_queue = SendQueue()
        self.reassembly = Reassembly(max_message_size, self._events)
        self.tracker: DataTracker | None = None
        self.retransmissions: RetransmissionQueue | None = None
        self._advertised_rwnd = receive_window

        self._t3 = Timer("t3-rtx")
        self._delayed_ack = Timer("delayed-ack")
        self._heartbeat = Timer("heartbeat")
        self._heartbeat_nonce = -1
        self._reconfig_timer = Timer("reconfig")

        self.resets = StreamResets(
            self.local_initial_tsn, self.send_queue, self.reassembly, self._events
        )

        # The parts (they change the state above; the underscored names are theirs too).
        self._handshake = Handshake(self)
        self._receiver = Receiver(self)
        self._sender = Sender(self)
        self._shutdown_sequence = ShutdownSequence(self)
        self._timers = (self._handshake.t1, self._shutdown_sequence.t2, self._t3,
                        self._delayed_ack, self._heartbeat, self._reconfig_timer)

        #: Statistics (see :meth:`stats`): packets and SACKs sent; packets that belonged
        #: to the association, those of them with DATA, and SACKs received.
        self.packets_sent = 0
        self.sacks_sent = 0
        self.packets_received = 0
        self.data_packets_received = 0
        self.sacks_received = 0

    # -- user API ---------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Send INIT (the client side; in WebRTC both sides may)."""
        self._now = now
        target = next_state(self.state, Trigger.CONNECT)
        if target is None or self._ended:
            raise AssociationNotOpen(f"cannot connect in state {self.state.value}")
        self._handshake.send_init(now)
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
        self._sender.set_mtu(mtu)
        self.mtu = mtu

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
        self._shutdown_sequence.maybe_drained(now)

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
        for timer in self._timers:
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
    def packets_since_sack(self) -> int:
        """DATA packets received since the last SACK went out."""
        tracker = self.tracker
        return tracker.packets_since_sack if tracker is not None else 0

    @property
    def loss_reported(self) -> bool:
        """The next SACK reports gaps or duplicate TSNs: RFC 9260 6.2 wants it sent at once,
        and the peer's fast retransmit counts every such report."""
        tracker = self.tracker
        return tracker is not None and tracker.reports_loss()

    @property
    def srtt(self) -> float | None:
        return self._rto.srtt

    def stats(self) -> dict[str, int | float | str | None]:
        """The association's counters and congestion state, as plain data.

        Packets and SACKs each way; ``retransmissions``: DATA chunks sent again, after
        ``fast_retransmits`` and ``t3_expirations`` (loss events); ``abandoned``: chunks of
        partially reliable messages given up; ``unreliable_losses_ignored``: losses that left
        the congestion window alone (see ``unreliable_losses_reduce_cwnd``).  Counters only
        grow.  ``cwnd``, ``ssthresh``, ``flight_size`` and ``peer_rwnd`` (bytes) are
        ``None`` until the association is established; ``our_rwnd`` is the window we
        advertise, ``outbound_bytes`` what is queued and not yet sent.
        """
        rtx = self.retransmissions
        srtt = self._rto.srtt
        return {
            "state": self.state.value,
            "packets_sent": self.packets_sent,
            "packets_received": self.packets_received,
            "data_packets_received": self.data_packets_received,
            "sacks_sent": self.sacks_sent,
            "sacks_received": self.sacks_received,
            "cwnd": rtx.congestion.cwnd if rtx is not None else None,
            "ssthresh": rtx.congestion.ssthresh if rtx is not None else None,
            "flight_size": rtx.flight if rtx is not None else None,
            "peer_rwnd": rtx.peer_rwnd if rtx is not None else None,
            "our_rwnd": self._a_rwnd(),
            "outbound_bytes": self.send_queue.total_buffered,
            "srtt_ms": srtt * 1000 if srtt is not None else None,
            "rto_ms": self._rto.rto * 1000,
            "retransmissions": rtx.chunks_retransmitted if rtx is not None else 0,
            "fast_retransmits": rtx.fast_retransmits if rtx is not None else 0,
            "t3_expirations": rtx.timeouts if rtx is not None else 0,
            "abandoned": rtx.chunks_abandoned if rtx is not None else 0,
            "unreliable_losses_ignored": (
                rtx.ignored_unreliable_losses if rtx is not None else 0
            ),
        }

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
        self._receiver.receive_packet(data, now)

    # -- heartbeat --------------------------------------------------------------------------

    def _send_heartbeat(self, now: float) -> None:
        if self._heartbeat_nonce >= 0:
            self._error_count += 1  # the previous one went unanswered
            if self._error_count > self.max_retransmissions:
                self._lost("the peer stopped answering heartbeats", now)
                return
        self._heartbeat_nonce = random_u32()
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

    # -- the end ----------------------------------------------------------------------------

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
        for timer in self._timers:
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
        if self._handshake.t1.expired(now):
            self._handshake.on_t1_expired(now)
            if self._ended:
                return
        if self._t3.expired(now):
            self._on_t3(now)
            if self._ended:
                return
        if self._shutdown_sequence.t2.expired(now):
            self._shutdown_sequence.on_t2_expired(now)
            if self._ended:
                return
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
        self._sender.forward_tsn_force = True
        self._t3.start(now, self._rto.rto)

    # -- outgoing packets -------------------------------------------------------------------

    def _a_rwnd(self) -> int:
        """The receive window to advertise: what unread and unassembled data leave free."""
        reassembly = self.reassembly
        return max(0, self.receive_window - reassembly.buffered - reassembly.delivered)

    def packets_to_send(self) -> list[bytes]:
        """The packets to send now, each a whole SCTP packet of at most ``mtu`` bytes."""
        return self._sender.packets_to_send()
