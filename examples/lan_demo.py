"""An IP link between two machines in TUN mode, with no ``ip`` commands typed by hand.

Terminal 1 (answerer, tunnel address 10.0.0.1)::

    AGENT_ID=server SIGNALING_URL=ws://SIGNAL:8765 MODE=tun \\
        sudo -E python examples/lan_demo.py answer

Terminal 2 (offerer, tunnel address 10.0.0.2)::

    AGENT_ID=client SIGNALING_URL=ws://SIGNAL:8765 MODE=tun \\
        sudo -E python examples/lan_demo.py offer server

Each side creates its TUN device (mvp-tun%d), gives it its address (MVPD_TUN__ADDRESS, or
10.0.0.1/24 answering and 10.0.0.2/24 offering), sets the MTU, brings it up and routes the
peer's allowed IPs through it; then ``ping 10.0.0.1`` / ``ping 10.0.0.2`` work. Ctrl-C
removes the device. Needs root (or CAP_NET_ADMIN) and /dev/net/tun.

Only a peer with allowed IPs may use TUN mode. Unless the config (or MVPD_PEERS) has
``peers``, the offerer gives its peer 10.0.0.1/32 and the answerer, which does not know
who will call, gives any peer (a ``"*"`` entry) 10.0.0.2/32: one caller at a time, with
that one address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from mvpd import AgentCore, SignalingClient, load_settings
from mvpd.tun.tunnel import Tunnel

DEFAULT_ADDRESS = {"answer": "10.0.0.1/24", "offer": "10.0.0.2/24"}
#: The other side's tunnel address: its allowed IPs here.
PEER_ADDRESS = {"answer": "10.0.0.2/32", "offer": "10.0.0.1/32"}


async def main(role: str, peer: str | None) -> int:
    os.environ.setdefault("MODE", "tun")
    os.environ.setdefault("MVPD_TUN__ADDRESS", DEFAULT_ADDRESS[role])
    settings = load_settings()
    if not settings.peers:
        entry = {"mode": "tun", "allowed_ips": [PEER_ADDRESS[role]]}
        settings = load_settings(peers={peer or "*": entry})
    tunnel = Tunnel(settings)
    await tunnel.start()
    signaling = SignalingClient(settings)
    await signaling.connect()
    core = AgentCore(settings, signaling)
    core.add_connect_check(tunnel.check)
    core.add_transport_hook(tunnel.attach)
    await core.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    events = core.subscribe(kinds={"peer-state"})
    other = DEFAULT_ADDRESS["offer" if role == "answer" else "answer"].split("/")[0]

    async def report() -> None:
        async for event in events:
            state = event.data["state"]
            print(f"{event.peer}: {state} {event.data.get('reason') or ''}", file=sys.stderr)
            if state == "connected" and tunnel.device is not None:
                print(f"tunnel up on {tunnel.device.name} ({settings.tun.address}); try: "
                      f"ping {other}", file=sys.stderr)
            if state in ("closed", "failed") and role == "offer":
                stop.set()

    reporter = asyncio.ensure_future(report())
    code = 0
    try:
        if role == "offer":
            assert peer is not None
            await core.connect_to(peer, "tun")
        else:
            print(f"{settings.agent_id}: waiting for a peer ...", file=sys.stderr)
        await stop.wait()
    except Exception as exc:  # a clear line, not a traceback
        print(f"lan_demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        reporter.cancel()
        events.close()
        await core.stop()
        await tunnel.close()
        await signaling.close()
    return code


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in ("answer", "offer") or (args[0] == "offer") != (len(args) == 2):
        print("usage: lan_demo.py answer | lan_demo.py offer PEER", file=sys.stderr)
        sys.exit(2)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(args[0], args[1] if len(args) == 2 else None)))
