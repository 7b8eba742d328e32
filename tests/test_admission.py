"""Offer admission: the per-id token bucket, the pending-session cap and the rate-limited
refusal log, alone and inside a real AgentCore (real signaling server, real aiortc peers)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection

from mvpd.admission import PENDING, RATE, OfferAdmission, TokenBuckets
from mvpd.core import AgentCore
from mvpd.peer import PeerState
from mvpd.proto.signaling import Bye, Offer
from mvpd.signaling.client import SignalingClient
from tests.peerlink import make_settings, run, wait_for
from tests.test_core import FAST, agents


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_buckets_refill_evenly_and_forget_the_least_recent_ids() -> None:
    clock = Clock()
    buckets = TokenBuckets(3, 3 / 60, max_keys=2, clock=clock)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    clock.now += 19  # not quite one token back
    assert not buckets.take("a")
    clock.now += 2
    assert buckets.take("a") and not buckets.take("a")
    assert buckets.take("b") and buckets.take("c")  # "a" is forgotten: a fresh bucket
    assert len(buckets._buckets) == 2


def test_admission_refuses_by_rate_first_then_by_the_pending_cap() -> None:
    clock = Clock()
    admission = OfferAdmission(max_pending=2, offers_per_minute=2, clock=clock)
    assert admission.refusal("a", pending=0, exempt=False) is None
    assert admission.refusal("a", pending=1, exempt=False) is None
    assert admission.refusal("a", pending=1, exempt=False) == RATE
    assert admission.refusal("b", pending=2, exempt=False) == PENDING
    assert admission.refusal("c", pending=2, exempt=True) is None
    # A peer that was connected lately comes back past the cap, for an hour.
    admission.note_connected("d")
    assert admission.refusal("d", pending=2, exempt=False) is None
    clock.now += 3601
    assert admission.refusal("d", pending=2, exempt=False) == PENDING
    assert dict(admission.refused) == {RATE: 1, PENDING: 2}


class Recorder:
    """The signaling side of a core under test: records what it sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.state = "connected"

    async def send(self, message: Any) -> None:
        self.sent.append(message)

    def __aiter__(self) -> Any:
        return self._nothing()

    async def _nothing(self) -> Any:
        await asyncio.Event().wait()
        yield


async def real_offer_sdp() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("mvp")
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    await pc.close()
    return sdp


def test_a_flood_of_offers_gets_at_most_the_cap_of_sessions_and_byes_for_the_rest() -> None:
    async def body() -> None:
        sdp = await real_offer_sdp()
        signaling = Recorder()
        core = AgentCore(make_settings("bob", max_pending_sessions=3), signaling)
        for n in range(20):
            core.dispatch(Offer(sender=f"flood-{n}", to="bob", sdp=sdp))
        assert len(core.sessions) == 3
        assert core.status()["refused_offers_by_reason"] == {PENDING: 17}
        assert core.status()["refused_offers"] == 17
        await wait_for(lambda: sum(isinstance(m, Bye) for m in signaling.sent) == 17)
        byes = [m for m in signaling.sent if isinstance(m, Bye)]
        assert {m.to for m in byes} == {f"flood-{n}" for n in range(3, 20)}
        assert all("too many connections are being set up" in (m.reason or "") for m in byes)
        await core.stop()

    run(body())


def test_offers_from_one_id_are_rate_limited_even_when_each_session_ends_at_once() -> None:
    async def body() -> None:
        signaling = Recorder()
        core = AgentCore(make_settings("bob", offers_per_minute=3), signaling)
        # No data channel section: each session fails at once, so every offer is new.
        for _ in range(6):
            core.dispatch(Offer(sender="mallory", to="bob", sdp="v=0\r\n"))
            await wait_for(lambda: core.get_session("mallory") is None)
        assert core.status()["refused_offers_by_reason"] == {RATE: 3}
        await core.stop()

    run(body())


async def flood(group: Any, target: str, ids: list[str], sdp: str) -> list[SignalingClient]:
    """Offers to ``target`` from agents registered under ``ids`` that never answer more."""
    clients = []
    for agent_id in ids:
        client = SignalingClient(make_settings(agent_id, signaling_url=group.server.url), **FAST)
        await client.connect()
        await client.send(Offer(sender=agent_id, to=target, sdp=sdp))
        clients.append(client)
    return clients


def test_a_flood_neither_evicts_a_connected_peer_nor_keeps_out_a_restarted_one() -> None:
    async def body() -> None:
        async with agents() as group:
            bob = await group.add("bob", max_pending_sessions=4)
            alice = await group.add("alice")
            await alice.connect_to("bob")
            flooders = await flood(group, "bob", [f"flood-{n}" for n in range(8)],
                                   await real_offer_sdp())
            await wait_for(lambda: bob.status()["refused_offers_by_reason"] == {PENDING: 4})
            session = bob.get_session("alice")
            assert session is not None and session.state == PeerState.CONNECTED
            # alice restarts (a new core, a new offer) while the cap is still full.
            await alice.stop()
            await group.clients.pop("alice").close()
            del group.cores["alice"]
            again = await group.add("alice")
            await again.connect_to("bob")
            assert bob.status()["refused_offers_by_reason"] == {PENDING: 4}
            assert bob._pending_answers() == 4
            for client in flooders:
                await client.close()

    run(body(), timeout=120)


def test_a_peer_named_in_the_configuration_is_not_held_back_by_the_cap() -> None:
    async def body() -> None:
        async with agents() as group:
            bob = await group.add("bob", max_pending_sessions=2,
                                  allowed_peers=["*", "carol"])
            flooders = await flood(group, "bob", [f"flood-{n}" for n in range(3)],
                                   await real_offer_sdp())
            await wait_for(lambda: bob.status()["refused_offers_by_reason"] == {PENDING: 1})
            carol = await group.add("carol")
            await carol.connect_to("bob")
            for client in flooders:
                await client.close()

    run(body(), timeout=120)
