"""Interoperability with aiortc 1.16's pure-Python SCTP (RTCSctpTransport)."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCDataChannel, RTCDataChannelParameters

from mvpd.sctp import AssociationEstablished, MessageReceived, StreamsReset

from .aiortc_peer import Wire

PPID_BINARY = 53


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def _channel(wire: Wire, stream_id: int, **options: object) -> RTCDataChannel:
    return RTCDataChannel(
        wire.theirs,
        RTCDataChannelParameters(label=f"c{stream_id}", negotiated=True, id=stream_id,
                                 **options),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("we_connect", [True, False])
@pytest.mark.parametrize("aiortc_role", ["server", "client"])
def test_handshake_and_messages_both_ways(we_connect: bool, aiortc_role: str) -> None:
    async def main() -> None:
        wire = Wire(aiortc_role=aiortc_role)
        await wire.start(we_connect=we_connect)
        ours = wire.ours
        await ours.wait_for(lambda: any(isinstance(e, AssociationEstablished)
                                        for e in ours.events))
        channel = _channel(wire, 1)
        received: list[bytes] = []
        channel.on("message", received.append)
        sizes = [1, 100, 1200, 5000, 65536, 262144]
        for i, size in enumerate(sizes):
            ours.association.send(1, PPID_BINARY, bytes([i]) * size, now=ours.now())
        ours.flush()
        for _ in range(1000):
            if len(received) == len(sizes):
                break
            await asyncio.sleep(0.01)
        assert [len(m) for m in received] == sizes
        assert [m[0] for m in received] == list(range(len(sizes)))
        for i, size in enumerate(sizes):
            channel.send(bytes([i + 1]) * size)
        await ours.wait_for(lambda: len([e for e in ours.events
                                         if isinstance(e, MessageReceived)]) == len(sizes))
        got = [e for e in ours.events if isinstance(e, MessageReceived)]
        assert [len(e.data) for e in got] == sizes
        assert all(e.stream_id == 1 and e.ppid == PPID_BINARY for e in got)
        await wire.stop()

    _run(main())


def test_bulk_under_loss_both_ways() -> None:
    async def main() -> None:
        wire = Wire(loss=0.05, rto_min=0.05, rto_initial=0.2)
        await wire.start()
        ours = wire.ours
        await ours.wait_for(lambda: bool(ours.events), timeout=30)
        channel = _channel(wire, 3)
        received: list[bytes] = []
        channel.on("message", received.append)
        count = 200
        for i in range(count):
            ours.association.send(3, PPID_BINARY, i.to_bytes(4, "big") * 500, now=ours.now())
            channel.send(i.to_bytes(4, "big") * 300)
        ours.flush()
        await ours.wait_for(lambda: len([e for e in ours.events
                                         if isinstance(e, MessageReceived)]) == count,
                            timeout=60)
        for _ in range(6000):
            if len(received) == count:
                break
            await asyncio.sleep(0.01)
        assert [m[:4] for m in received] == [i.to_bytes(4, "big") for i in range(count)]
        got = [e.data[:4] for e in ours.events if isinstance(e, MessageReceived)]
        assert got == [i.to_bytes(4, "big") for i in range(count)]
        await wire.stop()

    _run(main())


def test_channel_close_resets_streams_both_ways() -> None:
    async def main() -> None:
        wire = Wire()
        await wire.start()
        ours = wire.ours
        await ours.wait_for(lambda: bool(ours.events))
        channel = _channel(wire, 5)
        channel.send(b"last words")
        channel.close()
        await ours.wait_for(lambda: any(isinstance(e, StreamsReset) for e in ours.events))
        kinds = [type(e).__name__ for e in ours.events]
        assert kinds.index("MessageReceived") < kinds.index("StreamsReset")
        reset = next(e for e in ours.events if isinstance(e, StreamsReset))
        assert reset.stream_ids == [5]
        # Our side closes its half; aiortc then sees the channel closed.
        ours.association.reset_streams([5], ours.now())
        ours.flush()
        for _ in range(500):
            if channel.readyState == "closed":
                break
            await asyncio.sleep(0.01)
        assert channel.readyState == "closed"
        await wire.stop()

    _run(main())


def test_partial_reliability_both_ways_under_loss() -> None:
    async def main() -> None:
        wire = Wire(loss=0.1, seed=3, rto_min=0.05, rto_initial=0.2)
        await wire.start()
        ours = wire.ours
        await ours.wait_for(lambda: bool(ours.events), timeout=30)
        unreliable = _channel(wire, 1, ordered=True, maxRetransmits=0)
        reliable = _channel(wire, 2)
        for _ in range(3000):
            if unreliable.readyState == "open":
                break
            await asyncio.sleep(0.01)
        received: list[bytes] = []
        unreliable.on("message", received.append)
        for i in range(300):
            ours.association.send(1, PPID_BINARY, i.to_bytes(2, "big") * 400,
                                  max_retransmits=0, now=ours.now())
            unreliable.send(i.to_bytes(2, "big") * 400)
        ours.association.send(1, PPID_BINARY, b"reliable after", now=ours.now())
        ours.flush()
        for _ in range(3000):  # aiortc skips what we abandoned (our FORWARD TSN) and goes on
            if received and received[-1] == b"reliable after":
                break
            await asyncio.sleep(0.01)
        assert received[-1] == b"reliable after"
        ids = [int.from_bytes(m[:2], "big") for m in received[:-1]]
        assert ids == sorted(set(ids)) and 0 < len(ids) < 300
        reliable.send(b"done")
        await ours.wait_for(lambda: any(isinstance(e, MessageReceived) and e.data == b"done"
                                        for e in ours.events), timeout=30)
        tracker = ours.association.tracker
        assert tracker is not None
        for _ in range(500):  # aiortc's FORWARD TSN moves our cumulative TSN past the gaps
            if not tracker.has_gaps:
                break
            await asyncio.sleep(0.01)
        assert not tracker.has_gaps
        got = [e for e in ours.events if isinstance(e, MessageReceived) and e.stream_id == 1]
        assert 0 < len(got) < 300
        await wire.stop()

    _run(main())
