"""Session descriptions of the data-channel stack: built and parsed with aiortc.sdp, read by a
stock aiortc peer connection, and hostile input rejected with InvalidSdp."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import (
    RTCCertificate,
    RTCConfiguration,
    RTCIceCandidate,
    RTCIceParameters,
    RTCPeerConnection,
    RTCSessionDescription,
)

from mvpd.proto.errors import ProtocolError
from mvpd.rtc.description import (
    DEFAULT_REMOTE_MAX_MESSAGE_SIZE,
    LocalParameters,
    build_description,
    candidate_line,
    parse_candidate,
    parse_description,
)
from mvpd.rtc.errors import InvalidSdp

CANDIDATE = RTCIceCandidate(
    component=1, foundation="abc", ip="192.0.2.7", port=40000, priority=2130706431,
    protocol="udp", type="host",
)


def local(
    setup: str = "actpass", candidates: list[RTCIceCandidate] | None = None
) -> LocalParameters:
    return LocalParameters(
        ice=RTCIceParameters(usernameFragment="ufrag", password="p" * 22),
        candidates=[CANDIDATE] if candidates is None else candidates,
        candidates_complete=True,
        fingerprints=RTCCertificate.generateCertificate().getFingerprints(),
        setup=setup,
    )


def test_offer_has_one_application_section_with_everything() -> None:
    sdp = build_description("offer", local())
    lines = sdp.splitlines()
    assert sum(line.startswith("m=") for line in lines) == 1
    for wanted in (
        "m=application 40000 UDP/DTLS/SCTP webrtc-datachannel",
        "a=sctp-port:5000",
        "a=max-message-size:262144",
        "a=setup:actpass",
        "a=ice-ufrag:ufrag",
        "a=candidate:abc 1 udp 2130706431 192.0.2.7 40000 typ host",
        "a=end-of-candidates",
        "a=mid:0",
        "a=group:BUNDLE 0",
    ):
        assert wanted in lines, wanted
    assert any(line.startswith("a=fingerprint:sha-256 ") for line in lines)


@pytest.mark.parametrize("setup", ["active", "passive"])
def test_answer_round_trip(setup: str) -> None:
    params = local(setup)
    remote = parse_description(build_description("answer", params), "answer")
    assert remote.setup == setup
    assert remote.ice.usernameFragment == "ufrag" and remote.ice.password == "p" * 22
    assert remote.candidates == [CANDIDATE] and remote.candidates_complete
    assert remote.sctp_port == 5000 and remote.max_message_size == 262144
    assert {f.algorithm for f in remote.fingerprints} == {"sha-256", "sha-384", "sha-512"}


def test_setup_values_are_checked_when_building() -> None:
    with pytest.raises(ValueError, match="not valid in an answer"):
        build_description("answer", local("actpass"))
    with pytest.raises(ValueError, match="offer"):
        build_description("pranswer", local())


def test_no_candidates_gives_the_discard_address() -> None:
    sdp = build_description("offer", local(candidates=[]))
    assert "m=application 9 UDP/DTLS/SCTP webrtc-datachannel" in sdp
    assert "c=IN IP4 0.0.0.0" in sdp


async def stock_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("x")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def test_stock_aiortc_offer_parses_and_accepts_our_answer() -> None:
    async def main() -> None:
        pc, sdp = await stock_offer()
        try:
            remote = parse_description(sdp, "offer")
            assert remote.setup == "actpass" and remote.mid == "0"
            assert remote.candidates and remote.candidates_complete
            # aiortc reads our answer and takes the DTLS server role we leave it.
            answer = build_description("answer", local("active"))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            assert pc.sctp is not None and pc.sctp.transport._role == "server"
        finally:
            await pc.close()

    asyncio.run(main())


def test_stock_aiortc_answers_our_offer() -> None:
    async def main() -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            offer = build_description("offer", local())
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            remote = parse_description(pc.localDescription.sdp, "answer")
            assert remote.setup == "active"  # aiortc answers as the DTLS client
            assert remote.max_message_size == 262144
        finally:
            await pc.close()

    asyncio.run(main())


def test_legacy_sctpmap_and_missing_max_message_size() -> None:
    sdp = build_description("offer", local())
    legacy = (
        sdp.replace("UDP/DTLS/SCTP webrtc-datachannel", "DTLS/SCTP 5001")
        .replace("a=sctp-port:5000\r\n", "a=sctpmap:5001 webrtc-datachannel 1024\r\n")
        .replace("a=max-message-size:262144\r\n", "")
    )
    remote = parse_description(legacy, "offer")
    assert remote.sctp_port == 5001
    assert remote.max_message_size == DEFAULT_REMOTE_MAX_MESSAGE_SIZE


def good_offer() -> str:
    return build_description("offer", local())


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda s: "hello", "not SDP"),
        (lambda s: s + "a=x\r\n" * 20000, "characters long"),
        (lambda s: s.replace("a=ice-ufrag:ufrag\r\n", ""), "ice-ufrag"),
        (lambda s: s.replace("a=ice-pwd:" + "p" * 22, "a=ice-pwd:short"), "22-256"),
        (lambda s: "\r\n".join(x for x in s.split("\r\n") if not x.startswith("a=fingerprint")),
         "no a=fingerprint"),
        (lambda s: s.replace("a=fingerprint:sha-", "a=fingerprint:md5-"), "no a=fingerprint"),
        (lambda s: s.replace("a=setup:actpass", "a=setup:holdconn"), "cannot parse"),
        (lambda s: s.replace("m=application 40000", "m=application 0"), "port 0"),
        (lambda s: s + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n", "audio sections"),
        (lambda s: s.replace("webrtc-datachannel", "bfcp"), "not webrtc-datachannel"),
        (lambda s: s.replace("a=sctp-port:5000", "a=sctp-port:70000"), "out of range"),
        (lambda s: s.replace("a=sctp-port:5000", "a=sctp-port:x"), "cannot parse"),
        (lambda s: s.replace("a=max-message-size:262144", "a=max-message-size:-1"),
         "negative"),
        (lambda s: s.replace("typ host", "typ"), "cannot parse"),
        (lambda s: s + s[s.index("m="):], "exactly one"),
        (lambda s: s.replace("a=candidate:abc", "a=candidate:abc\r\n" * 300 + "a=candidate:abc")
         .replace("a=candidate:abc\r\n", "a=candidate:x 1 udp 1 192.0.2.1 9 typ host\r\n"),
         "candidates"),
    ],
)
def test_hostile_descriptions_are_invalid_sdp(mangle: object, match: str) -> None:
    sdp = mangle(good_offer())  # type: ignore[operator]
    with pytest.raises(InvalidSdp, match=match) as info:
        parse_description(sdp, "offer")
    assert isinstance(info.value, ProtocolError)


def test_md5_fingerprint_alone_is_not_enough_but_extra_ones_are_ignored() -> None:
    remote = parse_description(good_offer().replace("a=fingerprint:sha-512", "a=fingerprint:md5"),
                               "offer")
    assert {f.algorithm for f in remote.fingerprints} == {"sha-256", "sha-384"}


def test_answer_must_pick_a_role_and_offer_defaults_to_actpass() -> None:
    with pytest.raises(InvalidSdp, match="must pick active or passive"):
        parse_description(good_offer(), "answer")
    no_setup = good_offer().replace("a=setup:actpass\r\n", "")
    assert parse_description(no_setup, "offer").setup == "actpass"
    with pytest.raises(InvalidSdp, match="no a=setup"):
        parse_description(no_setup, "answer")


def test_candidates() -> None:
    line = candidate_line(CANDIDATE)
    assert line == "candidate:abc 1 udp 2130706431 192.0.2.7 40000 typ host"
    assert parse_candidate(line) == CANDIDATE
    assert parse_candidate("a=" + line) == CANDIDATE
    for bad in ("", "candidate:abc 1 udp", "abc 1 udp x 192.0.2.7 40000 typ host",
                "abc 1 udp 1 192.0.2.7 0 typ host", "abc 2 udp 1 192.0.2.7 9 typ host",
                "x" * 600):
        with pytest.raises(InvalidSdp):
            parse_candidate(bad)
