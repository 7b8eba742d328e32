"""PeerSession with real aiortc peers on loopback, signaling through an in-test forwarder."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import mvpd.peer
from mvpd.peer import PeerSession, PeerState, ice_configuration, parse_candidate
from mvpd.proto.errors import ConnectionClosed, IllegalTransition, PeerError
from mvpd.proto.session_states import SessionEvent
from mvpd.proto.signaling import Answer, Bye, IceCandidate, Offer, RoutedMessage
from mvpd.transports import ChatTransport, JsonTransport
from tests.e2e.harness import TurnServer
from tests.peerlink import (
    Forwarder,
    intercept_received,
    make_settings,
    run,
    split_candidates,
    trickle,
    wait_for,
)


async def connect(sa: PeerSession, sb: PeerSession) -> tuple[Any, Any]:
    await sa.start_offer()
    ta = await sa.wait_open()
    tb = await sb.wait_open()
    return ta, tb


def test_offer_answer_chat_both_ways_and_status() -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        ta, tb = await connect(sa, sb)
        assert isinstance(ta, ChatTransport) and isinstance(tb, ChatTransport)
        assert (sa.role, sb.role) == ("offerer", "answerer")
        ta.send_text("hello bob")
        assert await tb.recv() == "hello bob"
        await tb.send_text_async("héllo alice ✓")
        assert await ta.recv() == "héllo alice ✓"

        assert sa.state == sb.state == PeerState.CONNECTED
        assert [c.state for c in sa.history] == [
            PeerState.NEW, PeerState.CONNECTING, PeerState.CONNECTED
        ]
        snap = sa.snapshot()
        assert snap["state"] == "connected" and snap["mode"] == "chat"
        assert snap["ice"]["path"] == "direct"
        assert "typ host" in snap["ice"]["local_candidate"]
        assert "typ host" in snap["ice"]["remote_candidate"]
        counters = snap["transports"]["mvp"]
        assert counters["messages_out"] == 1 and counters["messages_in"] == 1
        assert counters["bytes_out"] == len(b"hello bob")

        await sa.close("done", send_bye=True)
        assert sa.state == PeerState.CLOSED
        await wait_for(lambda: sb.state == PeerState.CLOSED)
        assert "bye" in sb.history[-1].reason or "closed" in sb.history[-1].reason
        with pytest.raises(ConnectionClosed):
            tb.send_text("too late")

    run(body())


def test_mode_travels_with_the_channel() -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        sa.mode = "json"  # bob's settings say chat
        ta, tb = await connect(sa, sb)
        assert isinstance(tb, JsonTransport) and sb.mode == "json"
        ta.send_json({"n": 1, "list": [1, 2]})
        assert await tb.recv() == {"n": 1, "list": [1, 2]}
        await sa.close()

    run(body())


def test_candidates_arriving_before_the_offer_are_queued_not_dropped() -> None:
    """Browser-style trickle in both directions: no candidate in any SDP, the offerer's
    candidates sent before its offer. Without the early ones nobody knows an address."""

    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        early_seen: list[int] = []

        async def strip(message: RoutedMessage) -> list[RoutedMessage]:
            if isinstance(message, Offer):
                sdp, lines = split_candidates(message.sdp)
                assert lines
                stripped = Offer(sender=message.sender, to=message.to, sdp=sdp)
                # Candidates first; the answerer must hold them until the offer comes.
                out: list[RoutedMessage] = [*trickle(message, lines), stripped]
                for item in out[:-1]:
                    sb.deliver(item)  # type: ignore[arg-type]
                await wait_for(lambda: sb.snapshot()["pending_candidates"] == len(out) - 1)
                early_seen.append(sb.snapshot()["pending_candidates"])
                return [stripped]
            if isinstance(message, Answer):
                sdp, lines = split_candidates(message.sdp)
                return [Answer(sender=message.sender, to=message.to, sdp=sdp),
                        *trickle(message, lines)]
            return [message]

        fwd.filter = strip
        ta, tb = await connect(sa, sb)
        assert early_seen and early_seen[0] >= 2  # host candidate(s) + end-of-candidates
        assert sb.snapshot()["pending_candidates"] == 0
        ta.send_text("through trickled candidates")
        assert await tb.recv() == "through trickled candidates"
        await sa.close()
        await sb.close()

    run(body())


def test_glare_lower_id_yields_and_answers() -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        held: list[RoutedMessage] = []
        release = asyncio.Event()

        async def cross(message: RoutedMessage) -> list[RoutedMessage]:
            # Hold both offers until both were sent, so they cross on the wire.
            if isinstance(message, Offer) and not release.is_set():
                held.append(message)
                if len(held) == 2:
                    release.set()
                    return held
                return []
            return [message]

        fwd.filter = cross
        await asyncio.gather(sa.start_offer(), sb.start_offer())
        ta, tb = await asyncio.gather(sa.wait_open(), sb.wait_open())
        # "alice" < "bob": alice threw her offer away and answered bob's.
        assert sa.role == "answerer" and sb.role == "offerer"
        answers = [m for m in fwd.sent if isinstance(m, Answer)]
        assert [m.sender for m in answers] == ["alice"]
        ta.send_text("after glare")
        assert await tb.recv() == "after glare"
        await sa.close()
        await sb.close()

    run(body())


def test_glare_while_the_lower_id_is_still_gathering() -> None:
    """Bob's offer reaches alice while her own offer is still gathering: she throws that
    peer connection away mid-gather and answers (her session must not fail for it)."""

    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        await sb.start_offer()  # bob's offer is delivered to alice's inbox now
        await sa.start_offer()  # her worker handles it while this gathers
        ta, tb = await asyncio.gather(sa.wait_open(), sb.wait_open())
        assert sa.role == "answerer" and sb.role == "offerer"
        assert [m.sender for m in fwd.sent if isinstance(m, Offer)] == ["bob"]
        ta.send_text("after glare")
        assert await tb.recv() == "after glare"
        await sa.close()
        await sb.close()

    run(body())


def test_close_resets_the_channels_and_shuts_sctp_down_before_the_bye() -> None:
    """Closing a session ends the data path cleanly, as a browser wants to see it: stream
    resets for the channels, then the SHUTDOWN handshake to its end (SHUTDOWN, SHUTDOWN ACK,
    SHUTDOWN COMPLETE), never an ABORT; the bye follows."""

    async def body() -> None:
        from mvpd.sctp.chunks import ABORT, RECONFIG, SHUTDOWN, SHUTDOWN_ACK, SHUTDOWN_COMPLETE
        from mvpd.sctp.packet import parse_packet

        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        await connect(sa, sb)
        pipe = await sa.open_pipe()
        seen: list[int] = []  # chunk types either side received, in order
        for session in (sa, sb):
            assert session._pc is not None and session._pc.sctp is not None
            driver = session._pc.sctp

            def record(data: bytes) -> bool:
                seen.extend(kind for kind, _f, _s, _e in parse_packet(data).chunks)
                return True

            intercept_received(driver, record)
        bye_at: list[int] = []
        send = fwd.sender("alice")

        async def watch(message: RoutedMessage) -> None:
            if isinstance(message, Bye):
                bye_at.append(len(seen))
            await send(message)

        sa._send_signal = watch
        await sa.close("done", send_bye=True)
        assert pipe.is_closed
        assert ABORT not in seen, seen
        for kind in (RECONFIG, SHUTDOWN, SHUTDOWN_ACK, SHUTDOWN_COMPLETE):
            assert kind in seen, (kind, str(seen))
        assert seen.index(RECONFIG) < seen.index(SHUTDOWN)
        # The bye left once the handshake was over.
        assert bye_at and bye_at[0] > seen.index(SHUTDOWN_COMPLETE)
        await wait_for(lambda: sb.state == PeerState.CLOSED)

    run(body())


def test_connect_timeout_is_a_clear_peer_error() -> None:
    async def body() -> None:
        async def nowhere(message: RoutedMessage) -> None:
            return None

        session = PeerSession(
            make_settings("alice", connect_timeout=0.5), "ghost", send_signal=nowhere
        )
        await session.start_offer()
        with pytest.raises(PeerError, match="no open data channel to ghost"):
            await session.wait_open()
        assert session.state == PeerState.FAILED
        assert session.failure is not None and "ghost" in session.failure

    run(body())


def test_bye_from_peer_closes_and_releases() -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        _, tb = await connect(sa, sb)
        sb.deliver(Bye(sender="alice", to="bob", reason="going away"))
        await wait_for(lambda: sb.state == PeerState.CLOSED)
        assert "going away" in sb.history[-1].reason
        assert tb.is_closed
        # alice sees the association go down without any signaling.
        await wait_for(lambda: sa.state.is_final)
        await sa.close()

    run(body())


def test_malformed_candidates_are_ignored() -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        await connect(sa, sb)
        from mvpd.proto.signaling import Candidate

        sb.deliver(Candidate(sender="alice", to="bob",
                             candidate=IceCandidate(candidate="candidate:garbage", sdpMid="0")))
        await wait_for(lambda: sb.candidates_ignored == 1)
        assert sb.state == PeerState.CONNECTED
        await sa.close()
        await sb.close()

    run(body())


def test_parse_candidate_accepts_browser_forms() -> None:
    line = "candidate:842163049 1 udp 1677729535 10.0.0.5 46154 typ srflx raddr 0.0.0.0 rport 0"
    cand = parse_candidate(IceCandidate(candidate=line, sdpMid="0"))
    assert (cand.ip, cand.port, cand.type, cand.sdpMid) == ("10.0.0.5", 46154, "srflx", "0")
    cand = parse_candidate(IceCandidate(candidate="a=" + line))
    assert cand.sdpMLineIndex == 0
    with pytest.raises(ValueError):
        parse_candidate(IceCandidate(candidate="candidate:1 1 udp"))


def test_ice_configuration_is_explicit() -> None:
    cfg = ice_configuration(make_settings("alice"))
    assert cfg.servers == () and cfg.policy == "all"
    relay = make_settings(
        "alice",
        ice_transport_policy="relay",
        ice_servers=[{"urls": ["turn:127.0.0.1:3478"], "username": "u", "credential": "s3"}],
    )
    cfg = ice_configuration(relay)
    assert cfg.policy == "relay"
    assert cfg.servers[0].credential == "s3" and cfg.servers[0].username == "u"


def test_relay_policy_goes_through_turn_and_status_says_relayed(
    turn_server: TurnServer,
) -> None:
    async def body() -> None:
        fwd = Forwarder()
        relay = {
            "ice_transport_policy": "relay",
            "ice_servers": [
                {"urls": [turn_server.url], "username": TurnServer.USER,
                 "credential": TurnServer.PASSWORD}
            ],
        }
        sa, sb = fwd.pair("alice", "bob", **relay)
        ta, tb = await connect(sa, sb)
        ta.send_text("via the relay")
        assert await tb.recv() == "via the relay"
        for session in (sa, sb):
            ice = session.snapshot()["ice"]
            assert ice["path"] == "relayed"
            assert "typ relay" in ice["local_candidate"]
        offer = next(m for m in fwd.sent if isinstance(m, Offer))
        assert "typ host" not in offer.sdp
        await sa.close()
        await sb.close()

    run(body())


def test_state_changes_follow_the_session_table(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        async def nowhere(message: Any) -> None:
            pass

        session = PeerSession(make_settings("alice"), "bob", send_signal=nowhere)
        # Strict (the test suite): a refused event raises and changes nothing.
        with pytest.raises(IllegalTransition, match="'channel-open' is not allowed in state 'new'"):
            session._set_state(SessionEvent.CHANNEL_OPEN)
        assert session.state == PeerState.NEW
        # Production: logged and ignored; and a close for a reason the table refuses here
        # still ends the session, as a plain close.
        monkeypatch.setattr(mvpd.peer.session, "strict_transitions", False)
        assert not session._set_state(SessionEvent.CHANNEL_OPEN)
        await session.close("the data channel closed", event=SessionEvent.CHANNEL_CLOSED)
        assert [c.state for c in session.history] == [PeerState.NEW, PeerState.CLOSED]
        # Final: nothing moves it any more.
        assert not session._set_state(SessionEvent.OFFER_RECEIVED)
        assert session.state == PeerState.CLOSED

    run(body())


def test_a_timeout_ends_the_session_failed() -> None:
    async def body() -> None:
        async def nowhere(message: Any) -> None:
            pass

        session = PeerSession(make_settings("alice"), "bob", send_signal=nowhere)
        await session.close("no channel within 1 s", event=SessionEvent.TIMEOUT)
        assert session.state == PeerState.FAILED
        assert session.failure == "no channel within 1 s"

    run(body())
