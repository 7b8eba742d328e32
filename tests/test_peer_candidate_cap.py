"""Remote ICE candidates per session are capped (RFC 8445 section 19.5.1): an offer with
1000 candidates, then 1000 trickled ones, leave aioice with at most the cap, the rest
counted; the real candidates, listed first, still connect. Real aiortc peers on loopback."""

from __future__ import annotations

from typing import Any

from mvpd.proto.signaling import Offer, RoutedMessage
from tests.peerlink import Forwarder, run, trickle

FAKES = 1000
CAP = 64  # the default


def fake_candidates(first_port: int) -> list[str]:
    # Ports of the sender's choosing on loopback, where nothing listens.
    return [
        f"candidate:f{n} 1 udp {1000 + n} 127.0.0.1 {first_port + n} typ host"
        for n in range(FAKES)
    ]


def with_candidates(sdp: str, lines: list[str]) -> str:
    """``sdp`` with ``lines`` added after its own candidate lines."""
    out = sdp.splitlines()
    last = max(i for i, line in enumerate(out) if line.startswith("a=candidate:"))
    out[last + 1 : last + 1] = [f"a={line}" for line in lines]
    return "\r\n".join(out) + "\r\n"


def test_a_thousand_candidates_leave_at_most_the_cap_in_aioice() -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        real = 0

        async def stuff(message: RoutedMessage) -> list[RoutedMessage]:
            nonlocal real
            if not isinstance(message, Offer):
                return [message]
            real = message.sdp.count("a=candidate:")
            offer = Offer(sender=message.sender, to=message.to,
                          sdp=with_candidates(message.sdp, fake_candidates(21000)))
            return [offer, *trickle(offer, fake_candidates(23000))]

        fwd.filter = stuff
        await sa.start_offer()
        await sa.wait_open()
        await sb.wait_open()
        connection: Any = sb._pc.ice_transport._connection  # aioice's
        remote = connection.remote_candidates
        # What aioice holds: at most the cap (peer-reflexive ones it learns come on top).
        assert len([c for c in remote if c.type != "prflx"]) <= CAP
        assert sb.remote_candidates == CAP
        # The rest were ignored, or dropped earlier as a signaling backlog (all at once).
        assert 0 < real < CAP
        assert sb.candidates_ignored + sb.inbox_dropped >= 2 * FAKES + real - CAP
        assert sb.snapshot()["remote_candidates"] == CAP
        await sa.close()
        await sb.close()

    run(body(), timeout=120)
