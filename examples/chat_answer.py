"""Wait for a peer to connect, then chat with it (the answering side).

    AGENT_ID=alice SIGNALING_URL=ws://127.0.0.1:8765 python examples/chat_answer.py
"""

from __future__ import annotations

import asyncio
import sys

from chat_common import chat, start_agent


async def main() -> None:
    core, signaling = await start_agent()
    events = core.subscribe(kinds={"peer-state"})
    print("waiting for a peer to connect ...", file=sys.stderr)
    async for event in events:
        if event.data["state"] == "connected":
            print(f"{event.peer} connected; type to chat", file=sys.stderr)
            events.close()
            await chat(core, signaling, event.peer)
            return


if __name__ == "__main__":
    asyncio.run(main())
