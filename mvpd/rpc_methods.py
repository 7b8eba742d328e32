"""What each control RPC does: the daemon's side of
:class:`mvpd.control_handler.ControlHandler`.

The control server has already authorised the caller and validated the parameters; these
methods turn a call into work on the :class:`~mvpd.core.AgentCore` and shape the answer.
:class:`RpcMethods` is the handler: this module holds the methods on peers and their
messages (``connect``, ``disconnect``, ``send``, ``recv``, ``pipe.open``) and ``reload``;
``recv`` reads the core's inbox of the peer (:mod:`mvpd.inbox`), the one place received
messages wait; ``send`` hands the message to :meth:`AgentCore.send`; :class:`CorePipe` is
the pipe ``pipe.open`` returns. What shows the daemon (``status``, ``peers``, ``stats``,
``ping``) is :mod:`mvpd.rpc_observe`; identity and trust are :mod:`mvpd.rpc_identity`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .config import AgentSettings
from .control_handler import Caller, PipeStream
from .core import AgentCore
from .peer import PeerSession
from .ping import PingService
from .proto.errors import (
    ConnectionClosed,
    MvpError,
    NotFound,
    PeerError,
    RpcTimeout,
)
from .proto.rpc import (
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
)
from .rpc_identity import IdentityMethods
from .rpc_observe import ObserveMethods
from .stats import TrafficSampler
from .transports import PipeTransport

log = logging.getLogger("mvpd.rpc")

#: How long a new connect waits for a signaling reconnect in progress before failing.
SIGNALING_GRACE = 3.0
#: Most bytes handed to the client in one pipe ``data`` event.
PIPE_READ_CHUNK = 256 * 1024


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


class RpcMethods(ObserveMethods, IdentityMethods):
    """The control handler of a running daemon: the methods on peers and their messages
    here, ``status``, ``peers``, ``stats`` and ``ping`` from :class:`ObserveMethods`,
    ``id``, ``id.rotate``, ``trust`` and ``forget`` from :class:`IdentityMethods`."""

    def __init__(
        self,
        settings: AgentSettings,
        core: AgentCore,
        *,
        signaling_state: Callable[[], str],
        reload: Callable[[], ReloadResult] | None = None,
        sampler: TrafficSampler | None = None,
    ) -> None:
        self.settings = settings
        self.core = core
        self.started = time.time()
        self._signaling_state = signaling_state
        self._reload = reload
        self.sampler = sampler
        self.pings = PingService()

    async def close(self) -> None:
        """End every ``recv --follow`` (the daemon stops) and every ping."""
        self.pings.close()
        self.core.inboxes.close()

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
        except TimeoutError:
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
        self._session(params.peer)  # not connected: NotFound, as for the other methods
        value = {"text": params.text, "json": params.json_value, "bytes": params.data}
        size = await self.core.send(params.peer, params.kind, value[params.kind])
        return SendResult(bytes=size)

    async def rpc_recv(self, params: RecvParams, caller: Caller) -> AsyncIterator[PeerMessage]:
        inbox = self.core.inboxes.get(params.peer)
        if not params.follow and not inbox and self.core.get_session(params.peer) is None:
            raise NotFound(f"not connected to {params.peer} and no messages from it")
        return self._read(params)

    async def _read(self, params: RecvParams) -> AsyncIterator[PeerMessage]:
        """Queued messages, then (following) new ones until the daemon stops. A follower
        may wait for a peer that is not connected yet: ``chat`` starts that way."""
        async for message in self.core.inboxes.read(
            params.peer, follow=params.follow, limit=params.limit
        ):
            yield PeerMessage(peer=params.peer, kind=message.kind, data=message.value)

    async def rpc_pipe_open(self, params: PipeOpenParams, caller: Caller) -> PipeStream:
        session = self._session(params.peer)
        log.info("pipe to %s opened by %s%s", params.peer, caller,
                 " (copying its input and output)" if params.attach else "")
        return CorePipe(session, await session.open_pipe())

    async def rpc_reload(self, params: NoParams, caller: Caller) -> ReloadResult:
        log.info("reload requested by %s", caller)
        if self._reload is None:
            return ReloadResult(not_applied=["reload is not supported here"])
        return self._reload()



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
