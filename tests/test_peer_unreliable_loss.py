"""Losses of ``maxRetransmits=0`` chunks (TUN mode) leave our SCTP's congestion window
alone, on real peer sessions over loopback; losses of reliable chunks still shrink it.

Loss is made by the receiving side ignoring chosen packets that carry DATA of the test
channel, as if the network had dropped them: the sender learns of it from the gap reports of
later SACKs, exactly as on a lossy link. What is checked is the sender's slow-start
threshold, which any reaction to a loss (fast retransmit or T3-rtx) lowers, and what was
delivered.
"""

from __future__ import annotations

import struct
from typing import Any

from mvpd.sctp.chunks import DATA
from mvpd.sctp.packet import parse_packet
from tests.peerlink import connected_pair, intercept_received, run, wait_for

MESSAGES = 400
MESSAGE_SIZE = 1000  # one DATA chunk per packet
#: Every DROP_EVERY-th packet with DATA of the test channel is lost, among the first
#: DROP_UNTIL: later ones all arrive, so no loss is at the tail (which only a T3-rtx finds).
DROP_EVERY = 25
DROP_UNTIL = 300
CHANNEL_ID = 100


def drop_data_packets(sctp: Any, stream_id: int) -> list[int]:
    """Make the SCTP driver ``sctp`` ignore every DROP_EVERY-th of the first DROP_UNTIL
    packets carrying new DATA of ``stream_id`` (retransmissions are let through and not
    counted, so the number dropped does not depend on when they come); returns the TSNs
    dropped."""
    dropped: list[int] = []
    arrived: set[int] = set()
    seen = 0

    def keep(data: bytes) -> bool:
        nonlocal seen
        packet = parse_packet(data)
        tsns = [
            struct.unpack_from("!I", data, start)[0]
            for kind, _flags, start, _end in packet.chunks
            if kind == DATA and struct.unpack_from("!H", data, start + 4)[0] == stream_id
        ]
        if not tsns or tsns[0] in arrived:
            return True
        arrived.update(tsns)
        seen += 1
        if seen <= DROP_UNTIL and seen % DROP_EVERY == 0:
            dropped.extend(tsns)
            return False
        return True

    intercept_received(sctp, keep)
    return dropped


async def lossy_transfer(
    *, reliable: bool, unreliable_losses_reduce_cwnd: bool = False
) -> tuple[Any, int, list[bytes], list[int]]:
    """Send MESSAGES messages over a negotiated channel with some packets lost.

    Returns the sender's retransmission queue, its slow-start threshold before the
    transfer, the messages received and the dropped TSNs.
    """
    sa, sb, _, _ = await connected_pair("chat")
    try:
        options: dict[str, Any] = {} if reliable else {"ordered": False, "maxRetransmits": 0}
        channel_a = sa._pc.createDataChannel("loss", negotiated=True, id=CHANNEL_ID, **options)
        channel_b = sb._pc.createDataChannel("loss", negotiated=True, id=CHANNEL_ID, **options)
        received: list[bytes] = []
        channel_b.on("message", received.append)
        await wait_for(lambda: channel_a.readyState == channel_b.readyState == "open")
        association = sa._pc.sctp.association
        sender = association.retransmissions
        # What the daemon sets (mvpd.rtc.sctp_transport); True is RFC 9260's behaviour.
        assert sender.unreliable_losses_reduce_cwnd is False
        sender.unreliable_losses_reduce_cwnd = unreliable_losses_reduce_cwnd
        ssthresh = sender.congestion.ssthresh
        dropped = drop_data_packets(sb._pc.sctp, CHANNEL_ID)
        for index in range(MESSAGES):
            channel_a.send(index.to_bytes(4, "big") * (MESSAGE_SIZE // 4))

        def done() -> bool:
            lost = 0 if reliable else len(dropped)  # grows while the transfer runs
            idle = not association.send_queue.has_data and not sender.outstanding
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
    assert sender.ignored_unreliable_losses > 0
    assert sender.congestion.ssthresh == ssthresh  # never lowered


def test_with_rfc_behaviour_the_same_loss_lowers_the_window() -> None:
    """The same transfer with the option off: the loss is reacted to (so the test above
    measures the option, not a transfer without losses)."""
    sender, ssthresh, received, dropped = run(
        lossy_transfer(reliable=False, unreliable_losses_reduce_cwnd=True)
    )
    assert len(received) == MESSAGES - len(dropped)
    assert sender.ignored_unreliable_losses == 0
    assert sender.congestion.ssthresh < ssthresh


def test_loss_of_reliable_chunks_still_lowers_the_window_and_nothing_is_lost() -> None:
    sender, ssthresh, received, dropped = run(lossy_transfer(reliable=True))
    assert len(dropped) == DROP_UNTIL // DROP_EVERY
    assert received == [
        index.to_bytes(4, "big") * (MESSAGE_SIZE // 4) for index in range(MESSAGES)
    ]
    assert sender.congestion.ssthresh < ssthresh
    assert sender.ignored_unreliable_losses == 0
