"""A data channel with the surface of aiortc's ``RTCDataChannel`` (W3C names).

It is what :class:`mvpd.transports.base.DataChannelLike` describes: ``label``, ``protocol``,
``id``, ``ordered``, ``maxRetransmits``, ``maxPacketLifeTime``, ``readyState``,
``bufferedAmount``, ``bufferedAmountLowThreshold``, ``send()``, ``close()`` and the events
``open``, ``message``, ``bufferedamountlow``, ``error`` and ``close`` through ``on()``.

The channel itself holds no data: it asks its :class:`ChannelTransport` (the SCTP driver)
to send, to close (an SCTP stream reset, so the peer sees a clean close), and how many
bytes wait on its stream; the driver calls the ``_set_*``/``_deliver`` methods.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..sctp.dcep import ChannelParameters, ChannelState
from .errors import InvalidStateError
from .events import EventEmitter

log = logging.getLogger(__name__)


class ChannelTransport(Protocol):
    """What a channel needs from the SCTP driver."""

    def channel_send(self, channel: DataChannel, data: str | bytes) -> None: ...

    def channel_close(self, channel: DataChannel) -> None: ...

    def channel_buffered_amount(self, channel: DataChannel) -> int: ...

    def channel_set_low_threshold(self, channel: DataChannel, threshold: int) -> None: ...


class DataChannel(EventEmitter):
    """One bidirectional data channel (one SCTP stream id)."""

    def __init__(
        self,
        transport: ChannelTransport,
        parameters: ChannelParameters,
        *,
        stream_id: int | None = None,
        negotiated: bool = False,
        state: ChannelState = ChannelState.CONNECTING,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._parameters = parameters
        self._id = stream_id
        self._negotiated = negotiated
        self._state = state
        self._low_threshold = 0

    # --- W3C attributes --------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self._parameters.label

    @property
    def protocol(self) -> str:
        return self._parameters.protocol

    @property
    def id(self) -> int | None:
        """The SCTP stream id; ``None`` until the DTLS role is known."""
        return self._id

    @property
    def ordered(self) -> bool:
        return self._parameters.ordered

    @property
    def maxRetransmits(self) -> int | None:
        return self._parameters.max_retransmits

    @property
    def maxPacketLifeTime(self) -> int | None:
        return self._parameters.max_packet_lifetime

    @property
    def negotiated(self) -> bool:
        return self._negotiated

    @property
    def parameters(self) -> ChannelParameters:
        return self._parameters

    @property
    def readyState(self) -> str:
        return self._state.value

    @property
    def bufferedAmount(self) -> int:
        """Bytes handed to ``send`` that SCTP has not sent yet (empty messages count 1)."""
        if self._state == ChannelState.CLOSED:
            return 0
        return self._transport.channel_buffered_amount(self)

    @property
    def bufferedAmountLowThreshold(self) -> int:
        return self._low_threshold

    @bufferedAmountLowThreshold.setter
    def bufferedAmountLowThreshold(self, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError("bufferedAmountLowThreshold must be between 0 and 2**32-1")
        self._low_threshold = value
        if self._id is not None:
            self._transport.channel_set_low_threshold(self, value)

    @property
    def transport(self) -> ChannelTransport:
        """The SCTP transport carrying the channel (aiortc's name for it; its ``transport``
        is the DTLS transport, as in the W3C ``RTCSctpTransport``)."""
        return self._transport

    # --- W3C methods -----------------------------------------------------------------------

    def send(self, data: str | bytes | bytearray | memoryview) -> None:
        """Queue one message. :class:`InvalidStateError` unless open, ``ValueError`` when it
        is larger than the peer accepts, ``TypeError`` for other types."""
        if not isinstance(data, (str, bytes)):
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"cannot send {type(data).__name__}, only str or bytes")
            data = bytes(data)
        if self._state != ChannelState.OPEN:
            raise InvalidStateError(f"data channel {self.label!r} is {self._state.value}")
        self._transport.channel_send(self, data)

    def close(self) -> None:
        """Close the channel: reset its stream; ``close`` is emitted once the peer reset its
        side too (or at once if the channel never reached the peer)."""
        if self._state in (ChannelState.CLOSING, ChannelState.CLOSED):
            return
        self._transport.channel_close(self)

    def __repr__(self) -> str:
        return f"DataChannel(id={self._id}, label={self.label!r}, {self._state.value})"

    # --- driven by the SCTP driver ---------------------------------------------------------

    def _bind(self, transport: ChannelTransport) -> None:
        """Move the channel to ``transport`` (the SCTP driver, once there is one)."""
        self._transport = transport

    def _set_id(self, stream_id: int) -> None:
        self._id = stream_id
        if self._low_threshold:
            self._transport.channel_set_low_threshold(self, self._low_threshold)

    def _set_state(self, state: ChannelState) -> None:
        if state == self._state or self._state == ChannelState.CLOSED:
            return
        self._state = state
        if state == ChannelState.OPEN:
            self.emit("open")
        elif state == ChannelState.CLOSING:
            self.emit("closing")
        elif state == ChannelState.CLOSED:
            self.emit("close")
            self.remove_all_listeners()
