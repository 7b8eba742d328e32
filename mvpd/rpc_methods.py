"""What each control RPC does: the daemon's side of :class:`mvpd.control.ControlHandler`.

The control server has already authorised the caller and validated the parameters; these
methods turn a call into work on the :class:`~mvpd.core.AgentCore` and shape the answer.
Messages from peers wait in a bounded inbox per peer until ``mvpctl recv`` (or ``chat``)
takes them; the oldest are dropped, and counted, when nobody reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from . import __version__
from .config import AgentSettings
from .control import Caller, PipeStream
from .core import AgentCore, CoreEvent
from .peer import PeerSession, PeerState
from .proto.errors import ConnectionClosed, MvpError, NotFound, PeerError, RpcTimeout
from .proto.rpc import (
    ConnectParams,
    Message,
    NoParams,
    PeerParams,
    PeerStatus,
    RecvParams,
    ReloadResult,
    SendParams,
    SendResult,
    SignalingStatus,
    StatusResult,
)
from .transports import PipeTransport, Transport, TunTransport
from .transports.base import encode_json

log = logging.getLogger("mvpd.rpc")

#: How long a new connect waits for a signaling reconnect in progress before failing.
SIGNALING_GRACE = 3.0
#: Messages kept per peer for ``recv`` before the oldest are dropped.
INBOX_SIZE = 1000
#: Most bytes handed to the client in one pipe ``data`` event.
PIPE_READ_CHUNK = 64 * 1024


class PeerInbox:
    """Messages received from one peer, waiting for a reader."""

    def __init__(self, size: int = INBOX_SIZE) -> None:
        self.messages: collections.deque[Message] = collections.deque(maxlen=size)
        self.dropped = 0
        self.changed = asyncio.Event()

    def put(self, message: Message) -> None:
        if len(self.messages) == self.messages.maxlen:
            self.dropped += 1
        self.messages.append(message)
        self.changed.set()

    def close(self) -> None:
        self.changed.set()


class CorePipe:
    """A :class:`PipeStream` to one peer: what the client writes goes out on a pipe channel
    we open; what it reads comes from the next pipe channel the peer opens (its own
    ``mvpctl pipe``). One channel per direction, so both sides may start at any moment.

    Whatever stops a direction early (the peer's ``mvpctl pipe`` quit, the peer disconnected,
    the connection was lost) becomes a :class:`PeerError` saying which, never a clean end."""

    def __init__(self, session: PeerSession, outgoing: PipeTransport) -> None:
        self.session = session
        self.outgoing = outgoing
        self.incoming: PipeTransport | None = None

    async def _broken(self) -> PeerError:
        return PeerError(await self.session.pipe_end_reason())

    async def read(self) -> AsyncIterator[bytes]:
        self.incoming = await self.session.wait_pipe()
        try:
            while chunk := await self.incoming.read(PIPE_READ_CHUNK):
                yield chunk
        except ConnectionClosed:
            raise await self._broken() from None
        # Read to the end (the peer has our EOF-ACK): the sending side's channel is done.
        self.incoming.close()

    async def write(self, data: bytes) -> None:
        try:
            await self.outgoing.write(data)
        except ConnectionClosed:
            raise await self._broken() from None

    async def write_eof(self) -> None:
        """Send EOF and return once the peer's reader has taken the whole stream."""
        try:
            await self.outgoing.write_eof()
            await self.outgoing.wait_eof_acknowledged()
        except ConnectionClosed:
            raise await self._broken() from None
        self.outgoing.close()

    async def wait_broken(self) -> MvpError:
        await self.outgoing.wait_closed()
        if self.outgoing.eof_acknowledged:
            await asyncio.Event().wait()  # a complete stream: nothing to report, ever
        return await self._broken()

    async def close(self) -> None:
        # The outgoing stream is complete or abandoned by now (the client went away): either
        # way it ends here, and the peer sees a truncated stream unless it had our EOF.
        self.outgoing.close()
        if self.incoming is not None and not self.incoming.at_eof:
            self.incoming.close()


class RpcMethods:
    """The control handler of a running daemon."""

    def __init__(
        self,
        settings: AgentSettings,
        core: AgentCore,
        *,
        signaling_state: Callable[[], str],
        reload: Callable[[], ReloadResult] | None = None,
    ) -> None:
        self.settings = settings
        self.core = core
        self.started = time.time()
        self._signaling_state = signaling_state
        self._reload = reload
        self.inboxes: dict[str, PeerInbox] = {}
        self._events = core.subscribe(kinds={"message", "peer-state"}, maxsize=4096)
        self._pump = asyncio.ensure_future(self._collect())
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        self._events.close()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        for inbox in self.inboxes.values():
            inbox.close()

    async def _collect(self) -> None:
        async for event in self._events:
            self._on_event(event)

    def _on_event(self, event: CoreEvent) -> None:
        if event.kind == "message":
            value = event.data["message"]
            kind = {"chat": "text", "json": "json"}.get(event.data["mode"], "bytes")
            if kind == "bytes" and isinstance(value, str):
                value = value.encode()
            self.inbox(event.peer).put(Message(peer=event.peer, kind=kind, data=value))
        elif event.kind == "peer-state" and event.data["state"] in ("closed", "failed"):
            inbox = self.inboxes.get(event.peer)
            if inbox is not None:
                inbox.changed.set()
                if not inbox.messages:  # keep unread messages; forget empty inboxes
                    del self.inboxes[event.peer]

    def inbox(self, peer: str) -> PeerInbox:
        inbox = self.inboxes.get(peer)
        if inbox is None:
            inbox = self.inboxes[peer] = PeerInbox()
        return inbox

    # --- read methods ----------------------------------------------------------------------

    async def rpc_status(self, params: NoParams, caller: Caller) -> StatusResult:
        return StatusResult(
            agent_id=self.settings.agent_id,
            version=__version__,
            uptime=time.time() - self.started,
            signaling=SignalingStatus(
                url=self.settings.signaling_url, state=self._signaling_state()
            ),
            peers=self._peer_list(),
            refused_offers=dict(self.core.admission.refused),
        )

    async def rpc_peers(self, params: NoParams, caller: Caller) -> list[PeerStatus]:
        return self._peer_list()

    def _peer_list(self) -> list[PeerStatus]:
        return [self.peer_status(s) for _, s in sorted(self.core.sessions.items())]

    def peer_status(self, session: PeerSession) -> PeerStatus:
        """One peer as ``mvpctl status`` shows it."""
        snap = session.snapshot()
        totals = collections.Counter[str]()
        dropped = collections.Counter[str]()
        for counters in snap["transports"].values():
            for key in ("bytes_in", "bytes_out", "messages_in", "messages_out"):
                totals[key] += counters[key]
            dropped.update(counters["errors"])
            if counters["dropped_in"]:
                dropped["receive-queue-full"] += counters["dropped_in"]
        if snap["signaling_dropped"]:
            dropped["signaling-backlog"] += snap["signaling_dropped"]
        inbox = self.inboxes.get(session.peer_id)
        if inbox is not None and inbox.dropped:
            dropped["inbox-full"] += inbox.dropped
        tun = _tun_status(session.transport)
        if tun is not None:
            dropped.update(tun["drops"])
        ice = snap["ice"]
        return PeerStatus(
            peer=session.peer_id,
            state=snap["state"],
            mode=snap["mode"],
            since=snap["since"] if session.state == PeerState.CONNECTED else None,
            path=ice["path"] or "unknown",
            local_candidate=ice["local_candidate"],
            remote_candidate=ice["remote_candidate"],
            dropped=dict(dropped),
            error=snap["failure"],
            tun=tun,
            **totals,
        )

    # --- write methods ---------------------------------------------------------------------

    async def rpc_connect(self, params: ConnectParams, caller: Caller) -> PeerStatus:
        log.info("connect to %s requested by %s", params.peer, caller)
        session = self.core.get_session(params.peer)
        if session is None or session.state.is_final:
            await self._require_signaling()
        if not params.wait:
            task = asyncio.ensure_future(self.core.connect_to(params.peer, params.mode))
            task.add_done_callback(_log_background_failure(params.peer))
            await asyncio.sleep(0)  # let the session come into being
            session = self.core.get_session(params.peer)
            if session is None:  # failed at once (bad mode, ourselves, ...)
                await task
                raise PeerError(f"could not start a connection to {params.peer}")
            return self.peer_status(session)
        timeout = params.timeout or self.settings.connect_timeout
        try:
            await asyncio.wait_for(self.core.connect_to(params.peer, params.mode), timeout)
        except asyncio.TimeoutError:
            await self.core.disconnect(params.peer, "connect timed out")
            raise RpcTimeout(
                f"no data channel to {params.peer} opened within {timeout:g} s; is the peer "
                "running and registered with the same signaling server?"
            ) from None
        return self.peer_status(self._session(params.peer))

    async def _require_signaling(self) -> None:
        """A new connection needs the signaling server: say so at once when it is away
        (after a short grace period for a reconnect in progress) rather than time out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SIGNALING_GRACE
        while (state := self._signaling_state()) != "connected":
            if loop.time() >= deadline:
                raise PeerError(
                    f"the signaling server {self.settings.signaling_url} is not reachable "
                    f"(signaling {state}), so no new connection can be set up; connected "
                    "peers keep working. `mvpctl status` shows the signaling state."
                )
            await asyncio.sleep(0.1)

    async def rpc_disconnect(self, params: PeerParams, caller: Caller) -> None:
        log.info("disconnect from %s requested by %s", params.peer, caller)
        if not await self.core.disconnect(params.peer, f"disconnected by uid {caller.uid}"):
            raise NotFound(f"not connected to {params.peer}")

    async def rpc_send(self, params: SendParams, caller: Caller) -> SendResult:
        transport = self._transport(params.peer)
        kind = params.kind
        if kind == "text":
            assert params.text is not None
            payload: str | bytes = params.text
            if transport.mode == "bytes":
                payload = params.text.encode()
        elif kind == "json":
            payload = encode_json(params.json_value)
            if transport.mode == "bytes":
                payload = payload.encode()
        else:
            assert params.data is not None
            payload = params.data
            if transport.mode in ("chat", "json"):
                try:
                    payload = params.data.decode()
                except UnicodeDecodeError:
                    raise PeerError(
                        f"{params.peer} is connected in {transport.mode} mode, which carries "
                        "text; this data is not UTF-8: connect with --mode bytes"
                    ) from None
        if transport.mode == "json" and kind != "json":
            try:
                json.loads(payload)
            except ValueError:
                raise PeerError(
                    f"{params.peer} is connected in json mode and this is not JSON; "
                    "use --json or connect with --mode chat"
                ) from None
        if isinstance(payload, str):
            await transport.send_text_async(payload)
            size = len(payload.encode())
        else:
            await transport.send_bytes_async(payload)
            size = len(payload)
        return SendResult(bytes=size)

    async def rpc_recv(self, params: RecvParams, caller: Caller) -> AsyncIterator[Message]:
        queued = params.peer in self.inboxes and self.inboxes[params.peer].messages
        if not params.follow and not queued and self.core.get_session(params.peer) is None:
            raise NotFound(f"not connected to {params.peer} and no messages from it")
        return self._follow(params)

    async def _follow(self, params: RecvParams) -> AsyncIterator[Message]:
        """Queued messages, then (following) new ones until the daemon stops. A follower
        may wait for a peer that is not connected yet: ``chat`` starts that way."""
        left = params.limit
        while (left is None or left > 0) and not self._closed:
            # Looked up each time: the inbox of a peer that left is replaced when it returns.
            inbox = self.inbox(params.peer)
            if inbox.messages:
                yield inbox.messages.popleft()
                if left is not None:
                    left -= 1
                continue
            if not params.follow:
                return
            inbox.changed.clear()
            await inbox.changed.wait()

    async def rpc_pipe_open(self, params: PeerParams, caller: Caller) -> PipeStream:
        session = self._session(params.peer)
        log.info("pipe to %s opened by %s", params.peer, caller)
        return CorePipe(session, await session.open_pipe())

    async def rpc_reload(self, params: NoParams, caller: Caller) -> ReloadResult:
        log.info("reload requested by %s", caller)
        if self._reload is None:
            return ReloadResult(not_applied=["reload is not supported here"])
        return self._reload()

    # --- helpers ---------------------------------------------------------------------------

    def _session(self, peer: str) -> PeerSession:
        session = self.core.get_session(peer)
        if session is None or session.state.is_final:
            raise NotFound(f"not connected to {peer}; run `mvpctl connect {peer}` first")
        return session

    def _transport(self, peer: str) -> Transport[Any]:
        session = self._session(peer)
        transport = session.transport
        if transport is None or not transport.is_open:
            raise PeerError(f"the connection to {peer} is {session.state.value}, not open yet")
        return transport


def _tun_status(transport: Transport[Any] | None) -> dict[str, Any] | None:
    """The TUN part of a peer's status (device, addresses, packets, drops), if tun mode."""
    return transport.tun_status() if isinstance(transport, TunTransport) else None


def _log_background_failure(peer: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, MvpError):
            log.warning("connect to %s failed: %s", peer, exc)
        elif exc is not None:
            log.error("connect to %s failed", peer, exc_info=exc)

    return done
