"""Data-path pings: answer the peer's ``mvp-ping`` channel, and ping a peer over our own.

The wire format is :mod:`mvpd.proto.ping`. The answering side is :func:`answer_pings`,
called by the session for a channel the peer opened with that label. The pinging side is
:class:`Pinger`, one per session (kept by :class:`PingService`): it opens the channel at its
first ping and keeps it for the next ones, so each ``ping`` call measures one round trip of
a probe, not the channel's setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from .proto.errors import PeerError, ProtocolError
from .proto.ping import (
    PING_LABEL,
    PING_PROTOCOL,
    REPLY,
    encode_request,
    parse_probe,
    reply_to,
)
from .stats import peer_connection

if TYPE_CHECKING:
    from .peer import PeerSession, StateChange

log = logging.getLogger(__name__)

#: Replies are skipped (and counted) while this many bytes wait on the ping channel: a peer
#: that floods requests gets no more than the link carries, and no memory builds up here.
MAX_REPLY_BACKLOG = 64 * 1024
#: Ping channels one peer may have answered at once (one per `mvpctl ping` caller is plenty).
MAX_PING_CHANNELS = 4
#: How many ping channels are being answered, by the SCTP association they belong to (a
#: count, not the channels: they refer to the association, which would never be freed).
_answering: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
#: Seconds the ping channel may take to open.
OPEN_TIMEOUT = 5.0

NO_PINGS = (
    "{peer} does not answer data-path pings ({why}); it is not an mvpd, or an older one. "
    "`mvpctl stats {peer}` shows the ICE round trip instead"
)


def answer_pings(channel: Any) -> bool:
    """Echo every valid request that arrives on ``channel`` (an ``mvp-ping`` channel the
    peer opened); ignore anything else. A peer gets at most :data:`MAX_PING_CHANNELS` such
    channels answered at once: a further one is closed (``False``)."""
    association = getattr(channel, "transport", None)
    if association is not None:
        if _answering.get(association, 0) >= MAX_PING_CHANNELS:
            channel.close()
            return False
        _answering[association] = _answering.get(association, 0) + 1
    closed = False

    def on_close() -> None:
        nonlocal closed
        if not closed and association is not None and association in _answering:
            _answering[association] -= 1
        closed = True

    def on_message(data: Any) -> None:
        reply = reply_to(data) if isinstance(data, bytes) else None
        if reply is not None and channel.readyState == "open" and (
            channel.bufferedAmount <= MAX_REPLY_BACKLOG
        ):
            channel.send(reply)

    channel.on("message", on_message)
    channel.on("close", on_close)
    return True


class Pinger:
    """Probes to one session's peer over a channel of their own."""

    def __init__(self, session: PeerSession) -> None:
        self.session = session
        self._channel: Any = None
        self._opened: asyncio.Future[None] | None = None
        self._waiting: dict[int, asyncio.Future[float]] = {}
        self._sequence = 0
        #: Whether the peer ever answered: until it has, a silence means it cannot.
        self.answered = False

    async def ping(self, timeout: float, padding: int = 0) -> tuple[int, float | None]:
        """Send one probe; its sequence number and round trip in seconds (``None``: no
        reply within ``timeout``). :class:`PeerError` when the peer cannot answer pings."""
        await self._open()
        if self._channel is None or self._channel.readyState != "open":
            self.close()
            raise self._closed_error()
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        sequence = self._sequence
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[sequence] = waiter
        try:
            self._channel.send(encode_request(sequence, time.monotonic_ns(), padding))
            return sequence, await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            if not self.answered:
                self.close()
                raise PeerError(NO_PINGS.format(peer=self.session.peer_id,
                                                why=f"no reply within {timeout:g} s"),
                                code="timeout") from None
            return sequence, None
        finally:
            self._waiting.pop(sequence, None)

    async def _open(self) -> None:
        if self._opened is None:
            pc = peer_connection(self.session)
            if pc is None or self.session.state.value != "connected":
                raise PeerError(f"not connected to {self.session.peer_id}")
            loop = asyncio.get_running_loop()
            opened: asyncio.Future[None] = loop.create_future()
            self._opened = opened
            channel = pc.createDataChannel(
                PING_LABEL, ordered=False, maxRetransmits=0, protocol=PING_PROTOCOL
            )
            self._channel = channel

            def on_open() -> None:
                if not opened.done():
                    opened.set_result(None)

            def on_close() -> None:
                error = self._closed_error()
                if not opened.done():
                    opened.set_exception(error)
                    opened.exception()  # retrieved: nobody may be waiting
                self._fail_waiting(error)
                if self._opened is opened:  # the next ping opens a new channel
                    self._opened = self._channel = None

            channel.on("open", on_open)
            channel.on("close", on_close)
            channel.on("message", self._on_message)
            if channel.readyState == "open":
                on_open()
        opened = self._opened
        assert opened is not None
        try:
            await asyncio.wait_for(asyncio.shield(opened), OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            self.close()
            raise PeerError(NO_PINGS.format(peer=self.session.peer_id,
                                            why=f"the channel did not open in {OPEN_TIMEOUT:g} s"),
                            code="timeout") from None

    def _closed_error(self) -> PeerError:
        if self.answered:
            return PeerError(f"the ping channel to {self.session.peer_id} closed; try again")
        return PeerError(NO_PINGS.format(peer=self.session.peer_id,
                                         why="it closed the mvp-ping channel"))

    def _on_message(self, data: Any) -> None:
        try:
            probe = parse_probe(data)
        except ProtocolError:
            return
        waiter = self._waiting.get(probe.sequence)
        if probe.kind != REPLY or waiter is None or waiter.done():
            return
        self.answered = True
        waiter.set_result((time.monotonic_ns() - probe.timestamp) / 1e9)

    def _fail_waiting(self, exc: Exception) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()

    def close(self) -> None:
        channel, self._channel, self._opened = self._channel, None, None
        self._fail_waiting(PeerError(f"the connection to {self.session.peer_id} closed"))
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()


class PingService:
    """One :class:`Pinger` per live session, dropped when the session ends."""

    def __init__(self) -> None:
        self._pingers: dict[str, Pinger] = {}

    def pinger(self, session: PeerSession) -> Pinger:
        pinger = self._pingers.get(session.peer_id)
        if pinger is None or pinger.session is not session:
            if pinger is not None:
                pinger.close()
            pinger = self._pingers[session.peer_id] = Pinger(session)
            session.add_state_listener(self._on_state)
        return pinger

    def _on_state(self, session: PeerSession, change: StateChange) -> None:
        pinger = self._pingers.get(session.peer_id)
        if change.state.is_final and pinger is not None and pinger.session is session:
            del self._pingers[session.peer_id]
            pinger.close()

    def close(self) -> None:
        for pinger in self._pingers.values():
            pinger.close()
        self._pingers.clear()


__all__ = [
    "MAX_PING_CHANNELS",
    "MAX_REPLY_BACKLOG",
    "PingService",
    "Pinger",
    "answer_pings",
]
