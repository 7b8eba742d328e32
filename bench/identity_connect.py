"""Connect time with the long-term identity against aiortc's certificate per connection.

Two :class:`mvpd.peer.PeerSession` objects in one process, on loopback, with signaling
passed straight between them. Rounds alternate between the two ways, in the same run:

* ``per-connection``: no verifier, so aiortc makes a new ECDSA key and certificate for every
  peer connection and nothing is checked (mvpd before identities);
* ``identity``: each side has its long-term certificate (state directories in a temporary
  directory) and checks the other's fingerprint before applying its SDP (trust on first use:
  the first round remembers, later rounds compare).

Each connect is timed from ``start_offer`` to the main channel being open on both sides. The
result (medians and their ratio) is one JSON object on stdout.

    .venv/bin/python bench/identity_connect.py --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mvpd.config import load_settings
from mvpd.known_peers import PeerVerifier
from mvpd.peer import PeerSession
from mvpd.proto.signaling import RoutedMessage, dump_message, parse_message


def settings(agent_id: str, state: Path) -> Any:
    empty = state.parent / "empty.yaml"
    empty.write_text("")
    return load_settings(config_file=empty, env_file=None, agent_id=agent_id, ice_servers=[],
                         state_dir=state, peer_timeout=0)


async def connect_once(verifiers: dict[str, PeerVerifier] | None, root: Path) -> float:
    sessions: dict[str, PeerSession] = {}

    def sender(agent: str) -> Any:
        async def send(message: RoutedMessage) -> None:
            target = sessions.get(message.to)
            if target is not None:
                target.deliver(parse_message(dump_message(message)))  # type: ignore[arg-type]

        return send

    for me, other in (("alice", "bob"), ("bob", "alice")):
        verifier = verifiers[me] if verifiers else None
        own = verifier.settings if verifier else settings(me, root / me)
        sessions[me] = PeerSession(own, other, send_signal=sender(me), verifier=verifier)
    started = time.perf_counter()
    await sessions["alice"].start_offer()
    await sessions["alice"].wait_open()
    await sessions["bob"].wait_open()
    elapsed = time.perf_counter() - started
    for session in sessions.values():
        await session.close("done")
    return elapsed


async def main(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mvpd-bench-") as tmp:
        root = Path(tmp)
        verifiers = {me: PeerVerifier.load(settings(me, root / me)) for me in ("alice", "bob")}
        await connect_once(None, root)  # warm-up (imports, first sockets)
        await connect_once(verifiers, root)
        times: dict[str, list[float]] = {"per-connection": [], "identity": []}
        for _ in range(rounds):
            times["per-connection"].append(await connect_once(None, root))
            times["identity"].append(await connect_once(verifiers, root))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rounds": rounds,
        "median_ms": {k: round(v * 1000, 1) for k, v in medians.items()},
        "min_ms": {k: round(min(v) * 1000, 1) for k, v in times.items()},
        "ratio_identity_to_per_connection": round(
            medians["identity"] / medians["per-connection"], 3
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(json.dumps(asyncio.run(asyncio.wait_for(main(args.rounds), 600)), indent=2))
