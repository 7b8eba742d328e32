"""A cluster signaling server whose event loop a test can starve, in a process of its own:

    python -m tests.signaling.starved_server REDIS_URL

prints ``listening on ws://HOST:PORT`` and runs until SIGTERM. Its Redis heartbeat is fast and
its presence TTL short (0.3 s and 1 s), so that what takes a loaded server tens of seconds
happens here in a few. SIGUSR1 makes the event loop CPU-bound for ``STARVE_FOR`` seconds: each
turn of the loop then takes ``TURN`` seconds of pure computation holding the GIL, as when a
server reads a flood of frames from thousands of connections; the server stays alive and
answers everything, only late."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from pydantic import SecretStr

from mvpd.config import SignalingServerSettings
from mvpd.signaling.server import SignalingServer

HEARTBEAT = 0.3
TTL = 1
STARVE_FOR = 6.0
TURN = 1.5


async def _starve() -> None:
    end = time.monotonic() + STARVE_FOR
    while time.monotonic() < end:
        busy_until = min(time.monotonic() + TURN, end)
        while time.monotonic() < busy_until:
            pass
        await asyncio.sleep(0)  # one turn of the loop: everything else ready runs once


async def _main(redis_url: str) -> None:
    server = SignalingServer(
        SignalingServerSettings(listen="127.0.0.1:0", redis=SecretStr(redis_url))
    )
    assert server.cluster is not None
    server.cluster.heartbeat = HEARTBEAT
    server.cluster.ttl = TTL
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    starving: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: starving.add(loop.create_task(_starve()))
    )
    print(f"listening on {server.url}", flush=True)
    await stop.wait()
    await server.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
