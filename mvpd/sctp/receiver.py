"""The receiving side of an association: the peer's packets, checked and taken apart chunk
by chunk.

A packet must carry our ports and the right verification tag (RFC 9260 8.5), else it is
dropped unseen.  DATA goes to the data tracker and reassembly, within the receive window;
SACK (and the cumulative ack of a SHUTDOWN) to the retransmission queue; FORWARD TSN skips
what the peer abandoned; RE-CONFIG requests and responses go to the stream resets.  The
setup and shutdown chunks go to their parts, :mod:`~mvpd.sctp.handshake` and
:mod:`~mvpd.sctp.shutdown`.

A part of :class:`~mvpd.sctp.association.Association`, which owns the state it changes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .chunks import (
    ABORT,
    COOKIE_ACK,
    COOKIE_ECHO,
    DATA,
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
    ErrorChunk,
    ForwardTsnChunk,
    HeartbeatAckChunk,
    HeartbeatChunk,
    InitAckChunk,
    InitChunk,
    ReconfigChunk,
    SackChunk,
    ShutdownChunk,
    ShutdownCompleteChunk,
)
from .errors import MalformedPacket, ProtocolViolation
from .events import AssociationLost
from .packet import parse_packet
from .parameters import (
    CAUSE_NO_USER_DATA,
    CAUSE_PROTOCOL_VIOLATION,
    CAUSE_UNRECOGNIZED_CHUNK,
    PARAM_OUTGOING_SSN_RESET_REQUEST,
    PARAM_RECONFIG_RESPONSE,
    RESULT_DENIED,
    TLV,
    OutgoingSsnResetRequest,
    ReconfigResponse,
    cause_text,
)
from .reassembly import ENTRY_COST
from .send_queue import OutgoingMessage
from .state import State

if TYPE_CHECKING:
    from .association import Association

__all__ = ["Receiver"]

_DATA_FIELDS = struct.Struct("!IHHI")
_PLAIN_SACK = struct.Struct("!IIHH")
_NO_GAPS: list[tuple[int, int]] = []
#: DATA further than this beyond the cumulative TSN is dropped (gap blocks are 16-bit).
_MAX_TSN_AHEAD = 0xFFFF


class Receiver:
    """Takes in the peer's packets for an association."""

    def __init__(self, association: Association) -> None:
        self._association = association

    def receive_packet(self, data: bytes, now: float) -> None:
        """Process one SCTP packet (see :meth:`Association.receive_packet`)."""
        a = self._association
        packet = parse_packet(data)
        if packet.dst_port != a.local_port or packet.src_port != a.remote_port:
            return
        if a._ended:
            # Our SHUTDOWN COMPLETE was lost: the peer repeats its SHUTDOWN ACK (RFC 9260 8.4).
            if packet.verification_tag == a.local_tag and any(
                span[0] == SHUTDOWN_ACK for span in packet.chunks
            ):
                a._control.append((a.local_tag, ShutdownCompleteChunk(FLAG_T).encode()))
            return
        chunks = packet.chunks
        first_type, first_flags = chunks[0][0], chunks[0][1]
        vtag = packet.verification_tag
        if first_type == INIT:
            if len(chunks) != 1 or vtag != 0:
                return
        elif first_type in (ABORT, SHUTDOWN_COMPLETE) and first_flags & FLAG_T:
            if vtag != a.peer_tag or not a.peer_tag:
                return
        elif vtag != a.local_tag:
            return
        a.packets_received += 1
        data = packet.data
        data_seen = False
        for kind, flags, start, end in chunks:
            if a._ended:
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
                a._handshake.on_init(InitChunk.decode(flags, value), now)
            elif kind == INIT_ACK:
                a._handshake.on_init_ack(InitAckChunk.decode(flags, value), now)
            elif kind == COOKIE_ECHO:
                a._handshake.on_cookie_echo(value, now)
            elif kind == COOKIE_ACK:
                a._handshake.on_cookie_ack(now)
            elif kind == HEARTBEAT:
                if a.peer_tag and len(value) <= 1024:
                    a._control.append((a.peer_tag, HeartbeatAckChunk(
                        HeartbeatChunk.decode(flags, value).info).encode()))
            elif kind == HEARTBEAT_ACK:
                a._on_heartbeat_ack(HeartbeatAckChunk.decode(flags, value), now)
            elif kind == ABORT:
                causes = AbortChunk.decode(flags, value).causes
                a._end(now)
                a._events.append(AssociationLost(
                    f"aborted by peer: {cause_text(causes)}", by_peer=True
                ))
                return
            elif kind == SHUTDOWN:
                a._shutdown_sequence.on_shutdown(ShutdownChunk.decode(flags, value), now)
            elif kind == SHUTDOWN_ACK:
                a._shutdown_sequence.on_shutdown_ack(now)
            elif kind == SHUTDOWN_COMPLETE:
                a._shutdown_sequence.on_shutdown_complete(now)
                return
            elif kind == ERROR:
                ErrorChunk.decode(flags, value)  # reported causes need no action here
            elif kind == RECONFIG:
                self._on_reconfig(ReconfigChunk.decode(flags, value), now)
            else:
                action = kind >> 6
                if action in (1, 3) and a.peer_tag:
                    report = ErrorChunk([(CAUSE_UNRECOGNIZED_CHUNK, data[start - 4 : end])])
                    a._control.append((a.peer_tag, report.encode()))
                if action < 2:
                    break
        tracker = a.tracker
        if data_seen and tracker is not None and not a._ended:
            a.data_packets_received += 1
            tracker.packet_received()
            if a.resets.has_deferred:
                self._perform_deferred_resets()
            if not tracker.sack_now and not a._delayed_ack.running:
                a._delayed_ack.start(now, a.delayed_ack_timeout)

    def _on_data(self, data: bytes, start: int, end: int, now: float) -> None:
        a = self._association
        tracker = a.tracker
        if tracker is None or not a._receives_data:
            return
        if end - start < 12:
            raise MalformedPacket("DATA chunk shorter than its header")
        if end - start == 12:
            a._fail(CAUSE_NO_USER_DATA, b"", "peer sent a DATA chunk without data", now)
            return
        tsn, stream_id, ssn, ppid = _DATA_FIELDS.unpack_from(data, start)
        distance = tracker.new_distance(tsn)
        if not distance:
            tracker.duplicate(tsn)
            return
        if distance > _MAX_TSN_AHEAD:
            return
        size = end - start - 12
        reassembly = a.reassembly
        held = reassembly.buffered + reassembly.delivered
        # Out of room: drop (unacknowledged, the sender tries again).  Except the next TSN
        # in sequence while fragments waiting for it fill the window (it may complete
        # them), up to twice the window; not while unread messages fill it.
        window = a.receive_window
        if held + size + ENTRY_COST > window and (
            distance != 1 or reassembly.buffered < window // 2 or held > 2 * window
        ):
            tracker.sack_now = True  # dropped for lack of room: tell the sender our window
            return
        tracker.received(tsn)
        flags = data[start - 3]
        if flags & DATA_IMMEDIATE:
            tracker.sack_now = True  # the sender asks for an immediate SACK (RFC 7053)
        if stream_id >= a.inbound_streams:
            return  # acknowledged but not delivered: no such stream was negotiated
        try:
            reassembly.add(tsn, stream_id, ssn, flags & 7, ppid, data[start + 12 : end])
        except ProtocolViolation as exc:
            a._fail(CAUSE_PROTOCOL_VIOLATION, str(exc).encode(), str(exc), now)

    def _on_sack(self, cumulative_tsn: int, a_rwnd: int, gaps: list[tuple[int, int]],
                 now: float) -> None:
        a = self._association
        rtx = a.retransmissions
        if rtx is None or not a._receives_sack:
            return
        a.sacks_received += 1
        advanced, abandon = rtx.on_sack(cumulative_tsn, a_rwnd, gaps, now)
        self.after_ack(advanced, abandon, now)

    def after_ack(self, advanced: bool, abandon: list[OutgoingMessage], now: float) -> None:
        """What follows a SACK or SHUTDOWN the retransmission queue took in: T3-rtx,
        abandoned messages, fast retransmission, waiting stream resets, a waiting shutdown."""
        a = self._association
        rtx = a.retransmissions
        assert rtx is not None
        a._error_count = 0  # the peer is reachable
        for message in abandon:
            a._abandon(message)
        if rtx.has_retransmissions:
            a._sender.fast_retransmit_due = True
        if rtx.outstanding == 0:
            a._t3.stop()
        elif advanced:
            a._t3.start(now, a._rto.rto)
        if a.resets.pending:
            a._maybe_request_reset(now)
        a._shutdown_sequence.maybe_drained(now)

    def _on_forward_tsn(self, chunk: ForwardTsnChunk, now: float) -> None:
        a = self._association
        tracker = a.tracker
        if tracker is None or not a._receives_data or not a.forward_tsn:
            return  # (not offered: the peer must not skip anything)
        if tracker.forward_to(chunk.new_cumulative_tsn):
            a.reassembly.forward(chunk.new_cumulative_tsn, chunk.streams)
        tracker.sack_now = True  # RFC 3758 3.6: acknowledge a FORWARD TSN at once

    def _on_reconfig(self, chunk: ReconfigChunk, now: float) -> None:
        a = self._association
        tracker = a.tracker
        if a.state is not State.ESTABLISHED or tracker is None:
            return
        responses: list[TLV] = []
        for kind, value in chunk.params:
            if kind == PARAM_OUTGOING_SSN_RESET_REQUEST:
                request = OutgoingSsnResetRequest.decode(value)
                responses.append(
                    a.resets.handle_request(request, tracker.cumulative_tsn).encode()
                )
            elif kind == PARAM_RECONFIG_RESPONSE:
                settled = a.resets.handle_response(ReconfigResponse.decode(value))
                if settled is False:
                    a._reconfig_timer.start(now, a._rto.rto)  # ask again later
                elif settled:
                    a._reconfig_timer.stop()
                    a._maybe_request_reset(now)
            elif 13 <= kind <= 18 and len(value) >= 4:
                # Other requests (incoming reset, SSN/TSN reset, add streams): refuse.
                seq = int.from_bytes(value[:4], "big")
                responses.append(ReconfigResponse(seq, RESULT_DENIED).encode())
        if responses:
            a._control.append((a.peer_tag, ReconfigChunk(responses).encode()))

    def _perform_deferred_resets(self) -> None:
        a = self._association
        tracker = a.tracker
        assert tracker is not None
        done = a.resets.perform_deferred(tracker.cumulative_tsn)
        if done:
            chunk = ReconfigChunk([response.encode() for response in done])
            a._control.append((a.peer_tag, chunk.encode()))
