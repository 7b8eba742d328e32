"""A WebRTC peer-connection stack for data channels: aiortc's ICE and DTLS objects, our SCTP.

See :mod:`mvpd.rtc.connection` for how the parts fit together.
"""

from __future__ import annotations

from .aiortc_internals import CandidateInfo, SelectedPair
from .connection import IceConfiguration, PeerConnection
from .datachannel import DataChannel
from .errors import InvalidSdp, InvalidStateError, RtcError, UnsupportedLibrary

__all__ = [
    "CandidateInfo",
    "DataChannel",
    "IceConfiguration",
    "InvalidSdp",
    "InvalidStateError",
    "PeerConnection",
    "RtcError",
    "SelectedPair",
    "UnsupportedLibrary",
]
