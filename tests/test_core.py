"""AgentCore end to end: real signaling server and clients on 127.0.0.1, real aiortc peers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mvpd.config import SignalingServerSettings
from mvpd.core import AgentCore, CoreEvent, EventSubscription
from mvpd.inbox import InboxMessage
from mvpd.proto.errors import ConnectionClosed, PeerError
from mvpd.signaling.client import SignalingClient
from mvpd.signaling.server import SignalingServer
from mvpd.transports import BytesTransport, ChatTransport, JsonTransport
from tests.peerlink import make_settings, run, wait_for

FAST: dict[str, Any] = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 5.0}


class Agents:
    def __init__(self, server: SignalingServer) -> None:
        self.server = server
        self.cores: dict[str, AgentCore] = {}
        self.clients: dict[str, SignalingClient] = {}
        self.events: dict[str, EventSubscription] = {}

    async def add(self, agent_id: str, **settings: Any) -> AgentCore:
        cfg = make_settings(agent_id, signaling_url=self.server.url, **settings)
        client = SignalingClient(cfg, **FAST)
        await client.connect()
        core = AgentCore(cfg, client)
        self.events[agent_id] = core.subscribe()
        await core.start()
        self.cores[agent_id] = core
        self.clients[agent_id] = client
        return core

    async def close(self) -> None:
        for core in self.cores.values():
            await core.stop()
        for client in self.clients.values():
            await client.close()


@asynccontextmanager
async def agents() -> AsyncIterator[Agents]:
    server = SignalingServer(SignalingServerSettings(listen="127.0.0.1:0"))
    await server.start()
    group = Agents(server)
    try:
        yield group
    finally:
        await group.close()
        await server.close()


async def next_event(sub: EventSubscription, kind: str, timeout: float = 20) -> CoreEvent:
    async with asyncio.timeout(timeout):
        while True:
            event = await sub.get()
            if event.kind == kind:
                return event


async def state_event(sub: EventSubscription, peer: str, state: str) -> CoreEvent:
    async with asyncio.timeout(20):
        while True:
            event = await next_event(sub, "peer-state")
            if event.peer == peer and event.data["state"] == state:
                return event


def test_connect_chat_both_ways_events_and_status() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            bob = await group.add("bob")
            ta = await alice.connect_to("bob")
            assert isinstance(ta, ChatTransport)
            assert alice.get_channel("bob").readyState == "open"
            await state_event(group.events["bob"], "alice", "connected")
            tb = bob.get_transport("alice")
            assert isinstance(tb, ChatTransport)

            await ta.send_text_async("hi bob")
            assert await bob.recv("alice") == InboxMessage("text", "hi bob", 6)
            # The transport reads the same (one) inbox the core reads.
            tb.send_text("hi alice")
            assert await ta.recv() == "hi alice"
            assert alice.inboxes.get("bob") is ta.inbox and len(ta.inbox) == 0
            # core.send fits a message to the mode; what the mode cannot carry is refused.
            assert await alice.send("bob", "json", {"a": 1}) == 7
            assert await bob.recv("alice") == InboxMessage("text", '{"a":1}', 7)
            with pytest.raises(PeerError, match="not UTF-8"):
                await alice.send("bob", "bytes", b"\xff")
            with pytest.raises(PeerError, match="not connected to carol"):
                await alice.send("carol", "text", "hi")
            # Messages are no events: the subscriber saw none.
            while (event := group.events["bob"].get_nowait()) is not None:
                assert event.kind != "message"

            status = alice.status()
            peer = status["peers"]["bob"]
            assert peer["state"] == "connected" and peer["role"] == "offerer"
            assert peer["ice"]["path"] == "direct"
            assert peer["transports"]["mvp"]["messages_out"] == 2
            assert status["signaling"] == "connected"
            # connect_to an already connected peer returns the same transport.
            assert await alice.connect_to("bob") is ta

    run(body())


def test_disconnect_is_seen_by_both_sides() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            bob = await group.add("bob")
            await alice.connect_to("bob")
            await state_event(group.events["bob"], "alice", "connected")
            assert await alice.disconnect("bob", "user asked")
            await state_event(group.events["alice"], "bob", "closed")
            event = await state_event(group.events["bob"], "alice", "closed")
            assert "user asked" in event.data["reason"] or "closed" in event.data["reason"]
            assert alice.sessions == {} and bob.sessions == {}
            assert not await alice.disconnect("bob")
            # A new connection afterwards works.
            await alice.connect_to("bob")

    run(body())


def test_offer_from_a_peer_not_allowed_is_refused_with_a_bye() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice", connect_timeout=10.0)
            bob = await group.add("bob", allowed_peers=["carol"])
            with pytest.raises(PeerError, match="offer refused"):
                await alice.connect_to("bob")
            event = await next_event(group.events["bob"], "offer-refused")
            assert event.peer == "alice"
            assert bob.sessions == {} and bob.refused_offers == 1

    run(body())


def test_a_tun_channel_from_a_peer_without_allowed_ips_is_refused_with_a_bye() -> None:
    """The offerer names the mode; the answerer grants tun only to peers its config gives
    allowed IPs: others get a bye with the reason, and it counts an offer-refused event."""
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice", trust="tofu")  # past the identity check
            bob = await group.add("bob", peers={"carol": {"allowed_ips": ["10.9.0.3/32"]}})
            with contextlib.suppress(PeerError):  # the channel may open before the bye
                await alice.connect_to("bob", "tun")
            closed = await state_event(group.events["alice"], "bob", "closed")
            assert closed.data["reason"].startswith("bob said bye: tun mode refused"), closed
            event = await next_event(group.events["bob"], "offer-refused")
            assert (event.peer, event.data["mode"]) == ("alice", "tun")
            await wait_for(lambda: bob.sessions == {})
            assert bob.refused_offers == 1 and bob.admission.refused == {"mode-not-granted": 1}
            # Other modes stay open to every allowed peer.
            await alice.connect_to("bob", "chat")

    run(body())


def test_connect_to_an_offline_peer_fails_fast_and_clearly() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice", connect_timeout=15.0)
            with pytest.raises(PeerError, match="nobody is not connected to the signaling"):
                await asyncio.wait_for(alice.connect_to("nobody"), 10)
            with pytest.raises(PeerError, match="not a valid agent id"):
                await alice.connect_to("bad id")
            with pytest.raises(PeerError, match="unknown transport mode 'telnet'"):
                await alice.connect_to("bob", "telnet")
            assert alice.sessions == {}

    run(body())


def test_three_peers_at_once_in_different_modes() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            others = {name: await group.add(name) for name in ("bob", "carol", "dave")}
            chat, jsn, raw = await asyncio.gather(
                alice.connect_to("bob", "chat"),
                alice.connect_to("carol", "json"),
                alice.connect_to("dave", "bytes"),
            )
            assert isinstance(chat, ChatTransport)
            assert isinstance(jsn, JsonTransport)
            assert isinstance(raw, BytesTransport)
            await wait_for(lambda: all(o.get_transport("alice") for o in others.values()))
            assert others["carol"].sessions["alice"].mode == "json"
            chat.send_text("to bob")
            jsn.send_json({"to": "carol"})
            raw.send_bytes(b"\x00to dave")
            assert await others["bob"].get_transport("alice").recv() == "to bob"  # type: ignore[union-attr]
            assert await others["carol"].get_transport("alice").recv() == {"to": "carol"}  # type: ignore[union-attr]
            assert await others["dave"].get_transport("alice").recv() == b"\x00to dave"  # type: ignore[union-attr]
            assert sorted(alice.sessions) == ["bob", "carol", "dave"]

    run(body())


def test_simultaneous_connect_both_ways_ends_with_one_session() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            bob = await group.add("bob")
            ta, tb = await asyncio.gather(alice.connect_to("bob"), bob.connect_to("alice"))
            ta.send_text("one session")
            assert await tb.recv() == "one session"
            assert alice.get_transport("bob") is ta and bob.get_transport("alice") is tb

    run(body())


def test_open_session_survives_the_signaling_server_going_away() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            bob = await group.add("bob", mode="json")
            ta = await alice.connect_to("bob", "json")
            await wait_for(lambda: bob.get_transport("alice") is not None)
            await group.server.close()
            await wait_for(lambda: group.clients["alice"].state != "connected")
            tb = bob.get_transport("alice")
            assert tb is not None
            await ta.send_json_async({"still": "working"})
            assert await tb.recv() == {"still": "working"}
            ta.send_text("not json")
            event = await next_event(group.events["bob"], "transport-error")
            assert event.data["reason"] == "invalid-json"
            tb.send_json([1])
            assert await ta.recv() == [1]
            assert alice.sessions["bob"].state.value == "connected"

    run(body())


def test_pipe_through_the_core() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            bob = await group.add("bob")
            await alice.connect_to("bob")
            await wait_for(lambda: bob.get_transport("alice") is not None)
            pipe = await alice.open_pipe("bob")
            await pipe.write(b"x" * 100_000)
            await pipe.write_eof()
            received = await bob.wait_pipe("alice", timeout=10)
            assert await received.read_all() == b"x" * 100_000
            event = await next_event(group.events["bob"], "channel")
            assert event.data["label"] in ("mvp", "mvp-pipe")

    run(body())


def test_bad_signaling_input_is_ignored() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            alice.dispatch("not json")
            alice.dispatch({"type": "answer", "from": "zed", "to": "alice", "sdp": "v=0"})
            alice.dispatch({"type": "candidate", "to": "alice", "candidate": None})
            alice.dispatch({"type": "offer", "from": "zed", "to": "someone-else", "sdp": "x"})
            assert alice.ignored_messages == 4
            # A garbage offer fails its session, nothing else.
            alice.dispatch({"type": "offer", "from": "zed", "to": "alice", "sdp": "garbage"})
            event = await state_event(group.events["alice"], "zed", "failed")
            assert "bad offer" in event.data["reason"]
            assert alice.sessions == {}

    run(body())


def test_slow_subscriber_drops_oldest_and_counts() -> None:
    async def body() -> None:
        core = AgentCore(make_settings("alice"), signaling=None)  # type: ignore[arg-type]
        slow = core.subscribe(maxsize=2)
        only_state = core.subscribe(kinds={"peer-state"})
        for i in range(5):
            core.emit("channel", "bob", label=i)
        assert slow.dropped == 3
        assert core.dropped() == {"event-queue-full": 3}
        assert [(await slow.get()).data["label"] for _ in range(2)] == [3, 4]
        assert only_state.get_nowait() is None
        slow.close()
        assert len(core.status()["subscribers"]) == 1

    run(body())


def test_inbox_of_a_peer_that_left_is_kept_for_the_grace_then_freed() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            bob = await group.add("bob")
            bob.inboxes.grace = 0.5
            await alice.connect_to("bob")
            for i in range(3):
                await alice.send("bob", "text", f"m{i}")
            await wait_for(lambda: len(bob.inboxes.get("alice") or ()) == 3)
            assert await alice.disconnect("bob")
            await wait_for(lambda: not bob.sessions)
            # Right after the peer left, its messages are still there to read.
            assert (await bob.recv("alice")).value == "m0"
            assert bob.status()["inboxes"]["queued"] == 2
            await asyncio.sleep(0.8)
            assert bob.inboxes.get("alice") is None
            assert bob.status()["inboxes"] == {
                "inboxes": 0, "queued": 0, "queued_bytes": 0, "waiting_followers": 0
            }
            assert bob.dropped() == {"inbox-expired": 2}
            # The sender's empty inbox of bob went when bob left.
            assert alice.inboxes.get("bob") is None
            # Following an absent peer keeps no inbox for it, only the follower.
            follower = asyncio.ensure_future(bob.recv("ghost"))
            await asyncio.sleep(0.05)
            assert bob.inboxes.get("ghost") is None
            assert bob.status()["inboxes"]["waiting_followers"] == 1
            follower.cancel()

    run(body())


def test_refused_identity_is_an_event_naming_peer_expected_and_offered(tmp_path: Any) -> None:
    """A peer whose key is not the one pinned: refused before any data, with an event."""

    async def body() -> None:
        from mvpd.identity import AgentIdentity, IdentityStore

        pinned = AgentIdentity.generate().fingerprint
        async with agents() as group:
            alice = await group.add("alice", state_dir=tmp_path / "alice",
                                    peers={"bob": {"fingerprints": [pinned]}})
            await group.add("bob", state_dir=tmp_path / "bob")
            with pytest.raises(PeerError, match="identity refused"):
                await alice.connect_to("bob")
            event = await next_event(group.events["alice"], "identity-refused")
            assert event.peer == "bob" and event.data["expected"] == [pinned]
            offered = IdentityStore(tmp_path / "bob").load().fingerprint
            assert event.data["offered"] == offered
            assert "not pinned" in event.data["reason"]
            assert not any(e.kind == "message" for e in _drain(group.events["alice"]))

    run(body())


def test_transport_reader_under_a_core_ends_when_its_channel_closes() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            bob = await group.add("bob")
            ta = await alice.connect_to("bob")
            await wait_for(lambda: bob.get_transport("alice") is not None)
            reader = asyncio.ensure_future(ta.recv())
            await asyncio.sleep(0.05)
            ta.close()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(reader, 5)

    run(body())


def test_candidates_before_an_offer_are_held_bounded_and_counted() -> None:
    async def body() -> None:
        core = AgentCore(make_settings("alice", allowed_peers=["web", "pal"]),
                         signaling=None)  # type: ignore[arg-type]

        def candidate(sender: str, n: int) -> dict[str, Any]:
            return {"type": "candidate", "from": sender, "to": "alice", "candidate": {
                "candidate": f"candidate:{n} 1 udp 1 10.0.0.1 {5000 + n} typ host",
                "sdpMid": "0", "sdpMLineIndex": 0}}

        for n in range(70):  # over the per-id cap of 64
            core.dispatch(candidate("web", n))
        core.dispatch(candidate("stranger", 1))  # not allowed: not even held
        core.dispatch(candidate("pal", 1))
        assert core.early_candidates.peers() == ["web", "pal"]
        assert len(core.early_candidates) == 65
        assert core.ignored_messages == 7
        # pal says bye instead of offering: its candidate goes, counted.
        core.dispatch({"type": "bye", "from": "pal", "to": "alice"})
        assert core.early_candidates.peers() == ["web"]
        assert core.dropped() == {"early-candidates": 7}

    run(body())


def _drain(sub: EventSubscription) -> list[CoreEvent]:
    events = []
    while (event := sub.get_nowait()) is not None:
        events.append(event)
    return events


def test_tun_connect_to_an_unpinned_peer_fails_before_any_offer() -> None:
    async def body() -> None:
        async with agents() as group:
            alice = await group.add("alice")
            await group.add("bob")
            with pytest.raises(PeerError, match=r"needs its identity pinned.*mvpctl trust bob"):
                await alice.connect_to("bob", "tun")
            assert alice.sessions == {}

    run(body())
