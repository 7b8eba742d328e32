"""mvpd against its baselines, side by side in one run, as ratios.

    .venv/bin/python bench/main_job.py            # the full run (a few minutes)
    .venv/bin/python bench/main_job.py --quick    # a smoke run (well under a minute)

What runs (all on loopback, ICE server list explicitly empty, in a temporary directory):

* a standalone signaling server (``mvpd signal --listen 127.0.0.1:0``);
* daemons ``bench-a`` and ``bench-b`` (``mvpd run``), and ``bench-hub`` for the memory test,
  each with ``AGENT_CONFIG`` pointing at a file written here (``/etc`` is never read);
* ``bench/bare_aiortc.py``: two processes joined by a bare aiortc data channel, the baseline
  for throughput, echo round trip and connect time;
* ``bench/peer_swarm.py``: N ``AgentCore`` peers in ONE helper process (distinct ids, one
  signaling client each), the far ends for the hub's memory test.

Measured, each next to a baseline measured in the same run:

* bulk throughput ``mvpctl pipe`` A -> B vs the bare channel (64 KiB messages, reliable,
  respecting bufferedAmount), MB/s from the receiver's first to its last byte;
* 100-byte round trip through the daemons (bytes mode; an RPC client on A sends, an RPC client
  on B echoes what it receives) vs the bare echo, p50 and p99;
* data-path ping (the ``ping`` RPC: a 100-byte mvp-ping probe timed by the daemon) vs a bare
  echo run right after it, p50 and p99;
* connect time (``connect`` RPC, and the ``mvpctl connect`` process) vs bare offer-to-open;
* hub RSS with 1, 10 and 50 peers; growth per peer against the 1-peer figure;
* ``mvpctl status`` as a process vs ``python -c pass``; the status RPC alone (connect + call
  through :mod:`mvpctl.client`) vs a bare Unix-socket connect + echo to a tiny server.

Every child is started with a death signal and stopped by PID at the end, also on failure,
Ctrl-C, SIGTERM or the overall time limit. No figure is asserted: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import (
    MVPCTL,
    MVPD,
    REPO,
    Children,
    clean_env,
    daemon_env,
    rss_kib,
    write_config,
)

from mvpctl.client import Client
from mvpd.proto.ping import HEADER_SIZE

BENCH = Path(__file__).resolve().parent
ECHO_SIZE = 100
MiB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """How much of everything to do."""

    connects: int
    echoes: int
    bulk_bytes: int
    bulk_rounds: int
    starts: int
    rpc_calls: int
    peer_counts: tuple[int, ...]
    time_limit: float


FULL = Plan(
    connects=5,
    echoes=500,
    bulk_bytes=128 * MiB,  # seconds per round at either rate: start-up does not count
    bulk_rounds=3,
    starts=10,
    rpc_calls=300,
    peer_counts=(1, 10, 50),
    time_limit=900,
)
QUICK = Plan(
    connects=2,
    echoes=50,
    bulk_bytes=2 * MiB,
    bulk_rounds=1,
    starts=3,
    rpc_calls=50,
    peer_counts=(1, 3),
    time_limit=120,
)


@dataclass
class Row:
    """One line of the result table."""

    measure: str
    value: float
    baseline: float | None
    unit: str
    baseline_is: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"  ratio {row.ratio:.2f}" if row.ratio is not None else ""
        progress(f"   {row.measure}: {fmt(row.value)} {row.unit}{ratio}")


class BenchTimeout(Exception):
    """The overall time limit passed."""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# --- the setup -------------------------------------------------------------------------------


class Setup:
    """The signaling server, the daemons, and where they keep their files."""

    def __init__(self, children: Children, work: Path) -> None:
        self.children = children
        self.work = work
        self.config = write_config(work / "agent.yaml")
        self.url = ""
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    def socket(self, agent_id: str) -> Path:
        return self.work / f"{agent_id}.sock"

    def start_signaling(self) -> None:
        proc = self.children.start(
            "signaling",
            [MVPD, "signal", "--listen", "127.0.0.1:0"],
            env=clean_env(),
            cwd=self.work,
            stdout=subprocess.PIPE,
            stderr=open_log(self.work / "signal.log"),
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode() if ready else ""
        match = re.match(r"listening on (ws://\S+)", line)
        if not match:
            raise RuntimeError(f"the signaling server did not start: {line!r}")
        self.url = match[1]

    def start_daemon(self, agent_id: str) -> None:
        self.daemons[agent_id] = self.children.start(
            f"mvpd {agent_id}",
            [MVPD, "run"],
            env=daemon_env(agent_id, self.url, self.socket(agent_id), self.config),
            cwd=self.work,
            stderr=open_log(self.work / f"{agent_id}.log"),
        )

    def wait_ready(self, agent_id: str, timeout: float = 60.0) -> None:
        """Until the daemon answers on its socket and is registered with signaling."""
        deadline = time.monotonic() + timeout
        proc = self.daemons[agent_id]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mvpd {agent_id} exited with {proc.returncode}: "
                    f"{tail(self.work / f'{agent_id}.log')}"
                )
            if self.socket(agent_id).exists():
                with contextlib.suppress(Exception), self.client(agent_id) as client:
                    if client.call("status")["signaling"]["state"] == "connected":
                        return
            time.sleep(0.05)
        raise RuntimeError(f"mvpd {agent_id} was not ready within {timeout:g} s")

    def client(self, agent_id: str, timeout: float = 60.0) -> Client:
        return Client.connect(self.socket(agent_id), timeout=timeout, client="bench")

    def mvpctl(self, agent_id: str, *args: str) -> list[str | os.PathLike[str]]:
        return [MVPCTL, "--socket", self.socket(agent_id), *args]

    def peers_of(self, agent_id: str) -> list[str]:
        with self.client(agent_id) as client:
            return [p["peer"] for p in client.call("peers")]


def open_log(path: Path) -> Any:
    return path.open("ab")


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def run_bare(children: Children, work: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    """One run of bench/bare_aiortc.py; its JSON result."""
    proc = children.start(
        "bare aiortc",
        [sys.executable, BENCH / "bare_aiortc.py", "--timeout", str(timeout), *args],
        env=clean_env(),
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=open_log(work / "bare.log"),
    )
    try:
        out, _ = proc.communicate(timeout=timeout + 30)
    finally:
        children.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"bare_aiortc failed ({proc.returncode}): {tail(work / 'bare.log')}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# --- the measurements ------------------------------------------------------------------------


def measure_status(setup: Setup, plan: Plan, report: Report) -> None:
    progress("== mvpctl status latency")
    children, work = setup.children, setup.work
    env = clean_env()
    python_s, status_s = [], []
    for _ in range(plan.starts):  # alternate, so noise hits both alike
        python_s.append(
            children.run_timed("python -c pass", [sys.executable, "-c", "pass"], env=env, cwd=work)
        )
        status_s.append(
            children.run_timed(
                "mvpctl status", setup.mvpctl("bench-a", "status"), env=env, cwd=work
            )
        )
    report.add(
        Row(
            "mvpctl status, process (median)",
            statistics.median(status_s) * 1000,
            statistics.median(python_s) * 1000,
            "ms",
            "python -c pass",
        )
    )

    echo_path = work / "echo.sock"
    server = children.start(
        "unix echo",
        [sys.executable, "-c", UNIX_ECHO_SERVER, str(echo_path)],
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()
        rpc_s, bare_s, call_s = [], [], []
        with setup.client("bench-a") as open_client:
            for _ in range(plan.rpc_calls):
                bare_s.append(unix_echo_once(echo_path))
                started = time.perf_counter()
                with setup.client("bench-a") as client:
                    client.call("status")
                rpc_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                open_client.call("status")
                call_s.append(time.perf_counter() - started)
    finally:
        children.stop(server)
    bare = statistics.median(bare_s) * 1000
    report.add(
        Row(
            "status RPC: connect+hello+call (median)",
            statistics.median(rpc_s) * 1000,
            bare,
            "ms",
            "Unix socket connect+echo",
        )
    )
    report.add(
        Row(
            "status RPC: call on open connection (median)",
            statistics.median(call_s) * 1000,
            bare,
            "ms",
            "Unix socket connect+echo",
        )
    )


UNIX_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(64); s.settimeout(30)
print("ready", flush=True)
while True:
    try:
        c, _ = s.accept()
    except (TimeoutError, OSError):
        break
    with c:
        data = c.recv(65536)
        c.sendall(data)
"""


def unix_echo_once(path: Path) -> float:
    import socket

    started = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"\x00\x00\x00\x10" + b"status-request!!")
        sock.recv(65536)
    return time.perf_counter() - started


def connect_ab(setup: Setup) -> float:
    with setup.client("bench-a") as client:
        started = time.perf_counter()
        client.call(
            "connect", peer="bench-b", mode="bytes", wait=True, timeout=30, reply_timeout=60
        )
        return time.perf_counter() - started


def disconnect_ab(setup: Setup) -> None:
    with setup.client("bench-a") as client:
        client.call("disconnect", peer="bench-b")
    deadline = time.monotonic() + 15
    while setup.peers_of("bench-a") or setup.peers_of("bench-b"):
        if time.monotonic() > deadline:
            raise RuntimeError("the disconnected peers did not go away within 15 s")
        time.sleep(0.05)


def measure_connect(setup: Setup, plan: Plan, report: Report) -> None:
    progress("== connect time")
    connect_ab(setup)  # warm up, like the bare run
    disconnect_ab(setup)
    rpc_s, proc_s = [], []
    for _ in range(plan.connects):
        rpc_s.append(connect_ab(setup))
        disconnect_ab(setup)
        proc_s.append(
            setup.children.run_timed(
                "mvpctl connect",
                setup.mvpctl("bench-a", "connect", "bench-b", "--mode", "bytes"),
                env=clean_env(),
                cwd=setup.work,
            )
        )
        disconnect_ab(setup)
    bare = run_bare(setup.children, setup.work, "--connects", str(plan.connects))
    bare_ms = statistics.median(bare["connect_s"]) * 1000
    report.add(
        Row(
            "connect: RPC to channel open (median)",
            statistics.median(rpc_s) * 1000,
            bare_ms,
            "ms",
            "bare offer-to-open",
        )
    )
    report.add(
        Row(
            "connect: mvpctl connect process (median)",
            statistics.median(proc_s) * 1000,
            bare_ms,
            "ms",
            "bare offer-to-open",
            "includes the mvpctl process start",
        )
    )
    report.facts["bare_uvloop"] = bare["uvloop"]


def measure_echo(setup: Setup, plan: Plan, report: Report) -> None:
    progress("== 100-byte round trip")
    connect_ab(setup)
    children = setup.children
    echoer = children.start(
        "echoer",
        [
            sys.executable,
            __file__,
            "--echo-socket",
            setup.socket("bench-b"),
            "--echo-peer",
            "bench-a",
            "--echo-timeout",
            "120",
        ],
        env=clean_env(),
        cwd=setup.work,
        stdout=subprocess.PIPE,
    )
    try:
        assert echoer.stdout is not None
        ready, _, _ = select.select([echoer.stdout], [], [], 30)
        if not ready or echoer.stdout.readline().strip() != b"ready":
            raise RuntimeError("the echoer did not start")
        rtts = []
        with setup.client("bench-a") as client:
            stream = client.subscribe("recv", peer="bench-b", follow=True)
            warmup = min(plan.echoes, 20)
            for index in range(warmup + plan.echoes):
                payload = os.urandom(ECHO_SIZE)
                started = time.perf_counter()
                request = client.request("send", peer="bench-b", data=payload)
                event = client.next_event(stream.sub, timeout=10)
                elapsed = time.perf_counter() - started
                client.wait(request)
                if event.event != "message" or event.data["data"] != payload:
                    raise RuntimeError(f"unexpected echo: {event}")
                if index >= warmup:
                    rtts.append(elapsed)
    finally:
        children.stop(echoer)
    bare = run_bare(children, setup.work, "--echoes", str(plan.echoes))
    for pct in (50, 99):
        report.add(
            Row(
                f"100 B echo round trip p{pct}",
                percentile(rtts, pct) * 1000,
                percentile(bare["echo_s"], pct) * 1000,
                "ms",
                "bare aiortc echo",
                "RPC send on A, RPC recv+send on B",
            )
        )


def measure_ping(setup: Setup, plan: Plan, report: Report) -> None:
    """``mvpctl ping``'s round trip (the daemon times its mvp-ping probe, padded to the echo's
    100 bytes) against a bare aiortc echo run right after it."""
    progress("== data-path ping round trip")
    connect_ab(setup)
    rtts = []
    with setup.client("bench-a") as client:
        warmup = min(plan.echoes, 20)
        for index in range(warmup + plan.echoes):
            result = client.call("ping", peer="bench-b", padding=ECHO_SIZE - HEADER_SIZE,
                                 timeout=5)
            if result["rtt_ms"] is None:
                raise RuntimeError(f"ping {index} lost on loopback")
            if index >= warmup:
                rtts.append(float(result["rtt_ms"]))
    bare = run_bare(setup.children, setup.work, "--echoes", str(plan.echoes))
    for pct in (50, 99):
        value, baseline = percentile(rtts, pct), percentile(bare["echo_s"], pct) * 1000
        report.add(
            Row(
                f"mvpctl ping round trip p{pct}",
                value,
                baseline,
                "ms",
                "bare aiortc echo",
                f"{value - baseline:+.2f} ms; probe timed in the daemon, 100 B",
            )
        )


def echo_main(socket_path: str, peer: str, timeout: float) -> int:
    """The far side of the echo (a child process): send back every message from ``peer``."""
    with Client.connect(socket_path, timeout=30, client="bench-echo") as client:
        stream = client.subscribe("recv", peer=peer, follow=True)
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = client.next_event(stream.sub, timeout=left)
            except Exception:
                break
            if not stream.check(event):
                break
            if event.event == "message":
                client.call("send", peer=peer, data=event.data["data"])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (also of a zombie not yet
    reaped)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exited_cpu_seconds(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait until ``proc`` exits, without reaping it, and read its CPU seconds."""
    deadline = time.monotonic() + timeout
    while proc.returncode is None and time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG):
                break
        except ChildProcessError:
            break
        time.sleep(0.01)
    try:
        return cpu_seconds(proc.pid)
    except (FileNotFoundError, ProcessLookupError):
        return math.nan  # already reaped


@dataclass
class PipeResult:
    """One pipe transfer: MB/s and CPU seconds on each side (daemon, mvpctl)."""

    rate: float
    cpu: dict[str, float]


def pipe_round(setup: Setup, data_file: Path, size: int, *, framed: bool = False) -> PipeResult:
    """One ``mvpctl pipe`` transfer B <- A; MB/s from the first to the last byte received,
    and the CPU seconds of both daemons and both ``mvpctl pipe`` processes over it.
    ``framed``: with ``--framed`` (the bytes cross the control sockets through mvpctl)."""
    children = setup.children
    extra = ["--framed"] if framed else []
    daemons = {name: setup.daemons[f"bench-{name}"].pid for name in ("a", "b")}
    cpu_before = {name: cpu_seconds(pid) for name, pid in daemons.items()}
    receiver = children.start(
        "mvpctl pipe (receiver)",
        setup.mvpctl("bench-b", "pipe", "bench-a", *extra),
        env=clean_env(),
        cwd=setup.work,
        stdout=subprocess.PIPE,
    )
    sender = None
    try:
        # The receiver opens the pipe channel first; the sender then joins it (if both
        # opened one at once there would be two pipes).
        time.sleep(1.0)
        with data_file.open("rb") as source:
            sender = children.start(
                "mvpctl pipe (sender)",
                setup.mvpctl("bench-a", "pipe", "bench-b", *extra),
                env=clean_env(),
                cwd=setup.work,
                stdin=source,
            )
        assert receiver.stdout is not None
        fd = receiver.stdout.fileno()
        received, first, last = 0, 0.0, 0.0
        deadline = time.monotonic() + 300
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"the pipe stalled after {received} bytes")
            chunk = os.read(fd, MiB)
            now = time.perf_counter()
            if not chunk:
                break
            if not received:
                first = now
            received += len(chunk)
            last = now
        if received != size:
            raise RuntimeError(f"the pipe delivered {received} of {size} bytes")
        cpu = {f"daemon {name}": cpu_seconds(pid) - cpu_before[name]
               for name, pid in daemons.items()}
        cpu["mvpctl a"] = exited_cpu_seconds(sender, 30)
        cpu["mvpctl b"] = exited_cpu_seconds(receiver, 30)
        for proc in (sender, receiver):
            proc.wait(timeout=30)
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                children.stop(proc)
    return PipeResult(size / (last - first) / 1e6, cpu)


def measure_bulk(setup: Setup, plan: Plan, report: Report) -> None:
    progress("== bulk throughput")
    data_file = setup.work / "bulk.bin"
    with data_file.open("wb") as out:
        for _ in range(plan.bulk_bytes // MiB):
            out.write(os.urandom(MiB))
        out.write(os.urandom(plan.bulk_bytes % MiB))
    connect_ab(setup)
    pipe_rates, bare_rates = [], []
    pipe_cpu: dict[str, list[float]] = {}
    bare_cpu: dict[str, list[float]] = {"sender": [], "receiver": []}
    megabytes = plan.bulk_bytes / 1e6
    framed_rates = []
    for _ in range(plan.bulk_rounds):  # alternate, so noise hits both alike
        pipe = pipe_round(setup, data_file, plan.bulk_bytes)
        pipe_rates.append(pipe.rate)
        framed_rates.append(pipe_round(setup, data_file, plan.bulk_bytes, framed=True).rate)
        for name, seconds in pipe.cpu.items():
            pipe_cpu.setdefault(name, []).append(seconds / megabytes)
        bare = run_bare(setup.children, setup.work, "--bulk-bytes", str(plan.bulk_bytes))
        bare_rates.extend(b["bytes"] / b["seconds"] / 1e6 for b in bare["bulk"])
        for b in bare["bulk"]:
            for side in ("sender", "receiver"):
                bare_cpu[side].append(b.get(f"{side}_cpu_seconds", math.nan) / megabytes)
        progress(f"   round: pipe {pipe_rates[-1]:.2f} MB/s, --framed {framed_rates[-1]:.2f} "
                 f"MB/s, bare {bare_rates[-1]:.2f} MB/s")
    ms_per_mb = {name: 1000 * statistics.median(values) for name, values in pipe_cpu.items()}
    for side, daemon, ctl, bare_side in (("sending", "a", "a", "sender"),
                                         ("receiving", "b", "b", "receiver")):
        report.add(
            Row(
                f"CPU per MB, {side} side (daemon + mvpctl)",
                ms_per_mb[f"daemon {daemon}"] + ms_per_mb[f"mvpctl {ctl}"],
                1000 * statistics.median(bare_cpu[bare_side]),
                "ms/MB",
                f"bare aiortc {bare_side}",
                f"daemon {ms_per_mb[f'daemon {daemon}']:.1f} + mvpctl "
                f"{ms_per_mb[f'mvpctl {ctl}']:.1f}, lower is better",
            )
        )
    report.add(
        Row(
            "bulk throughput, mvpctl pipe (median)",
            statistics.median(pipe_rates),
            statistics.median(bare_rates),
            "MB/s",
            "bare aiortc channel",
            f"{plan.bulk_bytes // MiB} MiB x {plan.bulk_rounds}, higher is better",
        )
    )
    report.add(
        Row(
            "bulk throughput, mvpctl pipe --framed (median)",
            statistics.median(framed_rates),
            statistics.median(bare_rates),
            "MB/s",
            "bare aiortc channel",
            "bytes through mvpctl and the control sockets, as before descriptor passing",
        )
    )


def measure_memory(
    setup: Setup, plan: Plan, report: Report, swarm: subprocess.Popen[bytes]
) -> None:
    progress("== daemon RSS with N peers")
    assert swarm.stdout is not None
    ready, _, _ = select.select([swarm.stdout], [], [], 90)
    line = swarm.stdout.readline().decode() if ready else ""
    if not line.startswith("ready"):
        raise RuntimeError(f"the peer swarm did not start: {line!r}")
    hub = setup.daemons["bench-hub"].pid
    time.sleep(1.0)
    idle = rss_kib(hub)
    connected = 0
    rss: dict[int, int] = {}
    with setup.client("bench-hub", timeout=120) as client:
        for count in plan.peer_counts:
            while connected < count:
                batch = range(connected, min(count, connected + 5))
                pending = [
                    client.request(
                        "connect", peer=f"swarm-{i}", mode="bytes", wait=True, timeout=60
                    )
                    for i in batch
                ]
                for request in pending:
                    client.wait(request, timeout=90)
                connected = batch[-1] + 1
            time.sleep(2.0)  # let the connections settle (SCTP, first heartbeats)
            rss[count] = rss_kib(hub)
            progress(
                f"   {count} peer(s): hub RSS {rss[count] / 1024:.1f} MiB, "
                f"swarm RSS {rss_kib(swarm.pid) / 1024:.1f} MiB"
            )
        peers = len(client.call("peers"))
    if peers != plan.peer_counts[-1]:
        raise RuntimeError(f"the hub has {peers} peers, expected {plan.peer_counts[-1]}")
    base_count = plan.peer_counts[0]
    report.add(Row("hub RSS, no peers", idle / 1024, None, "MiB", "-"))
    for count in plan.peer_counts:
        note = ""
        if count > base_count:
            per_peer = (rss[count] - rss[base_count]) / (count - base_count)
            note = f"{per_peer:+.0f} KiB per peer beyond {base_count}"
        report.add(
            Row(
                f"hub RSS, {count} peer(s)",
                rss[count] / 1024,
                rss[base_count] / 1024,
                "MiB",
                f"hub RSS with {base_count} peer",
                note,
            )
        )
    report.facts["peers"] = (
        "far ends are AgentCore instances in ONE helper process "
        "(bench/peer_swarm.py), one signaling client each"
    )


# --- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"the benchmark passed its time limit of {seconds:g} s")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_alarm = signal.signal(signal.SIGALRM, expire)
    old_term = signal.signal(signal.SIGTERM, terminate)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)


def run(plan: Plan, quick: bool, keep: bool, parent: Path | None = None) -> Report:
    report = Report()
    report.facts.update(
        date=time.strftime("%Y-%m-%d"),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        quick=quick,
        load_before=os.getloadavg(),
    )
    work = Path(tempfile.mkdtemp(prefix="mvp-bench.", dir=parent))
    report.facts["workdir"] = str(work)
    children = Children()
    setup = Setup(children, work)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("status", lambda: measure_status(setup, plan, report)),
        ("connect", lambda: measure_connect(setup, plan, report)),
        ("echo", lambda: measure_echo(setup, plan, report)),
        ("ping", lambda: measure_ping(setup, plan, report)),
        ("bulk", lambda: measure_bulk(setup, plan, report)),
    ]
    try:
        with deadline(plan.time_limit):
            progress(f"== starting signaling, daemons and the peer swarm in {work}")
            setup.start_signaling()
            for agent_id in ("bench-a", "bench-b", "bench-hub"):
                setup.start_daemon(agent_id)
            swarm = children.start(
                "peer swarm",
                [
                    sys.executable,
                    BENCH / "peer_swarm.py",
                    "--url",
                    setup.url,
                    "--count",
                    str(plan.peer_counts[-1]),
                    "--config",
                    setup.config,
                    "--timeout",
                    str(plan.time_limit),
                ],
                env=clean_env(),
                cwd=work,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open_log(work / "swarm.log"),
            )
            for agent_id in ("bench-a", "bench-b", "bench-hub"):
                setup.wait_ready(agent_id)
            for _, step in steps:
                step()
            measure_memory(setup, plan, report, swarm)
    except BaseException:
        progress(f"benchmark failed; logs in {work}:")
        for log in sorted(work.glob("*.log")):
            progress(f"--- {log.name}\n{tail(log)}")
        keep = True
        raise
    finally:
        children.stop_all()
        report.facts["load_after"] = os.getloadavg()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report


def table(report: Report) -> str:
    header = ["measure", "mvpd", "baseline", "unit", "ratio", "baseline is", "note"]
    rows = [header] + [
        [
            r.measure,
            fmt(r.value),
            fmt(r.baseline),
            r.unit,
            f"{r.ratio:.2f}" if r.ratio is not None else "-",
            r.baseline_is,
            r.note,
        ]
        for r in report.rows
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mvpd vs bare aiortc and other baselines")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--tmpdir", type=Path, help="make the temporary directory in here (default: $TMPDIR)"
    )
    parser.add_argument("--echo-socket", help=argparse.SUPPRESS)
    parser.add_argument("--echo-peer", help=argparse.SUPPRESS)
    parser.add_argument("--echo-timeout", type=float, default=120, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_socket:
        return echo_main(args.echo_socket, args.echo_peer, args.echo_timeout)
    if not MVPD.exists() or not MVPCTL.exists():
        parser.error(f"run with the project's venv python ({REPO / '.venv/bin/python'})")
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    report = run(plan, args.quick, args.keep, args.tmpdir)
    facts = report.facts
    print(
        f"mvpd main-job benchmark, {facts['date']}, {facts['cpus']} CPUs, "
        f"Python {facts['python']}, {'quick' if args.quick else 'full'} run, "
        f"{time.monotonic() - started:.0f} s; load {facts['load_before'][0]:.2f} before, "
        f"{facts['load_after'][0]:.2f} after"
    )
    print("ratio = mvpd / baseline (same run); for MB/s higher is better, for ms lower is")
    print(f"uvloop in the bare baseline: {facts.get('bare_uvloop')}; daemons use it if present")
    print(f"peers for the RSS rows: {facts.get('peers')}")
    print(table(report))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"facts": facts, "rows": [{**r.__dict__, "ratio": r.ratio} for r in report.rows]},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
