"""One exception tree for the whole project.

Every error mvpd raises on purpose derives from :class:`MvpError`, so callers can catch the
family or one branch of it. Protocol errors carry a short machine-readable ``code`` that also
travels on the wire (signaling ``error`` messages, RPC error replies).
"""

from __future__ import annotations


class MvpError(Exception):
    """Base of every error mvpd raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class ConfigError(MvpError):
    """The configuration is invalid; the daemon exits with EX_CONFIG (78)."""

    code = "config"


class ProtocolError(MvpError):
    """Bytes or text from the outside world that do not follow a protocol."""

    code = "protocol"


class SignalingError(ProtocolError):
    """A signaling message could not be parsed or is not allowed here."""

    code = "bad-message"


class MalformedMessage(SignalingError):
    """Not JSON, not an object, or fields missing or of the wrong type."""

    code = "bad-message"


class UnknownMessageType(SignalingError):
    """Well-formed JSON whose ``type`` this implementation does not know."""

    code = "unknown-type"

    def __init__(self, message: str, *, message_type: str) -> None:
        super().__init__(message)
        self.message_type = message_type


class SignalingRejected(SignalingError):
    """The signaling server refused us (bad token, id taken, replaced, ...)."""

    code = "rejected"


class ConnectionClosed(MvpError):
    """The other end went away."""

    code = "closed"


class PeerError(MvpError):
    """A peer connection could not be made or was lost."""

    code = "peer"


class TransportError(MvpError):
    """A data-channel transport could not send or decode a message."""

    code = "transport"


class MessageTooLarge(TransportError):
    """A message is larger than the negotiated maximum."""

    code = "too-large"


class MalformedPacket(ProtocolError):
    """An IP packet (or a batch of them) from the TUN device or a peer that is truncated or
    not IPv4/IPv6 at all."""

    code = "malformed-packet"


class TunError(MvpError):
    """A TUN device could not be created, configured or used."""

    code = "tun"


class TunUnavailable(TunError):
    """TUN devices cannot be made here at all: no ``/dev/net/tun``, or no CAP_NET_ADMIN."""

    code = "tun-unavailable"
