"""The baseline: a bare aiortc data channel between two processes, no daemon in the way.

This process is the offerer; it starts a second copy of itself (``--serve``) as the answerer
and exchanges SDP with it over that child's stdin and stdout (one JSON object per line), so
no signaling server is involved. Both sides use ``RTCConfiguration(iceServers=[])`` (loopback
host candidates only) and, like mvpd, uvloop when it is installed. It measures what
``bench/main_job.py`` compares mvpd against:

* ``--connects K``: K times (after one warm-up), offer creation to the channel's ``open``;
* ``--echoes N``: N round trips of a 100-byte binary message echoed by the answerer;
* ``--bulk-bytes B --bulk-rounds R``: R transfers of B bytes in 64 KiB messages over a
  reliable ordered channel, pausing while ``bufferedAmount`` is above 1 MiB and resuming on
  ``bufferedamountlow`` (256 KiB), the same watermarks as mvpd's transports. The answerer
  times each transfer from its first to its last received byte; each side reports the CPU
  seconds its process used for the transfer.

The result is one JSON object on stdout. Everything is bounded by ``--timeout``; the answerer
is stopped by PID when this process ends, and dies with it (PR_SET_PDEATHSIG) if it is killed.

    .venv/bin/python bench/bare_aiortc.py --connects 5 --echoes 200 --bulk-bytes 8388608
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription

MESSAGE_SIZE = 64 * 1024
HIGH_WATERMARK = 1024 * 1024
LOW_WATERMARK = 256 * 1024
ECHO_SIZE = 100
LABEL = "bench"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the parent dies (no orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def ice_config() -> RTCConfiguration:
    """No ICE servers at all: without an explicit empty list aiortc asks a public STUN server."""
    return RTCConfiguration(iceServers=[])


def install_uvloop(enabled: bool) -> bool:
    if not enabled:
        return False
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# --- the answerer (--serve) ----------------------------------------------------------------


class Answerer:
    """Answers offers read from stdin; echoes binary messages; times announced transfers."""

    def __init__(self) -> None:
        self.pcs: list[RTCPeerConnection] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while line := await reader.readline():
                request = json.loads(line)
                if request.get("type") != "offer":
                    continue
                # One connection at a time: the previous one is done with.
                await self.close_all()
                answer = await self.answer(request["sdp"])
                sys.stdout.write(json.dumps({"type": "answer", "sdp": answer}) + "\n")
                sys.stdout.flush()
        finally:
            await self.close_all()

    async def close_all(self) -> None:
        pcs, self.pcs = self.pcs, []
        for pc in pcs:
            with contextlib.suppress(Exception):
                await pc.close()

    async def answer(self, sdp: str) -> str:
        pc = RTCPeerConnection(ice_config())
        self.pcs.append(pc)
        pc.on("datachannel", self.serve_channel)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    @staticmethod
    def serve_channel(channel: RTCDataChannel) -> None:
        expected = 0
        received = 0
        first = 0.0
        cpu_start = 0.0

        def on_message(message: str | bytes) -> None:
            nonlocal expected, received, first, cpu_start
            if isinstance(message, str):
                if message.startswith("bulk:"):
                    expected, received = int(message[5:]), 0
                    cpu_start = time.process_time()
                return
            if expected <= 0:
                channel.send(message)  # echo
                return
            now = time.perf_counter()
            if received == 0:
                first = now
            received += len(message)
            if received >= expected:
                expected = 0
                channel.send(json.dumps({
                    "bytes": received, "seconds": now - first,
                    "receiver_cpu_seconds": time.process_time() - cpu_start,
                }))

        channel.on("message", on_message)


# --- the offerer -----------------------------------------------------------------------------


class Offerer:
    """Drives the answerer child: connections, echoes, bulk transfers."""

    def __init__(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        self.pc: RTCPeerConnection | None = None
        self.channel: RTCDataChannel | None = None
        self.inbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.low = asyncio.Event()

    async def _exchange(self, offer: str) -> str:
        assert self.child.stdin is not None and self.child.stdout is not None
        line = json.dumps({"type": "offer", "sdp": offer}) + "\n"
        stdin, stdout = self.child.stdin, self.child.stdout

        def roundtrip() -> bytes:
            stdin.write(line.encode())
            stdin.flush()
            return stdout.readline()

        reply = await asyncio.to_thread(roundtrip)
        if not reply:
            raise RuntimeError("the answerer process ended")
        return str(json.loads(reply)["sdp"])

    async def connect(self) -> float:
        """A fresh connection; seconds from offer creation to the channel's open event."""
        await self.close()
        started = time.perf_counter()
        pc = RTCPeerConnection(ice_config())
        channel = pc.createDataChannel(LABEL, ordered=True)
        opened = asyncio.Event()
        channel.on("open", opened.set)
        channel.on("message", self.inbox.put_nowait)
        channel.bufferedAmountLowThreshold = LOW_WATERMARK
        channel.on("bufferedamountlow", self.low.set)
        self.pc, self.channel = pc, channel
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self._exchange(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await opened.wait()
        return time.perf_counter() - started

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        self.pc = self.channel = None

    async def echo(self, payload: bytes) -> float:
        assert self.channel is not None
        started = time.perf_counter()
        self.channel.send(payload)
        got = await self.inbox.get()
        elapsed = time.perf_counter() - started
        if got != payload:
            raise RuntimeError("the echo differs from what was sent")
        return elapsed

    async def bulk(self, size: int) -> dict[str, float]:
        """Send ``size`` bytes, respecting bufferedAmount; the answerer's timing."""
        channel = self.channel
        assert channel is not None
        chunk = os.urandom(MESSAGE_SIZE)
        channel.send(f"bulk:{size}")
        started = time.perf_counter()
        cpu_start = time.process_time()
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
        result = json.loads(report)
        result["sender_seconds"] = time.perf_counter() - started
        result["sender_cpu_seconds"] = time.process_time() - cpu_start
        return {k: float(v) for k, v in result.items()}


async def offer_side(args: argparse.Namespace, child: subprocess.Popen[bytes]) -> dict[str, Any]:
    offerer = Offerer(child)
    result: dict[str, Any] = {"connect_s": [], "echo_s": [], "bulk": []}
    try:
        if args.connects:
            await offerer.connect()  # warm up (first DTLS handshake, imports, caches)
        for _ in range(args.connects):
            result["connect_s"].append(await offerer.connect())
        if args.echoes or (args.bulk_bytes and args.bulk_rounds):
            if offerer.channel is None:
                await offerer.connect()
            payload = os.urandom(ECHO_SIZE)
            for _ in range(min(args.echoes, 20)):  # warm up
                await offerer.echo(payload)
            for _ in range(args.echoes):
                result["echo_s"].append(await offerer.echo(payload))
            for _ in range(args.bulk_rounds if args.bulk_bytes else 0):
                result["bulk"].append(await offerer.bulk(args.bulk_bytes))
    finally:
        await offerer.close()
    return result


def start_answerer(uvloop_on: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, os.path.abspath(__file__), "--serve"]
    if not uvloop_on:
        argv.append("--no-uvloop")
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=die_with_parent
    )


def stop_child(child: subprocess.Popen[bytes]) -> None:
    """Stop the answerer by its PID: end of input first, then SIGTERM, then SIGKILL."""
    with contextlib.suppress(OSError):
        if child.stdin is not None:
            child.stdin.close()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help="be the answerer (internal)")
    parser.add_argument("--connects", type=int, default=0)
    parser.add_argument("--echoes", type=int, default=0)
    parser.add_argument("--bulk-bytes", type=int, default=0)
    parser.add_argument("--bulk-rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    uvloop_on = install_uvloop(not args.no_uvloop)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(Answerer().run())
        return 0
    # SIGTERM becomes an exception so the finally below stops the answerer.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    child = start_answerer(uvloop_on)
    try:
        result = asyncio.run(asyncio.wait_for(offer_side(args, child), args.timeout))
    finally:
        stop_child(child)
    result["uvloop"] = uvloop_on
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
