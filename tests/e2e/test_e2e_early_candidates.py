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
from tests.e2e.harness import Daemon, Daemons, TurnServer
from tests.peerlink import make_settings

PEER = "early"


def split_candidates(sdp: str) -> tuple[str, list[str], str]:
    """The SDP without its candidate lines, those lines (without ``a=``), and the ufrag."""
    kept, candidates, ufrag = [], [], ""
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            candidates.append(line[2:])
        elif line != "a=end-of-candidates":
            kept.append(line)
        if line.startswith("a=ice-ufrag:"):
            ufrag = line.split(":", 1)[1]
    return "\r\n".join(kept) + "\r\n", candidates, ufrag


class TricklingPeer:
    """An aiortc peer, relay only, that sends every candidate (then end-of-candidates) to
    ``target`` before an offer that carries none, as a browser may."""

    def __init__(self, turn: TurnServer, same_key_as: TricklingPeer | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(
            iceServers=[RTCIceServer(turn.url, turn.USER, turn.PASSWORD)],
            iceTransportPolicy=RTCIceTransportPolicy.RELAY,
        ))
        if same_key_as is not None:
            # aiortc has no parameter for it: its private list, read when the first channel
            # makes the DTLS transport.
            self.pc._RTCPeerConnection__certificates = (
                same_key_as.pc._RTCPeerConnection__certificates
            )
        self.channel = self.pc.createDataChannel("mvp", protocol="chat")
        self.opened = asyncio.Event()
        self.received: asyncio.Queue[str] = asyncio.Queue()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", self.received.put_nowait)

    async def connect(self, url: str, target: str) -> None:
        client = SignalingClient(make_settings(PEER, signaling_url=url))
        await client.connect()
        try:
            await self.pc.setLocalDescription(await self.pc.createOffer())
            sdp, lines, ufrag = split_candidates(self.pc.localDescription.sdp)
            assert lines and all("typ relay" in line for line in lines), lines
            for line in lines:
                await client.send(Candidate(sender=PEER, to=target, candidate=IceCandidate(
                    candidate=line, sdpMid="0", sdpMLineIndex=0, usernameFragment=ufrag)))
            await client.send(Candidate(sender=PEER, to=target, candidate=None))
            await client.send(Offer(sender=PEER, to=target, sdp=sdp))
            async for message in client:
                if isinstance(message, Answer):
                    await self.pc.setRemoteDescription(
                        RTCSessionDescription(message.sdp, "answer"))
                    break
            await asyncio.wait_for(self.opened.wait(), 25)
        finally:
            await client.close()  # signaling only: the channel stays open

    async def close(self) -> None:
        await asyncio.wait_for(self.pc.close(), 10)


async def chat(peer: TricklingPeer, daemon: Daemon, line: str) -> None:
    """``line`` to the daemon over the relay and an answer back."""
    peer.channel.send(line)
    got = await asyncio.to_thread(daemon.messages, PEER, 1, 40)
    assert got == [line]
    state = (await asyncio.to_thread(daemon.peers))[PEER]
    assert state["state"] == "connected" and state["path"] == "relayed", state
    await asyncio.to_thread(daemon.send, PEER, text="back: " + line)
    assert await asyncio.wait_for(peer.received.get(), 20) == "back: " + line


def relay_only_daemon(daemons: Daemons, turn: TurnServer) -> Daemon:
    return daemons("bob", env={**turn.daemon_env(), "MVPD_ALLOWED_PEERS": "*",
                               "MVPD_CONNECT_TIMEOUT": "20"})


def test_candidates_before_the_offer_connect_through_a_relay(
    turn_server: TurnServer, daemons: Daemons
) -> None:
    bob = relay_only_daemon(daemons, turn_server)

    async def body() -> None:
        peer = TricklingPeer(turn_server)
        try:
            await peer.connect(bob.signaling_url, "bob")
            await chat(peer, bob, "hello over the relay")
        finally:
            await peer.close()

    asyncio.run(asyncio.wait_for(body(), 90))
    assert "early-candidates" not in bob.status()["dropped"]


def test_a_peer_that_starts_over_trickling_first_replaces_its_session(
    turn_server: TurnServer, daemons: Daemons
) -> None:
    # The peer's first connection is still up (no bye) when it starts over, as after a page
    # reload: its new candidates name a new ICE ufrag, so they wait for the new offer
    # instead of going to the session that offer replaces.
    bob = relay_only_daemon(daemons, turn_server)

    async def body() -> None:
        # The same peer starting over keeps its key (bob remembered it on first contact),
        # as a restarted agent does.
        first = TricklingPeer(turn_server)
        second = TricklingPeer(turn_server, same_key_as=first)
        try:
            await first.connect(bob.signaling_url, "bob")
            await chat(first, bob, "first")
            await second.connect(bob.signaling_url, "bob")
            await chat(second, bob, "second")
        finally:
            await first.close()
            await second.close()

    asyncio.run(asyncio.wait_for(body(), 120))
    assert "sent a new offer; replacing its session" in bob.log.read_text()
