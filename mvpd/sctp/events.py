"""What the association reports to its user, drained with ``Association.events()``."""

from __future__ import annotations

from dataclasses import dataclass


class Event:
    """Base of the association's events."""

    __slots__ = ()


@dataclass(slots=True)
class AssociationEstablished(Event):
    """The handshake completed: messages can be sent."""


@dataclass(slots=True)
class MessageReceived(Event):
    """A complete user message arrived on ``stream_id`` with payload protocol id ``ppid``."""

    stream_id: int
    ppid: int
    data: bytes


@dataclass(slots=True)
class MessageRefused(Event):
    """An incoming message on ``stream_id`` outgrew the maximum message size and was
    dropped; ``received`` bytes of it had arrived by then."""

    stream_id: int
    received: int


@dataclass(slots=True)
class StreamsReset(Event):
    """The peer reset its outgoing ``stream_ids`` (our incoming ones): for WebRTC, the peer
    closed those data channels.  Their incoming sequence numbers start again at 0."""

    stream_ids: list[int]


@dataclass(slots=True)
class OutgoingStreamsReset(Event):
    """Our :meth:`~mvpd.sctp.Association.reset_streams` request for ``stream_ids`` completed
    (``succeeded``) or was refused by the peer; the streams can carry messages again."""

    stream_ids: list[int]
    succeeded: bool = True


@dataclass(slots=True)
class BufferedAmountLow(Event):
    """The bytes queued on ``stream_id`` fell to its buffered-amount-low threshold."""

    stream_id: int


@dataclass(slots=True)
class AssociationLost(Event):
    """The association ended abnormally (ABORT sent or received, too many retransmissions,
    protocol violation); ``reason`` says why.  ``by_peer``: the peer ended it with an ABORT
    (WebRTC stacks close connections that way), rather than a failure seen here."""

    reason: str
    by_peer: bool = False


@dataclass(slots=True)
class AssociationClosed(Event):
    """The association ended gracefully (SHUTDOWN sequence completed)."""
