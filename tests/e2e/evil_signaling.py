"""A hostile signaling server for the identity tests: it routes like ours (register, then
messages relayed by ``to`` with ``from`` filled in) until told to attack, and then:

* ``impersonate``: answers offers for the victim itself, with its own aiortc peer, and
  sends its own text on the channel;
* ``mitm``: sits between two agents: answers the offerer as the victim and offers to the
  victim as the offerer, with its own certificates, relaying the channels in between (a full
  man-in-the-middle terminating both DTLS sessions);
* ``replay``: sends the victim an offer recorded earlier, verbatim, and answers the ICE
  checks with the recorded ICE credentials, so that only DTLS stands in the way.

It runs its own event loop in a thread; everything it starts is closed by :meth:`stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from websockets.asyncio.server import Server, ServerConnection, serve

T = TypeVar("T")
ATTACKER_TEXT = "this is the attacker speaking"


class EvilSignaling:
    def __init__(self, ice: RTCConfiguration, mode: str = "chat") -> None:
        self.ice = ice
        self.mode = mode
        self.attack: str | None = None
        self.clients: dict[str, ServerConnection] = {}
        self.offers: list[dict[str, Any]] = []
        #: What the attacker's peers received on their channels.
        self.heard: list[Any] = []
        #: Channels of the attacker's peers that opened (DTLS and SCTP went through).
        self.opened: list[str] = []
        self.pcs: list[RTCPeerConnection] = []
        #: ICE states the attacker's peers went through.
        self.ice_reached: list[str] = []
        self._mitm_towards_victim: RTCPeerConnection | None = None
        self._replay_pc: RTCPeerConnection | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Server | None = None
        self.url = ""

    # --- running -------------------------------------------------------------------------

    def start(self) -> EvilSignaling:
        self._thread.start()
        async def listen() -> Server:
            return await serve(self._handle, "127.0.0.1", 0)

        self._server = self.call(listen())
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        async def shutdown() -> None:
            for pc in self.pcs:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pc.close(), 5)
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        with contextlib.suppress(Exception):
            self.call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # --- routing -------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        agent = None
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "register":
                    agent = message["id"]
                    self.clients[agent] = ws
                    await ws.send(json.dumps({"type": "registered", "id": agent}))
                elif agent is not None and "to" in message:
                    message["from"] = agent
                    await self._route(message)
        finally:
            if agent is not None and self.clients.get(agent) is ws:
                del self.clients[agent]

    async def _deliver(self, message: dict[str, Any]) -> None:
        ws = self.clients.get(message["to"])
        if ws is not None:
            await ws.send(json.dumps(message))

    async def _route(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "offer":
            self.offers.append(dict(message))
        if self.attack == "impersonate" and message["to"] == "bob":
            if kind == "offer":
                await self._impersonate(message)
            return
        if self.attack == "mitm" and kind in ("offer", "answer", "candidate"):
            if kind == "offer" and message["to"] == "bob":
                await self._mitm(message)
            elif kind == "answer" and message["to"] == "alice":
                assert self._mitm_towards_victim is not None
                await self._mitm_towards_victim.setRemoteDescription(
                    RTCSessionDescription(sdp=message["sdp"], type="answer"))
            return
        if self.attack == "replay" and kind == "answer" and message["to"] == "alice":
            assert self._replay_pc is not None
            await self._replay_pc.setRemoteDescription(
                RTCSessionDescription(sdp=message["sdp"], type="answer"))
            return
        await self._deliver(message)

    # --- the attacker's peers ------------------------------------------------------------

    def _new_pc(self) -> RTCPeerConnection:
        pc = RTCPeerConnection(self.ice)  # its own certificate, as any attacker's
        self.pcs.append(pc)
        pc.on("iceconnectionstatechange", lambda: self.ice_reached.append(pc.iceConnectionState))
        return pc

    def _listen(self, channel: Any, name: str, relay_to: list[Any] | None = None) -> None:
        """Record what ``channel`` receives and pass it on to ``relay_to[0]`` (as soon as
        that one is open) when relaying; else send the attacker's text once it opens."""
        waiting: list[Any] = []
        hooked: list[Any] = []

        def opened() -> None:
            self.opened.append(name)
            if relay_to is None:
                channel.send(ATTACKER_TEXT)

        def flush() -> None:
            if relay_to and relay_to[0].readyState == "open":
                while waiting:
                    relay_to[0].send(waiting.pop(0))

        def message(data: Any) -> None:
            self.heard.append(data)
            if relay_to is None:
                return
            waiting.append(data)
            if relay_to and relay_to[0] not in hooked:
                hooked.append(relay_to[0])
                relay_to[0].on("open", flush)
            flush()

        channel.on("message", message)
        channel.on("open", opened)
        if channel.readyState == "open":
            opened()

    async def _answer(self, pc: RTCPeerConnection, offer: dict[str, Any], as_: str) -> None:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self._deliver({"type": "answer", "from": as_, "to": offer["from"],
                             "sdp": pc.localDescription.sdp})

    async def _impersonate(self, offer: dict[str, Any]) -> None:
        pc = self._new_pc()
        pc.on("datachannel", lambda channel: self._listen(channel, "impersonated"))
        await self._answer(pc, offer, as_=offer["to"])

    async def _mitm(self, offer: dict[str, Any]) -> None:
        """Answer alice as bob, offer to bob as alice, relay between the two channels."""
        towards_alice, towards_bob = self._new_pc(), self._new_pc()
        self._mitm_towards_victim = towards_bob
        to_bob_channel = towards_bob.createDataChannel("mvp", protocol=self.mode)
        to_alice: list[Any] = []
        self._listen(to_bob_channel, "mitm-bob", relay_to=to_alice)

        def from_alice(channel: Any) -> None:
            to_alice.append(channel)
            self._listen(channel, "mitm-alice", relay_to=[to_bob_channel])

        towards_alice.on("datachannel", from_alice)
        await self._answer(towards_alice, offer, as_="bob")
        await towards_bob.setLocalDescription(await towards_bob.createOffer())
        await self._deliver({"type": "offer", "from": "alice", "to": "bob",
                             "sdp": towards_bob.localDescription.sdp})

    async def replay(self, sender: str, victim: str) -> None:
        """Send ``victim`` the first offer recorded from ``sender``, and get ready to
        answer ICE with the ICE credentials in it."""
        old = next(o for o in self.offers if o["from"] == sender and o["to"] == victim)
        self.attack = "replay"
        pc = self._replay_pc = self._new_pc()
        self._listen(pc.createDataChannel("mvp", protocol=self.mode), "replayed")
        await pc.setLocalDescription(await pc.createOffer())
        ufrag = next(line.split(":", 1)[1] for line in old["sdp"].splitlines()
                     if line.startswith("a=ice-ufrag:"))
        pwd = next(line.split(":", 1)[1] for line in old["sdp"].splitlines()
                   if line.startswith("a=ice-pwd:"))
        connection = pc.sctp.transport.transport.iceGatherer._connection  # type: ignore[union-attr]
        connection._local_username, connection._local_password = ufrag.strip(), pwd.strip()
        await self._deliver(dict(old))
