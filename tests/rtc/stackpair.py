"""Test helpers: our peer connection against a stock aiortc RTCPeerConnection (or another of
ours), exchanging SDP directly, no ICE servers, candidates inline or trickled.

aiortc gathers no loopback addresses; the peers reach each other over the machine's own
interface addresses, which the kernel delivers locally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from mvpd.rtc.connection import IceConfiguration, PeerConnection
from mvpd.rtc.description import parse_candidate
from tests.peerlink import split_candidates

Peer = PeerConnection | RTCPeerConnection


def stock_peer() -> RTCPeerConnection:
    """aiortc's own peer connection, with an explicit empty ICE server list."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def our_peer() -> PeerConnection:
    return PeerConnection(IceConfiguration(servers=()))


@dataclass
class Inbox:
    """Everything a channel emits, for awaiting in tests."""

    messages: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    low: int = 0

    def attach(self, channel: Any) -> Any:
        channel.on("message", self.messages.put_nowait)
        channel.on("open", self.opened.set)
        channel.on("close", self.closed.set)

        def on_low() -> None:
            self.low += 1

        channel.on("bufferedamountlow", on_low)
        if channel.readyState == "open":
            self.opened.set()
        return channel

    async def get(self, timeout: float = 10.0) -> str | bytes:
        return await asyncio.wait_for(self.messages.get(), timeout)


async def candidates_to(peer: Peer, lines: list[str]) -> None:
    """Trickle SDP candidate lines to ``peer``, then end-of-candidates."""
    for line in lines:
        candidate = parse_candidate(line)
        candidate.sdpMid, candidate.sdpMLineIndex = "0", 0
        await peer.addIceCandidate(candidate)
    if isinstance(peer, PeerConnection):
        await peer.addIceCandidate(None)


async def negotiate(
    offerer: Peer,
    answerer: Peer,
    *,
    trickle: str = "inline",
    before_answer: Callable[[], Any] | None = None,
) -> None:
    """Offer/answer between two peers.

    ``trickle``: ``inline`` (candidates in the SDP), ``before`` (each side gets the other's
    candidates before the description they belong to, where the side is ours) or ``after``
    (after it). Stock aiortc takes trickled candidates only after its remote description,
    so it always gets them after.
    """
    await offerer.setLocalDescription(await offerer.createOffer())
    offer = offerer.localDescription.sdp
    offer_cands: list[str] = []
    if trickle != "inline":
        offer, offer_cands = split_candidates(offer)
    if trickle == "before" and isinstance(answerer, PeerConnection):
        await candidates_to(answerer, offer_cands)
        offer_cands = []
    await answerer.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
    if before_answer is not None:
        before_answer()
    await answerer.setLocalDescription(await answerer.createAnswer())
    answer = answerer.localDescription.sdp
    answer_cands: list[str] = []
    if trickle != "inline":
        answer, answer_cands = split_candidates(answer)
    if trickle == "before" and isinstance(offerer, PeerConnection):
        await candidates_to(offerer, answer_cands)
        answer_cands = []
    await offerer.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    if offer_cands:
        await candidates_to(answerer, offer_cands)
    if answer_cands:
        await candidates_to(offerer, answer_cands)


async def wait_state(peer: Peer, state: str, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while peer.connectionState != state:  # noqa: ASYNC110 (state of aiortc objects)
            await asyncio.sleep(0.02)


async def open_pair(
    offerer: Peer, answerer: Peer, *, trickle: str = "inline", **options: Any
) -> tuple[Any, Any, Inbox, Inbox]:
    """Negotiate with one channel the offerer creates; both ends once open."""
    channel = offerer.createDataChannel("main", protocol="chat", **options)
    ours = Inbox()
    ours.attach(channel)
    theirs = Inbox()
    remote: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_datachannel(ch: Any) -> None:
        theirs.attach(ch)
        if not remote.done():
            remote.set_result(ch)

    answerer.on("datachannel", on_datachannel)
    await negotiate(offerer, answerer, trickle=trickle)
    far = await asyncio.wait_for(remote, 15)
    await asyncio.wait_for(ours.opened.wait(), 15)
    return channel, far, ours, theirs


async def close_all(*peers: Peer) -> None:
    for peer in peers:
        await peer.close()
