"""A sans-I/O SCTP association for WebRTC data channels.

:class:`Association` is the entry point; see :mod:`mvpd.sctp.association`.  The I/O layer
(the WebRTC stack in :mod:`mvpd.rtc`) feeds it DTLS application data and drains its packets,
events and deadlines.
"""

from __future__ import annotations

from .association import Association
from .errors import (
    AssociationNotOpen,
    InvalidStream,
    MalformedPacket,
    MessageTooLarge,
    ProtocolViolation,
    SctpError,
    SendError,
    StreamClosing,
)
from .events import (
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
from .state import State

__all__ = [
    "Association",
    "AssociationClosed",
    "AssociationEstablished",
    "AssociationLost",
    "AssociationNotOpen",
    "BufferedAmountLow",
    "Event",
    "InvalidStream",
    "MalformedPacket",
    "MessageReceived",
    "MessageRefused",
    "MessageTooLarge",
    "OutgoingStreamsReset",
    "ProtocolViolation",
    "SctpError",
    "SendError",
    "State",
    "StreamClosing",
    "StreamsReset",
]
