"""Our WebRTC stack (aiortc ICE/DTLS + mvpd.sctp) against a stock aiortc RTCPeerConnection on
the machine's own addresses, in both roles, and against itself."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mvpd.rtc import aiortc_internals as internals
from mvpd.rtc.connection import PeerConnection
from mvpd.rtc.datachannel import DataChannel
from mvpd.rtc.errors import InvalidSdp, InvalidStateError
from mvpd.transports import ChatTransport, PipeTransport
from tests.rtc.stackpair import (
    Inbox,
    Peer,
    close_all,
    open_pair,
    our_peer,
    stock_peer,
    wait_state,
)

BIG = 262144  # the largest message either side advertises

ROLES = {
    "ours-offers": (our_peer, stock_peer),
    "stock-offers": (stock_peer, our_peer),
    "ours-both": (our_peer, our_peer),
}


def run(body: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def ours_of(a: Peer, b: Peer) -> PeerConnection:
    return a if isinstance(a, PeerConnection) else b  # type: ignore[return-value]


@pytest.mark.parametrize("roles", ROLES)
def test_messages_both_ways(roles: str) -> None:
    """Text, binary, empty text, empty binary and 256 KiB messages, in order, both ways."""

    async def body() -> None:
        make_a, make_b = ROLES[roles]
        a, b = make_a(), make_b()
        try:
            near, far, near_in, far_in = await open_pair(a, b)
            assert far.label == "main" and far.protocol == "chat" and far.ordered
            big = os.urandom(BIG)
            sent: list[str | bytes] = ["héllo", b"\x00\x01\x02", "", b"", big, "x" * BIG, "end"]
            for message in sent:
                near.send(message)
                far.send(message)
            for inbox in (far_in, near_in):
                got = [await inbox.get() for _ in sent]
                assert [type(m) for m in got] == [type(m) for m in sent]
                assert got == sent
            for peer in (a, b):
                assert peer.connectionState == "connected"
            # One byte over what the peer advertised is refused before it is queued.
            ours = near if isinstance(near, DataChannel) else far
            with pytest.raises(ValueError, match="accepts at most 262144"):
                ours.send(bytes(BIG + 1))
            with pytest.raises(ValueError, match="accepts at most 262144"):
                ours.send("é" * (BIG // 2) + "x")
            assert ours.bufferedAmount == 0
        finally:
            await close_all(a, b)

    run(body)


@pytest.mark.parametrize("roles", ["ours-offers", "stock-offers"])
@pytest.mark.parametrize(
    "options",
    [
        {"ordered": False},
        {"ordered": True, "maxRetransmits": 0},
        {"ordered": False, "maxRetransmits": 2},
        {"ordered": False, "maxPacketLifeTime": 500},
    ],
    ids=["unordered", "rexmit0", "unordered-rexmit2", "unordered-timed"],
)
def test_unordered_and_partially_reliable_channels(roles: str, options: dict[str, Any]) -> None:
    """The channel type crosses in DCEP; on a lossless path every message arrives."""

    async def body() -> None:
        make_a, make_b = ROLES[roles]
        a, b = make_a(), make_b()
        try:
            near, far, near_in, far_in = await open_pair(a, b, **options)
            for channel in (near, far):
                assert channel.ordered == options["ordered"]
                assert channel.maxRetransmits == options.get("maxRetransmits")
                assert channel.maxPacketLifeTime == options.get("maxPacketLifeTime")
            count = 200
            for i in range(count):
                near.send(f"{i}")
                far.send(i.to_bytes(2, "big") * 1000)
            got_far = {int(await far_in.get()) for _ in range(count)}
            got_near = {int.from_bytes(bytes(await near_in.get())[:2], "big") for _ in range(count)}
            assert got_far == got_near == set(range(count))
        finally:
            await close_all(a, b)

    run(body)


@pytest.mark.parametrize("roles", ["ours-offers", "stock-offers", "ours-both"])
@pytest.mark.parametrize("trickle", ["before", "after"])
def test_trickled_candidates_before_or_after_the_description(roles: str, trickle: str) -> None:
    async def body() -> None:
        make_a, make_b = ROLES[roles]
        a, b = make_a(), make_b()
        try:
            near, _, _, far_in = await open_pair(a, b, trickle=trickle)
            near.send("over trickled candidates")
            assert await far_in.get() == "over trickled candidates"
            ours = ours_of(a, b)
            assert ours.pending_candidates == 0
            pair = ours.selected_pair()
            assert pair is not None and pair.path == "direct"
        finally:
            await close_all(a, b)

    run(body)


@pytest.mark.parametrize("roles", ["ours-offers", "stock-offers"])
@pytest.mark.parametrize("closer", ["ours", "stock"])
def test_channel_close_is_a_clean_stream_reset(roles: str, closer: str) -> None:
    """Closing a channel resets its stream: the other side sees the channel close, the
    connection and its other channels stay up, and the stream id can be used again."""

    async def body() -> None:
        make_a, make_b = ROLES[roles]
        a, b = make_a(), make_b()
        try:
            near, far, near_in, far_in = await open_pair(a, b)
            ours_is_near = isinstance(a, PeerConnection)
            mine, mine_in = (near, near_in) if ours_is_near else (far, far_in)
            stock, stock_in = (far, far_in) if ours_is_near else (near, near_in)
            # A second channel, opened by the stock side.
            stock_pc = b if ours_is_near else a
            second: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            ours_of(a, b).on("datachannel", second.set_result)
            other = stock_pc.createDataChannel("other")
            other_mine = await asyncio.wait_for(second, 10)
            other_in = Inbox()
            other_in.attach(other_mine)

            mine.send("last words")
            assert await stock_in.get() == "last words"
            (mine if closer == "ours" else stock).close()
            await asyncio.wait_for(stock_in.closed.wait(), 10)
            await asyncio.wait_for(mine_in.closed.wait(), 10)
            assert mine.readyState == stock.readyState == "closed"
            with pytest.raises(Exception, match=r"closed|not open"):
                mine.send("too late")
            # Not an abort: the association and the other channel carry on.
            for peer in (a, b):
                assert peer.connectionState == "connected"
            other.send("still here")
            assert await other_in.get() == "still here"
            third = ours_of(a, b).createDataChannel("third")
            third_in = Inbox()
            third_in.attach(third)
            await asyncio.wait_for(third_in.opened.wait(), 10)
        finally:
            await close_all(a, b)

    run(body)


@pytest.mark.parametrize("roles", ROLES)
def test_transports_run_unchanged_on_our_channels(roles: str) -> None:
    """mvpd's chat and pipe transports attach to our channels as to aiortc's: the pipe's
    credit flow control and EOF work across the two stacks, with backpressure events."""

    async def body() -> None:
        make_a, make_b = ROLES[roles]
        a, b = make_a(), make_b()
        try:
            near, far, _, _ = await open_pair(a, b)
            chat_near, chat_far = ChatTransport(), ChatTransport()
            chat_near.attach_channel(near)
            chat_far.attach_channel(far)
            await chat_near.send_text_async("hi")
            assert await asyncio.wait_for(chat_far.recv(), 10) == "hi"

            offerer_pipe = a.createDataChannel("mvp-pipe", protocol="pipe")
            got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            b.on("datachannel", lambda ch: ch.label == "mvp-pipe" and got.set_result(ch))
            writer, reader = PipeTransport(), PipeTransport()
            writer.attach_channel(offerer_pipe)
            reader.attach_channel(await asyncio.wait_for(got, 10))
            await writer.wait_open()
            payload = os.urandom(3 * 1024 * 1024 + 17)

            async def write() -> None:
                await writer.write(payload)
                await writer.write_eof()

            writing = asyncio.ensure_future(write())
            assert await asyncio.wait_for(reader.read_all(), 30) == payload
            await writing
            assert writer.payload_out == reader.payload_in == len(payload)
        finally:
            await close_all(a, b)

    run(body)


def test_buffered_amount_and_low_event() -> None:
    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            near, _, near_in, far_in = await open_pair(a, b)
            near.bufferedAmountLowThreshold = 64 * 1024
            for _ in range(16):
                near.send(bytes(64 * 1024))
            assert near.bufferedAmount > 64 * 1024
            for _ in range(16):
                await far_in.get()
            async with asyncio.timeout(10):
                while near.bufferedAmount:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert near_in.low >= 1
        finally:
            await close_all(a, b)

    run(body)


@pytest.mark.parametrize("roles", ["ours-offers", "stock-offers"])
def test_state_fingerprint_and_keying_material(roles: str) -> None:
    async def body() -> None:
        make_a, make_b = ROLES[roles]
        a, b = make_a(), make_b()
        ours = ours_of(a, b)
        stock = b if ours is a else a
        states: list[str] = []
        ours.on("connectionstatechange", lambda: states.append(ours.connectionState))
        try:
            assert ours.connectionState == "new"
            await open_pair(a, b)
            await wait_state(ours, "connected")
            assert states == ["connecting", "connected"]
            assert f"a=fingerprint:sha-256 {ours.local_fingerprint}" in ours.localDescription.sdp
            assert ours.local_fingerprint in stock.remoteDescription.sdp
            assert ours.dtls_state == "connected" and ours.sctp_state == "connected"
            assert ours.ice_transport.role == ("controlling" if ours is a else "controlled")
            stats = ours.stats()
            assert stats["path"] == "direct" and stats["sctp"]["state"] == "connected"
            label = b"EXPORTER-mvp-test"
            theirs = internals.export_keying_material(stock.sctp.transport, label, 32)
            assert ours.export_keying_material(label, 32) == theirs
        finally:
            await close_all(a, b)
        assert states[-1] == "closed" and ours.connectionState == "closed"

    run(body)


def test_certificate_can_be_given() -> None:
    from aiortc import RTCCertificate

    async def body() -> None:
        certificate = RTCCertificate.generateCertificate()
        pc = PeerConnection(certificate=certificate)
        try:
            fingerprint = certificate.getFingerprints()[0].value
            assert pc.local_fingerprint == fingerprint
            offer = await pc.createOffer()
            assert fingerprint in offer.sdp
        finally:
            await pc.close()

    run(body)


def test_wrong_fingerprint_fails_the_connection() -> None:
    """A peer whose certificate does not match its a=fingerprint (a man in the middle) is
    refused: the connection fails, no channel opens."""

    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            channel = a.createDataChannel("main")
            await a.setLocalDescription(await a.createOffer())
            await b.setRemoteDescription(a.localDescription)
            await b.setLocalDescription(await b.createAnswer())
            answer = b.localDescription
            lines = [
                "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
                if line.startswith("a=fingerprint:") else line
                for line in answer.sdp.splitlines()
                if not line.startswith("a=fingerprint:sha-384")
                and not line.startswith("a=fingerprint:sha-512")
            ]
            from aiortc import RTCSessionDescription

            await a.setRemoteDescription(
                RTCSessionDescription(sdp="\r\n".join(lines) + "\r\n", type="answer")
            )
            await wait_state(a, "failed")
            assert "DTLS" in a.failure
            assert channel.readyState in ("connecting", "closed")
        finally:
            await close_all(a, b)

    run(body)


def test_signaling_misuse_and_bad_sdp_are_clear_errors() -> None:
    async def body() -> None:
        from aiortc import RTCSessionDescription

        pc = our_peer()
        try:
            with pytest.raises(InvalidStateError, match="no remote offer"):
                await pc.createAnswer()
            with pytest.raises(InvalidSdp, match="not SDP"):
                await pc.setRemoteDescription(RTCSessionDescription(sdp="junk", type="offer"))
            assert pc.signalingState == "stable" and pc.remoteDescription is None
            await pc.setLocalDescription(await pc.createOffer())
            assert pc.signalingState == "have-local-offer"
            with pytest.raises(InvalidStateError, match="must answer"):
                await pc.setRemoteDescription(RTCSessionDescription(sdp="v=0", type="offer"))
            # Candidates before the answer are kept, within bounds.
            for _ in range(300):
                await pc.addIceCandidate(None)
            assert pc.pending_candidates == 256 and pc.candidates_dropped == 44
        finally:
            await pc.close()
        with pytest.raises(InvalidStateError, match="closed"):
            pc.createDataChannel("late")

    run(body)


@pytest.mark.parametrize(
    ("offer_setup", "our_role"),
    [("actpass", "client"), ("passive", "client"), ("active", "server")],
)
def test_dtls_role_follows_the_offer_setup(offer_setup: str, our_role: str) -> None:
    """RFC 8842: we answer actpass and passive with active (DTLS client), active with
    passive (DTLS server); the stock offerer takes the other role from our answer."""

    async def body() -> None:
        from aiortc import RTCSessionDescription

        a, b = stock_peer(), our_peer()
        try:
            channel = a.createDataChannel("main")
            inbox = Inbox()
            inbox.attach(channel)
            await a.setLocalDescription(await a.createOffer())
            offer = a.localDescription.sdp.replace("a=setup:actpass", f"a=setup:{offer_setup}")
            await b.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await b.setLocalDescription(await b.createAnswer())
            wanted = "active" if our_role == "client" else "passive"
            assert f"a=setup:{wanted}" in b.localDescription.sdp
            await a.setRemoteDescription(b.localDescription)
            await asyncio.wait_for(inbox.opened.wait(), 15)
            assert internals.dtls_role(b._dtls) == our_role
            assert b.ice_transport.role == "controlled"
        finally:
            await close_all(a, b)

    run(body)


@pytest.mark.parametrize("roles", ["ours-offers", "stock-offers"])
def test_close_delivers_what_was_queued_first(roles: str) -> None:
    """close() right after send(): the queued messages reach the peer before the reset."""

    async def body() -> None:
        make_a, make_b = ROLES[roles]
        a, b = make_a(), make_b()
        try:
            near, far, near_in, far_in = await open_pair(a, b)
            mine, peer_in = (near, far_in) if isinstance(a, PeerConnection) else (far, near_in)
            chunks = [bytes([i]) * 65536 for i in range(32)]
            for chunk in chunks:
                mine.send(chunk)
            mine.close()
            assert mine.readyState == "closing"
            assert [await peer_in.get() for _ in chunks] == chunks
            await asyncio.wait_for(peer_in.closed.wait(), 10)
        finally:
            await close_all(a, b)

    run(body)
