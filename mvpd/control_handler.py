"""The contract between the control server and the daemon: who calls, and what it must do.

:class:`Caller` is a control client as the kernel names it (``SO_PEERCRED``) with the access
it was granted. :class:`ControlHandler` is what the daemon implements (one coroutine per
method of :data:`mvpd.proto.rpc.METHODS`; :class:`mvpd.rpc_methods.RpcMethods` is the
daemon's), and :class:`PipeStream` what its ``pipe.open`` returns. The server
(:mod:`mvpd.control`) authorises and validates before a handler runs; the streams it serves
from these are :mod:`mvpd.control_streams`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from .proto.errors import MvpError
from .proto.rpc import (
    Access,
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
    StatusResult,
)


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the kernel (``SO_PEERCRED`` at connect time), and what they may do.

    ``access`` is re-resolved (group membership can change) at most every
    :attr:`ControlLimits.access_ttl` seconds while a connection lives."""

    pid: int
    uid: int
    gid: int
    access: Access

    def __str__(self) -> str:
        return f"uid={self.uid} pid={self.pid}"


class PipeStream(Protocol):
    """A byte pipe to one peer, returned by :meth:`ControlHandler.rpc_pipe_open`.

    The control server owns it until it calls :meth:`close` (exactly once, always: when both
    directions are done, on ``cancel``, or when the client goes away)."""

    def read(self) -> AsyncIterator[bytes]:
        """Bytes from the peer, chunk by chunk; the iterator ends at the peer's EOF. Raise an
        :class:`MvpError` if the pipe breaks (it reaches the client as an ``error`` event).
        The server reads only as fast as the client takes the data (backpressure)."""
        ...

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the peer; return once the daemon has accepted it (e.g. the data
        channel's buffer is below its threshold). This await is the client's backpressure.
        Calls are never concurrent for one pipe and come in the client's order."""
        ...

    async def write_eof(self) -> None:
        """The client has no more data: tell the peer (end of stream). May return only once
        the peer has taken everything; raise an :class:`MvpError` if it cannot."""
        ...

    async def wait_broken(self) -> MvpError:
        """Return, with the error to report, as soon as the client's data can no longer reach
        the peer (its end closed, the connection to it was lost), even while the client
        writes nothing. Never returns for a pipe that works or ended cleanly; the server
        cancels it when the stream ends."""
        ...

    async def close(self) -> None:
        """Release everything (unsubscribe, stop reading). Must not raise."""
        ...


class ControlHandler(Protocol):
    """What the daemon implements: one coroutine per RPC method.

    Each receives the validated parameter model (see :data:`mvpd.proto.rpc.METHODS`) and the
    :class:`Caller` (already authorised for the method: the handler need not check access
    again). Results may be the pydantic models named below or equivalent plain dicts.

    Errors: raise an :class:`MvpError` with a message for the user; it becomes the error
    reply. Use :class:`~mvpd.proto.errors.NotFound` for an unknown peer,
    :class:`~mvpd.proto.errors.RpcTimeout` (or ``TimeoutError``) when a wait ran out, and
    :class:`~mvpd.proto.errors.PeerError` / ``TransportError`` (sent as ``peer-error``) when
    a peer connection failed. Any other exception is logged with its traceback here and
    the client sees only ``internal``. Cancellation (client gone) is delivered as
    ``asyncio.CancelledError``; let it propagate.
    """

    async def rpc_status(self, params: NoParams, caller: Caller) -> StatusResult | dict[str, Any]:
        """``status``: agent id, version, uptime, signaling state and every peer."""
        ...

    async def rpc_peers(
        self, params: NoParams, caller: Caller
    ) -> list[PeerStatus] | list[dict[str, Any]]:
        """``peers``: every known peer."""
        ...

    async def rpc_connect(
        self, params: ConnectParams, caller: Caller
    ) -> PeerStatus | dict[str, Any]:
        """``connect``: connect to ``params.peer`` (reuse an open connection); with
        ``params.wait`` return only once the channel is open, raising ``RpcTimeout`` after
        ``params.timeout`` (or the configured connect timeout)."""
        ...

    async def rpc_disconnect(self, params: PeerParams, caller: Caller) -> None:
        """``disconnect``: close the connection to ``params.peer`` (``NotFound`` if none)."""
        ...

    async def rpc_send(self, params: SendParams, caller: Caller) -> SendResult | dict[str, Any]:
        """``send``: one message; ``params.kind`` says which of ``text``, ``json_value``
        (wire name ``json``) and ``data`` was given. Return the number of bytes sent."""
        ...

    async def rpc_recv(self, params: RecvParams, caller: Caller) -> AsyncIterator[PeerMessage]:
        """``recv``: check the request (raise here, e.g. ``NotFound``, to refuse it), then
        return an async iterator of the peer's messages: those queued now, then, if
        ``params.follow``, new ones as they arrive, at most ``params.limit``.

        Return an async *generator* so its ``finally`` runs: the server calls ``aclose()``
        when the client cancels or goes away. End the iterator when the stream is over (not
        following and the queue is drained, or the peer is gone for good); the server then
        sends ``end``. An :class:`MvpError` raised while iterating becomes an ``error`` event.
        The server pulls the next message only after the previous one was written to the
        client's socket, so the daemon's own bounded queue is where a slow reader shows."""
        ...

    async def rpc_pipe_open(self, params: PipeOpenParams, caller: Caller) -> PipeStream:
        """``pipe.open``: a byte pipe to ``params.peer`` (raise to refuse). See
        :class:`PipeStream`; ``pipe.write`` and ``pipe.eof`` are routed to it by the server."""
        ...

    async def rpc_reload(self, params: NoParams, caller: Caller) -> ReloadResult | dict[str, Any]:
        """``reload``: re-read the configuration; say which changes took effect."""
        ...
