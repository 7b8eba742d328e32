"""The SCTP association's errors: one branch of the project's exception tree.

Everything :mod:`mvpd.sctp` raises on purpose derives from :class:`SctpError`, itself a
:class:`~mvpd.proto.errors.ProtocolError`, so the I/O layer can catch the whole family.
"""

from __future__ import annotations

from mvpd.proto.errors import ProtocolError


class SctpError(ProtocolError):
    """Base of every error :mod:`mvpd.sctp` raises."""

    code = "sctp"


class MalformedPacket(SctpError):
    """Bytes that are not a valid SCTP packet or chunk (bad checksum, truncated, lengths
    past the end); the packet is dropped without changing the association."""

    code = "sctp-malformed"


class SendError(SctpError):
    """A message the association cannot take."""

    code = "sctp-send"


class MessageTooLarge(SendError):
    """The message is larger than the association's maximum message size."""

    code = "sctp-message-too-large"


class AssociationNotOpen(SendError):
    """The association is not established (not yet, shutting down, closed or aborted)."""

    code = "sctp-not-open"


class StreamClosing(SendError):
    """The stream is being reset: no new messages until the reset completes."""

    code = "sctp-stream-closing"


class InvalidStream(SendError):
    """The stream id is outside the range negotiated with the peer."""

    code = "sctp-invalid-stream"


class ProtocolViolation(SctpError):
    """The peer broke the protocol in a way that ends the association (for example a
    message larger than the advertised maximum message size)."""

    code = "sctp-protocol-violation"
