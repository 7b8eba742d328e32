"""What aiortc's SCTP does under mvpd's tunnel on a lossy link.

    sudo .venv/bin/python bench/tun_lossy_sctp.py [--seconds 8] [--mtu 1400 4000]
        [--lossy "delay 20ms loss 5%"] [--variant stock ...]

Two daemons in tun mode over an impaired link (tests/impair.py), iperf3 TCP through the
tunnel, while ``sctp_probe`` samples each daemon's SCTP association (congestion window, flight
size, queues, T3-rtx expiries, fast-recovery entries, abandoned chunks) and ``nstat`` counts
the inner TCP's segments and retransmissions. ``--variant`` picks start-up code run in both
daemons before mvpd (see VARIANTS), so variants are compared in one run. Root only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tun_mvpd import tunnel_hosts  # noqa: E402
from tun_udp_relay import iperf3  # noqa: E402

#: Start-up code per variant, run before mvpd in both daemons.
VARIANTS: dict[str, str] = {
    # mvpd as it is.
    "mvpd": "",
    # aiortc's congestion control untouched (mvpd.peer.relax_unreliable_congestion_control
    # turned off).
    "aiortc-cc": "import mvpd.peer as p; p.ADJUST_UNRELIABLE_SCTP = False; ",
}


def daemon_command(variant: str, probe_file: Path) -> tuple[str, ...]:
    setup = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import sctp_probe; "
        f"sctp_probe.install({str(probe_file)!r}); "
        # The SCTP channel is what this bench studies: no datagram path.
        "import mvpd.tun.ice_datagrams as d; d.ENABLED = False; " + VARIANTS[variant]
    )
    return (sys.executable, "-c", setup + "from mvpd.cli import main; main()")


def nstat(ns: object) -> dict[str, int]:
    from tests.netns import Namespace

    assert isinstance(ns, Namespace)
    out = ns.run("nstat", "-az", "TcpOutSegs", "TcpRetransSegs", "TcpExtTCPLostRetransmit",
                 "TcpExtTCPTimeouts", "TcpExtTCPSpuriousRTOs", timeout=10).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        match = re.match(r"(\w+)\s+(\d+)", line)
        if match:
            values[match[1]] = int(match[2])
    return values


def summarize(probe_file: Path) -> str:
    """The sending association's counters (the one that sent the most data chunks)."""
    rows = [json.loads(line) for line in probe_file.read_text().splitlines() if line] if (
        probe_file.exists()) else []
    if not rows:
        return "no samples"
    sender = max(rows, key=lambda r: r["chunks_sent"])["association"]
    series = [r for r in rows if r["association"] == sender]
    last = series[-1]
    cwnds = sorted(r["cwnd"] for r in series)
    queued = sorted(r["dc_q_bytes"] for r in series)
    return (
        f"chunks {last['chunks_sent']}, abandoned {last['abandoned']}, "
        f"fast recoveries {last['fast_recovery']} (undone {last['unreliable_losses_ignored']}), "
        f"T3 {last['t3']}, FORWARD-TSN {last['forward_tsn']}, "
        f"cwnd median {cwnds[len(cwnds) // 2]} B, queued median {queued[len(queued) // 2]} B"
    )


def measure(variant: str, mtu: int, seconds: float, impair: str, work: Path) -> str:
    # Both daemons write to it; the sender's association is told apart by its chunk count.
    probe_a = work / f"{variant}-{mtu}-{'lossy' if impair else 'clean'}.jsonl"
    probe_a.unlink(missing_ok=True)
    with tunnel_hosts(mtu, daemon_command(variant, probe_a), impair) as (a, _):
        before = nstat(a)
        probe_a.unlink(missing_ok=True)
        mbits = iperf3(a, "10.77.0.2", seconds)
        after = nstat(a)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    out = delta.get("TcpOutSegs", 0)
    retrans = delta.get("TcpRetransSegs", 0)
    return (
        f"{variant:<10} MTU {mtu:<5} {impair or 'clean':<20} {mbits:8.2f} Mbit/s  "
        f"inner TCP: {out} segs, "
        f"{retrans} resent ({100 * retrans / max(out, 1):.1f} %), "
        f"RTOs {delta.get('TcpExtTCPTimeouts', 0)}\n    sctp (sender): {summarize(probe_a)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--mtu", type=int, nargs="+", default=[4000])
    parser.add_argument("--lossy", default="delay 20ms loss 5%")
    parser.add_argument("--variant", nargs="+", default=["aiortc-cc", "mvpd"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--clean", action="store_true", help="also measure without loss")
    parser.add_argument("--work", default="/tmp/mvp-sctp-probe")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for impair in ([args.lossy, ""] if args.clean else [args.lossy]):
        for mtu in args.mtu:
            for variant in args.variant:
                print(measure(variant, mtu, args.seconds, impair, work), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
