"""A peer that trickles every candidate before its offer, through coturn with a relay-only
policy on both sides: the daemon holds the early candidates and gives them to the session the
offer creates. Without them the relay has no permission for the peer's address and the
connection fails after connect_timeout (direct paths hide this: the offerer's checks reveal
its address anyway)."""

from __future__ import annotations

import asyncio

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from mvpd.proto.signaling import Answer, Candidate, IceCandidate, Offer
from mvpd.signaling.client import SignalingClient
from tests.e2e.harness import Daemons, TurnServer
from tests.peerlink import make_settings

PEER = "early"


def split_candidates(sdp: str) -> tuple[str, list[str]]:
    """The SDP without its candidate lines, and those lines (without ``a=``)."""
    kept, candidates = [], []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            candidates.append(line[2:])
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", candidates


async def offer_candidates_first(url: str, target: str, turn: TurnServer) -> str:
    """Connect to ``target`` as :data:`PEER`: every candidate, then end-of-candidates, then
    an offer without candidates. Returns the first message the daemon sends back."""
    pc = RTCPeerConnection(RTCConfiguration(
        iceServers=[RTCIceServer(turn.url, turn.USER, turn.PASSWORD)],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    ))
    channel = pc.createDataChannel("mvp", protocol="chat")
    opened = asyncio.Event()
    received: asyncio.Queue[str] = asyncio.Queue()
    channel.on("open", opened.set)
    channel.on("message", received.put_nowait)
    client = SignalingClient(make_settings(PEER, signaling_url=url))
    await client.connect()
    try:
        await pc.setLocalDescription(await pc.createOffer())
        sdp, lines = split_candidates(pc.localDescription.sdp)
        assert lines and all("typ relay" in line for line in lines), lines
        for line in lines:
            await client.send(Candidate(sender=PEER, to=target, candidate=IceCandidate(
                candidate=line, sdpMid="0", sdpMLineIndex=0)))
        await client.send(Candidate(sender=PEER, to=target, candidate=None))
        await client.send(Offer(sender=PEER, to=target, sdp=sdp))
        async for message in client:
            if isinstance(message, Answer):
                await pc.setRemoteDescription(RTCSessionDescription(message.sdp, "answer"))
                break
        await asyncio.wait_for(opened.wait(), 25)
        channel.send("hello over the relay")
        return await asyncio.wait_for(received.get(), 20)
    finally:
        await client.close()
        await asyncio.wait_for(pc.close(), 10)


def test_candidates_before_the_offer_connect_through_a_relay(
    turn_server: TurnServer, daemons: Daemons
) -> None:
    bob = daemons("bob", env={**turn_server.daemon_env(), "MVPD_ALLOWED_PEERS": "*",
                              "MVPD_CONNECT_TIMEOUT": "20"})

    async def body() -> str:
        task = asyncio.create_task(offer_candidates_first(bob.signaling_url, "bob", turn_server))
        got = await asyncio.to_thread(bob.messages, PEER, 1, 40)
        assert got == ["hello over the relay"]
        peer = (await asyncio.to_thread(bob.peers))[PEER]
        assert peer["path"] == "relayed", peer
        await asyncio.to_thread(bob.send, PEER, text="hello back")
        return await task

    assert asyncio.run(asyncio.wait_for(body(), 60)) == "hello back"
