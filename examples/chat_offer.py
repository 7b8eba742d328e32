"""Connect to a peer and chat with it (the offering side).

    AGENT_ID=bob SIGNALING_URL=ws://127.0.0.1:8765 python examples/chat_offer.py alice
"""

from __future__ import annotations

import asyncio
import sys

from chat_common import chat, start_agent


async def main(peer: str) -> None:
    core, signaling = await start_agent()
    await core.connect_to(peer, mode="chat")
    print(f"connected to {peer}; type to chat", file=sys.stderr)
    await chat(core, signaling, peer)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: chat_offer.py PEER")
    asyncio.run(main(sys.argv[1]))
