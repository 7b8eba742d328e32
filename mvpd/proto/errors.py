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


class IllegalTransition(MvpError):
    """A state machine was given an event its current state does not accept: a bug in the
    code driving it (see :mod:`mvpd.proto.fsm`)."""

    code = "internal"


class ConnectionClosed(MvpError):
    """The other end went away."""

    code = "closed"


class SignalingUnavailable(ConnectionClosed):
    """The signaling server cannot be reached (yet): connect or send timed out."""

    code = "signaling-unavailable"


class PeerError(MvpError):
    """A peer connection could not be made or was lost."""

    code = "peer"


class IdentityRefused(PeerError):
    """The remote peer's DTLS certificate fingerprint is not one this agent trusts for it."""

    code = "identity-refused"


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


class RpcError(MvpError):
    """A control-socket call failed. ``code`` is the wire error code (``mvpd.proto.rpc.ErrorCode``);
    the client raises the subclass that matches the code of an error reply."""

    code = "internal"


class FrameError(RpcError):
    """Bytes on the control socket that are not a valid frame (length + msgpack map)."""

    code = "bad-frame"


class FrameTooLarge(FrameError):
    """A frame longer than the size cap; the connection cannot be resynchronised."""

    code = "too-large"


class BadRequest(RpcError):
    """A well-formed frame that is not a valid hello, request or reply."""

    code = "bad-request"


class VersionMismatch(BadRequest):
    """Client and daemon speak different control protocol versions."""

    code = "version-mismatch"


class UnknownMethod(RpcError):
    """The method name is not in the method table."""

    code = "unknown-method"


class InvalidParams(RpcError):
    """The parameters do not match the method's model (missing, extra, wrong type)."""

    code = "invalid-params"


class Forbidden(RpcError):
    """The caller (by its peer credentials) may not make this call."""

    code = "forbidden"


class NotFound(RpcError):
    """The named peer or subscription does not exist."""

    code = "not-found"


class RpcPeerError(RpcError):
    """The daemon could not do what was asked with a peer (connect failed, channel closed, ...)."""

    code = "peer-error"


class RpcTimeout(RpcError):
    """The call did not finish in time."""

    code = "timeout"


class Busy(RpcError):
    """Too many connections, calls or streams: a limit protects the daemon."""

    code = "busy"


class DescriptorFailed(RpcError):
    """Reading or writing a descriptor the client passed (its input or output) failed."""

    code = "descriptor"


class DaemonNotRunning(RpcError):
    """No daemon listens on the control socket (client side)."""

    code = "not-running"
