"""tests/impair.py: the netem-style spec parser, and the impaired link really delaying and
dropping packets between two namespaces (root only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.impair import impaired_link, parse_netem, parse_ping, ping_stats
from tests.netns import namespace, require_tun


def test_parse_netem_reads_delay_and_loss() -> None:
    assert parse_netem("delay 20ms loss 5%") == (20.0, 0.05)
    assert parse_netem("loss 0.5%") == (0.0, 0.005)
    assert parse_netem("delay 1s") == (1000.0, 0.0)
    assert parse_netem("delay 500us") == (0.5, 0.0)
    assert parse_netem("") == (0.0, 0.0)


@pytest.mark.parametrize(
    "spec", ["delay 20ms 5ms", "loss 5", "delay 5%", "rate 1mbit", "delay", "loss 5% 25%"]
)
def test_parse_netem_refuses_what_the_forwarder_cannot_do(spec: str) -> None:
    with pytest.raises(ValueError, match="unsupported impairment"):
        parse_netem(spec)


def test_parse_ping_summary() -> None:
    text = (
        "--- 10.0.0.2 ping statistics ---\n"
        "200 packets transmitted, 181 received, 9.5% packet loss, time 2390ms\n"
        "rtt min/avg/max/mdev = 40.201/41.007/44.900/0.610 ms\n"
    )
    stats = parse_ping(text)
    assert (stats.transmitted, stats.received, stats.lost) == (200, 181, 19)
    assert (stats.rtt_min_ms, stats.rtt_avg_ms) == (40.201, 41.007)
    none = parse_ping("3 packets transmitted, 0 received, 100% packet loss, time 2040ms\n")
    assert none.lost == 3 and none.rtt_min_ms == 0.0


@pytest.mark.root
def test_the_link_delays_drops_and_cleans_up() -> None:
    require_tun()
    with namespace("ia") as a, namespace("ib") as b:
        with impaired_link(a, b, seed=1) as link:
            target = str(link.addr_b.ip)
            clean = ping_stats(a, target, count=20)
            assert clean.lost == 0, clean
            link.set(delay_ms=15, loss=0)
            slow = ping_stats(a, target, count=10)
            assert slow.lost == 0 and slow.rtt_min_ms >= 30, slow
            link.set_netem("loss 100%")
            assert ping_stats(a, target, count=5, interval=0.05).received == 0
            link.set(0, 0.3)
            lossy = ping_stats(a, target, count=100)
            assert 0 < lossy.lost < 100, lossy
            stats = link.stats()
            assert stats["dropped"] >= 5 + lossy.lost and stats["forwarded"] > 0, stats
            with pytest.raises(RuntimeError, match="loss in"):
                link.set(0, 1.5)
            router, process = link.router, link.process
        assert process.poll() is not None
        assert subprocess.run(["ip", "netns", "pids", router.name], capture_output=True,
                              check=False).returncode != 0  # fmt: skip
        assert a.ip_json("route", "show", "10.202.1.0/24") == []  # went with the veth


@pytest.mark.root
def test_the_forwarder_stops_by_itself() -> None:
    require_tun()
    with namespace("istop") as ns:
        # stdin stays open: only the deadline can stop it.
        proc = ns.popen(sys.executable, str(Path(__file__).parent / "impair.py"), "--tun",
                        "imp0", "--max-seconds", "0.3")  # fmt: skip
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert proc.stdout is not None and proc.stdin is not None
        lines = proc.stdout.read().splitlines()
        proc.stdout.close()
        proc.stdin.close()
        assert lines == ["ready", "stats forwarded=0 dropped=0 overflow=0"]
        assert "imp0" not in ns.link_names()
