"""Session descriptions for a data-channel-only peer connection, built and parsed with
``aiortc.sdp``.

A description has one ``m=application`` section (``UDP/DTLS/SCTP webrtc-datachannel``,
RFC 8841) with the ICE credentials and candidates, the DTLS fingerprints and ``a=setup``
(RFC 8842: the offerer says ``actpass``, the answerer picks ``active`` or ``passive``), the
SCTP port and the largest message we accept. Remote descriptions are validated here, so the
rest of the stack only sees well-formed values; anything unusable is an :class:`InvalidSdp`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from aiortc import RTCIceCandidate, RTCIceParameters
from aiortc.rtcdtlstransport import RTCDtlsFingerprint, RTCDtlsParameters
from aiortc.rtcsctptransport import RTCSctpCapabilities
from aiortc.sdp import (
    DTLS_SETUP_ROLE,
    GroupDescription,
    MediaDescription,
    SessionDescription,
    candidate_from_sdp,
    candidate_to_sdp,
)

from .errors import InvalidSdp

#: The SCTP port both sides use (the W3C default; any value is accepted from the peer).
SCTP_PORT = 5000
#: The largest message we accept, advertised in a=max-message-size (aiortc and Chromium
#: use the same).
MAX_MESSAGE_SIZE = 262144
#: RFC 8841 section 6: no a=max-message-size means 64 KiB.
DEFAULT_REMOTE_MAX_MESSAGE_SIZE = 65536
#: Bounds on what a peer may send (real descriptions are a few KiB, a few candidates).
MAX_SDP_LENGTH = 64 * 1024
MAX_CANDIDATES = 256
#: Fingerprint algorithms aiortc can check (RFC 8122 names).
SUPPORTED_FINGERPRINTS = ("sha-256", "sha-384", "sha-512")
#: RFC 8842 setup values and the DTLS role an answer gives each side.
SETUP_VALUES = ("actpass", "active", "passive")
_DISCARD_HOST = "0.0.0.0"
_DISCARD_PORT = 9


@dataclass(frozen=True)
class LocalParameters:
    """What our side puts into its description."""

    ice: RTCIceParameters
    candidates: list[RTCIceCandidate]
    candidates_complete: bool
    fingerprints: list[RTCDtlsFingerprint]
    setup: str
    mid: str = "0"
    sctp_port: int = SCTP_PORT
    max_message_size: int = MAX_MESSAGE_SIZE


@dataclass(frozen=True)
class RemoteDescription:
    """The usable content of the peer's offer or answer."""

    type: str
    mid: str
    ice: RTCIceParameters
    candidates: list[RTCIceCandidate]
    candidates_complete: bool
    fingerprints: list[RTCDtlsFingerprint]
    setup: str
    sctp_port: int
    #: 0 means no limit (RFC 8841 section 6).
    max_message_size: int
    sdp: str = field(repr=False, default="")

    @property
    def dtls(self) -> RTCDtlsParameters:
        return RTCDtlsParameters(fingerprints=list(self.fingerprints))


def build_description(kind: str, local: LocalParameters, session_id: int | None = None) -> str:
    """The SDP text of our ``offer`` or ``answer``."""
    if kind not in ("offer", "answer"):
        raise ValueError(f"a description is an 'offer' or an 'answer', not {kind!r}")
    if local.setup not in SETUP_VALUES or (kind == "answer" and local.setup == "actpass"):
        raise ValueError(f"a=setup:{local.setup} is not valid in an {kind}")
    sid = session_id if session_id is not None else secrets.randbits(62)
    session = SessionDescription()
    session.origin = f"- {sid} 0 IN IP4 0.0.0.0"
    session.type = kind
    session.group.append(GroupDescription(semantic="BUNDLE", items=[local.mid]))
    media = MediaDescription(
        kind="application", port=_DISCARD_PORT, profile="UDP/DTLS/SCTP",
        fmt=["webrtc-datachannel"],
    )
    media.rtp.muxId = local.mid
    media.sctp_port = local.sctp_port
    media.sctpCapabilities = RTCSctpCapabilities(maxMessageSize=local.max_message_size)
    media.ice = local.ice
    media.ice_candidates = list(local.candidates)
    media.ice_candidates_complete = local.candidates_complete
    if local.candidates:
        media.host, media.port = local.candidates[0].ip, local.candidates[0].port
    else:
        media.host = _DISCARD_HOST
    media.dtls = RTCDtlsParameters(
        fingerprints=list(local.fingerprints), role=DTLS_SETUP_ROLE[local.setup]
    )
    session.media.append(media)
    return str(session)


def parse_description(sdp: str, kind: str) -> RemoteDescription:
    """Validate the peer's ``offer`` or ``answer``; :class:`InvalidSdp` if unusable."""
    if kind not in ("offer", "answer"):
        raise InvalidSdp(f"a description is an offer or an answer, not {kind!r}")
    if len(sdp) > MAX_SDP_LENGTH:
        raise InvalidSdp(f"the {kind} is {len(sdp)} characters long (limit {MAX_SDP_LENGTH})")
    if not sdp.startswith("v=0"):
        raise InvalidSdp(f"the {kind} is not SDP (it does not start with v=0)")
    try:
        session = SessionDescription.parse(sdp)
    except (AssertionError, ValueError, KeyError, IndexError, StopIteration,
            AttributeError, TypeError) as exc:
        raise InvalidSdp(f"cannot parse the {kind}: {_why(exc)}") from None
    applications = [m for m in session.media if m.kind == "application"]
    others = [m.kind for m in session.media if m.kind != "application"]
    if others:
        raise InvalidSdp(
            f"the {kind} has {', '.join(others)} sections; only data channels are supported"
        )
    if len(applications) != 1:
        raise InvalidSdp(f"the {kind} needs exactly one m=application section, "
                         f"not {len(applications)}")
    media = applications[0]
    if media.port == 0:
        raise InvalidSdp(f"the {kind} rejects the data channel section (port 0)")
    if "webrtc-datachannel" in media.fmt and media.sctp_port is not None:
        sctp_port = media.sctp_port
    elif media.sctpmap:  # the pre-RFC 8841 form: m=application 9 DTLS/SCTP 5000
        sctp_port = next(iter(media.sctpmap))
    elif "webrtc-datachannel" in media.fmt:
        sctp_port = SCTP_PORT
    else:
        raise InvalidSdp(f"the {kind}'s application section is not webrtc-datachannel")
    if not 0 < sctp_port < 65536:
        raise InvalidSdp(f"a=sctp-port:{sctp_port} is out of range")
    ice = media.ice
    if ice is None or not ice.usernameFragment or not ice.password:
        raise InvalidSdp(f"the {kind} has no a=ice-ufrag and a=ice-pwd")
    if not 4 <= len(ice.usernameFragment) <= 256 or not 22 <= len(ice.password) <= 256:
        raise InvalidSdp("a=ice-ufrag must have 4-256 characters and a=ice-pwd 22-256")
    all_fingerprints, setup = _dtls_attributes(sdp)
    fingerprints = [f for f in all_fingerprints if f.algorithm in SUPPORTED_FINGERPRINTS]
    if not fingerprints:
        raise InvalidSdp(
            f"the {kind} has no a=fingerprint with {', '.join(SUPPORTED_FINGERPRINTS)}"
        )
    if setup is None:
        if kind == "answer":
            raise InvalidSdp("the answer has no a=setup (active or passive)")
        setup = "actpass"
    elif kind == "answer" and setup == "actpass":
        raise InvalidSdp("the answer says a=setup:actpass; it must pick active or passive")
    if len(media.ice_candidates) > MAX_CANDIDATES:
        raise InvalidSdp(f"the {kind} has {len(media.ice_candidates)} candidates "
                         f"(limit {MAX_CANDIDATES})")
    caps = media.sctpCapabilities
    max_message_size = caps.maxMessageSize if caps is not None else DEFAULT_REMOTE_MAX_MESSAGE_SIZE
    if max_message_size < 0:
        raise InvalidSdp(f"a=max-message-size:{max_message_size} is negative")
    return RemoteDescription(
        type=kind,
        mid=media.rtp.muxId or "0",
        ice=RTCIceParameters(usernameFragment=ice.usernameFragment, password=ice.password,
                             iceLite=ice.iceLite),
        candidates=list(media.ice_candidates),
        candidates_complete=media.ice_candidates_complete,
        fingerprints=fingerprints,
        setup=setup,
        sctp_port=sctp_port,
        max_message_size=max_message_size,
        sdp=sdp,
    )


def _dtls_attributes(sdp: str) -> tuple[list[RTCDtlsFingerprint], str | None]:
    """a=fingerprint and a=setup of the application section (media level wins over session
    level; aiortc's parser drops fingerprints when a=setup is missing)."""
    session: list[RTCDtlsFingerprint] = []
    media: list[RTCDtlsFingerprint] = []
    setups: dict[bool, str] = {}
    in_media = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_media = True
        elif line.startswith("a=fingerprint:"):
            algorithm, _, value = line[len("a=fingerprint:"):].strip().partition(" ")
            fingerprint = RTCDtlsFingerprint(algorithm=algorithm.lower(), value=value.strip())
            (media if in_media else session).append(fingerprint)
        elif line.startswith("a=setup:"):
            setups[in_media] = line[len("a=setup:"):].strip()
    setup = setups.get(True, setups.get(False))
    return media or session, setup if setup in SETUP_VALUES else None


def parse_candidate(line: str) -> RTCIceCandidate:
    """An ICE candidate from its SDP form, with or without ``a=`` and ``candidate:``."""
    text = line.strip().removeprefix("a=").removeprefix("candidate:")
    if len(text) > 512:
        raise InvalidSdp("ICE candidate line longer than 512 characters")
    try:
        candidate = candidate_from_sdp(text)
        if not 0 < candidate.port < 65536 or candidate.component != 1:
            raise ValueError("port or component out of range")
    except (AssertionError, IndexError, ValueError) as exc:
        raise InvalidSdp(f"cannot parse ICE candidate {line[:80]!r}: {_why(exc)}") from None
    return candidate


def candidate_line(candidate: RTCIceCandidate) -> str:
    """The ``candidate:...`` attribute value for ``candidate`` (as trickled to a browser)."""
    return "candidate:" + candidate_to_sdp(candidate)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
