"""mvpd.peer.adapt_sctp_to_unreliable_channels on real aiortc peers over loopback.

Loss is made by the receiving association ignoring chosen DATA chunks, as if the network had
dropped their packets: the sender learns of it from the gap reports of later SACKs, exactly
as on a lossy link. What is checked is the sender's slow-start threshold, which aiortc's
SCTP lowers on every loss it reacts to (fast retransmit or T3-rtx), and what was delivered.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiortc.rtcsctptransport import DataChunk

import mvpd.peer
from tests.peerlink import connected_pair, run, wait_for

MESSAGES = 400
MESSAGE_SIZE = 1000
#: Every DROP_EVERY-th DATA chunk of the test channel is lost, among the first DROP_UNTIL:
#: later ones all arrive, so no loss is at the tail (which only a T3-rtx timeout finds).
DROP_EVERY = 25
DROP_UNTIL = 300
CHANNEL_ID = 100


def drop_data_chunks(sctp: Any, stream_id: int) -> list[int]:
    """Make ``sctp`` ignore some DATA chunks of ``stream_id``; returns the dropped TSNs."""
    original = sctp._receive_chunk
    dropped: list[int] = []
    seen = 0

    async def receive_chunk(chunk: Any) -> None:
        nonlocal seen
        if isinstance(chunk, DataChunk) and chunk.stream_id == stream_id:
            seen += 1
            if seen <= DROP_UNTIL and seen % DROP_EVERY == 0 and chunk.tsn not in dropped:
                dropped.append(chunk.tsn)
                return
        await original(chunk)

    sctp._receive_chunk = receive_chunk
    return dropped


async def lossy_transfer(*, reliable: bool) -> tuple[Any, int, list[bytes], list[int]]:
    """Send MESSAGES messages over a negotiated channel with some chunks lost.

    Returns the sender's SCTP association, its slow-start threshold before the transfer,
    the messages received and the dropped TSNs.
    """
    sa, sb, _, _ = await connected_pair("chat")
    try:
        options: dict[str, Any] = {} if reliable else {"ordered": False, "maxRetransmits": 0}
        channel_a = sa._pc.createDataChannel("loss", negotiated=True, id=CHANNEL_ID, **options)
        channel_b = sb._pc.createDataChannel("loss", negotiated=True, id=CHANNEL_ID, **options)
        received: list[bytes] = []
        channel_b.on("message", received.append)
        await wait_for(lambda: channel_a.readyState == channel_b.readyState == "open")
        sender = sa._pc.sctp
        ssthresh = sender._ssthresh
        dropped = drop_data_chunks(sb._pc.sctp, CHANNEL_ID)
        for index in range(MESSAGES):
            channel_a.send(index.to_bytes(4, "big") * (MESSAGE_SIZE // 4))

        def done() -> bool:
            lost = 0 if reliable else len(dropped)  # grows while the transfer runs
            idle = not (sender._sent_queue or sender._outbound_queue
                        or sender._data_channel_queue)
            return idle and len(received) + lost >= MESSAGES

        await wait_for(done, 30)
        return sender, ssthresh, received, dropped
    finally:
        await sa.close("done")
        await sb.close("done")


def test_loss_of_unreliable_chunks_leaves_the_congestion_window_alone() -> None:
    sender, ssthresh, received, dropped = run(lossy_transfer(reliable=False))
    assert len(dropped) == DROP_UNTIL // DROP_EVERY
    assert len(received) == MESSAGES - len(dropped)
    assert sender._mvpd_unreliable_losses_ignored > 0
    assert sender._ssthresh == ssthresh  # never lowered: no reduction survived


def test_without_the_adaptation_aiortc_halves_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same transfer with aiortc's own behaviour: the loss is reacted to."""
    monkeypatch.setattr(mvpd.peer, "ADJUST_UNRELIABLE_SCTP", False)
    sender, ssthresh, received, dropped = run(lossy_transfer(reliable=False))
    assert len(received) == MESSAGES - len(dropped)
    assert not hasattr(sender, "_mvpd_unreliable_losses_ignored")
    assert sender._ssthresh < ssthresh


def test_loss_of_reliable_chunks_still_halves_the_window_and_nothing_is_lost() -> None:
    sender, ssthresh, received, dropped = run(lossy_transfer(reliable=True))
    assert len(dropped) == DROP_UNTIL // DROP_EVERY
    assert received == [
        index.to_bytes(4, "big") * (MESSAGE_SIZE // 4) for index in range(MESSAGES)
    ]
    assert sender._ssthresh < ssthresh
    assert sender._mvpd_unreliable_losses_ignored == 0
