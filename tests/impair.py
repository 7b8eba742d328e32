"""A lossy, slow link between two network namespaces without the netem qdisc.

Some kernels (this project's test machines among them) have no ``sch_netem``, so ``tc qdisc
... netem delay 20ms loss 5%`` fails with "Specified qdisc kind is unknown", and nothing else
in the kernel can delay packets (no netem, no fq for timestamp pacing). This module puts a
router namespace R between A and B and passes every forwarded packet through a TUN device in
R, where a small stdlib-only Python process holds each packet for the one-way delay and drops
it with the loss probability:

    A (addr_a) --veth-- R --veth-- B (addr_b)
                        |
                  policy routing: everything arriving on either veth goes to tun0;
                  impair.py reads it, waits/drops, writes it back; the kernel routes
                  what comes out of tun0 by the main table to the other veth.

Each direction crosses the TUN device once, so "delay 20ms loss 5%" here means what netem on
both veth ends means: RTT + 40 ms, 5 % loss each way. The kernel does the rest (checksums,
segmentation offloads, ARP), so nothing needs ethtool, iptables or a bridge.

    from tests.impair import impaired_link
    with namespace("a") as a, namespace("b") as b, impaired_link(a, b) as link:
        link.set(delay_ms=20, loss=0.05)
        a.run("ping", "-c3", str(link.addr_b.ip))

The process stops by itself when its stdin closes (the helper died) or after
``--max-seconds``; its queue is bounded (tail drop, as netem's ``limit``).

Run as a program (inside R) it is the forwarder: ``python tests/impair.py --tun NAME``.
Commands on stdin, one per line, each answered on stdout: ``set DELAY_MS LOSS`` -> ``ok``,
``stats`` -> ``stats forwarded=N dropped=N overflow=N``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import ipaddress
import os
import random
import re
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
#: Packets held at once; past it new ones are dropped (netem's default limit is 1000).
QUEUE_LIMIT = 10000
#: The routing table R sends everything arriving on its veths through.
IMPAIR_TABLE = "77"


# ---- the forwarder (runs inside R) -------------------------------------------------------


def open_tun(name: str) -> int:
    """Create the TUN device ``name`` (gone when the fd closes); a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Forwarder:
    """Packets in from the TUN fd, out again after ``delay`` seconds, some dropped."""

    def __init__(self, fd: int, delay_ms: float, loss: float, seed: int | None) -> None:
        self.fd = fd
        self.delay = delay_ms / 1000
        self.loss = loss
        self.rng = random.Random(seed)
        self.queue: list[tuple[float, int, bytes]] = []  # (due, sequence, packet)
        self.sequence = 0
        self.forwarded = self.dropped = self.overflow = 0

    def set(self, delay_ms: float, loss: float) -> None:
        self.delay = delay_ms / 1000
        self.loss = loss

    def stats(self) -> str:
        return f"stats forwarded={self.forwarded} dropped={self.dropped} overflow={self.overflow}"

    def read_all(self, now: float) -> None:
        """Take every packet waiting on the device."""
        while True:
            try:
                packet = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
            elif len(self.queue) >= QUEUE_LIMIT:
                self.overflow += 1
            else:
                self.sequence += 1  # keeps order among packets due at the same instant
                heapq.heappush(self.queue, (now + self.delay, self.sequence, packet))

    def write_due(self, now: float) -> float | None:
        """Send every packet whose time has come; seconds until the next one, or None."""
        while self.queue and self.queue[0][0] <= now:
            _, _, packet = heapq.heappop(self.queue)
            with contextlib.suppress(OSError):  # e.g. no route back yet: lost, like a wire
                os.write(self.fd, packet)
                self.forwarded += 1
        return self.queue[0][0] - now if self.queue else None


def command(forwarder: Forwarder, line: str) -> str:
    """One stdin command's answer."""
    words = line.split()
    if words[:1] == ["set"] and len(words) == 3:
        delay_ms, loss = float(words[1]), float(words[2])
        if delay_ms < 0 or not 0 <= loss <= 1:
            return "error delay must be >= 0 and loss in [0, 1]"
        forwarder.set(delay_ms, loss)
        return "ok"
    if words == ["stats"]:
        return forwarder.stats()
    return f"error unknown command {line.strip()!r}"


def serve(tun: str, delay_ms: float, loss: float, seed: int | None, max_seconds: float) -> None:
    """Forward until stdin closes or ``max_seconds`` pass."""
    forwarder = Forwarder(open_tun(tun), delay_ms, loss, seed)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    pending = b""
    deadline = time.monotonic() + max_seconds
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        wait = forwarder.write_due(now)
        timeout = min(deadline - now, wait if wait is not None else 1.0)
        ready, _, _ = select.select([forwarder.fd, stdin], [], [], max(timeout, 0))
        now = time.monotonic()
        if forwarder.fd in ready:
            forwarder.read_all(now)
        if stdin in ready:
            try:
                data = os.read(stdin, 4096)
            except BlockingIOError:
                continue
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                print(command(forwarder, line.decode(errors="replace")), flush=True)
    print(forwarder.stats(), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="delay and drop packets through a TUN device")
    parser.add_argument("--tun", required=True, help="TUN device to create")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability, 0..1")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop after this")
    args = parser.parse_args(argv)
    serve(args.tun, args.delay_ms, args.loss, args.seed, args.max_seconds)


# ---- the helper (runs in the test) ---------------------------------------------------------


def parse_netem(spec: str) -> tuple[float, float]:
    """``"delay 20ms loss 5%"`` -> ``(20.0, 0.05)``: the part of netem's syntax this
    forwarder can do (a fixed delay in ms/s/us and a random loss in %)."""
    delay_ms = loss = 0.0
    words = spec.split()
    if len(words) % 2:
        raise ValueError(f"unsupported impairment {spec!r}")
    for key, value in zip(words[::2], words[1::2], strict=True):
        number = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s|%)", value)
        if key == "delay" and number and number[2] != "%":
            delay_ms = float(number[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[number[2]]
        elif key == "loss" and number and number[2] == "%":
            loss = float(number[1]) / 100
        else:
            raise ValueError(f"unsupported impairment {spec!r}: {key} {value}")
    return delay_ms, loss


def _ns(ns: Any, *cmd: str) -> None:
    ns.run(*cmd, timeout=20)


@dataclass
class ImpairedLink:
    """A routed link A - R - B whose packets pass the forwarder in R.

    ``addr_a``/``addr_b``: the hosts' addresses; ``gateway_a``/``gateway_b``: R's address on
    each side (A reaches B's subnet through ``gateway_a``, and B A's through ``gateway_b``).
    """

    a: Any
    b: Any
    router: Any
    addr_a: ipaddress.IPv4Interface
    addr_b: ipaddress.IPv4Interface
    gateway_a: ipaddress.IPv4Interface
    gateway_b: ipaddress.IPv4Interface
    dev_a: str
    dev_b: str
    process: subprocess.Popen[str]

    def _ask(self, line: str) -> str:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(line + "\n")
        stdin.flush()
        answer = stdout.readline().strip()
        if not answer or answer.startswith("error"):
            raise RuntimeError(f"impair.py: {line!r} -> {answer or 'no answer'}")
        return answer

    def set(self, delay_ms: float = 0.0, loss: float = 0.0) -> None:
        """Change the one-way delay (each direction) and loss probability (each direction)."""
        self._ask(f"set {delay_ms} {loss}")

    def set_netem(self, spec: str) -> None:
        """The same from a netem spec, e.g. ``"delay 20ms loss 5%"``."""
        self.set(*parse_netem(spec))

    def stats(self) -> dict[str, int]:
        """Packets forwarded, dropped at random and dropped because the queue was full."""
        words = self._ask("stats").split()[1:]
        return {key: int(value) for key, value in (w.split("=") for w in words)}


@contextlib.contextmanager
def impaired_link(
    a: Any,
    b: Any,
    *,
    subnet_a: str = "10.201.1.0/24",
    subnet_b: str = "10.202.1.0/24",
    delay_ms: float = 0.0,
    loss: float = 0.0,
    seed: int | None = None,
    max_seconds: float = 900.0,
) -> Iterator[ImpairedLink]:
    """A and B (:class:`tests.netns.Namespace`) joined through a fresh router namespace:
    A gets ``.1`` of ``subnet_a`` and a route to ``subnet_b``, B ``.2`` of ``subnet_b`` and a
    route to ``subnet_a``. Everything (the router namespace, the forwarder) is gone after."""
    from tests.netns import ROOT, namespace, veth_pair

    net_a, net_b = ipaddress.IPv4Network(subnet_a), ipaddress.IPv4Network(subnet_b)
    with contextlib.ExitStack() as stack:
        router = stack.enter_context(namespace("rtr"))
        side_a = stack.enter_context(veth_pair(a, router, subnet_a))  # A .1, R .2
        side_b = stack.enter_context(veth_pair(router, b, subnet_b))  # R .1, B .2
        for key in ("ipv4.ip_forward=1", "ipv4.conf.all.rp_filter=0",
                    "ipv4.conf.default.rp_filter=0", "ipv4.conf.all.send_redirects=0",
                    "ipv4.conf.default.send_redirects=0"):  # fmt: skip
            _ns(router, "sysctl", "-q", "-w", f"net.{key}")
        tun = "imp0"
        process = router.popen(
            sys.executable, str(Path(__file__).resolve()), "--tun", tun,
            "--delay-ms", str(delay_ms), "--loss", str(loss), "--max-seconds", str(max_seconds),
            *(["--seed", str(seed)] if seed is not None else []),
            stderr=None, env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
        )  # fmt: skip

        def stop() -> None:
            if process.poll() is None:
                assert process.stdin is not None
                with contextlib.suppress(OSError):
                    process.stdin.close()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)

        stack.callback(stop)
        assert process.stdout is not None
        ready = process.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"impair.py did not start: {ready!r}")
        _ns(router, "sysctl", "-q", "-w", f"net.ipv4.conf.{tun}.rp_filter=0")
        _ns(router, "ip", "link", "set", tun, "up")
        _ns(router, "ip", "route", "add", "default", "dev", tun, "table", IMPAIR_TABLE)
        for dev in (side_a.dev_b, side_b.dev_a):
            _ns(router, "ip", "rule", "add", "iif", dev, "lookup", IMPAIR_TABLE)
        _ns(a, "ip", "route", "add", str(net_b), "via", str(side_a.addr_b.ip))
        _ns(b, "ip", "route", "add", str(net_a), "via", str(side_b.addr_a.ip))
        yield ImpairedLink(
            a, b, router, side_a.addr_a, side_b.addr_b, side_a.addr_b, side_b.addr_a,
            side_a.dev_a, side_b.dev_b, process,
        )  # fmt: skip


@dataclass(frozen=True)
class PingStats:
    """What ``ping -q`` says at the end."""

    transmitted: int
    received: int
    rtt_min_ms: float
    rtt_avg_ms: float

    @property
    def lost(self) -> int:
        return self.transmitted - self.received


def ping_stats(
    ns: Any, target: str, count: int = 200, interval: float = 0.01, deadline: float = 60
) -> PingStats:
    """Ping ``target`` ``count`` times from ``ns`` and parse the summary."""
    done = ns.run("ping", "-q", "-n", "-c", str(count), "-i", str(interval), "-W", "2",
                  target, check=False, timeout=deadline + 10)  # fmt: skip
    return parse_ping(done.stdout)


def parse_ping(text: str) -> PingStats:
    """The summary lines of ``ping -q`` output."""
    counts = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", text)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", text)
    if not counts:
        raise AssertionError(f"no ping summary in:\n{text}")
    return PingStats(int(counts[1]), int(counts[2]),
                     float(rtt[1]) if rtt else 0.0, float(rtt[2]) if rtt else 0.0)  # fmt: skip


if __name__ == "__main__":
    main()
