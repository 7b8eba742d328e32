"""Inboxes: bounds in messages, bytes per peer, bytes overall and inboxes; the life of a
departed peer's inbox; followers of absent peers."""

from __future__ import annotations

import asyncio

import pytest
from peerlink import run

from mvpd.inbox import MESSAGE_OVERHEAD, Inbox, Inboxes, InboxMessage
from mvpd.proto.errors import PeerError


def text(value: str) -> InboxMessage:
    return InboxMessage("text", value, len(value))


def test_inbox_drops_the_oldest_by_count_and_by_bytes() -> None:
    inbox = Inbox("bob", max_messages=3, max_bytes=1000)
    for i in range(5):
        inbox.put(text(str(i)))
    assert [inbox.pop(), inbox.pop(), inbox.pop(), inbox.pop()] == [
        text("2"), text("3"), text("4"), None
    ]
    assert inbox.dropped == {"inbox-full": 2} and inbox.bytes == 0
    big = InboxMessage("bytes", b"", 400)
    for _ in range(3):
        inbox.put(big)
    # Two of 464 bytes fit in 1000; the third pushed the first out.
    assert len(inbox) == 2 and inbox.bytes == 2 * (400 + MESSAGE_OVERHEAD)
    assert inbox.dropped == {"inbox-full": 3}


def test_all_inboxes_share_one_byte_budget() -> None:
    async def body() -> None:
        cost = 100 + MESSAGE_OVERHEAD
        boxes = Inboxes(max_bytes=10 * cost, total_bytes=3 * cost)
        alice, bob = boxes.open("alice"), boxes.open("bob")
        assert alice is not None and bob is not None
        msg = InboxMessage("bytes", b"", 100)
        for _ in range(3):
            alice.put(msg)
        bob.put(msg)  # bob has nothing to push out: his message is the one dropped
        assert (len(alice), len(bob)) == (3, 0)
        assert bob.dropped == {"memory-limit": 1}
        alice.put(msg)  # alice's own oldest makes room
        assert len(alice) == 3 and alice.dropped == {"memory-limit": 1}
        assert boxes.stats()["queued_bytes"] == 3 * cost

    run(body())


def test_number_of_inboxes_is_bounded_departed_ones_go_first() -> None:
    async def body() -> None:
        boxes = Inboxes(max_inboxes=2)
        a, b = boxes.open("a"), boxes.open("b")
        assert a is not None and b is not None
        assert boxes.open("c") is None  # both peers connected: no room
        a.put(text("unread"))
        boxes.peer_left("a")
        c = boxes.open("c")  # a's inbox (departed) made room; its message is counted
        assert c is not None and boxes.get("a") is None
        assert boxes.dropped == {"inbox-expired": 1}

    run(body())


def test_departed_peer_inbox_kept_for_the_grace_then_freed() -> None:
    async def body() -> None:
        boxes = Inboxes(grace=0.2)
        alice = boxes.open("alice")
        assert alice is not None
        alice.put(text("m1"))
        alice.put(text("m2"))
        alice.put(text("m3"))
        boxes.peer_left("alice")
        # A recv right after the peer left still gets its messages.
        got = [m.value async for m in boxes.read("alice", follow=False, limit=1)]
        assert got == ["m1"] and boxes.get("alice") is alice
        await asyncio.sleep(0.4)
        assert boxes.get("alice") is None and len(boxes) == 0
        assert boxes.dropped == {"inbox-expired": 2}
        # Coming back within the grace keeps the messages for good.
        bob = boxes.open("bob")
        assert bob is not None
        bob.put(text("kept"))
        boxes.peer_left("bob")
        assert boxes.open("bob") is bob
        await asyncio.sleep(0.4)
        assert boxes.get("bob") is bob and len(bob) == 1
        # An empty inbox goes as soon as its peer leaves; read to empty, likewise.
        boxes.peer_left("bob")
        assert [m.value async for m in boxes.read("bob", follow=False)] == ["kept"]
        assert boxes.get("bob") is None

    run(body())


def test_followers_of_absent_peers_hold_only_a_waiter_and_are_capped() -> None:
    async def body() -> None:
        boxes = Inboxes(max_waiting_followers=2)

        async def first(peer: str) -> object:
            async for message in boxes.read(peer):
                return message.value
            return None

        waiting = [asyncio.ensure_future(first(f"ghost-{i}")) for i in range(2)]
        await asyncio.sleep(0.01)
        assert boxes.waiting_followers == 2 and len(boxes) == 0
        with pytest.raises(PeerError, match="2 followers already wait"):
            await first("ghost-3")
        # The peer connects and sends: the follower gets it.
        inbox = boxes.open("ghost-0")
        assert inbox is not None
        inbox.put(text("hello"))
        assert await waiting[0] == "hello"
        waiting[1].cancel()
        await asyncio.gather(waiting[1], return_exceptions=True)
        assert boxes.waiting_followers == 0 and boxes._waiting == {}
        # close() ends every follower.
        follower = asyncio.ensure_future(first("ghost-0"))
        await asyncio.sleep(0.01)
        boxes.close()
        assert await follower is None

    run(body())
