"""The chat loop both examples share: stdin lines go out, the peer's messages print."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from mvpd import AgentCore, SignalingClient, load_settings


async def start_agent() -> tuple[Any, Any]:
    """Settings from the environment (AGENT_ID, SIGNALING_URL, ...), signaling, core."""
    settings = load_settings()
    signaling = SignalingClient(settings)
    await signaling.connect()
    core = AgentCore(settings, signaling)
    await core.start()
    print(f"{settings.agent_id}: registered at {settings.signaling_url}", file=sys.stderr)
    return core, signaling


async def chat(core: Any, signaling: Any, peer: str) -> None:
    """Chat with ``peer`` until stdin ends or the peer leaves."""
    transport = core.get_transport(peer)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def incoming() -> None:
        async for message in transport.messages():
            print(f"<{peer}> {message}", flush=True)

    printer = asyncio.ensure_future(incoming())
    try:
        while line := await reader.readline():
            await transport.send_text_async(line.decode(errors="replace").rstrip("\n"))
    finally:
        printer.cancel()
        await core.stop()
        await signaling.close()
