"""Closing an association gracefully (RFC 9260 9.2): SHUTDOWN, SHUTDOWN ACK and SHUTDOWN
COMPLETE.

Either side starts (``Association.shutdown`` or the peer's SHUTDOWN); each first waits until
all of its DATA is acknowledged, then the three chunks go back and forth, T2-shutdown
repeating SHUTDOWN or SHUTDOWN ACK until answered.  Both sides closing at once meet in
SHUTDOWN-ACK-SENT.  The transitions are the state table's (:mod:`mvpd.sctp.state`).

A part of :class:`~mvpd.sctp.association.Association`, which owns the state it changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chunks import ShutdownAckChunk, ShutdownChunk, ShutdownCompleteChunk
from .events import AssociationClosed
from .state import State, Trigger, next_state
from .timers import Timer

if TYPE_CHECKING:
    from .association import Association

__all__ = ["ShutdownSequence"]


class ShutdownSequence:
    """The shutdown chunks of an association and its T2-shutdown timer."""

    def __init__(self, association: Association) -> None:
        self._association = association
        #: Repeats the SHUTDOWN or SHUTDOWN ACK (``_chunk``) until the peer answers it.
        self.t2 = Timer("t2-shutdown")
        self._chunk = b""

    def maybe_drained(self, now: float) -> None:
        """In SHUTDOWN-PENDING or SHUTDOWN-RECEIVED, move on once all DATA is acked."""
        a = self._association
        if a.state not in (State.SHUTDOWN_PENDING, State.SHUTDOWN_RECEIVED):
            return
        rtx = a.retransmissions
        if a.send_queue.has_data or (rtx is not None and rtx.outstanding):
            return
        target = next_state(a.state, Trigger.OUTSTANDING_DRAINED)
        if target is None:
            return
        if target is State.SHUTDOWN_SENT:
            self._send_shutdown(now)
        else:
            self._send_shutdown_ack(now)
        a._set_state(target)

    def on_shutdown(self, chunk: ShutdownChunk, now: float) -> None:
        """The peer closes: its SHUTDOWN also acknowledges our DATA up to a TSN."""
        a = self._association
        target = next_state(a.state, Trigger.RECV_SHUTDOWN)
        rtx = a.retransmissions
        if target is None or rtx is None:
            return
        # SHUTDOWN carries a cumulative TSN ack (RFC 9260 9.2).
        advanced, abandon = rtx.on_sack(
            chunk.cumulative_tsn, rtx.peer_rwnd + rtx.flight, [], now
        )
        previous = a.state
        a._set_state(target)
        a._receiver.after_ack(advanced, abandon, now)
        if target is State.SHUTDOWN_ACK_SENT and previous is not State.SHUTDOWN_ACK_SENT:
            self._send_shutdown_ack(now)

    def on_shutdown_ack(self, now: float) -> None:
        """The peer acknowledged our SHUTDOWN: complete, and the association ends."""
        a = self._association
        if next_state(a.state, Trigger.RECV_SHUTDOWN_ACK) is None:
            return
        a._control.append((a.peer_tag, ShutdownCompleteChunk().encode()))
        a._end(now)
        a._events.append(AssociationClosed())

    def on_shutdown_complete(self, now: float) -> None:
        """The peer completed the shutdown we acknowledged: the association ends."""
        a = self._association
        if next_state(a.state, Trigger.RECV_SHUTDOWN_COMPLETE) is not None:
            a._end(now)
            a._events.append(AssociationClosed())

    def on_t2_expired(self, now: float) -> None:
        """T2-shutdown expired: send the SHUTDOWN or SHUTDOWN ACK again, or give up."""
        a = self._association
        a._error_count += 1
        if a._error_count > a.max_retransmissions:
            a._lost("the peer did not answer the shutdown", now)
            return
        if a.state is State.SHUTDOWN_SENT:
            self._send_shutdown(now)  # with the cumulative TSN as it is now
        else:
            a._control.append((a.peer_tag, self._chunk))
            self.t2.start(now, a._rto.rto)

    def _send_shutdown(self, now: float) -> None:
        a = self._association
        assert a.tracker is not None
        self._chunk = ShutdownChunk(a.tracker.cumulative_tsn).encode()
        a._control.append((a.peer_tag, self._chunk))
        self.t2.start(now, a._rto.rto)

    def _send_shutdown_ack(self, now: float) -> None:
        a = self._association
        self._chunk = ShutdownAckChunk().encode()
        a._control.append((a.peer_tag, self._chunk))
        self.t2.start(now, a._rto.rto)
