"""Test helpers: settings for loopback peers and a tiny in-process signal forwarder.

Real aiortc peers talk over 127.0.0.1 with an explicit empty ICE server list; only the
signaling path is replaced by direct delivery (through the JSON wire form, so models are
serialised and parsed as they would be on a socket).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from mvpd.config import AgentSettings, load_settings
from mvpd.peer import PeerSession
from mvpd.proto.signaling import (
    Candidate,
    IceCandidate,
    Message,
    Offer,
    RoutedMessage,
    dump_message,
    parse_message,
)
from mvpd.rtc import aiortc_internals

T = TypeVar("T")

_EMPTY_CONFIG = Path(tempfile.mkdtemp(prefix="mvpd-test-")) / "empty.yaml"
_EMPTY_CONFIG.write_text("")


def run(coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
    """Run one async test body with an overall time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_settings(agent_id: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {"agent_id": agent_id, "ice_servers": [], "connect_timeout": 20.0}
    values.update(overrides)
    return load_settings(config_file=_EMPTY_CONFIG, env_file=None, **values)


def wire(message: Message) -> Message:
    """The message as the other side would parse it from the wire."""
    return parse_message(dump_message(message))


Filter = Callable[[RoutedMessage], Awaitable[list[RoutedMessage]]]


class Forwarder:
    """Delivers what one session signals straight into the other session.

    ``filter`` may rewrite, split, hold back or reorder messages.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, PeerSession] = {}
        self.sent: list[RoutedMessage] = []
        self.filter: Filter | None = None

    def sender(self, agent_id: str) -> Callable[[RoutedMessage], Awaitable[None]]:
        async def send(message: RoutedMessage) -> None:
            parsed = wire(message)
            assert parsed.sender == agent_id  # type: ignore[union-attr]
            self.sent.append(message)
            out = [message] if self.filter is None else await self.filter(message)
            for item in out:
                target = self.sessions.get(item.to)
                if target is not None:
                    target.deliver(wire(item))  # type: ignore[arg-type]

        return send

    def pair(self, a: str, b: str, **settings: Any) -> tuple[PeerSession, PeerSession]:
        """Session ``a`` (towards b) and session ``b`` (towards a)."""
        sa = PeerSession(make_settings(a, **settings), b, send_signal=self.sender(a))
        sb = PeerSession(make_settings(b, **settings), a, send_signal=self.sender(b))
        self.sessions[a] = sa
        self.sessions[b] = sb
        return sa, sb


def split_candidates(sdp: str) -> tuple[str, list[str]]:
    """The SDP without its candidate lines (and end-of-candidates), plus those lines."""
    kept, candidates = [], []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            candidates.append(line[2:])
        elif line.startswith("a=end-of-candidates"):
            continue
        else:
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", candidates


def trickle(message: Offer | Any, candidates: list[str]) -> list[RoutedMessage]:
    """Candidate messages for ``candidates`` (browser style), then end-of-candidates."""
    out: list[RoutedMessage] = [
        Candidate(
            sender=message.sender,
            to=message.to,
            candidate=IceCandidate(candidate=line, sdpMid="0", sdpMLineIndex=0),
        )
        for line in candidates
    ]
    out.append(Candidate(sender=message.sender, to=message.to, candidate=None))
    return out


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``predicate`` until true (for state seen on the other side)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (state lives on the other peer)
            await asyncio.sleep(0.02)


async def connected_pair(
    mode: str = "chat", a: str = "alice", b: str = "bob"
) -> tuple[PeerSession, PeerSession, Any, Any]:
    """Two connected sessions (``a`` offers in ``mode``) and their main transports."""
    fwd = Forwarder()
    sa, sb = fwd.pair(a, b)
    sa.mode = mode
    await sa.start_offer()
    ta = await sa.wait_open()
    tb = await sb.wait_open()
    return sa, sb, ta, tb


def intercept_received(sctp: Any, keep: Callable[[bytes], bool]) -> None:
    """Show each SCTP packet the driver ``sctp`` (an open :class:`mvpd.rtc.SctpTransport`)
    receives to ``keep`` first, and drop it when that returns False. Both receive paths,
    aiortc's coroutine and the synchronous one, end in ``_receive``; the synchronous one
    bound the original, so it is set up again with the wrapper."""
    original = sctp._receive

    def receive(data: bytes) -> None:
        if keep(data):
            original(data)

    sctp._receive = receive
    aiortc_internals.stop_receiving_now(sctp.transport)
    aiortc_internals.receive_data_now(sctp.transport, receive)
