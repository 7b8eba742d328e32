"""Stream reset (RFC 6525): closing WebRTC data channels resets their outgoing streams.

Outgoing: :meth:`StreamResets.add` marks streams closing (their queued messages still go
first); once a stream has nothing left to fragment, :meth:`StreamResets.next_request`
builds one Outgoing SSN Reset Request naming it with the last TSN assigned.  Only one
request is outstanding at a time; the association retransmits it on its timer.

Incoming: the peer's request is performed once every TSN up to its "last assigned TSN" has
arrived (so every message sent before the reset is delivered first); until then it is
deferred and answered "in progress".  No timers or I/O here: the association owns those.
"""

from __future__ import annotations

from .events import Event, OutgoingStreamsReset, StreamsReset
from .parameters import (
    RESULT_ERROR_BAD_SEQUENCE_NUMBER,
    RESULT_IN_PROGRESS,
    RESULT_SUCCESS_NOTHING_TO_DO,
    RESULT_SUCCESS_PERFORMED,
    OutgoingSsnResetRequest,
    ReconfigResponse,
)
from .reassembly import Reassembly
from .send_queue import SendQueue
from .tsn import TSN_MASK, tsn_le

#: Requests from the peer waiting for their data; more means the peer misbehaves.
_MAX_DEFERRED = 16


class StreamResets:
    """Both directions of RFC 6525 outgoing-stream resets for one association."""

    def __init__(self, local_initial_tsn: int, send_queue: SendQueue, reassembly: Reassembly,
                 events: list[Event]) -> None:
        self._send_queue = send_queue
        self._reassembly = reassembly
        self._events = events
        #: Our streams waiting to be named in a request (closing, maybe still sending).
        self.pending: list[int] = []
        #: Our outstanding request, if any.
        self.request: OutgoingSsnResetRequest | None = None
        self._next_request_seq = local_initial_tsn  # RFC 6525 4.1: starts at the initial TSN
        self._peer_request_seq = 0  # the next request sequence number expected from the peer
        self._deferred: list[OutgoingSsnResetRequest] = []
        self._last_result = RESULT_SUCCESS_PERFORMED

    def established(self, peer_initial_tsn: int) -> None:
        self._peer_request_seq = peer_initial_tsn

    # -- our streams ------------------------------------------------------------------------

    def add(self, stream_ids: list[int]) -> None:
        """Mark ``stream_ids`` closing and remember to reset them."""
        for stream_id in stream_ids:
            stream = self._send_queue.stream(stream_id)
            if not stream.closing:
                stream.closing = True
                self.pending.append(stream_id)

    def next_request(self, last_assigned_tsn: int) -> OutgoingSsnResetRequest | None:
        """A new request for the pending streams with nothing left to send, if no request
        is outstanding; it becomes :attr:`request`."""
        if self.request is not None or not self.pending:
            return None
        ready = [s for s in self.pending if self._send_queue.drained(s)]
        if not ready:
            return None
        self.pending = [s for s in self.pending if s not in ready]
        self.request = OutgoingSsnResetRequest(
            self._next_request_seq, (self._peer_request_seq - 1) & TSN_MASK,
            last_assigned_tsn, ready,
        )
        return self.request

    def handle_response(self, response: ReconfigResponse) -> bool | None:
        """The peer answered: ``True`` when our request is settled (event queued), ``False``
        when it is in progress (ask again later), ``None`` when it is not about ours."""
        request = self.request
        if request is None or response.response_seq != request.request_seq:
            return None
        if response.result == RESULT_IN_PROGRESS:
            return False
        self.request = None
        self._next_request_seq = (self._next_request_seq + 1) & TSN_MASK
        succeeded = response.result in (RESULT_SUCCESS_PERFORMED, RESULT_SUCCESS_NOTHING_TO_DO)
        for stream_id in request.streams:
            stream = self._send_queue.stream(stream_id)
            stream.closing = False
            if succeeded:
                stream.next_ssn = 0
        self._events.append(OutgoingStreamsReset(list(request.streams), succeeded))
        return True

    # -- the peer's streams -----------------------------------------------------------------

    def handle_request(self, request: OutgoingSsnResetRequest,
                       cumulative_tsn: int) -> ReconfigResponse:
        """The answer to the peer's request (performing it now if its data is in)."""
        expected = self._peer_request_seq
        seq = request.request_seq
        if seq == (expected - 1) & TSN_MASK:
            # A retransmission: answer as before, or now if the deferred reset is done.
            self.perform_deferred(cumulative_tsn)
            return ReconfigResponse(seq, self._last_result)
        if seq != expected:
            return ReconfigResponse(seq, RESULT_ERROR_BAD_SEQUENCE_NUMBER)
        self._peer_request_seq = (expected + 1) & TSN_MASK
        if len(self._deferred) < _MAX_DEFERRED:
            self._deferred.append(request)
        self._last_result = RESULT_IN_PROGRESS
        self.perform_deferred(cumulative_tsn)
        return ReconfigResponse(seq, self._last_result)

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def perform_deferred(self, cumulative_tsn: int) -> list[ReconfigResponse]:
        """Perform the deferred requests whose data has all arrived (RFC 6525 5.2.2);
        returns their (unsolicited) success responses."""
        done: list[ReconfigResponse] = []
        deferred = self._deferred
        while deferred and tsn_le(deferred[0].last_tsn, cumulative_tsn):
            request = deferred.pop(0)
            self._reassembly.reset_streams(request.streams)
            self._events.append(StreamsReset(list(request.streams)))
            done.append(ReconfigResponse(request.request_seq, RESULT_SUCCESS_PERFORMED))
            if not deferred:
                self._last_result = RESULT_SUCCESS_PERFORMED
        return done
