"""An offer flood from many ids through a real `mvpd signal` server at its default limits:
the daemon's descriptors stay bounded, root's `mvpctl status` keeps working, the refusals
are counted and logged once plus a summary, and a real peer still connects."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from aiortc import RTCConfiguration, RTCPeerConnection

from mvpd.proto.signaling import Offer
from mvpd.signaling.client import SignalingClient
from tests.e2e.harness import Daemons
from tests.peerlink import make_settings

FLOODERS = 150
MAX_PENDING = 32  # the default


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def flood(url: str, target: str, count: int) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("mvp")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    clients = []
    try:
        for n in range(count):
            client = SignalingClient(make_settings(f"flood-{n}", signaling_url=url))
            await client.connect()
            await client.send(Offer(sender=f"flood-{n}", to=target, sdp=sdp))
            clients.append(client)
        await asyncio.sleep(3)  # the daemon answers what it admitted meanwhile
    finally:
        for client in clients:
            await client.close()


def test_offer_flood_leaves_descriptors_bounded_and_status_working(
    daemons: Daemons, tmp_path: Path
) -> None:
    bob = daemons("bob", env={"MVPD_ALLOWED_PEERS": "*,alice"})
    baseline = open_fds(bob.pid)
    peak = baseline
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, open_fds(bob.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        asyncio.run(flood(bob.signaling_url, "bob", FLOODERS))
        status = bob.status()  # mvpctl status as root, during the aftermath
    finally:
        done.set()
        watcher.join()
    print(f"fds: baseline {baseline}, peak {peak} during {FLOODERS} offers")
    refused = status["refused_offers"]
    assert refused == {"pending-cap": FLOODERS - MAX_PENDING}, refused
    # Each admitted session holds a few sockets; the refused ones hold none.
    per_session = (peak - baseline) / MAX_PENDING
    assert per_session <= 4, (baseline, peak)
    pending = [p for p in status["peers"] if p["state"] in ("new", "connecting")]
    assert len(pending) <= MAX_PENDING
    # One line for the first refusal; the rest wait for the summary.
    assert bob.log.read_text().count("refused an offer from") == 1
    # While the flood's sessions are still pending, a peer named in bob's configuration
    # gets through, and a connected peer stays connected.
    alice = daemons("alice")
    alice.ctl_ok("connect", "bob", timeout=40)
    assert bob.peer_state("alice") == "connected"
