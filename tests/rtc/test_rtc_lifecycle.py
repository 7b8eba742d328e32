"""Life and death of our peer connection next to a stock aiortc peer: closing from either
side, ICE failure, hostile data channel traffic, many channels, negotiated channels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiortc import RTCSessionDescription

from tests.e2e.harness import TurnServer
from tests.rtc.stackpair import (
    Inbox,
    close_all,
    negotiate,
    open_pair,
    our_peer,
    stock_peer,
    wait_state,
)


def run(body: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def test_the_stock_peer_closing_closes_us_cleanly() -> None:
    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            _, _, near_in, _ = await open_pair(a, b)
            await b.close()
            await asyncio.wait_for(near_in.closed.wait(), 10)
            await wait_state(a, "closed")
            assert a.failure == ""
        finally:
            await close_all(a, b)

    run(body)


def test_closing_us_closes_the_stock_channels() -> None:
    async def body() -> None:
        a, b = stock_peer(), our_peer()
        try:
            _, far, near_in, _ = await open_pair(a, b)
            await b.close()
            assert far.readyState == "closed" and b.connectionState == "closed"
            await asyncio.wait_for(near_in.closed.wait(), 10)
        finally:
            await close_all(a, b)

    run(body)


def test_no_usable_candidate_fails_with_a_reason() -> None:
    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            channel = a.createDataChannel("main")
            inbox = Inbox()
            inbox.attach(channel)
            await a.setLocalDescription(await a.createOffer())
            await b.setRemoteDescription(a.localDescription)
            await b.setLocalDescription(await b.createAnswer())
            answer = "".join(
                line + "\r\n" for line in b.localDescription.sdp.splitlines()
                if not line.startswith("a=candidate:")
            )
            await a.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await wait_state(a, "failed")
            assert "ICE" in a.failure
            await a.close()
            assert channel.readyState == "closed" and inbox.closed.is_set()
        finally:
            await close_all(a, b)

    run(body)


def test_hostile_data_channel_traffic_is_counted_and_survived(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer sending DCEP garbage, unknown PPIDs, bad UTF-8, an OPEN on our stream ids or
    data for channels that do not exist: each message is dropped and counted (bad UTF-8 is
    handed on as bytes), the connection and the open channel carry on."""

    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            near, far, near_in, _ = await open_pair(a, b)
            ours_parity = near.id % 2
            theirs = 1 - ours_parity
            send = b.sctp._send  # stock aiortc's raw SCTP send
            await send(far.id, 50, b"\x09")  # unknown DCEP message type
            await send(far.id, 50, b"\x03\x00")  # truncated OPEN
            await send(far.id, 99, b"x")  # unknown PPID
            await send(far.id, 51, b"\xff\xfe")  # text that is not UTF-8
            await send(far.id, 52, b"x")  # deprecated partial PPID
            await send(100 + theirs, 53, b"x")  # no channel on that stream
            await send(200 + ours_parity, 50, bytes([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
            await send(far.id, 50, bytes([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))  # again
            far.send("still fine")
            # Text that is not UTF-8 reaches the channel as bytes: its transport counts it
            # (mvpd.transports: invalid-utf8); everything else is dropped here.
            assert await near_in.get() == b"\xff\xfe"
            assert await near_in.get() == "still fine"
            assert a.sctp is not None and a.sctp.protocol_violations == 7
            assert a.sctp.invalid_text == 1
            assert a.connectionState == "connected" and near.readyState == "open"
        finally:
            await close_all(a, b)

    run(body)


def test_a_failing_listener_does_not_stop_delivery(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            near, far, near_in, _ = await open_pair(a, b)

            def broken(message: Any) -> None:
                raise RuntimeError("listener bug")

            near.remove_all_listeners("message")
            near.on("message", broken)
            near.on("message", near_in.messages.put_nowait)
            far.send("one")
            far.send("two")
            assert [await near_in.get(), await near_in.get()] == ["one", "two"]
            assert a.connectionState == "connected"
        finally:
            await close_all(a, b)

    with caplog.at_level(logging.ERROR, logger="mvpd.rtc.events"):
        run(body)
    assert "listener bug" in caplog.text


@pytest.mark.parametrize("ours_offers", [True, False])
def test_many_channels_from_both_sides_at_once(ours_offers: bool) -> None:
    async def body() -> None:
        ours, stock = our_peer(), stock_peer()
        offerer, answerer = (ours, stock) if ours_offers else (stock, ours)
        try:
            await open_pair(offerer, answerer)
            arrived: dict[int, list[Any]] = {id(ours): [], id(stock): []}
            done = asyncio.Event()

            def collector(pc: Any) -> Callable[[Any], None]:
                def on_channel(channel: Any) -> None:
                    arrived[id(pc)].append(channel)
                    if all(len(v) == 20 for v in arrived.values()):
                        done.set()
                return on_channel

            ours.on("datachannel", collector(ours))
            stock.on("datachannel", collector(stock))
            mine = [ours.createDataChannel(f"o{i}") for i in range(20)]
            mine_open = [Inbox() for _ in mine]
            for inbox, channel in zip(mine_open, mine, strict=True):
                inbox.attach(channel)
            theirs = [stock.createDataChannel(f"s{i}") for i in range(20)]
            await asyncio.wait_for(done.wait(), 20)
            for inbox in mine_open:
                await asyncio.wait_for(inbox.opened.wait(), 10)
            ids = [c.id for c in mine] + [c.id for c in theirs]
            assert len(set(ids)) == 40
            assert {c.label for c in arrived[id(ours)]} == {f"s{i}" for i in range(20)}
            assert {c.label for c in arrived[id(stock)]} == {f"o{i}" for i in range(20)}
            inbox = Inbox()
            inbox.attach(arrived[id(stock)][-1])
            next(c for c in mine if c.label == arrived[id(stock)][-1].label).send("on o-last")
            assert await inbox.get() == "on o-last"
        finally:
            await close_all(ours, stock)

    run(body)


def test_negotiated_channel_and_early_close() -> None:
    """A channel both sides create with the same id opens without DCEP; a channel closed
    before the connection exists never reaches the peer."""

    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            early = a.createDataChannel("never")
            early_in = Inbox()
            early_in.attach(early)
            early.close()
            assert early.readyState == "closed" and early_in.closed.is_set()
            ours = a.createDataChannel("n", negotiated=True, id=7)
            theirs = b.createDataChannel("n", negotiated=True, id=7)
            ours_in, theirs_in = Inbox(), Inbox()
            ours_in.attach(ours)
            theirs_in.attach(theirs)
            remote: list[Any] = []
            b.on("datachannel", remote.append)
            await negotiate(a, b)
            await asyncio.wait_for(ours_in.opened.wait(), 15)
            ours.send("negotiated")
            assert await theirs_in.get() == "negotiated"
            theirs.send(b"back")
            assert await ours_in.get() == b"back"
            assert remote == [] and ours.id == 7
        finally:
            await close_all(a, b)

    run(body)


def test_liveness_probe_on_the_selected_pair() -> None:
    """A STUN check on the selected pair is answered while the peer lives, and times out
    once it is gone (what mvpd's liveness watchdog builds on)."""
    from aioice.stun import TransactionError

    from mvpd.rtc import aiortc_internals as internals

    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            assert not await internals.probe_selected_pair(a.ice_transport, retransmissions=0)
            await open_pair(a, b)
            assert await internals.probe_selected_pair(a.ice_transport, retransmissions=1)
            await b.close()
            with pytest.raises(TransactionError):
                await internals.probe_selected_pair(a.ice_transport, retransmissions=0)
        finally:
            await close_all(a, b)

    run(body)


def test_ice_configuration_from_an_aiortc_configuration() -> None:
    from aiortc import RTCConfiguration, RTCIceServer
    from aiortc.rtcconfiguration import RTCIceTransportPolicy

    from mvpd.rtc import IceConfiguration

    server = RTCIceServer(urls=["turn:192.0.2.1:3478"], username="u", credential="p")
    config = RTCConfiguration(iceServers=[server], iceTransportPolicy=RTCIceTransportPolicy.RELAY)
    assert IceConfiguration.from_rtc_configuration(config) == IceConfiguration((server,), "relay")
    assert IceConfiguration.from_rtc_configuration(RTCConfiguration(iceServers=[])).servers == ()
    with pytest.raises(ValueError, match="public STUN server"):
        IceConfiguration.from_rtc_configuration(RTCConfiguration())
    with pytest.raises(ValueError, match="'all' or 'relay'"):
        IceConfiguration(policy="none")


def test_relay_policy_without_turn_gathers_nothing() -> None:
    """The transport policy reaches aioice: relay-only and no TURN server, no candidates
    (and no public STUN server is ever asked: the server list is empty)."""
    from mvpd.rtc import IceConfiguration, PeerConnection

    async def body() -> None:
        relay = PeerConnection(IceConfiguration(policy="relay"))
        everything = our_peer()
        try:
            assert "a=candidate:" not in (await relay.createOffer()).sdp
            offer = (await everything.createOffer()).sdp
            assert "typ host" in offer and "typ srflx" not in offer
        finally:
            await close_all(relay, everything)

    run(body)


def test_dtls_closed_by_the_peer_closes_channels_and_stops_sctp() -> None:
    """The peer ends DTLS (close_notify) without a word from SCTP: the connection closes,
    its channels close, and no SCTP timer keeps running."""

    async def body() -> None:
        a, b = our_peer(), stock_peer()
        try:
            near, _, near_in, _ = await open_pair(a, b)
            await b.sctp.transport.stop()  # DTLS only
            await asyncio.wait_for(near_in.closed.wait(), 10)
            await wait_state(a, "closed")
            assert a.sctp is not None and a.sctp._timer is None
            assert near.readyState == "closed" and near.bufferedAmount == 0
        finally:
            await close_all(a, b)

    run(body)


def test_a_flood_of_channels_from_the_peer_is_refused_past_the_limit() -> None:
    from mvpd.rtc import IceConfiguration, PeerConnection

    async def body() -> None:
        a, b = PeerConnection(IceConfiguration(), max_channels=5), stock_peer()
        try:
            await open_pair(a, b)  # one channel, ours
            accepted: list[Any] = []
            a.on("datachannel", accepted.append)
            flood = [b.createDataChannel(f"f{i}") for i in range(12)]
            async with asyncio.timeout(15):
                while sum(c.readyState == "closed" for c in flood) < 8:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert len(accepted) == 4 and {c.readyState for c in accepted} == {"open"}
            assert a.sctp is not None and a.sctp.channels_refused == 8
            assert a.connectionState == "connected"
        finally:
            await close_all(a, b)

    run(body)


@pytest.mark.parametrize("ours_offers", [True, False])
def test_relay_policy_through_turn_says_relayed(
    turn_server: TurnServer, ours_offers: bool
) -> None:
    """The ICE servers reach aioice: relay-only through coturn on 127.0.0.1, both sides; the
    selected pair is a relayed one and no host candidate was offered."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
    from aiortc.rtcconfiguration import RTCIceTransportPolicy

    from mvpd.rtc import IceConfiguration, PeerConnection

    config = RTCConfiguration(
        iceServers=[RTCIceServer(urls=[turn_server.url], username=TurnServer.USER,
                                 credential=TurnServer.PASSWORD)],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )

    async def body() -> None:
        ours = PeerConnection(IceConfiguration.from_rtc_configuration(config))
        stock = RTCPeerConnection(config)
        offerer, answerer = (ours, stock) if ours_offers else (stock, ours)
        try:
            near, _, _, far_in = await open_pair(offerer, answerer)
            near.send("via the relay")
            assert await far_in.get() == "via the relay"
            # Many packets each way through the relay (our stack sends and receives them
            # on its synchronous paths; the TURN channel binding comes first), in order.
            sent = [bytes([i]) * 3000 for i in range(64)]
            for data in sent:
                near.send(data)
            assert [await far_in.get() for _ in sent] == sent
            pair = ours.selected_pair()
            assert pair is not None and pair.path == "relayed"
            assert pair.local.type == "relay" and "typ relay" in pair.local.sdp
            assert "typ host" not in ours.localDescription.sdp  # type: ignore[union-attr]
        finally:
            await close_all(ours, stock)

    run(body, timeout=90)


def test_the_offerer_controls_ice_before_the_answer_arrives() -> None:
    """The answerer starts its connectivity checks as soon as it answers; when the answer
    reaches the offerer late (a busy signaling path), those checks meet an offerer that is
    already the controlling agent, so no role conflict can leave both ends waiting for the
    other to nominate (seen with three daemons connecting at once under load)."""

    async def body() -> None:
        offerer, answerer = our_peer(), our_peer()
        try:
            offerer.createDataChannel("late answer")
            await offerer.setLocalDescription(await offerer.createOffer())
            assert offerer.ice_transport._connection.ice_controlling is True
            assert offerer.localDescription is not None
            await answerer.setRemoteDescription(offerer.localDescription)
            await answerer.setLocalDescription(await answerer.createAnswer())
            assert answerer.ice_transport._connection.ice_controlling is False
            await asyncio.sleep(1.5)  # the answerer's checks arrive first
            assert answerer.localDescription is not None
            await offerer.setRemoteDescription(answerer.localDescription)
            await wait_state(offerer, "connected")
            await wait_state(answerer, "connected")
            pair = offerer.selected_pair()
            assert pair is not None and answerer.selected_pair() is not None
        finally:
            await close_all(offerer, answerer)

    run(body)
