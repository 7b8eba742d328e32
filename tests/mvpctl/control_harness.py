"""A ControlServer with a small in-memory handler, running in a thread.

The handler is a narrow fake of the daemon (no WebRTC): peers appear on ``connect``, a
message sent to a peer comes back on ``recv`` (an echo peer), a pipe echoes its bytes and its
EOF. It lets the control server and mvpctl be tested over a real Unix socket with
synchronous clients (and hypothesis), while the server runs its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

from mvpd.control import ControlServer
from mvpd.control_handler import Caller
from mvpd.proto.control import ControlLimits
from mvpd.proto.errors import ConnectionClosed, MvpError, NotFound, PeerError, RpcTimeout
from mvpd.proto.rpc import (
    ConnectParams,
    NoParams,
    PeerMessage,
    PeerParams,
    PeerStatus,
    PipeOpenParams,
    RecvParams,
    ReloadResult,
    SendParams,
    SendResult,
    SignalingStatus,
    StatusResult,
)

T = TypeVar("T")


class EchoPipe:
    """A pipe whose peer sends back whatever it gets, EOF included."""

    def __init__(self, owner: FakeDaemon) -> None:
        self.owner = owner
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(4)
        self.closed = False
        #: Set it (to an error) to break the pipe as a peer going away would.
        self.broken: asyncio.Future[MvpError] = asyncio.get_running_loop().create_future()

    async def read(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.queue.get()
            if chunk is None:
                return
            yield chunk

    async def write(self, data: bytes) -> None:
        if data == b"fail\n":
            raise PeerError("the channel broke")
        if data == b"closed\n":  # what a pipe whose peer went away raises
            raise ConnectionClosed("the pipe closed while waiting for the reader")
        await self.queue.put(data)

    async def write_eof(self) -> None:
        await self.queue.put(None)

    async def wait_broken(self) -> MvpError:
        return await self.broken

    async def close(self) -> None:
        self.closed = True
        self.owner.pipes_closed += 1


class FakeDaemon:
    """Implements :class:`mvpd.control_handler.ControlHandler` in memory."""

    def __init__(self) -> None:
        self.started = time.time()
        self.peers: dict[str, PeerStatus] = {}
        self.inbox: dict[str, asyncio.Queue[PeerMessage]] = {}
        self.calls: list[tuple[str, Caller]] = []
        self.pipes_closed = 0
        self.pipes: list[EchoPipe] = []
        #: Each pipe.open's ``attach``: whether the client handed over its descriptors.
        self.pipes_attached: list[bool] = []
        self.streams_closed = 0

    async def rpc_status(self, params: NoParams, caller: Caller) -> StatusResult:
        self.calls.append(("status", caller))
        return StatusResult(
            agent_id="alice",
            version="0.1.0",
            uptime=time.time() - self.started,
            signaling=SignalingStatus(url="ws://127.0.0.1:8765", state="connected"),
            peers=list(self.peers.values()),
        )

    async def rpc_peers(self, params: NoParams, caller: Caller) -> list[PeerStatus]:
        return list(self.peers.values())

    async def rpc_connect(self, params: ConnectParams, caller: Caller) -> PeerStatus:
        self.calls.append(("connect", caller))
        if params.peer == "unreachable":
            raise PeerError("unreachable is offline on the signaling server")
        if params.peer == "slow" and params.wait:
            await asyncio.sleep(params.timeout or 30)
            raise RpcTimeout(f"slow: no open channel after {params.timeout or 30:g} s")
        if params.peer == "crash":
            raise RuntimeError("a bug")
        status = PeerStatus(
            peer=params.peer,
            state="connected",
            mode=params.mode or "chat",
            since=time.time() - 65,
            path="direct",
            local_candidate="127.0.0.1:5000 host",
            remote_candidate="127.0.0.1:5001 host",
        )
        self.peers[params.peer] = status
        self.inbox.setdefault(params.peer, asyncio.Queue())
        return status

    async def rpc_disconnect(self, params: PeerParams, caller: Caller) -> None:
        self._peer(params.peer)
        del self.peers[params.peer]
        self.inbox.pop(params.peer, None)

    async def rpc_send(self, params: SendParams, caller: Caller) -> SendResult:
        self._peer(params.peer)
        kind: Literal["text", "json", "bytes"] = params.kind
        data: Any = {"text": params.text, "bytes": params.data, "json": params.json_value}[kind]
        size = len(data) if isinstance(data, str | bytes) else len(repr(data))
        status = self.peers[params.peer]
        status.messages_out += 1
        status.bytes_out += size
        await self.inbox[params.peer].put(PeerMessage(peer=params.peer, kind=kind, data=data))
        return SendResult(bytes=size)

    async def rpc_recv(self, params: RecvParams, caller: Caller) -> AsyncIterator[PeerMessage]:
        self._peer(params.peer)
        queue = self.inbox[params.peer]

        async def messages() -> AsyncIterator[PeerMessage]:
            count = 0
            try:
                while params.limit is None or count < params.limit:
                    if queue.empty() and not params.follow:
                        return
                    message = await queue.get()
                    if message.kind == "text" and message.data == "bye":
                        return
                    if message.kind == "text" and message.data == "explode":
                        raise PeerError("the channel broke")
                    count += 1
                    yield message
            finally:
                self.streams_closed += 1

        return messages()

    async def rpc_pipe_open(self, params: PipeOpenParams, caller: Caller) -> EchoPipe:
        self._peer(params.peer)
        self.pipes_attached.append(params.attach)
        self.pipes.append(EchoPipe(self))
        return self.pipes[-1]

    async def rpc_reload(self, params: NoParams, caller: Caller) -> ReloadResult:
        return ReloadResult(applied=["log_level"], not_applied=["socket"])

    def _peer(self, peer: str) -> PeerStatus:
        if peer not in self.peers:
            raise NotFound(f"no peer {peer!r}")
        return self.peers[peer]


class ServerThread:
    """A ControlServer on its own event loop in a background thread."""

    def __init__(
        self,
        path: Path,
        *,
        group: str = "mvp",
        others_access: Literal["read", "none"] = "read",
        limits: ControlLimits | None = None,
    ) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.handler = FakeDaemon()
        self.server = ControlServer(
            path,
            self.handler,
            group=group,
            others_access=others_access,
            agent_id="alice",
            version="0.1.0",
            limits=limits,
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        self.run(self.server.start())
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
