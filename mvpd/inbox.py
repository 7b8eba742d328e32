"""The one place a received chat/json/bytes message waits: its peer's inbox.

A transport decodes a message and puts it straight into the inbox of its peer
(:meth:`mvpd.transports.Transport.deliver`); ``mvpctl recv`` and ``recv --follow`` read that
same inbox, and so does :meth:`Transport.recv`. There is no other queue on the way, so a
message is dropped in exactly one place, counted there by reason:

* ``inbox-full``: the peer's inbox held :data:`INBOX_MESSAGES` messages or
  :data:`INBOX_BYTES` bytes; the oldest messages made room for the new one;
* ``inbox-limit``: :data:`MAX_INBOXES` inboxes already exist (other peers' messages wait
  unread) and this peer's message had nowhere to go;
* ``memory-limit``: all inboxes together hold :data:`TOTAL_BYTES`; the new message pushed
  out this peer's oldest ones, or was dropped if this peer had none waiting;
* ``inbox-expired``: the peer left, its unread messages were kept for
  :data:`LEFT_PEER_GRACE` seconds (or until it came back) and nobody read them.

Memory: an inbox exists only while its peer is connected or, after the peer left, while it
still holds unread messages within the grace period. A follower waiting for a peer that has
no inbox (``recv --follow`` on an id that is not connected, as ``mvpctl chat`` starts) holds
no memory but its own waiter; at most :data:`MAX_WAITING_FOLLOWERS` of those may wait.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .proto.errors import PeerError
from .proto.modes import MessageKind

log = logging.getLogger(__name__)

#: Messages one peer's inbox holds before the oldest are dropped.
INBOX_MESSAGES = 1000
#: Bytes (as received on the channel, plus :data:`MESSAGE_OVERHEAD` each) one peer's inbox
#: holds before the oldest messages are dropped: 16 messages of the largest size.
INBOX_BYTES = 4 * 1024 * 1024
#: What one queued message costs besides its payload, for the byte bound (a tuple and a
#: decoded object), so that a flood of empty messages is bounded in bytes as well.
MESSAGE_OVERHEAD = 64
#: Inboxes at most, connected and departed peers together.
MAX_INBOXES = 64
#: Bytes (counted as for :data:`INBOX_BYTES`) all inboxes together hold at most.
TOTAL_BYTES = 64 * 1024 * 1024
#: Seconds the unread messages of a peer that left are kept, so that a ``recv`` right after
#: it left still gets them. Its return within that time keeps them for good.
LEFT_PEER_GRACE = 60.0
#: ``recv --follow`` callers waiting at once for peers that have no inbox.
MAX_WAITING_FOLLOWERS = 64


@dataclass(slots=True)
class ByteBudget:
    """Bytes shared by all inboxes: what they hold together, and the most they may."""

    limit: int
    used: int = 0


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """One received message: its kind, its decoded value (str, JSON value or bytes) and
    the bytes it took on the channel."""

    kind: MessageKind
    value: Any
    size: int


class Inbox:
    """The messages received from one peer, waiting for a reader: bounded in count and
    bytes, the oldest dropped (and counted in :attr:`dropped`) when full."""

    def __init__(
        self,
        peer: str = "",
        *,
        max_messages: int = INBOX_MESSAGES,
        max_bytes: int = INBOX_BYTES,
        budget: ByteBudget | None = None,
    ) -> None:
        self.peer = peer
        self.max_messages = max(max_messages, 1)
        self.max_bytes = max_bytes
        self._budget = budget or ByteBudget(max_bytes)
        self._messages: collections.deque[InboxMessage] = collections.deque()
        #: Bytes the queued messages account for (payload + overhead each).
        self.bytes = 0
        #: Messages dropped here, by reason.
        self.dropped: collections.Counter[str] = collections.Counter()
        self._waiters: list[asyncio.Future[None]] = []
        #: When the peer left; None while it is connected.
        self.left_at: float | None = None
        self._expiry: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, message: InboxMessage) -> None:
        """Queue ``message``, dropping the oldest ones if it does not fit."""
        cost = message.size + MESSAGE_OVERHEAD
        budget = self._budget
        while self._messages and (
            len(self._messages) >= self.max_messages or self.bytes + cost > self.max_bytes
        ):
            self._drop_oldest("inbox-full")
        while self._messages and budget.used + cost > budget.limit:
            self._drop_oldest("memory-limit")
        if budget.used + cost > budget.limit:
            self.dropped["memory-limit"] += 1
            return
        self._messages.append(message)
        self.bytes += cost
        budget.used += cost
        self.wake()

    def pop(self) -> InboxMessage | None:
        """The oldest message, or None if there is none."""
        if not self._messages:
            return None
        message = self._messages.popleft()
        self._uncount(message)
        return message

    def clear(self, reason: str) -> int:
        """Drop every queued message, counted under ``reason``; how many there were."""
        count = len(self._messages)
        if count:
            self.dropped[reason] += count
        self._messages.clear()
        self._budget.used -= self.bytes
        self.bytes = 0
        return count

    async def wait(self) -> None:
        """Return at the next :meth:`put` or :meth:`wake` (returns at once if any message)."""
        if self._messages:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def wake(self) -> None:
        """Wake every :meth:`wait` (a message came, or a transport or the core closed)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _drop_oldest(self, reason: str) -> None:
        self._uncount(self._messages.popleft())
        self.dropped[reason] += 1

    def _uncount(self, message: InboxMessage) -> None:
        cost = message.size + MESSAGE_OVERHEAD
        self.bytes -= cost
        self._budget.used -= cost


class Inboxes:
    """Every peer's inbox, created when a peer's message channel appears and freed when the
    peer has left and its messages are read or expired (see the module docstring)."""

    def __init__(
        self,
        *,
        max_inboxes: int = MAX_INBOXES,
        grace: float = LEFT_PEER_GRACE,
        max_waiting_followers: int = MAX_WAITING_FOLLOWERS,
        max_messages: int = INBOX_MESSAGES,
        max_bytes: int = INBOX_BYTES,
        total_bytes: int = TOTAL_BYTES,
    ) -> None:
        self.max_inboxes = max_inboxes
        self.grace = grace
        self.max_waiting_followers = max_waiting_followers
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.budget = ByteBudget(total_bytes)
        self._inboxes: dict[str, Inbox] = {}
        #: Followers waiting for a peer without an inbox: peer -> their waiters.
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        #: Drops no connected peer's status shows: departed peers' expired messages, and
        #: messages that found no inbox, by reason.
        self.dropped: collections.Counter[str] = collections.Counter()
        self.closed = False

    def __len__(self) -> int:
        return len(self._inboxes)

    def get(self, peer: str) -> Inbox | None:
        return self._inboxes.get(peer)

    @property
    def waiting_followers(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def open(self, peer: str) -> Inbox | None:
        """The inbox of a peer that is (again) connected, created if needed; None when
        :attr:`max_inboxes` are taken by other peers (its messages are then dropped and
        counted as ``inbox-limit``)."""
        inbox = self._inboxes.get(peer)
        if inbox is None:
            if len(self._inboxes) >= self.max_inboxes and not self._evict_departed():
                log.warning("no inbox for %s: %d peers' messages wait unread", peer,
                            len(self._inboxes))
                return None
            inbox = self._inboxes[peer] = Inbox(
                peer, max_messages=self.max_messages, max_bytes=self.max_bytes,
                budget=self.budget,
            )
            for waiter in self._waiting.pop(peer, []):
                if not waiter.done():
                    waiter.set_result(None)
        inbox.left_at = None
        if inbox._expiry is not None:
            inbox._expiry.cancel()
            inbox._expiry = None
        return inbox

    def peer_left(self, peer: str) -> None:
        """``peer``'s session ended: free its inbox now if it is empty, else after the grace
        period (unless the peer comes back first)."""
        inbox = self._inboxes.get(peer)
        if inbox is None or inbox.left_at is not None:
            return
        loop = asyncio.get_running_loop()
        inbox.left_at = loop.time()
        inbox.wake()
        if not inbox:
            self._free(inbox, "")
        else:
            inbox._expiry = loop.call_later(self.grace, self._expire, inbox)

    def message_read(self, inbox: Inbox) -> None:
        """A reader took a message: a departed peer's inbox goes once it is empty."""
        if inbox.left_at is not None and not inbox:
            self._free(inbox, "")

    def _expire(self, inbox: Inbox) -> None:
        inbox._expiry = None
        if self._inboxes.get(inbox.peer) is inbox and inbox.left_at is not None:
            self._free(inbox, "inbox-expired")

    def _evict_departed(self) -> bool:
        departed = [i for i in self._inboxes.values() if i.left_at is not None]
        if not departed:
            return False
        self._free(min(departed, key=lambda i: i.left_at or 0.0), "inbox-expired")
        return True

    def _free(self, inbox: Inbox, reason: str) -> None:
        if reason and (count := inbox.clear(reason)):
            log.info("dropped %d unread messages of %s, which left", count, inbox.peer)
        # The peer is no longer listed in the status: its drops are the agent's from now.
        self.dropped.update(inbox.dropped)
        if inbox._expiry is not None:
            inbox._expiry.cancel()
            inbox._expiry = None
        if self._inboxes.get(inbox.peer) is inbox:
            del self._inboxes[inbox.peer]
        inbox.wake()

    async def read(
        self, peer: str, *, follow: bool = True, limit: int | None = None
    ) -> AsyncIterator[InboxMessage]:
        """``peer``'s queued messages, one at a time as the reader takes them, then
        (``follow``) new ones as they come, until :meth:`close` or ``limit`` messages.
        A follower of a peer without an inbox waits with nothing but a waiter;
        :class:`PeerError` if :attr:`max_waiting_followers` already wait so."""
        left = limit
        while (left is None or left > 0) and not self.closed:
            # Looked up each time: a departed peer's inbox may be freed, a new one made.
            inbox = self._inboxes.get(peer)
            message = inbox.pop() if inbox is not None else None
            if message is None:
                if not follow:
                    return
                if inbox is None:
                    await self._wait_for_inbox(peer)
                else:
                    await inbox.wait()
                continue
            assert inbox is not None
            self.message_read(inbox)
            yield message
            if left is not None:
                left -= 1

    async def _wait_for_inbox(self, peer: str) -> None:
        if self.waiting_followers >= self.max_waiting_followers:
            raise PeerError(
                f"{self.max_waiting_followers} followers already wait for peers that are not "
                f"connected; connect to {peer} first or stop a `recv --follow`"
            )
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(peer, [])
        waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiting.get(peer) is waiters:
                del self._waiting[peer]

    def close(self) -> None:
        """End every follower (the core stops)."""
        self.closed = True
        for inbox in self._inboxes.values():
            inbox.wake()
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def stats(self) -> dict[str, Any]:
        """Counts for status: inboxes, queued messages and bytes, waiting followers."""
        return {
            "inboxes": len(self._inboxes),
            "queued": sum(len(i) for i in self._inboxes.values()),
            "queued_bytes": self.budget.used,
            "waiting_followers": self.waiting_followers,
        }


__all__ = [
    "INBOX_BYTES",
    "INBOX_MESSAGES",
    "LEFT_PEER_GRACE",
    "MAX_INBOXES",
    "MAX_WAITING_FOLLOWERS",
    "TOTAL_BYTES",
    "ByteBudget",
    "Inbox",
    "InboxMessage",
    "Inboxes",
]
