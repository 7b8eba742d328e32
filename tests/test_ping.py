"""Data-path pings between real aiortc sessions on loopback: the echo, the path, peers that
cannot answer (an older mvpd closes the channel, a browser page ignores it), junk."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mvpd.peer import session as peer_module
from mvpd.ping import MAX_PING_CHANNELS, PingService
from mvpd.proto.errors import PeerError
from mvpd.proto.ping import PING_LABEL, PING_PROTOCOL, REPLY, encode_request, parse_probe
from mvpd.stats import peer_connection
from tests.peerlink import connected_pair, run, wait_for


def test_ping_measures_a_round_trip_over_one_reused_channel() -> None:
    async def body() -> None:
        sa, sb, _, _ = await connected_pair()
        pings = PingService()
        pinger = pings.pinger(sa)
        results = [await pinger.ping(2.0) for _ in range(5)]
        assert [seq for seq, _ in results] == [1, 2, 3, 4, 5]
        rtts = [rtt for _, rtt in results]
        assert all(rtt is not None and 0 < rtt < 1.0 for rtt in rtts), rtts
        assert pings.pinger(sa) is pinger  # kept for the next call
        ping_channels = [c for c in peer_connection(sb).sctp._channels.values()
                         if c.label == PING_LABEL]
        assert len(ping_channels) == 1
        assert sa.ice_path()["path"] == "direct"
        await sa.close()
        assert pings.pinger(sa) is not pinger or pinger._channel is None
        with pytest.raises(PeerError, match="not connected"):
            await pings.pinger(sa).ping(1.0)
        await sb.close()

    run(body())


def test_a_peer_that_ignores_the_channel_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A browser page gets the channel in ondatachannel and never answers.
    monkeypatch.setattr(peer_module, "answer_pings", lambda channel: None)

    async def body() -> None:
        sa, sb, _, _ = await connected_pair()
        with pytest.raises(PeerError, match="does not answer data-path pings") as caught:
            await PingService().pinger(sa).ping(0.5)
        assert "no reply within 0.5 s" in str(caught.value)
        assert sa.state.value == "connected"  # the session itself is unharmed
        await sa.close()
        await sb.close()

    run(body())


def test_a_peer_that_closes_the_channel_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An mvpd from before pings closes channels with labels it does not know.
    monkeypatch.setattr(peer_module, "PING_LABEL", "something-else")

    async def body() -> None:
        sa, sb, _, _ = await connected_pair()
        with pytest.raises(PeerError, match="closed the mvp-ping channel"):
            await PingService().pinger(sa).ping(2.0)
        assert sa.state.value == "connected"
        await sa.close()
        await sb.close()

    run(body())


def test_junk_on_the_ping_channel_is_ignored_and_valid_requests_still_answered() -> None:
    async def body() -> None:
        sa, sb, _, _ = await connected_pair()
        channel = peer_connection(sa).createDataChannel(
            PING_LABEL, ordered=True, protocol=PING_PROTOCOL)
        replies: asyncio.Queue[Any] = asyncio.Queue()
        channel.on("message", replies.put_nowait)
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await asyncio.wait_for(opened.wait(), 10)
        for junk in (b"", b"x" * 5000, "text", bytes(16), encode_request(1, 1)[:-1]):
            channel.send(junk)
        reply_of_reply = bytes([REPLY]) + encode_request(5, 5)[1:]
        channel.send(reply_of_reply)
        channel.send(encode_request(42, 99, padding=100))
        reply = parse_probe(await asyncio.wait_for(replies.get(), 5))
        assert (reply.kind, reply.sequence, reply.timestamp, reply.padding) == (REPLY, 42, 99, 100)
        await asyncio.sleep(0.2)
        assert replies.empty()  # nothing else was answered
        assert sb.state.value == "connected"
        await sa.close()
        await sb.close()

    run(body())


def test_a_peer_gets_only_a_few_ping_channels_answered_at_once() -> None:
    async def body() -> None:
        sa, sb, _, _ = await connected_pair()
        pc = peer_connection(sa)
        replies: asyncio.Queue[int] = asyncio.Queue()
        closed: list[int] = []
        channels = []
        for index in range(MAX_PING_CHANNELS + 2):
            channel = pc.createDataChannel(PING_LABEL, protocol=PING_PROTOCOL)
            channel.on("message", lambda data, i=index: replies.put_nowait(i))
            channel.on("close", lambda i=index: closed.append(i))
            channels.append(channel)
        await wait_for(lambda: all(c.readyState != "connecting" for c in channels), 10)
        await wait_for(lambda: len(closed) == 2, 10)
        for index, channel in enumerate(channels):
            if channel.readyState == "open":
                channel.send(encode_request(index, 0))
        answered = {await asyncio.wait_for(replies.get(), 5) for _ in range(MAX_PING_CHANNELS)}
        assert len(answered) == MAX_PING_CHANNELS and not set(closed) & answered
        # Closing one makes room for a new one.
        channels[min(answered)].close()
        await asyncio.sleep(0.3)
        extra = pc.createDataChannel(PING_LABEL, protocol=PING_PROTOCOL)
        extra.on("message", lambda data: replies.put_nowait(-1))
        await wait_for(lambda: extra.readyState == "open", 10)
        extra.send(encode_request(99, 0))
        assert await asyncio.wait_for(replies.get(), 5) == -1
        await sa.close()
        await sb.close()

    run(body())
