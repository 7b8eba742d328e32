"""One WebRTC peer connection per remote agent, on :mod:`mvpd.rtc`.

* :mod:`~mvpd.peer.session`: :class:`PeerSession` (negotiation, glare, channels, pipes,
  closing, status);
* :mod:`~mvpd.peer.state`: :class:`PeerState` and :class:`StateChange`;
* :mod:`~mvpd.peer.candidates`: ICE servers and policy, remote candidates from signaling;
* :mod:`~mvpd.peer.liveness`: checks that notice a vanished peer within ``peer_timeout``.
"""

from __future__ import annotations

from .candidates import ice_configuration, parse_candidate
from .liveness import LIVENESS_CHECKS_PER_TIMEOUT, LIVENESS_RETRANSMISSIONS, LIVENESS_RTTS
from .session import (
    BYE_TIMEOUT,
    MAX_INBOX,
    MAX_PENDING_CANDIDATES,
    PC_CLOSE_TIMEOUT,
    PIPE_END_GRACE,
    PeerSession,
    SendSignal,
    StateListener,
    TransportListener,
)
from .state import PeerState, StateChange

__all__ = [
    "BYE_TIMEOUT",
    "LIVENESS_CHECKS_PER_TIMEOUT",
    "LIVENESS_RETRANSMISSIONS",
    "LIVENESS_RTTS",
    "MAX_INBOX",
    "MAX_PENDING_CANDIDATES",
    "PC_CLOSE_TIMEOUT",
    "PIPE_END_GRACE",
    "PeerSession",
    "PeerState",
    "SendSignal",
    "StateChange",
    "StateListener",
    "TransportListener",
    "ice_configuration",
    "parse_candidate",
]
