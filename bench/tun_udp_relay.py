"""The ceiling for a Python data plane: two TUN devices joined by a plain UDP relay.

Two network namespaces made for the run (removed afterwards) are joined by a veth pair
(10.201.0.1 <-> 10.201.0.2). In each, a relay process owns a TUN device (10.202.0.1/24 and
10.202.0.2/24) built with mvpd.tun.device and forwards every packet it reads to the other relay
over UDP on the veth, and every datagram it receives into its device. iperf3 and ping then
run over the bare veth and over the tunnel, and the results are printed side by side.

    sudo .venv/bin/python bench/tun_udp_relay.py [--seconds 5] [--mtu 1400] [--no-uvloop]

Everything is bounded: the relays stop by themselves after their time is up, and all
processes inside the namespaces are killed when they are removed. Root only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RELAY_PORT = 40404
VETH_SUBNET = "10.201.0.0/24"
TUN_A, TUN_B = "10.202.0.1", "10.202.0.2"
SOCKET_BUFFER = 4 * 1024 * 1024
BATCH = 64


# --- the relay (runs inside a namespace) ---------------------------------------------------


async def relay(tun_address: str, local: str, remote: str, mtu: int, seconds: float) -> None:
    """Forward packets between a fresh TUN device and UDP ``local`` <-> ``remote``."""
    from mvpd.tun.device import TunDevice

    dev = TunDevice.create("bench%d")
    await dev.configure(tun_address, mtu=mtu)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.bind((local, RELAY_PORT))
    # Not connect()ed: a connected UDP socket gets ICMP errors (port unreachable while the
    # other relay starts), and uvloop then silently stops watching it.
    sock.setblocking(False)
    target = (remote, RELAY_PORT)
    sendto = sock.sendto
    recv = sock.recv
    write = dev.write
    dropped = 0

    def from_tun(packets: list[bytes]) -> None:
        nonlocal dropped
        for packet in packets:
            try:
                sendto(packet, target)
            except OSError:  # full socket buffer
                dropped += 1

    def from_udp() -> None:
        for _ in range(BATCH):
            try:
                data = recv(65535)
            except BlockingIOError:
                return
            except OSError:
                continue
            write(data)

    loop = asyncio.get_running_loop()
    dev.start_reading(from_tun)
    loop.add_reader(sock.fileno(), from_udp)
    print("ready", dev.name, flush=True)
    await asyncio.sleep(seconds)  # self-stopping
    loop.remove_reader(sock.fileno())
    dev.close()
    sock.close()
    print(f"relay {tun_address}: {vars(dev.stats)} send drops {dropped}", file=sys.stderr)


def run_relay(args: argparse.Namespace) -> None:
    coro = relay(args.tun_address, args.local, args.remote, args.mtu, args.seconds)
    if args.uvloop:
        try:
            import uvloop

            uvloop.run(coro)
            return
        except ImportError:
            pass
    asyncio.run(coro)


# --- the measurement (runs outside) -------------------------------------------------------


def iperf3(ns: object, server: str, seconds: float) -> float:
    """TCP throughput from ``ns`` to ``server`` in Mbit/s."""
    from tests.netns import Namespace

    assert isinstance(ns, Namespace)
    result = ns.run("iperf3", "-c", server, "-t", str(seconds), "-J", timeout=seconds + 30)
    data = json.loads(result.stdout)
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6


def ping(ns: object, target: str, count: int = 50) -> tuple[float, float]:
    """Average and mean deviation of ping RTT in ms."""
    from tests.netns import Namespace

    assert isinstance(ns, Namespace)
    result = ns.run("ping", "-q", "-c", str(count), "-i", "0.02", "-W", "2", target, timeout=60)
    match = re.search(r"= [\d.]+/([\d.]+)/[\d.]+/([\d.]+) ms", result.stdout)
    if not match:
        raise RuntimeError(f"unexpected ping output: {result.stdout}")
    return float(match[1]), float(match[2])


def measure(args: argparse.Namespace) -> int:
    from tests.netns import netns_unavailable_reason, tun_unavailable_reason, two_hosts

    reason = netns_unavailable_reason() or tun_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    relay_seconds = 4 * args.seconds + 30
    with two_hosts(VETH_SUBNET, label="bench") as link:
        a, b = link.a, link.b
        server = b.popen("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        relays = []
        for ns, tun, local, remote in (
            (a, f"{TUN_A}/24", link.addr_a.ip, link.addr_b.ip),
            (b, f"{TUN_B}/24", link.addr_b.ip, link.addr_a.ip),
        ):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--relay", tun, str(local)]
            cmd += [str(remote), "--mtu", str(args.mtu), "--seconds", str(relay_seconds)]
            if not args.uvloop:
                cmd.append("--no-uvloop")
            relays.append(ns.popen(*cmd, stderr=None))
        for proc in relays:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                print("a relay did not start", file=sys.stderr)
                return 1
        time.sleep(0.5)  # let the iperf3 server bind
        rows = []
        for label, target in (("veth, kernel", str(link.addr_b.ip)), ("TUN + UDP relay", TUN_B)):
            rtt, mdev = ping(a, target)
            mbits = iperf3(a, target, args.seconds)
            rows.append((label, mbits, rtt, mdev))
        server.kill()
        for proc in relays:
            proc.kill()
            proc.wait(timeout=10)
    loop_name = "uvloop" if args.uvloop else "asyncio"
    print(f"\nTUN relay over plain UDP ({loop_name}, TUN MTU {args.mtu}, {args.seconds}s iperf3)")
    print(f"{'path':<18} {'throughput':>14} {'RTT avg':>10} {'mdev':>8}")
    for label, mbits, rtt, mdev in rows:
        print(f"{label:<18} {mbits:>9.0f} Mbit/s {rtt:>7.3f} ms {mdev:>5.3f} ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per path")
    parser.add_argument("--mtu", type=int, default=1400, help="MTU of the TUN devices")
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    parser.add_argument("--relay", nargs=3, metavar=("TUN_ADDR", "LOCAL", "REMOTE"))
    args = parser.parse_args()
    if args.relay:
        args.tun_address, args.local, args.remote = args.relay
        run_relay(args)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
