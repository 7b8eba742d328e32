"""How our SCTP driver acknowledges: in-order DATA that arrives in a burst is acknowledged
together at the burst's end, but never more than BURST_SACK_PACKETS packets by one SACK.

With uvloop, as the daemon runs: its UDP transport hands over every datagram the socket
holds in one go, which is what makes a burst (asyncio's own reads one per loop turn, so
there every second packet is acknowledged, as RFC 9260 6.2 has it)."""

from __future__ import annotations

import asyncio

import pytest

from mvpd.rtc.sctp_transport import BURST_SACK_PACKETS
from tests.rtc.stackpair import close_all, open_pair, our_peer


def test_a_bulk_transfer_is_acknowledged_in_bursts_of_at_most_the_bound() -> None:
    async def body() -> None:
        a, b = our_peer(), our_peer()
        try:
            sender, _far, _ours, theirs = await open_pair(a, b)
            chunk = b"x" * 60000
            count = 64  # 3.8 MB
            for _ in range(count):
                while sender.bufferedAmount > 1 << 20:  # noqa: ASYNC110 (no event for it)
                    await asyncio.sleep(0.001)
                sender.send(chunk)
            for _ in range(count):
                assert await theirs.get() == chunk
            assert b.sctp is not None
            stats = b.sctp.association.stats()
            data, sacks = int(stats["data_packets_received"]), int(stats["sacks_sent"])
            assert data >= count * len(chunk) // 1500
            assert data <= BURST_SACK_PACKETS * sacks, (data, sacks)  # the bound holds
            assert data > 2 * sacks, (data, sacks)  # fewer SACKs than one per two packets
        finally:
            await close_all(a, b)

    uvloop = pytest.importorskip("uvloop")
    uvloop.run(asyncio.wait_for(body(), 60))
