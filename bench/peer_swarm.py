"""Many small peers in ONE process: N :class:`mvpd.core.AgentCore` instances, each with its
own signaling client and a distinct agent id (``PREFIX0`` ... ``PREFIX{N-1}``).

``bench/main_job.py`` uses them as the far ends when it measures how a daemon's memory grows
with its number of peers: starting N real daemons would cost N interpreters with aiortc loaded
on a 2-core machine, while the swarm answers offers exactly as a daemon's core does.

Prints ``ready N`` on stdout once every client is registered, then runs until its stdin ends,
SIGTERM, or ``--timeout`` seconds; it then closes every core and client. Loopback only: the
settings carry an explicit empty ICE server list.

    .venv/bin/python bench/peer_swarm.py --url ws://127.0.0.1:8765 --count 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvpd.config import load_settings
from mvpd.core import AgentCore
from mvpd.signaling.client import SignalingClient


async def swarm(
    url: str, count: int, prefix: str, config: Path, timeout: float, state_root: Path
) -> None:
    clients: list[SignalingClient] = []
    cores: list[AgentCore] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        for index in range(count):
            settings = load_settings(
                config_file=config,
                env_file=None,
                agent_id=f"{prefix}{index}",
                # Each peer has an identity and known_peers of its own, made for this run
                # (the daemons it meets are new each run too).
                state_dir=state_root / f"{prefix}{index}",
                signaling_url=url,
                ice_servers=[],
                mode="bytes",
                log_level="warning",
            )
            client = SignalingClient(settings, ping_interval=None)
            client.start()
            core = AgentCore(settings, client)
            await core.start()
            clients.append(client)
            cores.append(core)
        deadline = loop.time() + 60
        while not all(c.connected for c in clients):
            if loop.time() > deadline:
                raise RuntimeError("the swarm's clients did not all register within 60 s")
            await asyncio.sleep(0.05)
        # Registered means connected and the register message sent; give the server a
        # moment to process the last ones before announcing.
        await asyncio.sleep(0.3)
        print(f"ready {count}", flush=True)
        ended = asyncio.ensure_future(reader.read())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ended, stopped}, timeout=timeout, return_when="FIRST_COMPLETED")
        ended.cancel()
        stopped.cancel()
    finally:
        for core in cores:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(core.stop(), 5)
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="N AgentCore peers in one process")
    parser.add_argument("--url", required=True, help="signaling server URL (loopback)")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--prefix", default="swarm-")
    parser.add_argument("--config", type=Path, required=True, help="config file to read")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the peers keep their identities (default: a new "
                        "temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="peer_swarm %(levelname)s %(message)s")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    count = max(1, min(args.count, 500))
    with contextlib.ExitStack() as cleanup:
        state_root = args.state_dir or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mvp-swarm."))
        )
        asyncio.run(swarm(args.url, count, args.prefix, args.config, args.timeout, state_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
