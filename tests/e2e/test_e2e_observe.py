"""``mvpctl stats`` and ``mvpctl ping`` against real daemons, direct and through coturn, and
the metrics endpoint scraped by a real Prometheus server."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mvpd.rtc.aiortc_internals import MAX_SCTP_PACKET_SIZE
from tests.e2e.harness import (
    MVPCTL,
    Daemon,
    Daemons,
    TurnServer,
    base_env,
    free_port,
    wait_until,
)

#: A liveness check every 0.4 s, so the ICE round trip is known quickly.
FAST_CHECKS = {"MVPD_PEER_TIMEOUT": "2"}


def connect(alice: Daemon, bob: Daemon) -> None:
    alice.ctl_ok("connect", "bob")
    wait_until(lambda: bob.peer_state("alice") == "connected", what="bob to see alice")


def stats(daemon: Daemon, peer: str) -> dict[str, Any]:
    return json.loads(daemon.ctl_ok("stats", peer, "--json"))  # type: ignore[no-any-return]


def check_stats_and_ping(alice: Daemon, bob: Daemon, path: str, candidate_type: str) -> None:
    for i in range(5):
        alice.send("bob", text=f"hello {i}")
    assert len(bob.messages("alice", 5)) == 5
    wait_until(lambda: alice.call("stats", peer="bob")["ice_rtt"], what="a timed ICE check")
    wait_until(lambda: alice.call("stats", peer="bob")["rates"]["window_s"] > 0,
               what="two traffic samples")
    result = stats(alice, "bob")
    assert result["status"]["path"] == path
    assert result["pair"]["path"] == path
    assert result["pair"]["local"]["type"] == candidate_type
    assert result["pair"]["local"]["protocol"] == "udp"
    assert 0 < result["ice_rtt"]["last_ms"] < 1000
    assert result["channels"]["mvp"]["messages_out"] == 5
    assert result["sctp"]["cwnd"] > 0 and result["sctp"]["retransmissions"] >= 0
    assert result["history"] and len(result["history"][-1]) == 5
    human = alice.ctl_ok("stats", "bob")
    assert f"path {path}" in human
    assert re.search(rf"pair\s+udp \S+ {candidate_type} -> ", human), human
    assert "ice rtt" in human and "sctp      cwnd" in human and "drops     none" in human
    assert re.search(r"packets out [1-9]\d* / in [1-9]\d*, SACKs out \d+ / in [1-9]", human), human

    out = alice.ctl_ok("ping", "bob", "-c", "3", "-i", "0.2")
    replies = re.findall(r"reply from bob: seq=(\d+) time=([\d.]+) ms path=(\w+)", out)
    assert [seq for seq, _, _ in replies] == ["1", "2", "3"], out
    assert all(p == path and 0 < float(t) < 1000 for _, t, p in replies), out
    assert "3 probes, 3 replies, 0% lost" in out
    # The other side pings too (its own channel), and the bytes do not count as messages.
    back = json.loads(bob.ctl_ok("--json", "ping", "alice", "-c", "1"))
    assert back["path"] == path and back["rtt_ms"] > 0
    assert stats(alice, "bob")["channels"]["mvp"]["messages_out"] == 5


def test_stats_and_ping_on_a_direct_path(daemons: Daemons) -> None:
    alice, bob = daemons.many("alice", "bob", env=FAST_CHECKS)
    connect(alice, bob)
    check_stats_and_ping(alice, bob, "direct", "host")


def test_stats_and_ping_through_coturn_say_relayed(
    turn_server: TurnServer, daemons: Daemons
) -> None:
    alice, bob = daemons.many("alice", "bob", env={**turn_server.daemon_env(), **FAST_CHECKS})
    connect(alice, bob)
    check_stats_and_ping(alice, bob, "relayed", "relay")


def test_sctp_counters_move_with_the_traffic(daemons: Daemons, tmp_path: Path) -> None:
    """`mvpctl stats` shows the association's own counters, and a megabyte through a pipe
    moves them on both sides."""
    alice, bob = daemons.many("alice", "bob")
    connect(alice, bob)
    before = {"alice": stats(alice, "bob")["sctp"], "bob": stats(bob, "alice")["sctp"]}
    size = 1 << 20
    source, copy = tmp_path / "megabyte.bin", tmp_path / "copy.bin"
    source.write_bytes(os.urandom(size))
    with copy.open("wb") as out, subprocess.Popen(
        [*MVPCTL, "--socket", str(bob.socket), "pipe", "alice"], stdin=subprocess.DEVNULL,
        stdout=out, stderr=subprocess.PIPE, env=base_env(),
    ) as reader:
        with source.open("rb") as src:
            sent = alice.ctl("pipe", "bob", stdin=src, stdout=subprocess.DEVNULL)
        _, err = reader.communicate(timeout=60)
    assert sent.returncode == 0 and reader.returncode == 0, (sent.stderr, err)
    assert copy.stat().st_size == size
    after = {"alice": stats(alice, "bob")["sctp"], "bob": stats(bob, "alice")["sctp"]}
    moved = {side: {key: after[side][key] - before[side][key]
                    for key in ("packets_sent", "packets_received", "data_packets_received",
                                "sacks_sent", "sacks_received")} for side in after}
    # The megabyte went alice -> bob in packets of at most MAX_SCTP_PACKET_SIZE bytes,
    # acknowledged by bob's SACKs.
    assert moved["alice"]["packets_sent"] >= size // MAX_SCTP_PACKET_SIZE, moved
    assert moved["bob"]["data_packets_received"] >= size // MAX_SCTP_PACKET_SIZE, moved
    assert moved["bob"]["sacks_sent"] > 0 and moved["alice"]["sacks_received"] > 0, moved
    assert moved["bob"]["packets_received"] >= moved["bob"]["data_packets_received"]
    for side in after.values():
        assert side["state"] == "established" and side["cwnd"] > 0
        assert side["srtt_ms"] is not None and side["rto_ms"] > 0
        assert side["our_rwnd"] > 0 and side["peer_rwnd"] > 0
        # The loss counters are there (tests/test_stats.py makes them move).
        assert all(isinstance(side[key], int) for key in (
            "retransmissions", "fast_retransmits", "t3_expirations", "abandoned"))


def test_stats_and_ping_of_an_unknown_peer_say_so(daemons: Daemons) -> None:
    alice = daemons("alice")
    for command in (("stats", "nobody"), ("ping", "nobody", "-c", "1")):
        done = alice.ctl(*command)
        assert done.returncode == 1
        assert "not connected to nobody" in done.stderr


# --- Prometheus ------------------------------------------------------------------------------


def test_metrics_are_scraped_by_a_real_prometheus(daemons: Daemons, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed (scripts/setup.sh installs it)")
    port = free_port()
    alice = daemons("alice", env={"MVPD_METRICS_LISTEN": f"127.0.0.1:{port}"})
    bob = daemons("bob")
    connect(alice, bob)
    alice.send("bob", text="counted")
    alice.ctl_ok("stats", "bob")
    alice.ctl("disconnect", "nobody")  # a failed call: counted with its error code
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in alice.log.read_text()

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'mvpd_peer_state{peer="bob",state="connected"} 1.0' in text
    assert 'mvpd_signaling_state{state="connected"} 1.0' in text
    assert 'mvpd_rpc_calls_total{method="disconnect",outcome="not-found"} 1.0' in text

    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: mvpd\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )
    try:
        def query(expr: str) -> list[Any]:
            url = (f"http://127.0.0.1:{prom_port}/api/v1/query?"
                   + urllib.parse.urlencode({"query": expr}))
            try:
                reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                return []
            return reply["data"]["result"]  # type: ignore[no-any-return]

        found = wait_until(lambda: query('mvpd_peer_messages_sent_total{peer="bob"}'),
                           timeout=60, interval=0.5, what="Prometheus to scrape mvpd")
        assert found[0]["value"][1] == "1"
        assert query('mvpd_peer_state{peer="bob",state="connected"}')[0]["value"][1] == "1"
        assert query('mvpd_peer_path{peer="bob"}')[0]["metric"]["path"] == "direct"
        calls = query('mvpd_rpc_calls_total{method="stats",outcome="ok"}')
        assert calls and int(calls[0]["value"][1]) >= 1
        up = query('up{job="mvpd"}')
        assert up[0]["value"][1] == "1"
        alice.send("bob", text="counted again")
        wait_until(lambda: [r for r in query('mvpd_peer_messages_sent_total{peer="bob"}')
                            if r["value"][1] == "2"], timeout=30, interval=0.5,
                   what="the next scrape")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_metrics_refuse_non_loopback_unless_allowed(daemons: Daemons, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, "carol", "ws://127.0.0.1:1",
                           env={"MVPD_METRICS_LISTEN": "0.0.0.0:9477"})
    daemon.launch()
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 78  # a configuration error
    assert "metrics_allow_remote" in daemon.log.read_text()
    # Something that is not HTTP, and unknown paths, get an answer and leave it serving.
    port = free_port()
    alice = daemons("alice", env={"MVPD_METRICS_LISTEN": f"127.0.0.1:{port}"})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and goes away mid-request
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"x" * 10000 + b" HTTP/1.1\r\n\r\n")  # an oversized head
        assert sock.recv(100) == b""  # closed without an answer
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    assert missing.value.code == 404
    time.sleep(0.1)
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).status == 200
    assert alice.call("status")["agent_id"] == "alice"
    assert "Traceback" not in alice.log.read_text() and "Unhandled" not in alice.log.read_text()
