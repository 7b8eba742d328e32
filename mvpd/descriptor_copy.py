"""Copying bytes through descriptors a control client passed (its input and output).

The descriptors are the client's open file descriptions: the daemon must not make them
non-blocking (the client's terminal or shell shares them), and a read or write that would
block (a terminal, a pipe another process also reads, a reader that stopped reading) must
never stall the event loop that carries every peer. Two ways do that:

* On the event loop, for pipes and sockets: readiness from the loop, and reads and writes
  that refuse to block by themselves, whatever the descriptor's flags: ``RWF_NOWAIT`` on a
  pipe (Linux 5.x), ``MSG_DONTWAIT`` on a socket. No thread, no lock, no copy beyond the
  system call's. :class:`LoopReader`, :class:`LoopWriter`. The descriptor is closed by a
  closer thread (:func:`~mvpd.passed_descriptors.close_soon`): a socket's close can block.
* In a thread of its own, for everything else (regular files, terminals, devices, FIFOs
  opened by name, which refuse ``RWF_NOWAIT``) and where the kernel refuses ``RWF_NOWAIT``
  on pipes: the thread waits in ``poll`` on its descriptor and on a wake-up pipe, so
  stopping wakes it; it owns its descriptor and closes it when it ends. A read or write
  already under way cannot be woken (a terminal whose reader stopped reading, a pipe whose
  bytes another reader took first): the thread ends with it, and until then its pipe still
  counts against ``ControlLimits.max_attached_pipes``, so such threads stay bounded.
  :class:`ThreadReader`, :class:`ThreadWriter`.

:func:`open_reader` and :func:`open_writer` choose. Failures become
:class:`~mvpd.proto.errors.DescriptorFailed` (``output-closed`` when nobody reads the output
any more, as ``EPIPE`` is for any filter).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .passed_descriptors import PIPEFS_MAGIC, close_all, close_soon, file_system
from .proto.errors import Busy, DescriptorFailed

log = logging.getLogger(__name__)

#: Bytes asked for per read.
READ_SIZE = 256 * 1024
#: Reads a :class:`ThreadReader` makes ahead of its consumer.
READ_AHEAD = 2
#: Bytes a :class:`ThreadWriter` holds before :meth:`ThreadWriter.write` waits.
WRITE_BUFFER = 1024 * 1024
#: Buffers one ``writev`` may take.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: Off: every descriptor gets a thread (tests, benchmarks).
LOOP_COPY = True

READ_THE_INPUT = "read the input"
WRITE_THE_OUTPUT = "write the output"


class InputReader(Protocol):
    """Reads a passed input."""

    async def read(self) -> bytes:
        """The next bytes; ``b""`` at end of input. :class:`DescriptorFailed` if reading
        failed."""
        ...

    def stop(self) -> None:
        """Stop (a read in progress is abandoned) and let go of the descriptor."""
        ...

    def when_closed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) once the descriptor is let go of, now if it
        is: a thread stuck in a read can hold it after :meth:`stop`."""
        ...


class OutputWriter(Protocol):
    """Writes a passed output."""

    async def write(self, data: bytes) -> None:
        """Write ``data`` (or queue it); waits while the output does not keep up.
        :class:`DescriptorFailed` once a write has failed."""
        ...

    async def finish(self) -> None:
        """Write what is queued and close the descriptor; :class:`DescriptorFailed` if a
        write failed."""
        ...

    async def failed(self) -> DescriptorFailed:
        """Return the error once a write has failed, even while nothing is being written
        (never, while writes succeed)."""
        ...

    def stop(self) -> None:
        """Stop (queued bytes are dropped) and let go of the descriptor."""
        ...

    def when_closed(self, callback: Callable[[], None]) -> None:
        """As :meth:`InputReader.when_closed`."""
        ...


def _failure(what: str, exc: OSError) -> DescriptorFailed:
    code = "output-closed" if exc.errno == errno.EPIPE else None
    return DescriptorFailed(f"cannot {what}: {exc.strerror or exc}", code=code)


def _loop_kind(fd: int) -> str | None:
    """``"pipe"`` or ``"socket"`` when the event loop can copy through ``fd``."""
    if not LOOP_COPY:
        return None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return "socket"
    # A FIFO opened by name refuses RWF_NOWAIT (EOPNOTSUPP), even where pipes take it.
    if stat.S_ISFIFO(mode) and _nowait_pipes() and file_system(fd) == PIPEFS_MAGIC:
        return "pipe"
    return None


_NOWAIT_PIPES: bool | None = None


def _nowait_pipes() -> bool:
    """Whether this kernel honours ``RWF_NOWAIT`` on pipes (tried once)."""
    global _NOWAIT_PIPES
    if _NOWAIT_PIPES is None:
        r, w = os.pipe()
        try:
            os.pwritev(w, [b"x"], -1, os.RWF_NOWAIT)
            os.preadv(r, [bytearray(1)], -1, os.RWF_NOWAIT)
            os.preadv(r, [bytearray(1)], -1, os.RWF_NOWAIT)
        except BlockingIOError:
            _NOWAIT_PIPES = True
        except (OSError, AttributeError):
            _NOWAIT_PIPES = False
        else:
            _NOWAIT_PIPES = False  # an empty pipe read without EAGAIN: not honoured
        finally:
            close_all([r, w])
    return _NOWAIT_PIPES


def open_reader(fd: int) -> InputReader:
    """A reader of the passed input ``fd`` (it owns ``fd`` from now on, even when it fails:
    :class:`~mvpd.proto.errors.Busy` when the daemon lacks the descriptors or the thread)."""
    reader: InputReader = _open(fd, LoopReader, ThreadReader)
    return reader


def open_writer(fd: int) -> OutputWriter:
    """A writer of the passed output ``fd`` (owned as by :func:`open_reader`)."""
    writer: OutputWriter = _open(fd, LoopWriter, ThreadWriter)
    return writer


def _open(fd: int, on_loop: Any, in_thread: Any) -> Any:
    try:
        kind = _loop_kind(fd)
        if kind is not None:
            with contextlib.suppress(OSError):  # a socket Python cannot wrap: a thread then
                return on_loop(fd, kind)
        return in_thread(fd)
    except (OSError, RuntimeError) as exc:
        close_soon([fd])
        raise _cannot_copy(exc) from None


def _cannot_copy(exc: Exception) -> Busy:
    reason = exc.strerror if isinstance(exc, OSError) else str(exc)
    return Busy(f"mvpd cannot copy the passed descriptors now ({reason}); "
                "without attach the bytes go over the control socket")


class _LoopDescriptor:
    """A pipe or socket descriptor read or written from the event loop without blocking."""

    def __init__(self, fd: int, kind: str, what: str) -> None:
        self.fd = fd
        self.what = what
        self._loop = asyncio.get_running_loop()
        # A socket object is only a way to pass MSG_DONTWAIT: it shares the descriptor.
        self._sock = socket.socket(fileno=fd) if kind == "socket" else None
        self._closed = False
        self._on_closed: list[Callable[[], None]] = []

    async def _ready(self, add: Any, remove: Any) -> None:
        ready = self._loop.create_future()
        add(self.fd, _set_result, ready)
        try:
            await ready
        finally:
            if not self._closed:
                remove(self.fd)

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.fd)
        self._loop.remove_writer(self.fd)
        if self._sock is not None:
            self._sock.detach()
        close_soon([self.fd])  # a lingering socket's close blocks: never on the loop
        for callback in self._on_closed:
            callback()
        self._on_closed.clear()

    def when_closed(self, callback: Callable[[], None]) -> None:
        if self._closed:
            callback()
        else:
            self._on_closed.append(callback)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class LoopReader(_LoopDescriptor):
    """Reads a pipe or socket on the event loop (see the module docstring)."""

    def __init__(self, fd: int, kind: str) -> None:
        super().__init__(fd, kind, READ_THE_INPUT)
        self._buffer = bytearray(READ_SIZE)

    async def read(self) -> bytes:
        while True:
            if self._closed:
                raise DescriptorFailed(f"cannot {self.what}: it was closed")
            try:
                if self._sock is not None:
                    data = self._sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
                else:
                    size = os.preadv(self.fd, [self._buffer], -1, os.RWF_NOWAIT)
                    data = bytes(memoryview(self._buffer)[:size])
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
                continue
            except OSError as exc:
                raise _failure(self.what, exc) from None
            if not data:
                self.stop()
            return data


class LoopWriter(_LoopDescriptor):
    """Writes a pipe or socket on the event loop (see the module docstring)."""

    def __init__(self, fd: int, kind: str) -> None:
        super().__init__(fd, kind, WRITE_THE_OUTPUT)
        self._error: DescriptorFailed | None = None
        self._failed = asyncio.Event()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise DescriptorFailed(f"cannot {self.what}: it was closed")
            try:
                if self._sock is not None:
                    sent = self._sock.send(view, socket.MSG_DONTWAIT)
                else:
                    sent = os.pwritev(self.fd, [view], -1, os.RWF_NOWAIT)
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_writer, self._loop.remove_writer)
                continue
            except OSError as exc:
                self._error = _failure(self.what, exc)
                self._failed.set()
                raise self._error from None
            view = view[sent:]

    async def finish(self) -> None:
        if self._error is not None:
            raise self._error
        self.stop()

    async def failed(self) -> DescriptorFailed:
        await self._failed.wait()
        assert self._error is not None
        return self._error


class _DescriptorThread:
    """A thread that owns one passed descriptor, and the pipe that wakes it to stop."""

    def __init__(self, fd: int, name: str, what: str, events: int) -> None:
        self.fd = fd
        self.what = what
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._stopping = False
        self._finished = False
        self._released = False
        self._on_closed: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        try:
            self._thread.start()
        except RuntimeError:  # the caller closes the descriptor
            close_all([self._wake_read, self._wake_write])
            raise

    def stop(self) -> None:
        """Make the thread end soon (it closes the descriptor itself)."""
        with self._lock:
            self._stopping = True
            if not self._finished:
                with contextlib.suppress(BlockingIOError):  # a wake-up already waits
                    os.write(self._wake_write, b"\0")
        self._stopped()

    def _stopped(self) -> None:
        """Wake whatever the thread may be waiting on besides the descriptor."""

    def _main(self) -> None:
        try:
            self.run()
        except Exception:  # a bug must cost this copy, never the daemon
            log.exception("%s thread failed", self.what)
        finally:
            with self._lock:
                self._finished = True
                close_all([self.fd, self._wake_read, self._wake_write])
            self.call_in_loop(self._let_go)

    def run(self) -> None:
        """The thread's work; the descriptor is closed when it returns."""
        raise NotImplementedError

    def _let_go(self) -> None:
        self._released = True
        self.ended()
        for callback in self._on_closed:
            callback()
        self._on_closed.clear()

    def ended(self) -> None:
        """On the event loop, once the thread has closed the descriptor."""

    def when_closed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once the thread has closed the descriptor
        (after :meth:`stop`, that can wait for a read or write it cannot be woken from)."""
        if self._released:
            callback()
        else:
            self._on_closed.append(callback)

    def wait_ready(self) -> bool:
        """Wait until the descriptor is ready (or in error: the next call says what); False
        when told to stop."""
        poller = select.poll()
        poller.register(self.fd, self._events)
        poller.register(self._wake_read, select.POLLIN)
        while not self._stopping:
            for fd, _ in poller.poll():
                return fd != self._wake_read
        return False

    def call_in_loop(self, callback: Any, *args: Any) -> bool:
        """Run ``callback(*args)`` on the event loop; False if the loop is gone."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def failure(self, exc: OSError) -> DescriptorFailed:
        return _failure(self.what, exc)


class ThreadReader(_DescriptorThread):
    """Reads a passed descriptor in its own thread, up to :data:`READ_AHEAD` reads ahead."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "mvpd-fd-reader", READ_THE_INPUT, select.POLLIN)
        self._ready: collections.deque[bytes | DescriptorFailed] = collections.deque()
        self._arrived = asyncio.Event()
        self._room = threading.Semaphore(READ_AHEAD)
        self.start()

    async def read(self) -> bytes:
        """The next bytes; ``b""`` at end of input. :class:`DescriptorFailed` if reading
        failed."""
        while not self._ready:
            self._arrived.clear()
            await self._arrived.wait()
        item = self._ready.popleft()
        self._room.release()
        if isinstance(item, DescriptorFailed):
            raise item
        return item

    def _stopped(self) -> None:
        self._room.release()

    def run(self) -> None:
        while True:
            self._room.acquire()
            if self.stopping or not self.wait_ready():
                return
            try:
                data: bytes | DescriptorFailed = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                self._room.release()  # a non-blocking descriptor, or another reader won
                continue
            except OSError as exc:
                data = self.failure(exc)
            if not self.call_in_loop(self._deliver, data) or not data:
                return
            if isinstance(data, DescriptorFailed):
                return

    def _deliver(self, data: bytes | DescriptorFailed) -> None:
        self._ready.append(data)
        self._arrived.set()


class ThreadWriter(_DescriptorThread):
    """Writes to a passed descriptor in its own thread, holding up to :data:`WRITE_BUFFER`
    bytes; :meth:`finish` waits until all is written and the descriptor closed.

    The thread takes everything queued at once and writes it with one ``writev``, and wakes
    the event loop only when a :meth:`write` waits for room: at a few hundred MB/s, a
    wake-up and a GIL hand-over per chunk cost the event loop more than the copying."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "mvpd-fd-writer", WRITE_THE_OUTPUT, select.POLLOUT)
        # Shared with the thread, under _wanted: the queue, its size, the flags.
        self._queue: list[bytes] = []
        self._queued = 0  # bytes queued or being written
        self._closing = False
        self._room_wanted = False
        self._wanted = threading.Condition()
        self._error: DescriptorFailed | None = None
        self._room = asyncio.Event()
        self._failed = asyncio.Event()
        self._done = asyncio.Event()
        self.start()

    async def write(self, data: bytes) -> None:
        """Queue ``data``; waits while :data:`WRITE_BUFFER` bytes are queued already.
        :class:`DescriptorFailed` once a write has failed."""
        while True:
            if self._error is not None:
                raise self._error
            if self._done.is_set():
                raise DescriptorFailed(f"cannot {self.what}: it was closed")
            with self._wanted:
                if self._queued < WRITE_BUFFER:
                    self._queue.append(data)
                    self._queued += len(data)
                    self._wanted.notify()
                    return
                self._room_wanted = True
                self._room.clear()
            await self._room.wait()

    async def finish(self) -> None:
        """Write what is queued, close the descriptor; :class:`DescriptorFailed` if a write
        failed."""
        with self._wanted:
            self._closing = True
            self._wanted.notify()
        await self._done.wait()
        if self._error is not None:
            raise self._error

    async def failed(self) -> DescriptorFailed:
        """Return the error once a write has failed (never, while writes succeed)."""
        await self._failed.wait()
        assert self._error is not None
        return self._error

    def _stopped(self) -> None:
        with self._wanted:
            self._wanted.notify()

    def run(self) -> None:
        while True:
            with self._wanted:
                while not self._queue and not self._closing and not self.stopping:
                    self._wanted.wait()
                if self.stopping or not self._queue:
                    return
                batch, self._queue = self._queue, []
            if not self._write_all(batch):
                return
            size = sum(len(data) for data in batch)
            with self._wanted:
                self._queued -= size
                wake = self._room_wanted and self._queued < WRITE_BUFFER
                if wake:
                    self._room_wanted = False
            if wake:
                self.call_in_loop(self._room.set)

    def ended(self) -> None:
        self._done.set()
        self._room.set()

    def _write_all(self, batch: list[bytes]) -> bool:
        views = [memoryview(data) for data in batch]
        first = 0  # views[:first] are written
        while first < len(views):
            if not self.wait_ready():
                return False
            try:
                written = os.writev(self.fd, views[first : first + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                self.call_in_loop(self._fail, self.failure(exc))
                return False
            while written:  # drop what was written, keep the rest in order
                head = views[first]
                if written >= len(head):
                    written -= len(head)
                    first += 1
                else:
                    views[first] = head[written:]
                    written = 0
        return True

    def _fail(self, error: DescriptorFailed) -> None:
        self._error = error
        self._room.set()
        self._failed.set()
