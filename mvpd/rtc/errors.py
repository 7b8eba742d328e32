"""Errors of the WebRTC stack: branches of the project's exception tree."""

from __future__ import annotations

from ..proto.errors import PeerError, ProtocolError


class RtcError(PeerError):
    """The peer connection cannot do what was asked (closed, wrong state, no transport)."""

    code = "rtc"


class InvalidStateError(RtcError):
    """The call is not allowed in the current signaling or channel state."""

    code = "invalid-state"


class UnsupportedLibrary(RtcError):
    """The installed aiortc or aioice is not a version this stack was tested with."""

    code = "unsupported-library"


class InvalidSdp(ProtocolError):
    """A session description or ICE candidate from the peer that cannot be used."""

    code = "bad-sdp"
