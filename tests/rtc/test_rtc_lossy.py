"""Our stack on both ends of a lossy, slow link (tests/impair.py between two namespaces):
a reliable ordered channel still delivers every message, intact and in order."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.impair import ImpairedLink, impaired_link
from tests.netns import namespace, require_netns
from tests.rtc.test_rtc_chromium import Child

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.fixture
def children() -> Iterator[tuple[Child, Child, ImpairedLink]]:
    require_netns()
    with namespace("ra") as a, namespace("rb") as b, impaired_link(a, b, seed=7) as link:
        link.set(delay_ms=10, loss=0.05)
        sender, echoer = Child(a), Child(b)
        try:
            yield sender, echoer, link
        finally:
            sender.stop()
            echoer.stop()


def test_reliable_channel_over_5_percent_loss(
    children: tuple[Child, Child, ImpairedLink],
) -> None:
    sender, echoer, link = children
    sender.send(op="offer", echo=False)
    echoer.send(op="answer", sdp=sender.reply()["sdp"])
    sender.send(op="remote", sdp=echoer.reply()["sdp"])
    sender.wait_event(event="open", label="c")
    # 4 MiB each way in 16 KiB messages, some of them split into many SCTP chunks.
    sender.send(op="send", count=256, size=16 * 1024)
    result = sender.wait_event(event="sent", timeout=100)
    assert result["ok"] is True, result
    assert link.stats()["dropped"] > 100  # the loss was real
    for child in (sender, echoer):
        assert not [e for e in child.events if e.get("state") in ("failed", "closed")]
