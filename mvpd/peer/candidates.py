"""ICE settings and remote candidates as signaling carries them.

* :func:`ice_configuration`: the servers (an explicit list, empty when none are configured:
  without one aiortc's gatherer would ask a public STUN server) and the transport policy
  (``relay`` forces TURN).
* :func:`parse_candidate`: a browser's RTCIceCandidateInit as an ICE candidate.
* :func:`keep_candidate_lines`: an SDP with only its first N ``a=candidate`` lines, for the
  per-session cap on remote candidates.
"""

from __future__ import annotations

from aiortc import RTCIceCandidate, RTCIceServer
from aiortc.sdp import candidate_from_sdp

from ..config import AgentSettings
from ..proto.signaling import IceCandidate
from ..rtc import IceConfiguration

CANDIDATE_LINE = "a=candidate:"


def ice_configuration(settings: AgentSettings) -> IceConfiguration:
    """The ICE servers and transport policy of ``settings`` for a peer connection."""
    servers = tuple(
        RTCIceServer(
            urls=list(server.urls),
            username=server.username,
            credential=(
                server.credential.get_secret_value() if server.credential is not None else None
            ),
        )
        for server in settings.ice_servers
    )
    policy = "relay" if settings.ice_transport_policy == "relay" else "all"
    return IceConfiguration(servers, policy)


def parse_candidate(init: IceCandidate) -> RTCIceCandidate:
    """An ICE candidate from a browser's RTCIceCandidateInit (``candidate:...``, with or
    without ``a=``).

    Raises ``ValueError`` when the candidate line cannot be parsed.
    """
    line = init.candidate.strip()
    line = line.removeprefix("a=").removeprefix("candidate:")
    try:
        candidate = candidate_from_sdp(line)
    except (AssertionError, IndexError, ValueError) as exc:
        raise ValueError(f"cannot parse ICE candidate {init.candidate[:80]!r}") from exc
    candidate.sdpMid = init.sdpMid
    candidate.sdpMLineIndex = init.sdpMLineIndex
    if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
        # Data-only sessions have a single m-line.
        candidate.sdpMLineIndex = 0
    return candidate


def count_candidate_lines(sdp: str) -> int:
    """The ``a=candidate`` lines in ``sdp``."""
    return sum(1 for line in sdp.splitlines() if line.startswith(CANDIDATE_LINE))


def keep_candidate_lines(sdp: str, allowed: int) -> str:
    """``sdp`` with only its first ``allowed`` candidate lines (browsers list their best
    candidates first); every other line as it was."""
    kept = []
    for line in sdp.splitlines(keepends=True):
        if line.startswith(CANDIDATE_LINE):
            if allowed <= 0:
                continue
            allowed -= 1
        kept.append(line)
    return "".join(kept)


def ice_ufrag(sdp: str) -> str | None:
    """The ``a=ice-ufrag`` of ``sdp`` (which ICE session its candidates belong to)."""
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line.split(":", 1)[1].strip()
    return None
