"""The receive path of real daemons: one inbox per peer, every drop counted where it
happened, oversized messages from a hostile aiortc peer refused, inboxes of departed peers
freed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from mvpctl.client import Client
from mvpd.inbox import INBOX_BYTES, INBOX_MESSAGES, MESSAGE_OVERHEAD
from mvpd.proto.modes import MAX_MESSAGE_SIZE
from mvpd.proto.signaling import Answer, Offer
from mvpd.signaling.client import SignalingClient
from tests.e2e.harness import Daemon, SignalServer, wait_until
from tests.peerlink import make_settings

pytestmark = pytest.mark.slow


def send_many(daemon: Daemon, peer: str, messages: list[dict[str, Any]]) -> None:
    """``send`` each message over one control connection (mvpctl per message is slow)."""
    with Client.connect(daemon.socket, timeout=30) as client:
        for params in messages:
            client.call("send", peer=peer, **params)


def peer_entry(daemon: Daemon, peer: str) -> dict[str, Any]:
    return daemon.peers()[peer]


def test_5000_messages_received_and_read_show_no_drops(pair: tuple[Daemon, Daemon]) -> None:
    alice, bob = pair
    alice.ctl_ok("connect", "bob")
    wait_until(lambda: bob.peer_state("alice") == "connected", 20, what="bob to see alice")
    got: list[Any] = []
    for batch in range(10):
        send_many(alice, "bob", [{"text": f"{batch}-{i}"} for i in range(500)])
        got += bob.messages("alice", 500)
    assert got == [f"{b}-{i}" for b in range(10) for i in range(500)]
    status = bob.status()
    (peer,) = status["peers"]
    assert peer["messages_in"] == 5000
    assert peer["dropped"] == {} and status["dropped"] == {}
    assert status["inboxes"]["queued"] == 0
    assert "dropped    none" in bob.ctl_ok("status")
    (sender,) = alice.status()["peers"]
    assert sender["messages_out"] == 5000 and sender["dropped"] == {}


def test_flood_nobody_reads_shows_exactly_the_drops_that_happened(
    pair: tuple[Daemon, Daemon],
) -> None:
    alice, bob = pair
    alice.ctl_ok("connect", "bob", "--mode", "bytes")
    wait_until(lambda: bob.peer_state("alice") == "connected", 20, what="bob to see alice")
    # By count: 1500 small messages into an inbox of 1000.
    flood = INBOX_MESSAGES + 500
    send_many(alice, "bob", [{"data": i.to_bytes(2, "big")} for i in range(flood)])
    wait_until(lambda: peer_entry(bob, "alice")["messages_in"] == flood, 30,
               what="bob to receive the flood")
    peer = peer_entry(bob, "alice")
    assert peer["dropped"] == {"inbox-full": 500}
    assert peer["inbox"]["queued"] == INBOX_MESSAGES
    text = bob.ctl_ok("status")
    assert "alice: dropped: inbox-full 500" in text and "1000 messages unread" in text
    got = bob.messages("alice", INBOX_MESSAGES)
    assert got[0] == (500).to_bytes(2, "big") and got[-1] == (flood - 1).to_bytes(2, "big")
    # By bytes: messages of 250000 bytes; the inbox's bytes hold 16 of them.
    big = 250_000
    send_many(alice, "bob", [{"data": bytes([i]) * big} for i in range(20)])
    wait_until(lambda: peer_entry(bob, "alice")["messages_in"] == flood + 20, 30,
               what="bob to receive the big messages")
    fit = INBOX_BYTES // (big + MESSAGE_OVERHEAD)
    peer = peer_entry(bob, "alice")
    assert peer["dropped"] == {"inbox-full": 500 + 20 - fit}
    assert peer["inbox"] == {"queued": fit, "queued_bytes": fit * (big + MESSAGE_OVERHEAD)}
    assert bob.status()["dropped"] == {}
    assert peer_entry(alice, "bob")["dropped"] == {}  # nothing lost on the sending side


@contextlib.asynccontextmanager
async def hostile_peer(url: str, target: str) -> AsyncIterator[Any]:
    """A raw aiortc peer "mallory", connected to ``target`` through the signaling server in
    chat mode, that ignores the target's max-message-size: yields its open channel."""
    settings = make_settings("mallory", signaling_url=url)
    signaling = SignalingClient(settings)
    await signaling.connect()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        channel = pc.createDataChannel(settings.data_channel_label, protocol="chat")
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await pc.setLocalDescription(await pc.createOffer())
        await signaling.send(Offer(sender="mallory", to=target, sdp=pc.localDescription.sdp))
        async with asyncio.timeout(30):
            async for message in signaling:
                if isinstance(message, Answer):
                    await pc.setRemoteDescription(RTCSessionDescription(message.sdp, "answer"))
                    break
            await opened.wait()
        pc.sctp._remote_max_message_size = 0  # ignore the limit the daemon advertised
        yield channel
    finally:
        with contextlib.suppress(Exception):
            await pc.close()
        await signaling.close()


def test_oversized_messages_from_a_hostile_peer_are_refused_and_counted(
    daemons: Any, signal_server: SignalServer
) -> None:
    bob = daemons("bob")
    eight_mib = 8 * 1024 * 1024

    async def body() -> None:
        async with hostile_peer(signal_server.url, "bob") as channel:
            for _ in range(2):
                channel.send(b"x" * eight_mib)
            channel.send(b"y" * MAX_MESSAGE_SIZE)
            channel.send("still here")
            # Our SCTP refuses each 8 MiB message during reassembly, once it passes the
            # limit: it never reaches the channel, only its count does.
            await asyncio.to_thread(
                wait_until, lambda: peer_entry(bob, "mallory")["messages_in"] == 2, 120,
                what="bob to receive mallory's messages",
            )
            peer = await asyncio.to_thread(peer_entry, bob, "mallory")
            assert peer["state"] == "connected"
            assert peer["dropped"] == {"message-too-large": 2}
            assert peer["bytes_in"] == MAX_MESSAGE_SIZE + len("still here")
            # Only the two messages within the limit wait in the inbox, counted in bytes.
            assert peer["inbox"] == {
                "queued": 2, "queued_bytes": MAX_MESSAGE_SIZE + 10 + 2 * MESSAGE_OVERHEAD
            }
            got = await asyncio.to_thread(bob.messages, "mallory", 2)
            assert got == ["y" * MAX_MESSAGE_SIZE, "still here"]
            assert "mallory: dropped: message-too-large 2" in bob.ctl_ok("status")

    asyncio.run(body())


def test_inboxes_of_peers_that_left_are_freed(daemons: Any) -> None:
    bob = daemons("bob")
    senders = daemons.many("s1", "s2", "s3")
    for sender in senders:
        sender.ctl_ok("connect", "bob")
        send_many(sender, "bob", [{"text": f"{sender.agent_id}-{i}"} for i in range(3)])
    wait_until(lambda: bob.status()["inboxes"]["queued"] == 9, 20, what="9 queued at bob")
    assert bob.status()["inboxes"]["inboxes"] == 3
    for sender in senders:
        sender.ctl_ok("disconnect", "bob")
    wait_until(lambda: not bob.status()["peers"], 20, what="the senders to be gone")
    # A recv right after a peer left still gets its last messages; reading frees the inbox.
    assert bob.ctl_ok("recv", "s1").splitlines() == ["s1-0", "s1-1", "s1-2"]
    status = bob.status()
    assert status["inboxes"]["inboxes"] == 2 and status["inboxes"]["queued"] == 6
    assert bob.ctl("recv", "s1").returncode != 0  # nothing kept for it any more
    # Following an unknown id keeps nothing for it.
    with Client.connect(bob.socket, timeout=30) as client:
        client.subscribe("recv", peer="nobody", follow=True)
        wait_until(lambda: bob.status()["inboxes"]["waiting_followers"] == 1, 10,
                   what="the follower to wait")
        assert bob.status()["inboxes"]["inboxes"] == 2
    wait_until(lambda: bob.status()["inboxes"]["waiting_followers"] == 0, 10,
               what="the follower to go")
