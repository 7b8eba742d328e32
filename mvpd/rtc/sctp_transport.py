"""The asyncio driver of a sans-I/O SCTP association over DTLS, and the data channels on it.

It only feeds and drains :class:`mvpd.sctp.Association`:

* each DTLS application datagram goes to ``receive_packet(data, now)``, decrypted as the
  socket delivers it once DTLS is up (``aiortc_internals.receive_data_now``);
* whatever ``packets_to_send()`` returns goes out as DTLS application data, in one flush
  per loop iteration however many channels sent or datagrams arrived (so the association
  can bundle, and acknowledges a burst of received packets with one SACK); the packets
  are encrypted and handed to the socket synchronously where aioice's path allows, a
  flush's worth in few system calls (``aiortc_internals.send_data_now`` with UDP
  segmentation offload), else through aiortc's coroutines;
* one timer, re-armed from ``next_deadline()`` after every step, calls ``handle_timeout``;
* the association's events drive the channel table (:class:`DataChannelProtocol`, DCEP)
  and the :class:`DataChannel` objects.

The clock is the event loop's (monotonic, seconds). Stream resets follow RFC 8831 section
6.7: closing a channel resets our outgoing stream; when the peer resets its outgoing
stream we reset ours in turn; the channel is closed, and its stream id free, once both
directions are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from aiortc import RTCDtlsTransport

from ..sctp import Association, SctpError
from ..sctp.dcep import (
    PPID_STRING,
    ChannelAcknowledged,
    ChannelMessage,
    ChannelState,
    DataChannelProtocol,
    DcepError,
    Outgoing,
    ProtocolViolation,
    RemoteChannelOpened,
    payload_size,
)
from ..sctp.events import (
    AssociationClosed,
    AssociationEstablished,
    AssociationLost,
    BufferedAmountLow,
    Event,
    MessageReceived,
    MessageRefused,
    OutgoingStreamsReset,
    StreamsReset,
)
from ..udp_batch import TransportBatchSenders
from . import aiortc_internals as internals
from .datachannel import DataChannel
from .errors import InvalidStateError

log = logging.getLogger(__name__)

#: Channels (both sides' together) beyond which the peer's new ones are refused.
MAX_CHANNELS = 1024

#: The association's congestion response: as many CUBIC flows as a QUIC connection in
#: Chromium emulates (mvpd.sctp.congestion explains why).
EMULATED_FLOWS = 2

#: In-order DATA packets a burst may leave unacknowledged before a SACK goes out at once
#: (see SctpTransport._receive); 8 moved 1.1-1.2x what 4 moved on loopback.
BURST_SACK_PACKETS = 8
#: Seconds after a received packet revealed a gap during which every second DATA packet
#: is acknowledged at once again (RFC 9260 6.2), bursts or not.
LOSS_MEMORY = 1.0

#: States of the association as the connection sees them.
SCTP_NEW, SCTP_CONNECTING, SCTP_CONNECTED, SCTP_CLOSED, SCTP_FAILED = (
    "new", "connecting", "connected", "closed", "failed",
)


class SctpTransport:
    """One SCTP association over one DTLS transport, with its data channels.

    ``dtls_role`` (``client``/``server``) picks the stream id parity and which side sends
    the INIT (the DTLS client). ``remote_max_message_size`` (0: no limit) bounds what
    ``send`` accepts. ``on_datachannel`` gets channels the peer opens; ``on_state`` gets
    ``connected``, ``closed`` or ``failed`` once. At most ``max_channels`` channels are
    open at once: the peer's further OPENs are answered with a stream reset.
    """

    def __init__(
        self,
        dtls: RTCDtlsTransport,
        *,
        dtls_role: str,
        local_port: int,
        remote_port: int,
        remote_max_message_size: int,
        local_max_message_size: int,
        on_datachannel: Callable[[DataChannel], None],
        on_state: Callable[[str, str], None],
        max_channels: int = MAX_CHANNELS,
    ) -> None:
        self._dtls = dtls
        self._loop = asyncio.get_running_loop()
        self.dtls_role = dtls_role
        self.remote_max_message_size = remote_max_message_size
        self.association = Association(
            local_port=local_port,
            remote_port=remote_port,
            max_message_size=local_max_message_size,
            # The peer's a=max-message-size (0: it takes any size, RFC 8841 6.1).
            peer_max_message_size=remote_max_message_size or sys.maxsize,
            # Losses of maxRetransmits=0 messages (the tunnel) leave the congestion window
            # alone: the flows inside the tunnel run their own congestion control.
            unreliable_losses_reduce_cwnd=False,
            # CUBIC as two flows, as Chromium's QUIC connections (one association carries
            # all of a peer's channels); see mvpd.sctp.congestion.
            emulated_flows=EMULATED_FLOWS,
        )
        self.table = DataChannelProtocol(dtls_role)
        self.state = SCTP_NEW
        self.protocol_violations = 0
        #: Text messages that were not UTF-8 (handed to the channel as bytes).
        self.invalid_text = 0
        self.max_channels = max_channels
        self.channels_refused = 0
        self._on_datachannel = on_datachannel
        self._on_state = on_state
        self._channels: dict[int, DataChannel] = {}
        #: Channels created before the association was up (no stream id yet).
        self._pending: list[DataChannel] = []
        #: Stream ids whose outgoing/incoming direction has been reset.
        self._outgoing_reset: set[int] = set()
        self._incoming_reset: set[int] = set()
        self._reset_requested: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        #: When a received packet last revealed a gap (loop time; see _receive).
        self._loss_seen_at = -LOSS_MEMORY
        #: Inside the association's event handlers (they may send): no flush from there.
        self._dispatching = 0
        #: Batch senders on the selected pair's socket (one per transport it had).
        self._senders = TransportBatchSenders()
        #: Sending through aiortc's coroutines (a path send_data_now cannot take).
        self._slow_task: asyncio.Task[None] | None = None
        self._dtls_ready = False
        #: Set whenever a channel is forgotten or the state changes (for :meth:`close`).
        self._changed = asyncio.Event()
        #: Sends of the last packets through aiortc's own (TURN) path, kept referenced.
        self._last_sends: set[asyncio.Task[None]] = set()

    @property
    def transport(self) -> RTCDtlsTransport:
        """The DTLS transport under the association (W3C ``RTCSctpTransport.transport``)."""
        return self._dtls

    # --- lifecycle -------------------------------------------------------------------------

    def attach(self) -> None:
        """Receive DTLS application data (call before the DTLS handshake starts, so a
        packet right behind the handshake is not lost)."""
        internals.register_data_receiver(self._dtls, self)

    def set_packet_size(self, size: int) -> None:
        """Build SCTP packets of up to ``size`` bytes (before the association starts)."""
        self.association.set_mtu(size)

    def start(self) -> None:
        """DTLS is connected: the DTLS client starts the association."""
        self._dtls_ready = True
        internals.receive_data_now(self._dtls, self._receive)
        self._set_state(SCTP_CONNECTING)
        if self.dtls_role == "client":
            self.association.connect(self._now())
        self._step()

    def shutdown(self) -> None:
        """Close gracefully (SHUTDOWN), as far as the peer is still there."""
        if self.state in (SCTP_CONNECTING, SCTP_CONNECTED):
            self.association.shutdown(self._now())
            self._step()

    async def close(self, timeout: float) -> None:
        """Close cleanly within ``timeout`` seconds, as far as the peer answers: every
        channel by a stream reset (RFC 8831 section 6.7), then the association by SHUTDOWN
        (RFC 9260 section 9.2), so the peer sees a close and not an abort. Whatever is
        still open after ``timeout`` is left to :meth:`detach`."""
        loop = self._loop
        deadline = loop.time() + timeout
        for channel in [*self._channels.values(), *self._pending]:
            channel.close()
        # Half the time for the resets: the SHUTDOWN must still leave if the peer never
        # answers them.
        await self._wait_until(lambda: not self._channels, loop.time() + timeout / 2)
        self.shutdown()
        await self._wait_until(lambda: self.state in (SCTP_CLOSED, SCTP_FAILED), deadline)

    async def _wait_until(self, done: Callable[[], bool], deadline: float) -> None:
        while not done() and self.state in (SCTP_CONNECTING, SCTP_CONNECTED):
            self._changed.clear()
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def detach(self) -> None:
        """Stop all I/O and close every channel (the DTLS transport is going away)."""
        internals.stop_receiving_now(self._dtls)
        internals.unregister_data_receiver(self._dtls, self)
        self._senders.close()
        self._dtls_ready = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        self._close_all_channels()
        if self.state not in (SCTP_CLOSED, SCTP_FAILED):
            self._set_state(SCTP_CLOSED, "closed locally")

    def _now(self) -> float:
        return self._loop.time()

    # --- I/O -------------------------------------------------------------------------------

    async def _handle_data(self, data: bytes) -> None:
        """aiortc's DTLS transport hands us decrypted datagrams here (until the
        synchronous path of :func:`aiortc_internals.receive_data_now` takes over)."""
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        """One decrypted DTLS datagram: an SCTP packet.

        On a clean path, in-order DATA is acknowledged in the flush after the socket's
        current burst of datagrams rather than after every second packet (RFC 9260 6.2's
        SHOULD), and at least every :data:`BURST_SACK_PACKETS`: one SACK then covers
        several packets, which saves a packet and the peer's work on it each time.
        Everything else is answered at once, as RFC 9260 has it: a SACK that reports gaps
        or duplicates, every SACK for :data:`LOSS_MEMORY` seconds after one did (the peer's
        slow start grows by one MTU per SACK, its fast retransmit counts every report: over
        a path with delay and loss, fewer SACKs moved a sixth less), and what a SACK from
        the peer releases (holding that back to a burst's end cost a third over the same
        path; bench/rtc_pipe.py --netem)."""
        association = self.association
        data_packets = association.data_packets_received
        now = self._now()
        try:
            association.receive_packet(data, now)
        except SctpError as exc:  # malformed: dropped, the association is unchanged
            log.debug("SCTP packet dropped: %s", exc)
        except Exception:
            log.exception("SCTP failed on a received packet; dropped")
        if association.data_packets_received != data_packets:
            if association.loss_reported:
                self._loss_seen_at = now
            elif (now - self._loss_seen_at > LOSS_MEMORY
                    and association.packets_since_sack < BURST_SACK_PACKETS):
                self._step()
                return
        self._process_events()
        self._flush()
        self._rearm_timer()

    def _step(self) -> None:
        """After any call into the association: events, a flush soon, the timer."""
        self._process_events()
        self._schedule_flush()
        self._rearm_timer()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._dtls_ready:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        self._flush()
        self._rearm_timer()

    def _flush(self) -> None:
        """Send every packet the association has (and what taking them made due)."""
        if self._slow_task is not None:
            return  # it takes the association's packets when done with its own
        while self._dtls_ready:
            packets = self.association.packets_to_send()
            # Taking packets drains send queues: buffered-amount-low events follow.
            self._process_events()
            if not packets:
                return
            try:
                if internals.send_data_now(self._dtls, packets, self._senders):
                    continue
            except ConnectionError as exc:
                # DTLS or ICE is gone; SCTP's own timers notice the silence.
                log.debug("SCTP packets not sent: %s", exc)
                return
            self._slow_task = self._loop.create_task(self._flush_slowly(packets))
            return

    async def _flush_slowly(self, packets: list[bytes]) -> None:
        """Send through aiortc's coroutines, in order, until the association has no more."""
        try:
            while packets and self._dtls_ready:
                for packet in packets:
                    await internals.send_data(self._dtls, packet)
                packets = self.association.packets_to_send()
                self._process_events()
        except ConnectionError as exc:
            log.debug("SCTP packet not sent: %s", exc)
        finally:
            self._slow_task = None
        self._rearm_timer()

    def _send_last_packets(self) -> None:
        """The association ended: what it still has to say (SHUTDOWN COMPLETE, ABORT) goes
        out now, before the state change stops all I/O."""
        if not self._dtls_ready:
            return
        packets = self.association.packets_to_send()
        try:
            if internals.send_data_now(self._dtls, packets, self._senders):
                return
        except ConnectionError as exc:
            log.debug("last SCTP packets not sent: %s", exc)
            return
        for packet in packets:
            task = self._loop.create_task(internals.send_data(self._dtls, packet))
            self._last_sends.add(task)
            task.add_done_callback(self._last_sent)

    def _last_sent(self, task: asyncio.Task[None]) -> None:
        self._last_sends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("last SCTP packet not sent: %s", task.exception())

    def _rearm_timer(self) -> None:
        deadline = self.association.next_deadline()
        timer_at = self._timer_at
        if timer_at is not None and deadline is not None and timer_at <= deadline:
            # The armed timer fires no later than needed: when it does, handle_timeout runs
            # what is due (nothing, if the deadline moved on) and the timer is set again.
            # A SACK moves the T3-rtx deadline later on every packet; this saves a cancel
            # and a new loop timer each time.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self.state not in (SCTP_CLOSED, SCTP_FAILED):
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.association.handle_timeout(self._now())
        self._step()

    # --- association events ----------------------------------------------------------------

    def _process_events(self) -> None:
        self._dispatching += 1
        try:
            self._dispatch(self.association.events())
        finally:
            self._dispatching -= 1

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, MessageReceived):
                self._on_message(event.stream_id, event.ppid, event.data)
            elif isinstance(event, MessageRefused):
                channel = self._channels.get(event.stream_id)
                if channel is not None:
                    # Not a W3C event: mvpd's transports count it (message-too-large).
                    channel.emit("messagerefused", event.received)
            elif isinstance(event, BufferedAmountLow):
                channel = self._channels.get(event.stream_id)
                if channel is not None:
                    channel.emit("bufferedamountlow")
            elif isinstance(event, StreamsReset):
                for stream_id in event.stream_ids:
                    self._on_incoming_reset(stream_id)
            elif isinstance(event, OutgoingStreamsReset):
                for stream_id in event.stream_ids:
                    self._on_outgoing_reset(stream_id, event.succeeded)
            elif isinstance(event, AssociationEstablished):
                self._set_state(SCTP_CONNECTED)
                self._open_pending()
            elif isinstance(event, AssociationLost):
                self._send_last_packets()
                self._close_all_channels()
                # aiortc and browsers end a connection with an ABORT: the peer is gone by
                # its own choice, which is a close, not a failure of ours.
                self._set_state(SCTP_CLOSED if event.by_peer else SCTP_FAILED, event.reason)
            elif isinstance(event, AssociationClosed):
                self._send_last_packets()
                self._close_all_channels()
                self._set_state(SCTP_CLOSED, "the association was shut down")

    def _on_message(self, stream_id: int, ppid: int, data: bytes) -> None:
        event = self.table.receive(stream_id, ppid, data)
        if isinstance(event, ChannelMessage):
            channel = self._channels.get(stream_id)
            if channel is not None:
                channel.emit("message", event.data)
        elif isinstance(event, RemoteChannelOpened):
            if len(self._channels) >= self.max_channels:
                # A flood of OPENs: refuse the channel with a stream reset, never an ACK.
                self.channels_refused += 1
                log.debug("data channel %d refused: %d channels open", stream_id,
                          len(self._channels))
                refused = DataChannel(self, event.parameters, stream_id=stream_id,
                                      state=ChannelState.CLOSING)
                self._channels[stream_id] = refused
                self._request_reset(stream_id)
                return
            try:
                self._send(event.ack)
            except SctpError as exc:
                log.debug("cannot acknowledge data channel %d: %s", stream_id, exc)
                self.table.closed(stream_id)
                return
            channel = DataChannel(
                self, event.parameters, stream_id=stream_id, state=ChannelState.OPEN
            )
            self._channels[stream_id] = channel
            self._on_datachannel(channel)
        elif isinstance(event, ChannelAcknowledged):
            channel = self._channels.get(stream_id)
            if channel is not None:
                channel._set_state(ChannelState.OPEN)
        elif isinstance(event, ProtocolViolation):
            channel = self._channels.get(stream_id)
            if ppid == PPID_STRING and channel is not None and channel.readyState == "open":
                # Text that is not UTF-8 (the only violation a text message on an open
                # channel can have): the channel gets the bytes, and its transport decides
                # (chat and json count it as invalid). The association is unaffected.
                self.invalid_text += 1
                channel.emit("message", data)
                return
            self.protocol_violations += 1
            log.debug("data channel protocol violation on stream %d: %s",
                      stream_id, event.reason)

    def _on_incoming_reset(self, stream_id: int) -> None:
        self._incoming_reset.add(stream_id)
        channel = self._channels.get(stream_id)
        if channel is None:
            self._incoming_reset.discard(stream_id)
            return
        # The peer closed the channel: close our direction too (RFC 8831 section 6.7).
        channel._set_state(ChannelState.CLOSING)
        self._request_reset(stream_id)
        self._maybe_closed(stream_id)

    def _on_outgoing_reset(self, stream_id: int, succeeded: bool) -> None:
        self._reset_requested.discard(stream_id)
        if not succeeded:
            log.debug("the peer refused to reset stream %d; asking again", stream_id)
            self._request_reset(stream_id)
            return
        self._outgoing_reset.add(stream_id)
        self._maybe_closed(stream_id)

    def _request_reset(self, stream_id: int) -> None:
        if stream_id in self._outgoing_reset or stream_id in self._reset_requested:
            return
        self.table.start_closing(stream_id)
        try:
            self.association.reset_streams([stream_id], self._now())
        except SctpError as exc:
            # The association is ending, or the peer cannot reset streams: the channel
            # cannot be closed cleanly, so it is closed here.
            log.debug("stream %d not reset: %s", stream_id, exc)
            self._forget(stream_id)
            return
        self._reset_requested.add(stream_id)
        self._schedule_flush()

    def _maybe_closed(self, stream_id: int) -> None:
        if stream_id in self._incoming_reset and stream_id in self._outgoing_reset:
            self._forget(stream_id)

    def _forget(self, stream_id: int) -> None:
        """The channel on ``stream_id`` is closed and its id free."""
        self._incoming_reset.discard(stream_id)
        self._outgoing_reset.discard(stream_id)
        self._reset_requested.discard(stream_id)
        self.table.closed(stream_id)
        channel = self._channels.pop(stream_id, None)
        self._changed.set()
        if channel is not None:
            channel._set_state(ChannelState.CLOSED)

    def _close_all_channels(self) -> None:
        channels = list({id(c): c for c in [*self._channels.values(), *self._pending]}.values())
        self._channels.clear()
        self._pending.clear()
        for channel in channels:
            channel._set_state(ChannelState.CLOSED)

    def _set_state(self, state: str, reason: str = "") -> None:
        if state == self.state or self.state in (SCTP_CLOSED, SCTP_FAILED):
            return
        self.state = state
        self._changed.set()
        if self._timer is not None and state in (SCTP_CLOSED, SCTP_FAILED):
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        self._on_state(state, reason)

    # --- channels --------------------------------------------------------------------------

    def add_channel(self, channel: DataChannel) -> None:
        """Take over ``channel``: announce it with DCEP once the association is up, or, if
        negotiated, just open it then. :class:`DcepError` if its fixed id is taken."""
        if self.state in (SCTP_CLOSED, SCTP_FAILED):
            raise InvalidStateError("the SCTP association is closed")
        if channel.negotiated:
            assert channel.id is not None
            self.table.add_negotiated(channel.parameters, channel.id)
            self._channels[channel.id] = channel
        channel._bind(self)
        if self.state != SCTP_CONNECTED:
            self._pending.append(channel)
        elif channel.negotiated:
            self._loop.call_soon(channel._set_state, ChannelState.OPEN)
        else:
            self._announce(channel)

    def _open_pending(self) -> None:
        pending, self._pending = self._pending, []
        for channel in pending:
            if channel.negotiated:
                channel._set_state(ChannelState.OPEN)
            else:
                self._announce(channel)

    def _announce(self, channel: DataChannel) -> None:
        try:
            stream_id, open_message = self.table.open_channel(channel.parameters)
        except DcepError as exc:
            log.warning("cannot open data channel %r: %s", channel.label, exc)
            channel._set_state(ChannelState.CLOSED)
            return
        channel._set_id(stream_id)
        self._channels[stream_id] = channel
        try:
            self._send(open_message)
        except SctpError as exc:
            log.warning("cannot open data channel %r: %s", channel.label, exc)
            self._forget(stream_id)

    def _send(self, out: Outgoing) -> None:
        self.association.send(
            out.stream_id,
            out.ppid,
            out.payload,
            ordered=out.ordered,
            max_retransmits=out.max_retransmits,
            lifetime=out.lifetime / 1000 if out.lifetime is not None else None,
            now=self._now(),
        )
        if self._flush_scheduled or self._dispatching or not self._dtls_ready:
            # It goes with this iteration's flush (inside event dispatch, where a flush now
            # would run the handlers it is called from again, always).
            self._schedule_flush()
            return
        # The first message since the last flush leaves at once, as WebRTC's SCTP stacks
        # send (no Nagle delay): a request/response exchange does not wait for the rest of
        # the loop iteration. Messages sent after it in the same iteration are bundled by
        # the flush scheduled here.
        self._schedule_flush()
        self._flush()
        self._rearm_timer()

    # ChannelTransport, called by DataChannel.

    def channel_send(self, channel: DataChannel, data: str | bytes) -> None:
        size = payload_size(data)
        if self.remote_max_message_size and size > self.remote_max_message_size:
            raise ValueError(
                f"cannot send a message of {size} bytes: the peer accepts at most "
                f"{self.remote_max_message_size}"
            )
        if channel.id is None:
            raise InvalidStateError("the data channel has no stream yet")
        self._send(self.table.outgoing(channel.id, data))

    def channel_close(self, channel: DataChannel) -> None:
        stream_id = channel.id
        if stream_id is None or self.state != SCTP_CONNECTED:
            # Never announced (or nothing to announce it on): closed at once.
            with contextlib.suppress(ValueError):
                self._pending.remove(channel)
            if stream_id is not None:
                self._channels.pop(stream_id, None)
                self.table.closed(stream_id)
            channel._set_state(ChannelState.CLOSED)
            return
        channel._set_state(ChannelState.CLOSING)
        self._request_reset(stream_id)

    def channel_buffered_amount(self, channel: DataChannel) -> int:
        if channel.id is None:
            return 0
        return int(self.association.buffered_amount(channel.id))

    def channel_set_low_threshold(self, channel: DataChannel, threshold: int) -> None:
        if channel.id is not None:
            self.association.set_buffered_amount_low_threshold(channel.id, threshold)

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "channels": len(self._channels),
            "protocol_violations": self.protocol_violations,
            "invalid_text": self.invalid_text,
            # Messages over our a=max-message-size, refused during reassembly.
            "messages_too_large": self.association.reassembly.refused,
            "channels_refused": self.channels_refused,
        }
