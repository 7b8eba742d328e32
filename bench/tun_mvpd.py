"""TUN mode through mvpd, beside the bare veth and the plain-UDP Python relay, in one run.

Two network namespaces made for the run (removed afterwards, with every process in them)
are joined by a veth pair; a signaling server and one ``mvpd run`` live in each (the same
lab as tests/e2e_tun). For each variant - TUN MTU, and packets batched per message or one
per message - the daemons connect in tun mode, then ping (RTT) and iperf3 (TCP throughput)
run through the tunnel. The bare veth and bench/tun_udp_relay.py (a TUN-to-UDP relay in
Python: the ceiling for a Python data plane) run in the same invocation.

    sudo .venv/bin/python bench/tun_mvpd.py [--seconds 5] [--mtu 1160 1400 4000 8000]
        [--lossy "delay 20ms loss 5%"]

``--lossy`` adds two rows over an impaired link (both ways; netem where the kernel has it,
else tests/impair.py's forwarder in a router namespace): kernel TCP on the bare link and the
tunnel at each ``--mtu`` (one packet per message) over it. ``--lossy ""`` leaves them out.

Root only. Everything is bounded: iperf3 runs ``--seconds``, ping 50 packets.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tun_udp_relay import iperf3, ping  # noqa: E402


def daemon_command(batch: bool) -> tuple[str, ...]:
    """``mvpd`` with packets batched per message (up to 8 KiB) or one per message (the
    default)."""
    setup = "import mvpd.transports.tun as t; t.DEFAULT_BATCH_SIZE = 8192; " if batch else ""
    return (sys.executable, "-c", setup + "from mvpd.cli import main; main()")


@contextlib.contextmanager
def tunnel_hosts(
    mtu: int, mvpd: tuple[str, ...], impair: str = ""
) -> Iterator[tuple[Any, Any]]:
    """Two namespaces, alice (10.77.0.1) and bob (10.77.0.2), joined by an mvpd tunnel at
    ``mtu`` (their link impaired by ``impair``), with an iperf3 server on bob and one ping
    through the tunnel done: yields the two namespaces."""
    from tests.e2e_tun.harness import tun_lab

    configs = {
        "alice": f"tun:\n  address: 10.77.0.1/24\n  mtu: {mtu}\n"
                 "peers:\n  bob: {mode: tun, allowed_ips: [10.77.0.2/32]}\n",
        "bob": f"tun:\n  address: 10.77.0.2/24\n  mtu: {mtu}\n"
               "peers:\n  alice: {mode: tun, allowed_ips: [10.77.0.1/32]}\n",
    }
    with tempfile.TemporaryDirectory(prefix="mvp-bench-") as tmp, tun_lab(
        Path(tmp), ["alice", "bob"], configs, mvpd=mvpd, impairable=bool(impair),
    ) as lab:
        lab.connect("alice", "bob")
        if impair:
            lab.impair(impair)
        a, b = lab["alice"].ns, lab["bob"].ns
        server = b.popen("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            a.run("ping", "-c", "3", "-i", "0.2", "-w", "15", "10.77.0.2", timeout=30)
            yield a, b
        finally:
            server.kill()
            server.wait(5)


def measure_tunnel(
    mtu: int, batch: bool, seconds: float, impair: str = ""
) -> tuple[float, float, float]:
    with tunnel_hosts(mtu, daemon_command(batch), impair) as (a, _):
        rtt, mdev = ping(a, "10.77.0.2")
        mbits = iperf3(a, "10.77.0.2", seconds)
    return mbits, rtt, mdev


def measure_veth(seconds: float) -> tuple[float, float, float]:
    from tests.netns import two_hosts

    with two_hosts(label="bveth") as link:
        server = link.b.popen("iperf3", "-s", stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            rtt, mdev = ping(link.a, str(link.addr_b.ip))
            mbits = iperf3(link.a, str(link.addr_b.ip), seconds)
        finally:
            server.kill()
            server.wait(5)
    return mbits, rtt, mdev


def measure_bare_impaired(spec: str, seconds: float) -> tuple[float, float, float]:
    """Kernel TCP over the bare link impaired by ``spec`` both ways."""
    from tests.impair import impaired_link
    from tests.netns import namespace, netem, netem_unavailable_reason, two_hosts

    with contextlib.ExitStack() as stack:
        if netem_unavailable_reason() is None:
            pair = stack.enter_context(two_hosts(label="blossy"))
            a, b, target = pair.a, pair.b, str(pair.addr_b.ip)
            netem(a, pair.dev_a, spec)
            netem(b, pair.dev_b, spec)
        else:
            a = stack.enter_context(namespace("blossya"))
            b = stack.enter_context(namespace("blossyb"))
            link = stack.enter_context(impaired_link(a, b))
            link.set_netem(spec)
            target = str(link.addr_b.ip)
        server = b.popen("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            rtt, mdev = ping(a, target)
            mbits = iperf3(a, target, seconds)
        finally:
            server.kill()
            server.wait(5)
    return mbits, rtt, mdev


def measure_relay(seconds: float, mtu: int) -> list[str]:
    """The relay bench's own result rows (it builds its own namespaces)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tun_udp_relay.py"), "--seconds", str(seconds),
         "--mtu", str(mtu)], capture_output=True, text=True, timeout=4 * seconds + 120,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.startswith("TUN + UDP relay")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per path")
    parser.add_argument("--mtu", type=int, nargs="+", default=[1160, 1400, 4000, 8000])
    parser.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                        help="skip the one-packet-per-message variants")
    parser.add_argument("--lossy", default="delay 20ms loss 5%",
                        help='netem-style impairment for the lossy rows ("" for none)')
    args = parser.parse_args()
    from tests.netns import tun_unavailable_reason

    reason = tun_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    rows: list[tuple[str, float, float, float]] = []
    rows.append(("veth, kernel", *measure_veth(args.seconds)))
    for mtu in args.mtu:
        for batch in (True, False) if args.unbatched else (True,):
            label = f"mvpd tun, MTU {mtu}, {'batched' if batch else 'one per message'}"
            rows.append((label, *measure_tunnel(mtu, batch, args.seconds)))
            print(f"{label}: {rows[-1][1]:.1f} Mbit/s, {rows[-1][2]:.2f} ms", file=sys.stderr)
    if args.lossy:
        rows.append((f"bare link, {args.lossy}", *measure_bare_impaired(args.lossy,
                                                                       args.seconds)))
        for mtu in args.mtu:
            rows.append((f"mvpd tun, MTU {mtu}, {args.lossy}",
                         *measure_tunnel(mtu, False, args.seconds, args.lossy)))
    relay = measure_relay(args.seconds, 1400)
    print(f"\nTUN mode ({args.seconds:g}s iperf3 TCP, ping 50 x 20 ms; uvloop)")
    print(f"{'path':<40} {'throughput':>14} {'RTT avg':>10} {'mdev':>8}")
    for label, mbits, rtt, mdev in rows:
        print(f"{label:<40} {mbits:>9.1f} Mbit/s {rtt:>7.3f} ms {mdev:>5.3f} ms")
    for line in relay:
        print(line.replace("TUN + UDP relay", "Python TUN + UDP relay, MTU 1400", 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
