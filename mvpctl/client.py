"""A small synchronous client for the mvpd control socket.

Plain blocking sockets, no asyncio, no pydantic: ``mvpctl`` must start fast. It speaks the
protocol through :mod:`mvpd.proto.rpcwire` (the plain wire layer of :mod:`mvpd.proto.rpc`) and
imports nothing else from mvpd but the errors. One :class:`Client` is one
connection; it is not thread-safe (``mvpctl chat`` uses two connections and ``selectors``).

    with Client.connect() as client:
        print(client.call("status"))
        for event in client.subscribe("recv", peer="bob", follow=True):
            print(event.data)
"""

from __future__ import annotations

import array
import contextlib
import errno
import grp
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mvpd.proto.errors import ConnectionClosed, DaemonNotRunning, Forbidden, RpcTimeout
from mvpd.proto.rpcwire import (
    Event,
    FrameDecoder,
    Response,
    ServerHello,
    client_hello,
    encode_frame,
    error_from_wire,
    parse_server_hello,
    parse_server_message,
    request,
)

#: Where mvpd listens unless ``--socket`` or ``MVPD_SOCKET`` say otherwise.
DEFAULT_SOCKET = Path("/run/mvpd/mvpd.sock")
#: Seconds to wait for an answer to an ordinary call.
DEFAULT_TIMEOUT = 30.0
_RECV_SIZE = 256 * 1024


def socket_path(option: str | os.PathLike[str] | None = None) -> Path:
    """The control socket: the option, else ``MVPD_SOCKET``, else the default."""
    if option:
        return Path(option)
    return Path(os.environ.get("MVPD_SOCKET") or DEFAULT_SOCKET)


def _client_name() -> str:
    return "mvpctl"


class Client:
    """One connection to mvpd, after the hello. Use :meth:`connect` to make one."""

    def __init__(self, sock: socket.socket, path: Path, hello: ServerHello) -> None:
        self.sock = sock
        self.path = path
        self.hello = hello
        self._decoder = FrameDecoder()
        self._responses: dict[int, Response] = {}
        self._events: deque[Event] = deque()
        self._next_id = 1
        self._closed = False
        #: Frames queued by ``request(..., block=False)`` not fully sent yet.
        self._unsent = bytearray()

    # --- connecting ------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        client: str | None = None,
    ) -> Client:
        """Connect and exchange hellos. Raises :class:`DaemonNotRunning` when nothing listens,
        :class:`Forbidden` when the caller may not use the socket, :class:`RpcTimeout`."""
        where = socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            _connect_unix(sock, where, timeout)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            raise DaemonNotRunning(
                f"mvpd is not running (no socket at {where}); start it with "
                "`systemctl start mvpd` or `mvpd run`"
            ) from None
        except PermissionError:
            sock.close()
            raise Forbidden(_permission_text(where)) from None
        except TimeoutError:
            sock.close()
            raise RpcTimeout(f"mvpd did not accept the connection on {where} in time") from None
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise DaemonNotRunning(
                    f"mvpd is not running (no socket at {where}); start it with "
                    "`systemctl start mvpd` or `mvpd run`"
                ) from None
            raise ConnectionClosed(f"cannot connect to mvpd at {where}: {exc}") from None
        try:
            # If the daemon refuses us it may answer and close before our hello is written:
            # read its answer even if the write fails.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode_frame(client_hello(client or _client_name())))
            decoder = FrameDecoder()
            first = _read_one(sock, decoder, where)
            hello = parse_server_hello(first)
        except BaseException:
            sock.close()
            raise
        self = cls(sock, where, hello)
        self._decoder = decoder
        return self

    def close(self) -> None:
        """Close the connection (the daemon ends this connection's streams)."""
        if not self._closed:
            self._closed = True
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fileno(self) -> int:
        """The socket's descriptor, for ``selectors``."""
        return self.sock.fileno()

    @property
    def access(self) -> str:
        """``write`` or ``read``, as the daemon decided from our credentials."""
        return self.hello.access

    # --- calls -----------------------------------------------------------------------------

    def request(
        self, method: str, /, *, fds: Sequence[int] = (), block: bool = True, **params: Any
    ) -> int:
        """Send a request without waiting for its answer; returns its id for :meth:`wait`.
        ``fds`` are descriptors passed to the daemon with the request's bytes
        (``SCM_RIGHTS``). With ``block=False`` what the socket does not take at once waits
        in the client (see :meth:`send_some`): a loop that also reads the daemon's events
        must never block in a send, or both sides can end up waiting for each other."""
        request_id = self._next_id
        self._next_id += 1
        frame = encode_frame(request(request_id, method, params))
        if block:
            self._write(frame, fds)
        else:
            self._unsent += frame
            self.send_some()
        return request_id

    @property
    def unsent(self) -> bool:
        """Requests queued with ``block=False`` wait for room in the socket."""
        return bool(self._unsent)

    def send_some(self) -> None:
        """Send as much of the queued requests as the socket takes now."""
        try:
            # A socket with a timeout would first wait for room, whatever MSG_DONTWAIT says.
            self.sock.settimeout(None)
            while self._unsent:
                sent = self.sock.send(self._unsent, socket.MSG_DONTWAIT)
                del self._unsent[:sent]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ConnectionClosed(f"connection to mvpd lost: {exc}") from None

    def wait(self, request_id: int, *, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """The result of request ``request_id``; raises the error the daemon replied with.
        Events read meanwhile are kept for :meth:`next_event`."""
        while request_id not in self._responses:
            self._read_more(timeout)
        response = self._responses.pop(request_id)
        if response.error is not None:
            raise response.error
        return response.result

    def call(
        self, method: str, /, *, reply_timeout: float | None = DEFAULT_TIMEOUT, **params: Any
    ) -> Any:
        """Call ``method`` with ``params`` and return its result. ``reply_timeout`` is how
        long to wait for the answer (None: forever); it is not sent."""
        return self.wait(self.request(method, **params), timeout=reply_timeout)

    def done(self, request_id: int) -> bool:
        """Whether the answer to ``request_id`` has arrived (call :meth:`wait` to collect it)."""
        return request_id in self._responses

    # --- events ----------------------------------------------------------------------------

    def next_event(self, sub: int | None = None, *, timeout: float | None = None) -> Event:
        """The next event (of subscription ``sub``, if given), waiting up to ``timeout``."""
        while True:
            event = self.take_event(sub)
            if event is not None:
                return event
            self._read_more(timeout)

    def take_event(self, sub: int | None = None) -> Event | None:
        """An event already received, without reading the socket."""
        for index, event in enumerate(self._events):
            if sub is None or event.sub == sub:
                del self._events[index]
                return event
        return None

    def poll(self) -> None:
        """Read whatever has arrived without blocking (after ``selectors`` said readable).
        Raises :class:`ConnectionClosed` if the daemon closed the connection."""
        try:
            self.sock.settimeout(None)  # else recv waits up to the timeout for data
            data = self.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ConnectionClosed(f"connection to mvpd lost: {exc}") from None
        if not data:
            raise ConnectionClosed("mvpd closed the connection")
        self._deposit(data)

    def subscribe(self, method: str, /, **params: Any) -> Subscription:
        """Open a stream (``recv``, ``pipe.open``) and return it."""
        result = self.call(method, **params)
        return Subscription(self, int(result["sub"]))

    def open_pipe(self, peer: str) -> Subscription:
        """Open a byte pipe to ``peer``; write with :meth:`pipe_write`, read its events."""
        return self.subscribe("pipe.open", peer=peer)

    def attach_pipe(self, peer: str, source: int, sink: int) -> Subscription:
        """Open a byte pipe to ``peer`` that the daemon feeds from descriptor ``source`` and
        empties into ``sink`` itself (copies of both travel with the request); the stream
        has only ``error`` and ``end`` events."""
        result = self.wait(self.request("pipe.open", fds=(source, sink), peer=peer,
                                        attach=True))
        return Subscription(self, int(result["sub"]))

    def pipe_write(self, sub: int, data: bytes, *, block: bool = True) -> int:
        """Send a ``pipe.write`` (returns the request id; collect it with :meth:`wait`).
        ``block`` as for :meth:`request`."""
        return self.request("pipe.write", block=block, sub=sub, data=bytes(data))

    def pipe_eof(self, sub: int, *, block: bool = True) -> int:
        """Send a ``pipe.eof``."""
        return self.request("pipe.eof", block=block, sub=sub)

    # --- I/O -------------------------------------------------------------------------------

    def _write(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        try:
            self.sock.settimeout(None)
            if self._unsent:  # requests keep their order
                self.sock.sendall(self._unsent)
                self._unsent.clear()
            if fds:
                # The descriptors ride with the first byte; the rest follows plainly.
                sent = self.sock.sendmsg(
                    [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
                frame = frame[sent:]
            self.sock.sendall(frame)
        except OSError as exc:
            raise ConnectionClosed(f"connection to mvpd lost: {exc}") from None

    def _read_more(self, timeout: float | None) -> None:
        if self._unsent:  # what is waited for may depend on it
            self._write(b"")
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise RpcTimeout(f"no answer from mvpd within {timeout:g} s") from None
        except OSError as exc:
            raise ConnectionClosed(f"connection to mvpd lost: {exc}") from None
        if not data:
            raise ConnectionClosed("mvpd closed the connection")
        self._deposit(data)

    def _deposit(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            item = parse_server_message(message)
            if isinstance(item, Event):
                self._events.append(item)
            elif item.id is None:
                # An error not tied to a request: the daemon is about to close.
                raise item.error if item.error is not None else ConnectionClosed("mvpd hung up")
            else:
                self._responses[item.id] = item


class Subscription:
    """A stream's events. Iterating yields every event but ``end`` (which stops it); an
    ``error`` event raises the error it carries."""

    def __init__(self, client: Client, sub: int) -> None:
        self.client = client
        self.sub = sub
        self.ended = False

    def __iter__(self) -> Iterator[Event]:
        while not self.ended:
            event = self.client.next_event(self.sub)
            if self.check(event):
                yield event

    def check(self, event: Event) -> bool:
        """Whether ``event`` should be handled: False for ``end`` (marks the stream ended);
        raises for ``error``."""
        if event.event == "end":
            self.ended = True
            return False
        if event.event == "error":
            raise error_from_wire(event.data)
        return True

    def cancel(self) -> None:
        """End the stream early."""
        if not self.ended:
            self.client.call("cancel", sub=self.sub)


def _read_one(sock: socket.socket, decoder: FrameDecoder, where: Path) -> dict[str, Any]:
    while True:
        try:
            data = sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise RpcTimeout(f"mvpd at {where} did not answer the hello in time") from None
        except OSError as exc:
            raise ConnectionClosed(f"connection to mvpd at {where} lost: {exc}") from None
        if not data:
            raise ConnectionClosed(f"mvpd at {where} closed the connection during the hello")
        messages = decoder.feed(data)
        if messages:
            # Anything after the hello stays in the decoder's hands only if it is partial;
            # a daemon never sends more before our first request.
            return messages[0]


#: Pause between two connection attempts while the daemon's listen backlog is full.
BACKLOG_RETRY = 0.05


def _connect_unix(
    sock: socket.socket, where: str | os.PathLike[str], timeout: float | None
) -> None:
    """Connect ``sock`` to ``where``. A full listen backlog (EAGAIN on a Unix socket: the
    daemon is busy accepting, e.g. during a flood of connections) is waited out until
    ``timeout`` instead of failing at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            sock.connect(os.fsencode(where))
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(BACKLOG_RETRY)


def _permission_text(where: Path) -> str:
    try:
        group = grp.getgrgid(os.stat(where).st_gid).gr_name
    except (OSError, KeyError):
        group = "mvp"
    return (
        f"permission denied on {where}: only root and members of group {group!r} may use "
        f"mvpd (add yourself with `sudo usermod -aG {group} $USER`, then log in again)"
    )
