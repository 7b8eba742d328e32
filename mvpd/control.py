"""The control socket server: ``mvpctl`` (or any local program) drives ``mvpd`` through it.

A Unix stream socket speaking the frames and messages of :mod:`mvpd.proto.rpc`. The daemon
supplies a :class:`~mvpd.control_handler.ControlHandler` (one coroutine per method of the
method table :data:`mvpd.proto.rpc.METHODS`). The conversation itself (hello, framing, the
checks of every request, the one access rule) is the sans-I/O
:class:`mvpd.proto.control.ControlProtocol`; this module is its asyncio layer and owns what
needs I/O: the socket file, admission at ``accept``, peer credentials, the per-connection
read loop that feeds the protocol, writes what it says and calls the handler, and
concurrency limits. The streams it serves (``recv``, pipes) are
:mod:`mvpd.control_streams`. Connections are read with ``recvmsg``
(:class:`mvpd.passed_descriptors.ControlSocket`), so that a ``pipe.open`` with ``attach`` can
bring the caller's input and output along.

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
import inspect
import logging
import os
import pwd
import resource
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from .control_handler import Caller, ControlHandler
from .control_streams import AttachedPipes, ConnectionStreams
from .logs import RateLimitedLog, fields
from .passed_descriptors import ControlSocket
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
from .proto.errors import Busy, ConfigError, ConnectionClosed, MvpError, RpcError
from .proto.rpc import (
    METHODS,
    Access,
    PipeOpenParams,
    encode_frame,
    error_message,
    result_message,
    to_wire,
)
from .socket_file import SocketFile

log = logging.getLogger("mvpd.control")

_UCRED = struct.Struct("3i")
_READ_CHUNK = 256 * 1024


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
        self.attached_pipes = AttachedPipes(self.limits.max_attached_pipes)
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
                channel = ControlSocket(sock)
            except BaseException:
                sock.close()
                raise
            conn = ControlConnection(self, channel, admission)
            self._connections.add(conn)
            await conn.run()
        except OSError as exc:
            log.debug("control connection uid=%d lost: %s", admission.uid, exc)
        finally:
            self._ledger.release(admission)
            if conn is not None:
                self._connections.discard(conn)


class ControlConnection:
    """One client connection: feeds what it reads to a :class:`ControlProtocol` and writes
    what that says; serves the calls it lets through (handler calls here, streams and pipes
    through its :class:`~mvpd.control_streams.ConnectionStreams`)."""

    def __init__(
        self,
        server: ControlServer,
        channel: ControlSocket,
        admission: Admission,
    ) -> None:
        self.server = server
        self.channel = channel
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
        self._streams = ConnectionStreams(limits, self._send, self._spawn,
                                          server.attached_pipes)
        self._main: asyncio.Task[Any] | None = None
        self._builtins: dict[str, Callable[[CallReceived], Awaitable[None]]] = {
            "pipe.write": self._streams.enqueue_pipe,
            "pipe.eof": self._streams.enqueue_pipe,
            "cancel": self._streams.cancel,
        }

    def abort(self) -> None:
        """End this connection from outside (server shutdown)."""
        self._streams.closing = True
        if self._main is not None:
            self._main.cancel()

    async def run(self) -> None:
        self._main = asyncio.current_task()
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
            self._streams.closing = True
            await self._teardown()
            self.channel.close()

    async def _serve(self) -> None:
        limits = self.server.limits
        protocol = self.protocol
        # The hello: the first frame, within hello_timeout.
        try:
            async with asyncio.timeout(limits.hello_timeout):
                while protocol.state == ConnectionState.AWAITING_HELLO:
                    chunk = await self.channel.read(_READ_CHUNK)
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
            if not protocol.partial_frame:
                # Descriptors ride with their request's first bytes: any still here came
                # with requests that did not take them.
                self.channel.drop_descriptors()
            if protocol.closing:
                return
            chunk = await self.channel.read(_READ_CHUNK)
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
            # Every changing call is logged with its caller (README, security model), except
            # a pipe's writes: a line per 64 KiB would drown the journal.
            level = logging.DEBUG if event.method == "pipe.write" else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "control call %s by %s", event.method, caller,
                        extra=fields(event="rpc-call", rpc_method=event.method,
                                     caller_uid=caller.uid, caller_pid=caller.pid))
        builtin = self._builtins.get(event.method)
        if builtin is not None:
            await builtin(event)
            return
        if isinstance(event.params, PipeOpenParams) and event.params.attach:
            # Now, in the order of the requests: the descriptors came with this one's bytes.
            self._streams.adopt_descriptors(event, self.channel.take_descriptors(2))
        await slots.acquire()
        self._spawn(self._call(event, caller), slots.release)

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
            if t.cancelled() and inspect.iscoroutine(coro):
                # Cancelled (by teardown) before it ever ran: nothing else will await it.
                coro.close()
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
                await self._streams.open(call, lambda: handler_method(call.params, caller))
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

    async def _teardown(self) -> None:
        await self._streams.close()
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
        try:
            await self.channel.write(data)
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(f"control client went away: {exc}") from None
