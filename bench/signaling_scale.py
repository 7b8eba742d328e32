"""Signaling at scale: 1, 2 and 3 ``mvpd signal --redis`` servers against one server alone.

Everything on loopback; everything started here is stopped by PID. For each setup
(``single``: one server without Redis; ``cluster-N``: N servers sharing one redis-server):

1. ``--agents`` WebSocket agents register, spread round robin over the servers, opened by
   ``--workers`` client processes (many connections each); server RSS before and after gives
   the memory per agent;
2. offer/answer round trips between random agents on *different* servers (any two agents
   with one server) at a modest rate: p50/p99;
3. routed messages per second: every worker sends ``candidate`` messages to random agents on
   other servers as fast as its event loop allows for ``--flood`` seconds; what the
   receivers got, per second, is the throughput;
4. (the largest cluster) one server is killed with SIGKILL: its agents reconnect to the next
   server on their list at once (as ``mvpd.signaling.client`` does) and the time until the
   last one is registered again, and a message reaches it, is measured.

During the flood the Redis side is watched too: keys that expired (a server's presence
running out while its agents were connected answers them ``offline``), the largest backlog
Redis held for a server's subscription, and subscriptions Redis closed for exceeding
``client-output-buffer-limit pubsub`` (from its log).

Also measured once: a Redis pub/sub round trip against a Redis stream round trip (XADD then
a blocking XREAD), the two ways servers could hand each other messages.

    .venv/bin/python bench/signaling_scale.py                 # 10^4 agents: ~3-5 minutes
    .venv/bin/python bench/signaling_scale.py --agents 2000   # quicker
    --json FILE   also write the figures (with load average and CPUs) as JSON

The machine's load is printed with the results: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAX_AGENTS = 20_000
TIME_LIMIT = 900.0


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else 0


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port()
    # Redis's own defaults (client-output-buffer-limit pubsub 32mb 8mb 60 included): the
    # bench shows what a stock Redis does.
    with (workdir / "redis.log").open("ab") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(workdir), "--maxclients", "1000"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def start_server(redis_url: str | None) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-m", "mvpd.signaling.server", "--listen", "127.0.0.1:0",
            "--log-level", os.environ.get("SIGSCALE_LOG", "error"),
            # The flood sends tens of messages per second per agent; no keepalive pings.
            "--rate", "1000", "--burst", "5000", "--ping-interval", "0"]
    if redis_url:
        argv += ["--redis", redis_url]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(ws://\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the signaling server did not start: {line!r}")
    return proc, match[1]


class RedisWatch:
    """Samples Redis while the flood runs: keys expired meanwhile, the largest output
    backlog of a subscribed connection, and subscriptions closed for exceeding the pubsub
    output-buffer limit (Redis logs each)."""

    def __init__(self, redis_url: str, log: Path) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.log = log
        self.expired_before = self._expired()
        self.log_before = log.stat().st_size
        self.backlog = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _expired(self) -> int:
        return int(self.client.info("stats")["expired_keys"])

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(Exception):
                for client in self.client.client_list():
                    if int(client.get("sub", 0)) > 0:
                        self.backlog = max(self.backlog, int(client.get("omem", 0)))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        with self.log.open("rb") as f:
            f.seek(self.log_before)
            dropped = f.read().count(b"output buffer limits")
        result = {"expired_keys": self._expired() - self.expired_before,
                  "subscriber_backlog_mib": round(self.backlog / 2**20, 1),
                  "subscribers_dropped": dropped}
        self.client.close()
        return result


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- the client worker (one process, many agents) ----------------------------------------------


def home_server(agent: int, workers: int, servers: int) -> int:
    """Agent ``agent``'s first server: every worker has agents on every server."""
    return (agent // workers) % servers


class Worker:
    """Agents ``ids`` of one client process; agent ``i`` starts on server
    :func:`home_server` ``(i)``."""

    def __init__(self, ids: list[int], urls: list[str], servers: int, workers: int) -> None:
        self.ids = ids
        self.workers = workers
        self.urls = urls
        self.servers = servers
        self.total = 0
        self.conns: dict[int, Any] = {}
        self.server_of: dict[int, int] = {}
        self.rtt_waiting: dict[str, tuple[float, asyncio.Future[float]]] = {}
        self.received = 0
        self.errors: Counter[str] = Counter()
        #: Close codes of the connections the server closed (4008: did not read fast enough).
        self.closes: Counter[int] = Counter()
        self.last_received = 0.0
        self.registered_at: dict[int, float] = {}
        self.lost: set[int] = set()
        self.readers: set[asyncio.Task[None]] = set()

    async def open(self, agent: int, server: int) -> None:
        from websockets.asyncio.client import connect

        ws = await connect(self.urls[server], compression=None, ping_interval=None,
                           open_timeout=60, max_queue=None)
        await ws.send(json.dumps({"type": "register", "id": f"a{agent}"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if reply.get("type") != "registered":
            raise RuntimeError(f"a{agent} on server {server}: {reply}")
        self.conns[agent] = ws
        self.server_of[agent] = server
        self.registered_at[agent] = time.monotonic()
        task = asyncio.get_running_loop().create_task(self.read(agent, ws))
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)

    async def read(self, agent: int, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "error":
                    self.errors[msg.get("code", "?")] += 1
                if kind == "candidate":
                    self.received += 1
                    self.last_received = time.monotonic()
                elif kind == "offer":
                    await ws.send(json.dumps({"type": "answer", "to": msg["from"],
                                              "sdp": msg["sdp"]}))
                elif kind == "answer":
                    waiting = self.rtt_waiting.pop(msg["sdp"], None)
                    if waiting is not None and not waiting[1].done():
                        waiting[1].set_result(time.monotonic() - waiting[0])
        except ConnectionClosed:
            pass
        if self.conns.get(agent) is ws:
            code: int | None = getattr(ws, "close_code", None)
            self.closes[code if code is not None else 1006] += 1
            # Our server died (or closed us): the next one on the list, at once (with a
            # little jitter).
            del self.conns[agent]
            self.lost.add(agent)
            await asyncio.sleep(random.uniform(0, 0.5))
            server = (self.server_of[agent] + 1) % len(self.urls)
            for attempt in range(20):  # as the client: round the list, then back off
                try:
                    await self.open(agent, server)
                    return
                except (OSError, RuntimeError, TimeoutError):
                    server = (server + 1) % len(self.urls)
                    if attempt % len(self.urls) == len(self.urls) - 1:
                        await asyncio.sleep(min(0.5 * 2 ** (attempt // len(self.urls)), 5.0))

    def other_agent(self, agent: int) -> int:
        """A random agent on another server (any other agent with one server)."""
        while True:
            target = random.randrange(self.total)
            if target != agent and (self.servers == 1 or self.home(target) != self.home(agent)):
                return target

    def home(self, agent: int) -> int:
        return home_server(agent, self.workers, self.servers)

    async def connect_all(self, total: int) -> float:
        self.total = total
        started = time.monotonic()
        for first in range(0, len(self.ids), 200):
            batch = self.ids[first:first + 200]
            await asyncio.gather(*(self.open(i, self.home(i)) for i in batch))
        return time.monotonic() - started

    async def rtt(self, count: int, rate: float) -> list[float]:
        loop = asyncio.get_running_loop()
        results: list[asyncio.Future[float]] = []
        for n in range(count):
            agent = random.choice(list(self.conns))
            nonce = f"{os.getpid()}-{n}"
            future: asyncio.Future[float] = loop.create_future()
            self.rtt_waiting[nonce] = (time.monotonic(), future)
            await self.conns[agent].send(json.dumps(
                {"type": "offer", "to": f"a{self.other_agent(agent)}", "sdp": nonce}))
            results.append(future)
            await asyncio.sleep(1.0 / rate)
        done, _ = await asyncio.wait(results, timeout=10)
        return [f.result() for f in done]

    async def flood(self, seconds: float) -> int:
        sent = 0
        deadline = time.monotonic() + seconds
        ids = list(self.conns)
        while time.monotonic() < deadline:
            for _ in range(200):
                agent = random.choice(ids)
                ws = self.conns.get(agent)
                if ws is None:
                    continue
                await ws.send(json.dumps({"type": "candidate", "to": f"a{self.other_agent(agent)}",
                                          "candidate": None}))
                sent += 1
            # Let this process's readers run too: they are the receiving agents.
            await asyncio.sleep(0.002)
        return sent

    async def errors_seen(self) -> tuple[dict[str, int], dict[int, int]]:
        """Error replies by code and server closes by code since the last call."""
        errors, self.errors = dict(self.errors), Counter()
        closes, self.closes = dict(self.closes), Counter()
        return errors, closes

    async def reconnected(self) -> int:
        """Agents that lost their connection and opened another."""
        return len(self.lost)

    async def count(self, reset: bool) -> tuple[int, float]:
        """What arrived (or was answered with an error) so far and when the last one did."""
        counted = self.received + sum(self.errors.values()), self.last_received
        if reset:
            self.received = 0
        return counted

    async def failover(self, dead: int, killed_at: float, timeout: float) -> dict[str, Any]:
        moved = [a for a in self.ids if self.home(a) == dead]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(a in self.conns and self.server_of[a] != dead for a in moved):
                break
            await asyncio.sleep(0.05)
        back = [self.registered_at[a] - killed_at for a in moved
                if a in self.conns and self.server_of[a] != dead]
        return {"moved": len(moved), "back": back}


class WorkerFailed(str):
    """What a worker answers when a command failed."""


def worker_main(
    pipe: Connection, ids: list[int], urls: list[str], servers: int, workers: int
) -> None:
    raise_nofile(len(ids) * 2 + 256)

    async def serve() -> None:
        worker = Worker(ids, urls, servers, workers)
        loop = asyncio.get_running_loop()
        while True:
            command, args = await loop.run_in_executor(None, pipe.recv)
            if command == "stop":
                for ws in list(worker.conns.values()):
                    ws.transport.abort()
                pipe.send(None)
                return
            try:
                pipe.send(await getattr(worker, command)(*args))
            except Exception as exc:  # shown by the parent, which stops
                pipe.send(WorkerFailed(f"{command}: {type(exc).__name__}: {exc}"))

    asyncio.run(serve())


class Clients:
    """``count`` worker processes sharing the agents."""

    def __init__(self, count: int, agents: int, urls: list[str], servers: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for w in range(count):
            parent, child = ctx.Pipe()
            ids = list(range(w, agents, count))
            proc = ctx.Process(target=worker_main, args=(child, ids, urls, servers, count),
                               daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def call(self, command: str, *args: Any) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((command, args))
        answers = [pipe.recv() for pipe in self.pipes]
        for answer in answers:
            if isinstance(answer, WorkerFailed):
                raise RuntimeError(f"a client worker failed: {answer}")
        return answers

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("stop")
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# --- one setup ----------------------------------------------------------------------------------


def run_setup(name: str, servers: int, redis_url: str | None, args: argparse.Namespace,
              failover: bool, redis_log: Path) -> dict[str, Any]:
    started = [start_server(redis_url) for _ in range(servers)]
    procs = [p for p, _ in started]
    urls = [u for _, u in started]
    clients: Clients | None = None
    try:
        time.sleep(0.5)
        base = [rss_kib(p.pid) for p in procs]
        clients = Clients(args.workers, args.agents, urls, servers)
        connect_s = max(clients.call("connect_all", args.agents))
        time.sleep(1.0)
        loaded = [rss_kib(p.pid) for p in procs]
        per_agent = (sum(loaded) - sum(base)) / args.agents
        rtts = sorted(x for part in clients.call("rtt", args.rtt // args.workers,
                                                  args.rtt_rate / args.workers) for x in part)
        clients.call("count", True)
        clients.call("errors_seen")  # the flood's own refusals only
        watch = RedisWatch(redis_url, redis_log) if redis_url else None
        flood_started = time.monotonic()
        sent = sum(clients.call("flood", args.flood))
        # Until every message is accounted for (arrived or refused), or nothing more came
        # for 10 s.
        answered, progress = 0, time.monotonic()
        while answered < sent and time.monotonic() - progress < 10:
            time.sleep(0.5)
            counts = clients.call("count", False)
            if sum(n for n, _ in counts) > answered:
                answered, progress = sum(n for n, _ in counts), time.monotonic()
        counts = clients.call("count", True)
        elapsed = max(t for _, t in counts) - flood_started
        errors: Counter[str] = Counter()
        closes: Counter[int] = Counter()
        for part_errors, part_closes in clients.call("errors_seen"):
            errors.update(part_errors)
            closes.update(part_closes)
        # Every flooded message is delivered, refused with a reason (an error reply), or lost.
        refused = sum(errors.values())
        received = sum(n for n, _ in counts) - refused
        result: dict[str, Any] = {
            "setup": name, "servers": servers, "agents": args.agents,
            "connect_s": round(connect_s, 2),
            "kib_per_agent": round(per_agent, 1),
            "rss_mib": [round(x / 1024, 1) for x in loaded],
            "rtt_samples": len(rtts),
            "rtt_p50_ms": round(1000 * rtts[len(rtts) // 2], 2) if rtts else None,
            "rtt_p99_ms": round(1000 * rtts[int(len(rtts) * 0.99)], 2) if rtts else None,
            "sent": sent, "received": received,
            "routed_per_s": round(received / elapsed),
            "refused": refused,
            "lost": sent - received - refused,
            "errors": dict(errors),
            "closed_by_server": {str(code): n for code, n in closes.items()},
            "reconnected": sum(clients.call("reconnected")),
        }
        if watch is not None:
            result["redis"] = watch.stop()
        if failover:
            killed_at = time.monotonic()
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait()
            parts = clients.call("failover", 0, killed_at, 60.0)
            back = sorted(t for p in parts for t in p["back"])
            result["failover"] = {
                "moved": sum(p["moved"] for p in parts),
                "back": len(back),
                "median_s": round(statistics.median(back), 2) if back else None,
                "p99_s": round(back[int(len(back) * 0.99)], 2) if back else None,
                "last_s": round(back[-1], 2) if back else None,
            }
            # Routable again: round trips to anyone, including the agents that moved.
            after = [x for part in clients.call("rtt", 50, 100.0) for x in part]
            result["failover"]["rtt_after"] = f"{len(after)}/{50 * args.workers}"
        return result
    finally:
        if clients is not None:
            clients.close()
        for proc in procs:
            stop(proc)


# --- pub/sub against streams ---------------------------------------------------------------------


async def transport_probe(redis_url: str, count: int = 3000) -> dict[str, float]:
    """Median round trip of one small message: PUBLISH to a subscriber, and XADD to a
    stream read by a blocking XREAD, each from one asyncio client to another."""
    import redis.asyncio as aioredis

    sender = aioredis.Redis.from_url(redis_url)
    reader = aioredis.Redis.from_url(redis_url)
    pubsub = reader.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("probe")
    await asyncio.sleep(0.1)
    pub: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        await sender.publish("probe", "x" * 300)
        while (await pubsub.get_message(timeout=1.0)) is None:
            pass
        pub.append(time.perf_counter() - start)
    stream: list[float] = []
    await sender.delete("probe-stream")
    last: Any = "0-0"  # an explicit id: an entry added before the XREAD arrives is not missed
    for _ in range(count):
        start = time.perf_counter()
        read = asyncio.ensure_future(reader.xread({"probe-stream": last}, block=1000, count=1))
        await asyncio.sleep(0)
        await sender.xadd("probe-stream", {"m": "x" * 300}, maxlen=1000, approximate=True)
        entries = await read
        last = entries[0][1][-1][0]
        stream.append(time.perf_counter() - start)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await sender.aclose()
    await reader.aclose()
    return {"pubsub_us": round(1e6 * statistics.median(pub)),
            "stream_us": round(1e6 * statistics.median(stream))}


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=3, help="client processes")
    parser.add_argument("--rtt", type=int, default=1500, help="offer/answer round trips")
    parser.add_argument("--rtt-rate", type=float, default=300.0, help="round trips per second")
    parser.add_argument("--flood", type=float, default=8.0, help="seconds of flooding")
    parser.add_argument("--setups", default="single,cluster-1,cluster-2,cluster-3")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.agents = max(6, min(args.agents, MAX_AGENTS))
    # SIGTERM stops everything started here too (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    raise_nofile(args.agents * 2 + 1024)
    deadline = time.monotonic() + TIME_LIMIT
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mvp-sigscale-") as tmp:
        redis_proc, redis_url = start_redis(Path(tmp))
        try:
            probe = asyncio.run(transport_probe(redis_url))
            print(f"one message through Redis, median round trip: pub/sub "
                  f"{probe['pubsub_us']} us, stream {probe['stream_us']} us", flush=True)
            setups = args.setups.split(",")
            clusters = [s for s in setups if s.startswith("cluster-") and s != "cluster-1"]
            largest = max(clusters, key=lambda s: int(s.split("-")[1]), default=None)
            for name in setups:
                if time.monotonic() > deadline:
                    print("time limit reached; stopping", flush=True)
                    break
                servers = 1 if name == "single" else int(name.split("-")[1])
                redis = None if name == "single" else redis_url
                if redis is not None:
                    subprocess.run(["redis-cli", "-u", redis_url, "flushall"],
                                   capture_output=True, check=False)
                result = run_setup(name, servers, redis, args, failover=name == largest,
                                   redis_log=Path(tmp) / "redis.log")
                result["load"] = os.getloadavg()[0]
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            stop(redis_proc)
    single = next((r for r in results if r["setup"] == "single"), None)
    print(f"\n{args.agents} agents, {args.workers} client processes, {os.cpu_count()} CPUs")
    print(f"{'setup':<10} {'KiB/agent':>9} {'p50 ms':>7} {'p99 ms':>7} {'routed/s':>9} "
          f"{'x single':>8} {'sent':>7} {'refused':>7} {'lost':>5} {'load':>5}")
    for r in results:
        ratio = r["routed_per_s"] / single["routed_per_s"] if single else float("nan")
        print(f"{r['setup']:<10} {r['kib_per_agent']:>9} {r['rtt_p50_ms']!s:>7} "
              f"{r['rtt_p99_ms']!s:>7} {r['routed_per_s']:>9} {ratio:>8.2f} {r['sent']:>7} "
              f"{r['refused']:>7} {r['lost']:>5} {r['load']:>5.1f}")
    for r in results:
        if "redis" in r:
            w = r["redis"]
            print(f"{r['setup']}: during the flood Redis expired {w['expired_keys']} keys, held "
                  f"up to {w['subscriber_backlog_mib']} MiB for a subscriber, closed "
                  f"{w['subscribers_dropped']} subscriptions over the pubsub buffer limit")
    for r in results:
        if "failover" in r:
            f = r["failover"]
            print(f"{r['setup']}: one server killed: {f['back']}/{f['moved']} agents registered "
                  f"elsewhere, median {f['median_s']} s, p99 {f['p99_s']} s, last "
                  f"{f['last_s']} s after the kill; round trips afterwards {f['rtt_after']}")
    if args.json:
        args.json.write_text(json.dumps({"probe": probe, "results": results,
                                         "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
