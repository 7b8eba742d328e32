"""The sending side of an association: what goes out now, bundled into packets.

Each call of ``Association.packets_to_send`` bundles, in this order: the control chunks the
other parts queued (INIT alone in its packet, RFC 9260 6.10), a SACK when one is due or can
ride along with DATA, a FORWARD TSN past abandoned chunks (RFC 3758), retransmissions (one
packet of them regardless of the congestion window after a fast retransmit, RFC 9260 7.2.4)
and new DATA while the congestion and receive windows allow.  Chunks share a packet while
it has room for them and they carry the same verification tag; a message that fits a packet
of its own is not split to fill the rest of another.

A part of :class:`~mvpd.sctp.association.Association`, which owns the state it changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chunks import DATA_HEADER_SIZE, INIT, ForwardTsnChunk
from .packet import COMMON_HEADER_SIZE, PacketWriter, build_packet
from .retransmission_queue import RetransmissionQueue

if TYPE_CHECKING:
    from .association import Association

__all__ = ["Sender"]


class Sender:
    """Builds the packets of an association: the one being filled and those finished."""

    def __init__(self, association: Association) -> None:
        self._association = association
        self._out: list[bytes] = []
        self._writer = PacketWriter(association.local_port, association.remote_port,
                                    association.mtu)
        self._open_tag = -1  # the verification tag of the packet being filled (-1: none)
        #: Set by a SACK that made chunks due for fast retransmission.
        self.fast_retransmit_due = False
        self._forward_tsn_sent: tuple[int, float] = (-1, 0.0)
        #: Set by a T3-rtx timeout: the same FORWARD TSN again, without waiting a round trip.
        self.forward_tsn_force = False

    def set_mtu(self, mtu: int) -> None:
        """Finish the open packet; the next ones are at most ``mtu`` bytes."""
        a = self._association
        self._flush()
        self._writer = PacketWriter(a.local_port, a.remote_port, mtu)

    def packets_to_send(self) -> list[bytes]:
        """The packets to send now (see :meth:`Association.packets_to_send`)."""
        a = self._association
        now = a._now
        control = a._control
        if control:
            a._control = []
            for tag, chunk in control:
                if chunk[0] == INIT:
                    self._flush()  # INIT travels alone
                    self._put(tag, chunk)
                    self._flush()
                else:
                    self._put(tag, chunk)
        rtx = a.retransmissions
        tracker = a.tracker
        if rtx is not None and tracker is not None and not a._ended:
            tag = a.peer_tag
            sending = a._sends_data and (
                rtx.has_retransmissions or (a.send_queue.has_data
                                            and rtx.flight < rtx.congestion.cwnd)
            )
            if tracker.sack_now or (tracker.sack_pending and sending):
                self._put(tag, tracker.make_sack(a._a_rwnd()))
                a._advertised_rwnd = a._a_rwnd()
                a._delayed_ack.stop()
                a.sacks_sent += 1
            if rtx.forward_tsn_due and a.peer_supports_forward_tsn:
                self._put_forward_tsn(rtx, now)
            if a._sends_data:
                self._put_data(rtx, now)
        self._flush()
        out = self._out
        self._out = []
        a.packets_sent += len(out)
        return out

    def _ensure(self, size: int, tag: int) -> None:
        """Make the open packet one for ``tag`` with ``size`` bytes of room."""
        writer = self._writer
        if self._open_tag != tag or writer.room < size:
            if self._open_tag >= 0 and not writer.empty:
                self._out.append(writer.finish())
            writer.start(tag)
            self._open_tag = tag

    def _put(self, tag: int, chunk: bytes) -> None:
        a = self._association
        size = (len(chunk) + 3) & ~3
        if size > a.mtu - COMMON_HEADER_SIZE:
            self._flush()
            self._out.append(build_packet(a.local_port, a.remote_port, tag, chunk))
            return
        self._ensure(size, tag)
        self._writer.add(chunk)

    def _flush(self) -> None:
        if self._open_tag >= 0:
            if not self._writer.empty:
                self._out.append(self._writer.finish())
            self._open_tag = -1

    def _put_forward_tsn(self, rtx: RetransmissionQueue, now: float) -> None:
        a = self._association
        forward = rtx.forward_tsn()
        if forward is None:
            return
        new_cumulative, streams = forward
        last, sent_at = self._forward_tsn_sent
        srtt = a._rto.srtt if a._rto.srtt is not None else a._rto.rto
        # The same FORWARD TSN again only after a round trip (or a T3 timeout).
        if new_cumulative == last and now - sent_at < srtt and not self.forward_tsn_force:
            return
        self.forward_tsn_force = False
        self._forward_tsn_sent = (new_cumulative, now)
        self._put(a.peer_tag, ForwardTsnChunk(new_cumulative, streams).encode())
        if not a._t3.running:
            a._t3.start(now, a._rto.rto)

    def _put_data(self, rtx: RetransmissionQueue, now: float) -> None:
        a = self._association
        writer = self._writer
        tag = a.peer_tag
        mtu = a.mtu
        congestion = rtx.congestion
        # Retransmissions first; after a fast retransmit, one packet of them regardless of
        # cwnd (RFC 9260 7.2.4).
        bonus = mtu if self.fast_retransmit_due else 0
        self.fast_retransmit_due = False
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
        queue = a.send_queue
        min_room = DATA_HEADER_SIZE + 64
        whole_payload = (mtu - COMMON_HEADER_SIZE - DATA_HEADER_SIZE) & ~3
        while queue.has_data and rtx.flight < congestion.cwnd:
            if rtx.flight and rtx.peer_rwnd < min(mtu // 2, queue.total_buffered):
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
                a._abandon(message)  # expired midway: drop the rest, forward the sent
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
        if rtx.outstanding and not a._t3.running:
            a._t3.start(now, a._rto.rto)
        if a.resets.pending and a.resets.request is None:
            a._maybe_request_reset(now)
            if a._control:
                control = a._control
                a._control = []
                for chunk_tag, encoded in control:
                    self._put(chunk_tag, encoded)
