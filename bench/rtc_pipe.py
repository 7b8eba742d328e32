"""mvpd's WebRTC stack (mvpd.rtc: aiortc ICE/DTLS + mvpd.sctp) against a stock aiortc
RTCPeerConnection, in the same run, between two processes.

This process is the offerer; it starts a second copy of itself (``--serve``) as the answerer
and exchanges SDP over the child's stdin and stdout. Each connection uses one stack on both
ends (``ours``: mvpd.rtc.PeerConnection; ``stock``: aiortc.RTCPeerConnection), explicit empty
ICE server lists, and uvloop on both sides when installed. Per round, the two stacks take
turns (the first one alternates between rounds, so load from other users hits both alike):

* a fresh connection with one reliable ordered channel;
* ``--echoes N`` round trips of a 100-byte binary message echoed by the answerer (after 20
  warm-up ones);
* a transfer of ``--bulk-bytes`` in 64 KiB messages, pausing while ``bufferedAmount`` is above
  1 MiB and resuming on ``bufferedamountlow`` at 256 KiB (mvpd's transport watermarks). The
  answerer times first to last byte; both sides report their process CPU time for it.

It prints one JSON object: every sample, medians per stack, and ``ratio`` = ours / stock
(MB/s above 1: ours is faster; CPU s/MB and echo ms below 1: ours costs less).

    .venv/bin/python bench/rtc_pipe.py --rounds 5 --bulk-bytes 33554432 --echoes 300

``--netem "delay 20ms loss 5%"`` (root) runs the two processes in two network namespaces
joined by tests/impair.py's lossy, slow link (the delay and loss apply each way) and adds
the link's counters to the result:

    sudo .venv/bin/python bench/rtc_pipe.py --netem "delay 20ms loss 5%" --rounds 3 \
        --bulk-bytes 4194304 --echoes 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from bare_aiortc import (
    ECHO_SIZE,
    HIGH_WATERMARK,
    LOW_WATERMARK,
    MESSAGE_SIZE,
    die_with_parent,
    ice_config,
    install_uvloop,
    stop_child,
)
from bare_aiortc import Answerer as BareAnswerer

from mvpd.rtc.connection import IceConfiguration, PeerConnection

ROOT = Path(__file__).resolve().parent.parent
STACKS = ("stock", "ours")
LABEL = "bench"
MB = 1e6


def new_peer(stack: str) -> Any:
    """A peer connection of ``stack`` with no ICE servers at all."""
    if stack == "ours":
        return PeerConnection(IceConfiguration(servers=()))
    return RTCPeerConnection(ice_config())


# --- the answerer (--serve) ----------------------------------------------------------------


class Answerer:
    """Answers offers from stdin with the stack each names; echoes; times transfers."""

    def __init__(self) -> None:
        self.pc: Any = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while line := await reader.readline():
                request = json.loads(line)
                await self.close()
                pc = self.pc = new_peer(request["stack"])
                # The same echo/bulk server as the bare baseline, so both stacks answer alike.
                pc.on("datachannel", BareAnswerer.serve_channel)
                await pc.setRemoteDescription(
                    RTCSessionDescription(sdp=request["sdp"], type="offer")
                )
                await pc.setLocalDescription(await pc.createAnswer())
                sys.stdout.write(json.dumps({"sdp": pc.localDescription.sdp}) + "\n")
                sys.stdout.flush()
        finally:
            await self.close()

    async def close(self) -> None:
        pc, self.pc = self.pc, None
        if pc is not None:
            with contextlib.suppress(Exception):
                await pc.close()


# --- the offerer -----------------------------------------------------------------------------


class Offerer:
    def __init__(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        self.pc: Any = None
        self.channel: Any = None
        self.inbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.low = asyncio.Event()

    async def _exchange(self, stack: str, offer: str) -> str:
        stdin, stdout = self.child.stdin, self.child.stdout
        assert stdin is not None and stdout is not None
        line = json.dumps({"stack": stack, "sdp": offer}) + "\n"

        def roundtrip() -> bytes:
            stdin.write(line.encode())
            stdin.flush()
            return stdout.readline()

        reply = await asyncio.to_thread(roundtrip)
        if not reply:
            raise RuntimeError("the answerer process ended")
        return str(json.loads(reply)["sdp"])

    async def connect(self, stack: str) -> None:
        await self.close()
        pc = self.pc = new_peer(stack)
        channel = self.channel = pc.createDataChannel(LABEL, ordered=True)
        opened = asyncio.Event()
        channel.on("open", opened.set)
        channel.on("message", self.inbox.put_nowait)
        channel.bufferedAmountLowThreshold = LOW_WATERMARK
        channel.on("bufferedamountlow", self.low.set)
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self._exchange(stack, pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(opened.wait(), 20)

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        self.pc = self.channel = None

    async def echo(self, payload: bytes) -> float:
        started = time.perf_counter()
        self.channel.send(payload)
        got = await self.inbox.get()
        elapsed = time.perf_counter() - started
        if got != payload:
            raise RuntimeError("the echo differs from what was sent")
        return elapsed

    async def bulk(self, size: int) -> dict[str, float]:
        channel = self.channel
        chunk = os.urandom(MESSAGE_SIZE)
        cpu_start = time.process_time()
        channel.send(f"bulk:{size}")
        left = size
        while left > 0:
            while channel.bufferedAmount >= HIGH_WATERMARK:
                self.low.clear()
                await self.low.wait()
            piece = chunk if left >= MESSAGE_SIZE else chunk[:left]
            channel.send(piece)
            left -= len(piece)
        report = await self.inbox.get()
        assert isinstance(report, str), "expected the answerer's report"
        result = {k: float(v) for k, v in json.loads(report).items()}
        result["sender_cpu"] = time.process_time() - cpu_start
        return result


async def offer_side(args: argparse.Namespace, child: subprocess.Popen[bytes]) -> dict[str, Any]:
    offerer = Offerer(child)
    samples: dict[str, dict[str, list[float]]] = {
        stack: {"mb_s": [], "sender_cpu_s_per_mb": [], "receiver_cpu_s_per_mb": [],
                "echo_ms": []}
        for stack in STACKS
    }
    payload = os.urandom(ECHO_SIZE)
    try:
        for round_no in range(args.rounds):
            order = STACKS if round_no % 2 == 0 else STACKS[::-1]
            for stack in order:
                await offerer.connect(stack)
                for _ in range(20):  # warm up
                    await offerer.echo(payload)
                for _ in range(args.echoes):
                    samples[stack]["echo_ms"].append(1000 * await offerer.echo(payload))
                result = await offerer.bulk(args.bulk_bytes)
                megabytes = result["bytes"] / MB
                samples[stack]["mb_s"].append(megabytes / result["seconds"])
                samples[stack]["sender_cpu_s_per_mb"].append(result["sender_cpu"] / megabytes)
                samples[stack]["receiver_cpu_s_per_mb"].append(
                    result["receiver_cpu_seconds"] / megabytes
                )
                print(f"round {round_no + 1} {stack}: {megabytes / result['seconds']:.1f} MB/s",
                      file=sys.stderr)
    finally:
        await offerer.close()
    medians = {
        stack: {name: statistics.median(values) for name, values in rows.items() if values}
        for stack, rows in samples.items()
    }
    ratio = {
        name: medians["ours"][name] / medians["stock"][name]
        for name in medians["stock"]
        if medians["stock"][name]
    }
    return {"samples": samples, "median": medians, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help="be the answerer (internal)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=200)
    parser.add_argument("--bulk-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--netem", help='impair the path, e.g. "delay 20ms loss 5%%" (root)')
    parser.add_argument("--answerer-netns", help="start the answerer in it (internal)")
    args = parser.parse_args(argv)
    if args.bulk_bytes < 2 * MESSAGE_SIZE:
        parser.error(f"--bulk-bytes must be at least {2 * MESSAGE_SIZE} (two messages, so the "
                     "receiver's first-to-last-byte time is not zero)")
    uvloop_on = install_uvloop(not args.no_uvloop)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(Answerer().run())
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.netem:
        return run_impaired(args.netem, sys.argv[1:] if argv is None else argv)
    command = [sys.executable, os.path.abspath(__file__), "--serve"]
    if args.answerer_netns:
        command = ["ip", "netns", "exec", args.answerer_netns, *command]
    if not uvloop_on:
        command.append("--no-uvloop")
    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=die_with_parent
    )
    try:
        result = asyncio.run(asyncio.wait_for(offer_side(args, child), args.timeout))
    finally:
        stop_child(child)
    result["uvloop"] = uvloop_on
    result["bulk_bytes"] = args.bulk_bytes
    print(json.dumps(result))
    return 0


def run_impaired(spec: str, argv: list[str]) -> int:
    """This benchmark with the offerer in namespace A and the answerer in B, across
    tests/impair.py's link impaired with the netem-style ``spec``."""
    sys.path.insert(0, str(ROOT))
    from tests.impair import impaired_link
    from tests.netns import namespace, require_netns

    require_netns()
    rest = []
    skip = False
    for arg in argv:  # the same arguments without --netem
        if skip:
            skip = False
        elif arg == "--netem":
            skip = True
        elif not arg.startswith("--netem="):
            rest.append(arg)
    with namespace("pa") as a, namespace("pb") as b, impaired_link(a, b) as link:
        link.set_netem(spec)
        inner = a.run(sys.executable, os.path.abspath(__file__), *rest, "--answerer-netns",
                      b.name, timeout=3600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        sys.stderr.write(inner.stderr)
        result = json.loads(inner.stdout.strip().splitlines()[-1])
        result["netem"] = spec
        result["link"] = link.stats()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
