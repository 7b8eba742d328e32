"""mvpd's tunnel beside wireguard-go and the bare link, in the same namespaces and the same run.

Two network namespaces made for the run (removed afterwards, with every process in them) are
joined by a veth pair; a signaling server and one ``mvpd run`` live in them (the lab of
tests/e2e_tun), and wireguard-go (Debian's package, its defaults: MTU 1420, keys from
``wg genkey``, configured with ``wg``) joins the same two namespaces on its own subnet. For
each path - the bare link (kernel), wireguard-go, and each mvpd variant - the bench measures,
alternating between the paths for ``--rounds`` rounds (medians reported):

- TCP throughput (iperf3, ``--seconds``), and the CPU seconds per Gbit each side's tunnel
  process spent meanwhile (user + system time of wireguard-go / mvpd from /proc; the
  kernel's own share, softirq included, is not in it);
- RTT (ping, 50 x 20 ms);
- UDP loss at ``--udp-rate`` offered (iperf3 -u);
- then the same TCP and RTT over the link impaired by ``--lossy`` (both ways; netem where the
  kernel has it, else tests/impair.py's forwarder in a router namespace).

    sudo .venv/bin/python bench/tun_mvpd.py [--seconds 6] [--rounds 2]
        [--variant channel datagram] [--lossy "delay 20ms loss 5%"] [--udp-rate 300M]

Root only; needs wireguard-go, wg, iperf3. Everything is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tun_udp_relay import ping  # noqa: E402


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


# --- what runs where ------------------------------------------------------------------------

#: Start-up code per mvpd variant (run before mvpd in both daemons) and its TUN MTU (None:
#: mvpd's default).
VARIANTS: dict[str, tuple[str, int | None]] = {
    # TUN packets on the unordered maxRetransmits=0 SCTP data channel only, at the MTU that
    # was its default (4000: aiortc's cost is per message).
    "channel": ("import mvpd.tun.ice_datagrams as d; d.ENABLED = False; ", 4000),
    # As configured by default: the datagram path on the ICE pair when both ends have it.
    "datagram": ("", None),
    # The datagram path with one sendto per datagram on aioice's transport (no batches, no
    # UDP segmentation offload): what the batch sender gains.
    "datagram-sendto": ("import mvpd.tun.ice_datagrams as d; d.BATCH_SEND = False; ", None),
    # The datagram path with every received packet handed to the writer thread (no direct
    # write after a lull): what the direct write gains in round trip.
    "datagram-threaded": ("import mvpd.tun.writer as w; w.DIRECT_AFTER = 0; ", None),
}

WG_SUBNET = "10.78.0"
WG_PORT = 51820
MVPD_SUBNET = "10.77.0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def variant_command(setup: str) -> tuple[str, ...]:
    """``mvpd`` run after ``setup`` (tolerant of a tree without the module it tunes)."""
    if not setup:
        return (sys.executable, "-c", "from mvpd.cli import main; main()")
    code = f"try:\n    {setup}\nexcept ImportError:\n    pass\nfrom mvpd.cli import main; main()"
    return (sys.executable, "-c", code)


def mvpd_config(host: int, mtu: int | None) -> str:
    """The config of alice (``host`` 1) or bob (2): its tunnel address, the MTU (None: mvpd's
    default) and the other one as a tun peer with its /32."""
    peer, other = ("bob", 2) if host == 1 else ("alice", 1)
    return (f"tun:\n  address: {MVPD_SUBNET}.{host}/24\n" + (f"  mtu: {mtu}\n" if mtu else "")
            + f"peers:\n  {peer}: {{mode: tun, allowed_ips: [{MVPD_SUBNET}.{other}/32]}}\n")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class WireGuardPair:
    """wireguard-go in two namespaces, peered over ``addr_a`` <-> ``addr_b``."""

    def __init__(self, tmp: Path, a: Any, b: Any, addr_a: str, addr_b: str) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        keys = []
        for name in ("a", "b"):
            private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                     check=True).stdout.strip()
            public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True,
                                    text=True, check=True).stdout.strip()
            path = tmp / f"wg-{name}.key"
            path.write_text(private + "\n")
            path.chmod(0o600)
            keys.append((path, public))
        sides = ((a, 1, keys[0], keys[1], addr_b), (b, 2, keys[1], keys[0], addr_a))
        for ns, host, (own_key, _), (_, peer_pub), endpoint in sides:
            # Its control socket is /var/run/wireguard/<dev>.sock, shared by all namespaces:
            # a name per side and per run.
            dev = f"wgb{os.getpid() % 100000}-{host}"
            log = tmp / f"wireguard-go-{host}.log"
            with log.open("wb") as out:
                proc = ns.popen("wireguard-go", "-f", dev, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
            self.procs.append(proc)
            deadline = time.monotonic() + 10
            while dev not in ns.link_names():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"wireguard-go did not create its device: "
                                       f"{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
            peer_ip = f"{WG_SUBNET}.{3 - host}/32"
            ns.run("wg", "set", dev, "private-key", str(own_key), "listen-port",
                   str(WG_PORT), "peer", peer_pub, "allowed-ips", peer_ip, "endpoint",
                   f"{endpoint}:{WG_PORT}")
            ns.run("ip", "address", "add", f"{WG_SUBNET}.{host}/24", "dev", dev)
            ns.run("ip", "link", "set", dev, "up")
        a.run("ping", "-c", "3", "-i", "0.2", "-w", "15", f"{WG_SUBNET}.2", timeout=30)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --- measurements ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One path measured once."""

    tcp_mbits: float
    rtt_ms: float
    mdev_ms: float
    cpu_per_gbit: tuple[float, float] | None = None  # (sender side, receiver side)
    udp_loss_pct: float | None = None


@dataclass
class PathResult:
    label: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, get: Callable[[Sample], float | None]) -> float | None:
        values = [v for v in map(get, self.samples) if v is not None]
        return statistics.median(values) if values else None


def tcp(a: Any, target: str, seconds: float, pids: list[int]) -> tuple[float, Any]:
    """iperf3 TCP from ``a`` to ``target``: Mbit/s and CPU seconds per Gbit of ``pids``."""
    before = [cpu_seconds(p) for p in pids]
    result = a.run("iperf3", "-c", target, "-t", str(seconds), "-J", timeout=seconds + 30)
    after = [cpu_seconds(p) for p in pids]
    end = json.loads(result.stdout)["end"]["sum_received"]
    gbits = end["bytes"] * 8 / 1e9
    cpu = None
    if pids and gbits > 0:
        cpu = tuple((y - x) / gbits for x, y in zip(before, after, strict=True))
    return float(end["bits_per_second"]) / 1e6, cpu


UDP_PORT = 5202


def udp_loss(a: Any, b: Any, target: str, seconds: float, rate: str) -> float | None:
    """Percent of iperf3 -u datagrams lost at ``rate`` offered from ``a`` to ``target`` (in
    ``b``); None when iperf3 never finished (its control connection starved behind the
    flood). A one-off server per test, so a stuck test cannot block the next."""
    server = b.popen("iperf3", "-s", "-1", "-p", str(UDP_PORT), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        result = a.run("iperf3", "-c", target, "-p", str(UDP_PORT), "-u", "-b", rate, "-t",
                       str(seconds), "-J", timeout=seconds + 20)
        return float(json.loads(result.stdout)["end"]["sum"]["lost_percent"])
    except subprocess.TimeoutExpired:
        return None
    finally:
        server.kill()
        server.wait(5)


def measure_path(
    a: Any, b: Any, target: str, pids: list[int], seconds: float, udp_rate: str | None
) -> Sample:
    rtt, mdev = ping(a, target)
    mbits, cpu = tcp(a, target, seconds, pids)
    loss = udp_loss(a, b, target, seconds, udp_rate) if udp_rate else None
    return Sample(mbits, rtt, mdev, cpu, loss)


def run_condition(
    variants: list[str], rounds: int, seconds: float, lossy: str, udp_rate: str | None
) -> dict[str, PathResult]:
    """Every path in one lab (impaired by ``lossy`` if set), alternating, ``rounds`` times
    per mvpd variant."""
    from tests.e2e.harness import wait_until
    from tests.e2e_tun.harness import ping as tunnel_ping
    from tests.e2e_tun.harness import tun_lab

    suffix = f", {lossy}" if lossy else ""
    results: dict[str, PathResult] = {}

    def record(label: str, sample: Sample) -> None:
        results.setdefault(label, PathResult(label)).samples.append(sample)
        print(f"  {label}: {sample}", file=sys.stderr, flush=True)

    first_setup, first_mtu = VARIANTS[variants[0]]
    configs = {"alice": mvpd_config(1, first_mtu), "bob": mvpd_config(2, first_mtu)}
    with tempfile.TemporaryDirectory(prefix="mvp-bench-") as tmp, tun_lab(
        Path(tmp), ["alice", "bob"], configs, mvpd=variant_command(first_setup),
        impairable=bool(lossy),
    ) as lab:
        alice, bob = lab["alice"], lab["bob"]
        if lossy:
            lab.impair(lossy)
        a, b = alice.ns, bob.ns
        server = b.popen("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wg = WireGuardPair(Path(tmp), a, b, alice.veth_address, bob.veth_address)
        try:
            for i, name in enumerate(variants):
                setup, mtu = VARIANTS[name]
                if i:
                    for host, last in ((alice, 1), (bob, 2)):
                        host.stop()
                        host.config_text = mvpd_config(last, mtu)
                        host.start(lab.url, mvpd=variant_command(setup))
                    # Serving is not registered: over the impaired link the WebSocket takes
                    # a few round trips, and an offer to an unregistered id is refused.
                    for host in (alice, bob):
                        wait_until(lambda h=host: h.call("status")["signaling"]["state"]
                                   == "connected", 30, what=f"{host.agent_id} to register")
                lab.connect("alice", "bob")
                tunnel_ping(a, f"{MVPD_SUBNET}.2")
                mvpd_pids = [h.proc.pid for h in (alice, bob) if h.proc is not None]
                for _ in range(rounds):
                    record(f"bare link, kernel{suffix}",
                           measure_path(a, b, bob.veth_address, [], seconds, udp_rate))
                    record(f"wireguard-go{suffix}",
                           measure_path(a, b, f"{WG_SUBNET}.2", wg.pids, seconds, udp_rate))
                    record(f"mvpd tun, {name}{suffix}",
                           measure_path(a, b, f"{MVPD_SUBNET}.2", mvpd_pids, seconds, udp_rate))
        finally:
            wg.close()
            server.kill()
            server.wait(5)
    return results


def format_rows(results: dict[str, PathResult], udp_rate: str | None) -> list[str]:
    wg = next(r for label, r in results.items() if label.startswith("wireguard-go"))
    wg_tcp = wg.median(lambda s: s.tcp_mbits) or 0.0
    lines = []
    for label, r in results.items():
        mbits = r.median(lambda s: s.tcp_mbits) or 0.0
        ratio = f"{mbits / wg_tcp:.2f}x" if wg_tcp else "-"
        send = r.median(lambda s: s.cpu_per_gbit[0] if s.cpu_per_gbit else None)
        recv = r.median(lambda s: s.cpu_per_gbit[1] if s.cpu_per_gbit else None)
        cpu = f"{send:.2f} / {recv:.2f}" if send is not None and recv is not None else "-"
        loss = r.median(lambda s: s.udp_loss_pct)
        lines.append(
            f"| {label} | {mbits:.1f} Mbit/s | {ratio} | "
            f"{r.median(lambda s: s.rtt_ms) or 0:.3f} ms | "
            f"{r.median(lambda s: s.mdev_ms) or 0:.3f} ms | "
            f"{'-' if loss is None else f'{loss:.2f} %'} | {cpu} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="iperf3 duration per path")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per variant")
    parser.add_argument("--variant", nargs="+", default=["channel", "datagram"],
                        choices=list(VARIANTS))
    parser.add_argument("--lossy", default="delay 20ms loss 5%",
                        help='netem-style impairment for the lossy rows ("" for none)')
    parser.add_argument("--udp-rate", default="300M", help="iperf3 -u offered rate")
    args = parser.parse_args()
    from tests.netns import tun_unavailable_reason

    reason = tun_unavailable_reason()
    missing = [tool for tool in ("wireguard-go", "wg", "iperf3") if not shutil.which(tool)]
    if reason or missing:
        print(f"cannot run: {reason or 'missing ' + ', '.join(missing)}", file=sys.stderr)
        return 2
    load = os.getloadavg()
    print(f"clean link ({args.rounds} rounds per variant)", file=sys.stderr)
    clean = run_condition(args.variant, args.rounds, args.seconds, "", args.udp_rate)
    lossy = {}
    if args.lossy:
        print(f"lossy link: {args.lossy}", file=sys.stderr)
        lossy = run_condition(args.variant, args.rounds, args.seconds, args.lossy, None)
    print(f"\nTUN tunnels: iperf3 TCP {args.seconds:g} s, ping 50 x 20 ms, UDP {args.udp_rate} "
          f"offered; medians of alternating rounds; load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| path | TCP | vs wireguard-go | RTT avg | mdev | UDP loss | CPU s/Gbit send / recv |")
    print("|---|---|---|---|---|---|---|")
    for line in format_rows(clean, args.udp_rate):
        print(line)
    if lossy:
        for line in format_rows(lossy, None):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
