"""Memory of the signaling server holding N idle, registered clients (loopback only).

Starts ``python -m mvpd.signaling.server --listen 127.0.0.1:0`` as a subprocess, reads its RSS
from /proc, opens N WebSocket clients from this process in batches, registers each, checks that
routing still works, reads the RSS again, and stops everything. Bounded in count and time.

    .venv/bin/python bench/signaling_idle.py --clients 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[1]
MAX_CLIENTS = 20_000
TIME_LIMIT = 300.0


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else 0


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


async def open_client(url: str, agent_id: str) -> ClientConnection:
    ws = await connect(url, compression=None, ping_interval=None, open_timeout=30)
    await ws.send(json.dumps({"type": "register", "id": agent_id}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
    if reply.get("type") != "registered":
        raise RuntimeError(f"registration of {agent_id} failed: {reply}")
    return ws


def start_server() -> tuple[subprocess.Popen[str], str]:
    """The standalone server on a free loopback port, and its URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mvpd.signaling.server",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(ws://\S+)", line)
    if not match:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, match[1]


async def bench(pid: int, url: str, clients: int, batch: int) -> dict[str, float]:
    conns: list[ClientConnection] = []
    try:
        await asyncio.sleep(0.5)
        base = rss_kib(pid)
        started = time.monotonic()
        for first in range(0, clients, batch):
            ids = [f"idle-{i}" for i in range(first, min(clients, first + batch))]
            conns += await asyncio.gather(*(open_client(url, i) for i in ids))
        connect_s = time.monotonic() - started
        # Routing still works with everyone connected.
        await conns[0].send(json.dumps({"type": "bye", "to": f"idle-{clients - 1}"}))
        got = json.loads(await asyncio.wait_for(conns[-1].recv(), 10))
        assert got["from"] == "idle-0", got
        await asyncio.sleep(1.0)
        loaded = rss_kib(pid)
        return {
            "clients": clients,
            "rss_base_mib": base / 1024,
            "rss_loaded_mib": loaded / 1024,
            "kib_per_client": (loaded - base) / clients,
            "connect_seconds": connect_s,
        }
    finally:
        for ws in conns:
            with contextlib.suppress(Exception):
                ws.transport.abort()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    clients = max(2, min(args.clients, MAX_CLIENTS))
    raise_nofile(clients + 256)
    proc, url = start_server()
    try:
        result = asyncio.run(
            asyncio.wait_for(bench(proc.pid, url, clients, max(1, args.batch)), TIME_LIMIT)
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for key, value in result.items():
        print(f"{key:>16}: {value:.2f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
