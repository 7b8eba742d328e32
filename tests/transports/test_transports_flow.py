"""Backpressure: a 50 MiB bytes transfer keeps the send buffer near the watermark."""

from __future__ import annotations

import asyncio
import hashlib

from tests.peerlink import connected_pair, run

CHUNK = 64 * 1024
TOTAL = 50 * 1024 * 1024


def test_50_mib_never_overshoots_the_watermark_by_more_than_one_message() -> None:
    async def body() -> None:
        sa, sb, ta, tb = await connected_pair("bytes")

        async def receive_all() -> bytes:
            digest = hashlib.sha256()
            got = 0
            while got < TOTAL:
                data = await tb.recv()
                digest.update(data)
                got += len(data)
            return digest.digest()

        receiver = asyncio.ensure_future(receive_all())
        sent = hashlib.sha256()
        highest = 0
        block = bytes(range(256)) * (CHUNK // 256)
        for i in range(TOTAL // CHUNK):
            data = i.to_bytes(4, "big") + block[4:]
            sent.update(data)
            await ta.send_bytes_async(data)
            highest = max(highest, ta.buffered_amount)
        assert highest <= ta.high_watermark + CHUNK
        # The buffer really filled up, so the waiting was exercised.
        assert highest > ta.low_watermark
        assert await receiver == sent.digest()
        assert tb.counters.messages_in == TOTAL // CHUNK
        assert not tb.counters.errors and tb.inbox is not None and not tb.inbox.dropped
        await sa.close()
        await sb.close()

    run(body(), timeout=300)
