"""The control socket server: ``mvpctl`` (or any local program) drives ``mvpd`` through it.

A Unix stream socket speaking the frames and messages of :mod:`mvpd.proto.rpc`. The daemon
supplies a :class:`ControlHandler` (one coroutine per method of the method table
:data:`mvpd.proto.rpc.METHODS`). The conversation itself (hello, framing, the checks of every
request, the one access rule) is the sans-I/O :class:`mvpd.proto.control.ControlProtocol`;
this module is its asyncio layer and owns what needs I/O: the socket file, admission at
``accept``, peer credentials, the per-connection read loop that feeds the protocol and writes
what it says, concurrency limits, and the streams (``recv``, pipes) it serves.

Authorisation is by the kernel's peer credentials (``SO_PEERCRED``), checked on every call,
not by the socket's file mode alone: uid 0 and members of the configured group (primary or
supplementary) get ``write``; everyone else gets ``read`` (``status``, ``peers``) or nothing,
as configured. Every write call is logged with the caller's uid and pid.

The socket file lives in a directory only root can change (see :mod:`mvpd.socket_file`).

Admission happens at ``accept``, before the hello, from the peer credentials: a connection
over a limit of :class:`ControlLimits` is accepted at once, told ``busy`` in an error frame
and closed, so nobody can fill the listen backlog. The limits count every open connection,
those still waiting for their hello included: each uid but root has
:attr:`~ControlLimits.max_connections_per_uid` connections, at most
:attr:`~ControlLimits.max_pre_hello_per_uid` of them before their hello (which must come
within :attr:`~ControlLimits.hello_timeout` seconds); callers outside root and the group
share :attr:`~ControlLimits.max_read_only_connections` (each uid at most
:attr:`~ControlLimits.max_read_only_per_uid`); and the last
:attr:`~ControlLimits.reserved_for_root` of the :attr:`~ControlLimits.max_connections` are
root's. So no user outside the group can lock out root or the group, and no group member
can lock out root. When ``accept`` fails for want of file descriptors, that is logged
(rate-limited) and accepting resumes as soon as it can.

Per connection, at most :attr:`ControlLimits.max_inflight` calls run at once (further
requests are simply not read: the client's socket buffer fills up), at most
:attr:`ControlLimits.max_streams` subscriptions, and read-only callers may send frames of at
most :attr:`ControlLimits.read_only_max_frame` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import resource
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from .logs import RateLimitedLog, fields
from .proto.control import (
    Admission,
    CallReceived,
    CallRefused,
    ConnectionLedger,
    ConnectionState,
    ControlEvent,
    ControlLimits,
    ControlProtocol,
    HelloReceived,
    HelloRefused,
)
from .proto.errors import (
    BadRequest,
    Busy,
    ConfigError,
    ConnectionClosed,
    InvalidParams,
    MvpError,
    NotFound,
    RpcError,
)
from .proto.fsm import StateMachine
from .proto.pipe_states import PipeEvent, PipeState, eof_sent, pipe_machine
from .proto.rpc import (
    METHODS,
    Access,
    ConnectParams,
    NoParams,
    PeerMessage,
    PeerParams,
    PeerStatus,
    PipeWriteParams,
    RecvParams,
    ReloadResult,
    SendParams,
    SendResult,
    StatusResult,
    SubParams,
    encode_frame,
    error_message,
    event_message,
    result_message,
    to_wire,
)
from .socket_file import SocketFile

log = logging.getLogger("mvpd.control")

_UCRED = struct.Struct("3i")
_READ_CHUNK = 64 * 1024


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

    async def rpc_pipe_open(self, params: PeerParams, caller: Caller) -> PipeStream:
        """``pipe.open``: a byte pipe to ``params.peer`` (raise to refuse). See
        :class:`PipeStream`; ``pipe.write`` and ``pipe.eof`` are routed to it by the server."""
        ...

    async def rpc_reload(self, params: NoParams, caller: Caller) -> ReloadResult | dict[str, Any]:
        """``reload``: re-read the configuration; say which changes took effect."""
        ...


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def resolve_access(
    uid: int, gid: int, group: str, others_access: Literal["read", "none"]
) -> Access | None:
    """What a caller may do: ``write`` for root and members of ``group`` (primary gid or
    supplementary membership from the group database), else ``read`` or None (nothing)."""
    if uid == 0:
        return "write"
    try:
        group_id: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        group_id = None
    if group_id is not None:
        if gid == group_id:
            return "write"
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            user = None
        if user is not None and group_id in os.getgrouplist(user.pw_name, user.pw_gid):
            return "write"
    return "read" if others_access == "read" else None


#: accept() errors that mean "out of file descriptors or memory", not "that client is gone".
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: Seconds to wait before accepting again after one of those.
_ACCEPT_RETRY = 0.2


class ControlServer:
    """The control socket at ``path``, serving ``handler``.

    ``group`` and ``others_access`` configure authorisation (see the module docstring).
    ``await start()`` creates the socket (raising :class:`~mvpd.proto.errors.ConfigError`
    for a path it must not or cannot use, :class:`MvpError` if another mvpd already serves
    it), ``await close()`` stops serving, ends every connection and removes it."""

    def __init__(
        self,
        path: Path,
        handler: ControlHandler,
        *,
        group: str = "mvp",
        others_access: Literal["read", "none"] = "read",
        agent_id: str,
        version: str = "",
        limits: ControlLimits | None = None,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.others_access = others_access
        self.agent_id = agent_id
        self.server_name = f"mvpd {version}".strip()
        self.limits = limits or ControlLimits()
        #: The method table: each method of :data:`~mvpd.proto.rpc.METHODS` the server does
        #: not serve itself, and the handler's coroutine for it (missing: "not implemented").
        self.handlers: dict[str, Callable[[Any, Caller], Awaitable[Any]]] = {
            name: method
            for name, spec in METHODS.items()
            if not spec.builtin
            and (method := getattr(handler, spec.handler_name(name), None)) is not None
        }
        self._file: SocketFile | None = None
        self._listener: socket.socket | None = None
        self._resume_accepting: asyncio.TimerHandle | None = None
        self._connections: set[ControlConnection] = set()
        self._ledger = ConnectionLedger(self.limits, group)
        self._connection_tasks: set[asyncio.Task[None]] = set()
        # A hostile client must not be able to flood the journal with these.
        self._log_refusal = RateLimitedLog(log)
        self._log_exhausted = RateLimitedLog(log)

    @property
    def connections(self) -> int:
        """Connections open now (those waiting for their hello included)."""
        return len(self._ledger)

    async def start(self) -> None:
        """Create the socket and start accepting connections."""
        self._file = SocketFile(self.path)
        try:
            stale = await self._check_not_in_use()
            group_id = self._group_id()
            # Others need write permission on the socket to connect at all (for status).
            mode = 0o666 if self.others_access == "read" else 0o660 if group_id else 0o600
            try:
                self._listener = self._file.bind(
                    group_id=group_id, mode=mode, backlog=self.limits.backlog, stale=stale
                )
            except FileExistsError:
                raise MvpError(f"another mvpd started on {self.path} meanwhile") from None
            except OSError as exc:
                raise MvpError(f"cannot listen on control socket {self.path}: "
                               f"{exc.strerror or exc}") from None
        except BaseException:
            self._file.close()
            self._file = None
            raise
        self._start_accepting()
        log.info(
            "control socket %s: group %r may change things, others: %s",
            self.path,
            self.group,
            self.others_access,
        )

    async def close(self) -> None:
        """Stop accepting, end every connection (closing their streams), remove the socket."""
        if self._resume_accepting is not None:
            self._resume_accepting.cancel()
            self._resume_accepting = None
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self._connection_tasks)
        for task in tasks:  # also those still setting up their streams
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._file is not None:
            self._file.close()
            self._file = None
        self._log_refusal.flush()
        self._log_exhausted.flush()

    # --- socket file -----------------------------------------------------------------------

    async def _check_not_in_use(self) -> os.stat_result | None:
        """Refuse a path where something else than a stale socket is; return the stale
        socket's ``lstat`` (removed when the new socket is put in its place) or None."""
        assert self._file is not None
        st = self._file.existing()
        if st is None:
            return None
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                f"{self.path} exists and is not a socket; remove it or set another "
                "control socket path (MVPD_SOCKET)"
            )
        try:
            # The directory was checked: only root can have put this socket there.
            address = self._file.in_directory(self._file.name)
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(address), 2)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale control socket %s", self.path)
            return st
        except (TimeoutError, OSError) as exc:
            # Something is bound there but does not accept quickly: do not take it away.
            raise MvpError(
                f"another mvpd is running on {self.path} (it does not answer: {exc})"
            ) from None
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        raise MvpError(f"another mvpd is running on {self.path}")

    def _group_id(self) -> int | None:
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.warning("group %r does not exist: only root may change things", self.group)
            return None

    # --- accepting and admission ---------------------------------------------------------------

    def _start_accepting(self) -> None:
        self._resume_accepting = None
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)

    def _pause_accepting(self) -> None:
        """Stop watching the listener for a moment (the error would repeat at once)."""
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._listener.fileno())
        self._resume_accepting = loop.call_later(_ACCEPT_RETRY, self._start_accepting)

    def _accept_ready(self) -> None:
        """Accept every waiting connection at once (admission decides synchronously), so a
        flood of connections that never say hello cannot keep the listen backlog full;
        keep going through a shortage of file descriptors."""
        assert self._listener is not None
        for _ in range(self.limits.backlog):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that client is gone already
                if exc.errno in _RESOURCE_ERRORS:
                    self._log_exhausted.log(
                        logging.ERROR,
                        "control socket: cannot accept connections: %s (open file limit %d); "
                        "clients wait until descriptors are free: raise LimitNOFILE= in the "
                        "unit if this lasts",
                        exc.strerror,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    )
                else:
                    log.warning("control socket: accept failed: %s", exc)
                self._pause_accepting()
                return
            try:
                admission = self._admit(sock)
            except Exception:  # a bug here must cost one connection, never the listener
                log.exception("control connection admission failed")
                sock.close()
                continue
            if admission is not None:
                task = asyncio.create_task(self._serve_connection(sock, admission))
                self._connection_tasks.add(task)
                task.add_done_callback(self._connection_tasks.discard)

    def _admit(self, sock: socket.socket) -> Admission | None:
        """Count the new connection in, or refuse it (a ``busy`` frame, then close)."""
        sock.setblocking(False)
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError as exc:
            log.warning("control connection without peer credentials refused: %s", exc)
            sock.close()
            return None
        access = resolve_access(uid, gid, self.group, self.others_access)
        refusal = self._ledger.refusal(uid, access)
        if refusal is not None:
            self._log_refusal.warning("control connection refused: uid=%d pid=%d: %s",
                                      uid, pid, refusal)
            with contextlib.suppress(OSError):
                # A new socket's send buffer is empty: this small frame fits at once.
                sock.send(encode_frame(error_message(None, Busy(refusal))))
            sock.close()
            return None
        admission = self._ledger.admit(pid, uid, gid, access)
        return admission

    async def _serve_connection(self, sock: socket.socket, admission: Admission) -> None:
        conn: ControlConnection | None = None
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_READ_CHUNK)
            except BaseException:
                sock.close()
                raise
            conn = ControlConnection(self, reader, writer, admission)
            self._connections.add(conn)
            await conn.run()
        except OSError as exc:
            log.debug("control connection uid=%d lost: %s", admission.uid, exc)
        finally:
            self._ledger.release(admission)
            if conn is not None:
                self._connections.discard(conn)


@dataclass(eq=False)
class _ServedStream:
    """One subscription of a control connection: a ``recv`` stream or a pipe.

    A pipe's progress is the table of :mod:`mvpd.proto.pipe_states`, seen from the client:
    its ``pipe.eof`` ends the local direction, the peer's ``eof`` the remote one; the pipe
    ends once both did, or when it broke."""

    sub: int
    kind: Literal["recv", "pipe"]
    task: asyncio.Task[None] | None = None
    pipe: PipeStream | None = None
    queue: asyncio.Queue[tuple[int, str, Any]] | None = None
    writer_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None
    stream: StateMachine[PipeState, PipeEvent] = field(
        default_factory=lambda: pipe_machine(PipeState.OPEN)
    )
    #: Why the stream failed (its ``error`` event was sent): said once, and to the
    #: ``pipe.write``/``pipe.eof`` calls still waiting when it ends.
    failure: Exception | None = None
    #: The ``pipe.write``/``pipe.eof`` request being carried out.
    writing: int | None = None
    ended: bool = False

    def advance(self, event: PipeEvent) -> None:
        """Apply ``event`` if the pipe's table takes it (a stream that broke takes no EOF)."""
        if self.stream.accepts(event):
            self.stream.handle(event)


class ControlConnection:
    """One client connection: feeds what it reads to a :class:`ControlProtocol` and writes
    what that says; serves the calls it lets through (handler calls, streams, pipes)."""

    def __init__(
        self,
        server: ControlServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admission: Admission,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.admission = admission
        self.caller: Caller | None = None
        limits = server.limits
        group = server.group
        self.protocol = ControlProtocol(
            access=admission.access,
            server_name=server.server_name,
            agent_id=server.agent_id,
            forbidden_text=(
                f"uid {admission.uid} may not use this control socket: only root and members "
                f"of group {group!r} may (add the user with `usermod -aG {group} USER` and "
                "log in again)"
            ),
            write_hint=f"only root and members of group {group!r} may change things",
            max_frame=limits.max_frame,
            read_only_max_frame=limits.read_only_max_frame,
        )
        self._access_at = 0.0
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: dict[int, _ServedStream] = {}
        self._next_sub = 1
        self._streams_reserved = 0
        self._closing = False
        self._main: asyncio.Task[Any] | None = None
        self._builtins: dict[str, Callable[[CallReceived], Awaitable[None]]] = {
            "pipe.write": self._enqueue_pipe,
            "pipe.eof": self._enqueue_pipe,
            "cancel": self._cancel,
        }

    def abort(self) -> None:
        """End this connection from outside (server shutdown)."""
        self._closing = True
        if self._main is not None:
            self._main.cancel()

    async def run(self) -> None:
        self._main = asyncio.current_task()
        limits = self.server.limits
        pid, uid = self.admission.pid, self.admission.uid
        try:
            await self._serve()
        except (asyncio.CancelledError, ConnectionClosed):
            pass
        except OSError as exc:  # the client vanished mid-write (EPIPE, ECONNRESET)
            log.debug("control connection uid=%d pid=%d lost: %s", uid, pid, exc)
        except Exception:  # a bug here must cost one connection, never the daemon
            log.exception("control connection uid=%d pid=%d failed", uid, pid)
        finally:
            self._closing = True
            await self._teardown()
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), limits.hello_timeout)

    async def _serve(self) -> None:
        limits = self.server.limits
        protocol = self.protocol
        # The hello: the first frame, within hello_timeout.
        try:
            async with asyncio.timeout(limits.hello_timeout):
                while protocol.state == ConnectionState.AWAITING_HELLO:
                    chunk = await self.reader.read(_READ_CHUNK)
                    if not chunk:
                        return
                    protocol.receive_data(chunk)
        except TimeoutError:
            protocol.hello_timed_out()
        slots = asyncio.Semaphore(limits.max_inflight)
        while True:
            await self._flush(quiet=protocol.closing)
            for event in protocol.events_received():
                await self._on_event(event, slots)
            if protocol.closing:
                return
            chunk = await self.reader.read(_READ_CHUNK)
            if not chunk:
                return
            self._refresh_access()
            protocol.receive_data(chunk)

    def _refresh_access(self) -> None:
        """Look the caller's access up again once :attr:`ControlLimits.access_ttl` passed
        (group membership can change); :class:`ConnectionClosed` if it is gone."""
        caller = self.caller
        if caller is None:
            return
        now = time.monotonic()
        if now - self._access_at < self.server.limits.access_ttl:
            return
        access = resolve_access(caller.uid, caller.gid, self.server.group,
                                self.server.others_access)
        self._access_at = now
        if access != caller.access:
            log.info("control caller %s: access changed to %s", caller, access)
            if access is None:
                raise ConnectionClosed("access revoked")
            self.caller = Caller(caller.pid, caller.uid, caller.gid, access)
            self.protocol.access = access

    # --- dispatch ------------------------------------------------------------------------------

    async def _on_event(self, event: ControlEvent, slots: asyncio.Semaphore) -> None:
        admission = self.admission
        if isinstance(event, HelloReceived):
            admission.hello_pending = False
            self.caller = Caller(admission.pid, admission.uid, admission.gid, event.access)
            self._access_at = time.monotonic()
            log.debug("control client %r connected: %s access=%s", event.client, self.caller,
                      event.access)
            return
        if isinstance(event, HelloRefused):
            log.info("control connection refused: uid=%d pid=%d is not in group %r",
                     admission.uid, admission.pid, self.server.group)
            return
        caller = self.caller
        assert caller is not None
        if isinstance(event, CallRefused):
            log.warning(
                "refused control call %s by %s: not root and not in group %r",
                event.method, caller, self.server.group,
                extra=fields(event="rpc-refused", rpc_method=event.method,
                             caller_uid=caller.uid, caller_pid=caller.pid),
            )
            return
        if event.spec.access == "write":
            log.log(
                logging.DEBUG if event.method == "pipe.write" else logging.INFO,
                "control call %s by %s", event.method, caller,
                extra=fields(event="rpc-call", rpc_method=event.method, caller_uid=caller.uid,
                             caller_pid=caller.pid),
            )
        builtin = self._builtins.get(event.method)
        if builtin is not None:
            await builtin(event)
            return
        await slots.acquire()
        self._spawn(self._call(event, caller), slots.release)

    async def _cancel(self, call: CallReceived) -> None:
        assert isinstance(call.params, SubParams)
        sub = self._subs.get(call.params.sub)
        if sub is None:
            await self._send(error_message(call.id, NotFound(f"no subscription {call.params.sub}")))
            return
        await self._send(result_message(call.id, {}))
        await self._end(sub, cancel=True)

    def _spawn(
        self, coro: Awaitable[None], on_done: Callable[[], None] | None = None
    ) -> asyncio.Task[None]:
        async def wrapped() -> None:
            # A task's exception must end here: nobody awaits these tasks' results.
            try:
                await coro
            except (ConnectionClosed, OSError):
                pass  # the client went away; teardown closes the rest
            except Exception:
                log.exception("control connection task failed")

        task = asyncio.create_task(wrapped())
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if on_done is not None:
                on_done()

        task.add_done_callback(done)
        return task

    async def _call(self, call: CallReceived, caller: Caller) -> None:
        handler_method = self.server.handlers.get(call.method)
        try:
            if handler_method is None:
                raise RpcError(f"{call.method} is not implemented by this mvpd")
            if call.spec.stream:
                if len(self._subs) + self._streams_reserved >= self.server.limits.max_streams:
                    raise Busy(
                        f"too many streams on this connection "
                        f"({self.server.limits.max_streams} at most)"
                    )
                self._streams_reserved += 1
                try:
                    value = await handler_method(call.params, caller)
                finally:
                    self._streams_reserved -= 1
                await self._start_stream(call, value)
                return
            result = to_wire(await handler_method(call.params, caller))
            frame = result_message(call.id, {} if result is None else result)
            await self._send(frame)
        except asyncio.CancelledError:
            raise
        except ConnectionClosed:
            return
        except Exception as exc:
            if not isinstance(exc, MvpError | TimeoutError):
                log.exception("control call %s by %s failed", call.method, caller)
            with contextlib.suppress(ConnectionClosed):
                await self._send(error_message(call.id, exc))

    # --- streams -------------------------------------------------------------------------------

    async def _start_stream(self, call: CallReceived, value: Any) -> None:
        sub = _ServedStream(self._next_sub, "pipe" if call.method == "pipe.open" else "recv")
        self._next_sub += 1
        if sub.kind == "pipe":
            sub.pipe = value
            sub.queue = asyncio.Queue(self.server.limits.pipe_queue)
        self._subs[sub.sub] = sub
        try:
            await self._send(result_message(call.id, {"sub": sub.sub}))
        except BaseException:
            await self._end(sub, cancel=True, notify=False)
            raise
        if sub.kind == "recv":
            sub.task = self._spawn(self._pump_messages(sub, value))
        else:
            sub.task = self._spawn(self._pump_pipe(sub))
            sub.writer_task = self._spawn(self._pipe_writer(sub))
            sub.watch_task = self._spawn(self._watch_pipe(sub))

    async def _pump_messages(
        self, sub: _ServedStream, messages: AsyncIterator[PeerMessage]
    ) -> None:
        try:
            async for message in messages:
                await self._send(event_message(sub.sub, "message", to_wire(message)))
        except (asyncio.CancelledError, ConnectionClosed):
            raise
        except Exception as exc:
            await self._stream_error(sub, exc)
        finally:
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        sub.task = None
        await self._end(sub)

    # A pipe's own failures (the peer went away) are told to the client; only a failure to
    # write to the client itself (ConnectionClosed from _send) means the client is gone. The
    # two are kept apart by never sending from inside the try that calls into the pipe.

    async def _pump_pipe(self, sub: _ServedStream) -> None:
        assert sub.pipe is not None
        chunks = sub.pipe.read()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._fail_stream(sub, exc)
                return
            await self._send(event_message(sub.sub, "data", {"data": bytes(chunk)}))
        await self._send(event_message(sub.sub, "eof"))
        sub.advance(PipeEvent.EOF_RECEIVED)
        sub.task = None
        if sub.stream.state == PipeState.CLOSED:
            await self._end(sub)

    async def _pipe_writer(self, sub: _ServedStream) -> None:
        assert sub.pipe is not None and sub.queue is not None
        while True:
            request_id, method, data = await sub.queue.get()
            sub.writing = request_id
            reply: dict[str, Any]
            try:
                if eof_sent(sub.stream.state):
                    raise BadRequest(f"pipe {sub.sub}: the writing side has already ended")
                if method == "pipe.write":
                    await sub.pipe.write(data)
                else:
                    await sub.pipe.write_eof()
                    sub.advance(PipeEvent.EOF_SENT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, MvpError | TimeoutError):
                    log.exception("pipe %s failed", method)
                reply = error_message(request_id, exc)
            else:
                reply = result_message(request_id, {})
            sub.writing = None
            await self._send(reply)
            if sub.stream.state == PipeState.CLOSED:
                sub.writer_task = None
                await self._end(sub)
                return

    async def _watch_pipe(self, sub: _ServedStream) -> None:
        assert sub.pipe is not None
        try:
            error: Exception = await sub.pipe.wait_broken()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        sub.watch_task = None
        await self._fail_stream(sub, error)

    async def _fail_stream(self, sub: _ServedStream, exc: Exception) -> None:
        """The stream cannot go on: one ``error`` event, then ``end``."""
        if sub.ended or sub.failure is not None:
            return
        sub.failure = exc
        sub.advance(PipeEvent.FAILED)
        await self._stream_error(sub, exc)
        await self._end(sub)

    async def _enqueue_pipe(self, call: CallReceived) -> None:
        params = call.params
        assert isinstance(params, PipeWriteParams | SubParams)
        sub = self._subs.get(params.sub)
        if sub is None or sub.ended:
            await self._send(error_message(call.id, NotFound(f"no subscription {params.sub}")))
            return
        if sub.kind != "pipe" or sub.queue is None:
            await self._send(
                error_message(call.id, InvalidParams(f"subscription {params.sub} is not a pipe"))
            )
            return
        data = params.data if isinstance(params, PipeWriteParams) else None
        # Awaiting here stops reading this connection while the pipe is backed up.
        await sub.queue.put((call.id, call.method, data))
        if sub.ended:  # it ended while we waited for room: nobody will carry this out
            reason = sub.failure or ConnectionClosed(f"pipe {sub.sub} has ended")
            await self._send(error_message(call.id, reason))

    async def _stream_error(self, sub: _ServedStream, exc: Exception) -> None:
        if not isinstance(exc, MvpError | TimeoutError):
            log.exception("stream %d failed", sub.sub)
        await self._send(event_message(sub.sub, "error", error_message(None, exc)["error"]))

    async def _end(self, sub: _ServedStream, *, cancel: bool = False, notify: bool = True) -> None:
        """Finish a subscription once: stop its tasks, close its pipe, send ``end``."""
        if sub.ended:
            return
        sub.ended = True
        current = asyncio.current_task()
        for task in (sub.task, sub.writer_task, sub.watch_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if sub.pipe is not None:
            try:
                await sub.pipe.close()
            except Exception:
                log.exception("closing pipe %d failed", sub.sub)
        self._subs.pop(sub.sub, None)
        if sub.queue is not None and not self._closing:
            # Writes that were waiting get an answer too (clients may wait for each one).
            unanswered = [sub.writing] if sub.writing is not None else []
            while not sub.queue.empty():
                unanswered.append(sub.queue.get_nowait()[0])
            reason = sub.failure or ConnectionClosed(f"pipe {sub.sub} has ended")
            for request_id in unanswered:
                with contextlib.suppress(ConnectionClosed):
                    await self._send(error_message(request_id, reason))
        if notify and not self._closing:
            with contextlib.suppress(ConnectionClosed):
                await self._send(event_message(sub.sub, "end"))

    async def _teardown(self) -> None:
        for sub in list(self._subs.values()):
            await self._end(sub, cancel=True, notify=False)
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # --- writing -------------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        """Write one message (and anything the protocol had queued before it)."""
        async with self._write_lock:
            self.protocol.send(message)
            await self._write(self.protocol.data_to_send())

    async def _flush(self, *, quiet: bool = False) -> None:
        """Write what the protocol queued on its own (hello answer, error replies); ``quiet``
        when the connection ends anyway and a client already gone does not matter."""
        async with self._write_lock:
            data = self.protocol.data_to_send()
            if not data:
                return
            try:
                await self._write(data)
            except ConnectionClosed:
                if not quiet:
                    raise

    async def _write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionClosed("control client went away")
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(f"control client went away: {exc}") from None
