"""CPU cost of moving bulk data through two SCTP associations wired in memory.

Ours (``mvpd.sctp.Association``, sans-I/O, a virtual clock) against aiortc's
``RTCSctpTransport`` (two instances in one asyncio loop joined by a fake DTLS transport),
both sending 64 KiB messages on one reliable ordered stream and handing packets over one
datagram at a time.  The figure is megabytes per CPU second of this process (packets built,
parsed, checksummed, acknowledged: everything but DTLS and sockets), so the ratio is the
SCTP layer's share of the end-to-end gain; the end-to-end ratio is measured elsewhere.

    .venv/bin/python bench/sctp_assoc.py [--megabytes 64] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from typing import Any

from mvpd.sctp import Association, MessageReceived

MESSAGE = 65536
HIGH_WATER = 1 << 20


def run_ours(total: int) -> dict[str, float]:
    """Send ``total`` bytes a -> b; returns CPU seconds and packet counts."""
    a, b = Association(), Association()
    now = 0.0
    a.connect(now)
    to_b: deque[bytes] = deque(a.packets_to_send())
    to_a: deque[bytes] = deque()
    payload = b"\x5a" * MESSAGE
    queued = received = 0
    start = time.process_time()
    while received < total:
        while queued < total and a.buffered_amount(1) < HIGH_WATER and a.established:
            a.send(1, 53, payload, now=now)
            queued += MESSAGE
        if not to_b and not to_a:
            to_b.extend(a.packets_to_send())
        while to_b:
            b.receive_packet(to_b.popleft(), now)
            to_a.extend(b.packets_to_send())
            for event in b.events():
                if isinstance(event, MessageReceived):
                    received += len(event.data)
        while to_a:
            a.receive_packet(to_a.popleft(), now)
            to_b.extend(a.packets_to_send())
        now += 0.0005
        for side, queue in ((a, to_b), (b, to_a)):
            deadline = side.next_deadline()
            if deadline is not None and deadline <= now:
                side.handle_timeout(now)
                queue.extend(side.packets_to_send())
        if not to_b and not to_a and received < total:
            now += 0.2  # nothing in flight: let the delayed-SACK timer fire
    cpu = time.process_time() - start
    return {"cpu_s": cpu, "mb_per_cpu_s": total / cpu / 1e6,
            "data_packets": b.data_packets_received, "sacks": b.sacks_sent}


class _FakeDtls:
    def __init__(self, role: str) -> None:
        self.state = "connected"
        self._role = role
        self.peer: _FakeDtls | None = None
        self.receiver: Any = None
        self._loop = asyncio.get_running_loop()

    def _register_data_receiver(self, receiver: Any) -> None:
        self.receiver = receiver

    def _unregister_data_receiver(self, receiver: Any) -> None:
        self.receiver = None

    async def _send_data(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.receiver is not None:
            self._loop.create_task(peer.receiver._handle_data(data))


async def _aiortc(total: int) -> dict[str, float]:
    from aiortc import RTCDataChannel, RTCDataChannelParameters
    from aiortc.rtcsctptransport import RTCSctpCapabilities, RTCSctpTransport

    dtls_a, dtls_b = _FakeDtls("client"), _FakeDtls("server")
    dtls_a.peer, dtls_b.peer = dtls_b, dtls_a
    sctp_a = RTCSctpTransport(dtls_a)  # type: ignore[arg-type]
    sctp_b = RTCSctpTransport(dtls_b)  # type: ignore[arg-type]
    caps = RTCSctpCapabilities(maxMessageSize=262144)
    await sctp_a.start(caps, 5000)
    await sctp_b.start(caps, 5000)
    params = RTCDataChannelParameters(label="bulk", negotiated=True, id=1)
    sender = RTCDataChannel(sctp_a, params)
    receiver = RTCDataChannel(sctp_b, params)
    done = asyncio.Event()
    got = 0

    def on_message(message: bytes) -> None:
        nonlocal got
        got += len(message)
        if got >= total:
            done.set()

    receiver.on("message", on_message)
    opened = asyncio.Event()
    sender.on("open", opened.set)
    if sender.readyState != "open":
        await opened.wait()
    sender.bufferedAmountLowThreshold = HIGH_WATER // 4
    low = asyncio.Event()
    sender.on("bufferedamountlow", low.set)
    payload = b"\x5a" * MESSAGE
    start = time.process_time()
    sent = 0
    while sent < total:
        if sender.bufferedAmount > HIGH_WATER:
            low.clear()
            await low.wait()
        sender.send(payload)
        sent += MESSAGE
    await done.wait()
    cpu = time.process_time() - start
    await sctp_a.stop()
    await sctp_b.stop()
    return {"cpu_s": cpu, "mb_per_cpu_s": total / cpu / 1e6}


def run_aiortc(total: int) -> dict[str, float]:
    return asyncio.run(_aiortc(total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-aiortc", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    total = args.megabytes * MESSAGE * 16
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for _ in range(args.rounds):  # alternate, so load from elsewhere hits both alike
        ours.append(run_ours(total))
        if not args.no_aiortc:
            theirs.append(run_aiortc(total))
    best = max(ours, key=lambda r: r["mb_per_cpu_s"])
    print(f"mvpd.sctp   {best['mb_per_cpu_s']:8.1f} MB per CPU second "
          f"(best of {args.rounds}; SACKs per DATA packet "
          f"{best['sacks'] / best['data_packets']:.2f})")
    result: dict[str, Any] = {"megabytes": total / 1e6, "ours": ours}
    if theirs:
        their_best = max(theirs, key=lambda r: r["mb_per_cpu_s"])
        ratio = best["mb_per_cpu_s"] / their_best["mb_per_cpu_s"]
        print(f"aiortc      {their_best['mb_per_cpu_s']:8.1f} MB per CPU second")
        print(f"ratio       {ratio:8.2f}x")
        result.update(aiortc=theirs, ratio=ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
