"""Descriptors a control client passes to the daemon with a request (``SCM_RIGHTS``).

``mvpctl pipe`` hands the daemon its standard input and output with its ``pipe.open``
request, so the daemon copies between them and the pipe itself
(:mod:`mvpd.descriptor_copy`): the bytes of a transfer no longer cross the control socket,
framed, on each side, and the ``mvpctl`` processes no longer compete with the daemons for
the CPU. This module receives them:

* :class:`ControlSocket`, the control connection's socket: reads with ``recvmsg`` and keeps
  the descriptors that come with the bytes (at most :data:`MAX_PENDING` waiting; more are
  closed), writes with the event loop's ``sock_sendall``. A descriptor arrives with the read
  holding the first byte of the ``sendmsg`` that carried it, so by the time the request
  written with it is parsed, it is waiting here; once the requests read so far are
  dispatched and no frame is half read, the connection closes those no request took.

The descriptors give the daemon nothing the client did not have: the kernel checks the access
mode of an open file description at ``open``, so a descriptor opened read-only stays
read-only in the daemon, whoever passed it. Not everything is checked at ``open`` though, so
some descriptors are refused as they arrive (:func:`refusal`): files of the kernel's own file
systems (``/proc``, ``/sys``...), where some reads and writes check the rights of whoever
reads or writes (``/proc/PID/stat`` shows root more of another process than its owner);
descriptors that are not files, pipes, sockets or devices (``eventfd``, ``epoll``,
``signalfd``: a ``signalfd`` read takes the *reader's* signals); directories, ``O_PATH``
descriptors and listening sockets, which can never be copied; and a connection to this very
control socket, which would keep its own connection open after the client died (the daemon
would hold the client's end: no end of file ever).

Closing a passed descriptor can block: the last close of a TCP socket with ``SO_LINGER``
waits until its queued bytes are sent (for ever if the receiver does not read), a file on a
network or FUSE file system flushes. The thread that drops the last reference waits, so no
passed descriptor is ever closed on the event loop: :func:`close_soon` hands them to closer
threads. That includes the ones the kernel would drop itself (the room for descriptors in
each ``recvmsg`` takes as many as one message can carry) and those still unread in the
control socket when it closes (the socket itself is closed by a closer too).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import socket
import stat
import threading

from .proto.errors import ConnectionClosed

log = logging.getLogger(__name__)

#: Passed descriptors a connection holds that no request has taken yet; more are closed.
MAX_PENDING = 2
#: The most descriptors one message can carry (the kernel's SCM_MAX_FD).
_MOST_PER_MESSAGE = 253
#: Room for every descriptor one ``recvmsg`` can bring: what does not fit, the kernel would
#: close in that ``recvmsg``, on the event loop (a stream read never spans two messages that
#: carry descriptors).
_ANCILLARY_SPACE = socket.CMSG_SPACE(_MOST_PER_MESSAGE * array.array("i").itemsize)
#: Closer threads at once (see :class:`_Closer`).
MAX_CLOSERS = 16

#: The kernel's own file systems, by ``statfs`` magic number, and how to name them. Some of
#: their files check the rights of whoever reads or writes at each read or write.
_KERNEL_FILE_SYSTEMS = {
    0x9FA0: "/proc",
    0x62656572: "/sys",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0x6E736673: "nsfs",
    0x50494446: "pidfs",
    0x09041934: "anon_inode",
}
#: Mount types (prefixes) whose files a server answers for, not the kernel: a user's FUSE
#: server, or a network server that stopped answering, could stall ``fstat`` or ``close``.
_SERVED_FILE_SYSTEMS = ("fuse", "nfs", "cifs", "smb", "9p", "ceph", "afs", "glusterfs",
                        "lustre")
#: The ``statfs`` type of anonymous pipes (``pipe()``), unlike FIFOs on a disk.
PIPEFS_MAGIC = 0x50495045
#: Room for a ``struct statfs`` (120 bytes on 64-bit Linux), whose first field is the type.
_STATFS_SIZE = 256
_libc = ctypes.CDLL(None, use_errno=True)

#: A passed descriptor a request may take, or why it was refused (it is closed already).
Passed = int | str


def descriptors_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of the ``SCM_RIGHTS`` messages in ``recvmsg``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(data[: len(data) - len(data) % numbers.itemsize])
            fds.extend(numbers)
    return fds


def close_all(fds: list[int]) -> None:
    """Close descriptors, ignoring those already gone (in the calling thread: never on the
    event loop for a passed descriptor, see :func:`close_soon`)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Closer:
    """Closes descriptors in threads, so a close that blocks never blocks the event loop.

    A thread starts when descriptors wait and every closer is inside a ``close`` (one that
    blocks holds only its own thread), up to :data:`MAX_CLOSERS`; a closer ends as soon as
    nothing waits. Past the limit, descriptors wait for a closer to come back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque[list[int]] = collections.deque()
        self._threads = 0
        self._free = 0  # threads not inside a close: they look at the queue before ending
        self._warned = False

    def close(self, fds: list[int]) -> None:
        if not fds:
            return
        with self._lock:
            self._waiting.append(fds)
            if self._free or self._threads >= MAX_CLOSERS:
                if not self._free and not self._warned:
                    self._warned = True
                    log.warning("%d closes of passed descriptors are stuck (sockets lingering "
                                "or files on a file system that does not answer); more wait",
                                self._threads)
                return
            self._threads += 1
            self._free += 1
        try:
            threading.Thread(target=self._run, name="mvpd-fd-closer", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: a later close tries again
            with self._lock:
                self._threads -= 1
                self._free -= 1
            log.error("cannot start a thread to close passed descriptors: %s", exc)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    self._threads -= 1
                    self._free -= 1
                    return
                fds = self._waiting.popleft()
                self._free -= 1
            close_all(fds)
            with self._lock:
                self._free += 1
                self._warned = False


_closer = _Closer()


def close_soon(fds: list[int]) -> None:
    """Close passed descriptors in a closer thread (see the module docstring); returns at
    once."""
    _closer.close(fds)


def refusal(fd: int, control_address: str | bytes = "") -> str | None:
    """Why the passed descriptor ``fd`` must not be used (None: it may). ``control_address``
    is the control socket's own address: a connection to it is refused."""
    remote = mount_type(fd)
    if remote is not None and remote.startswith(_SERVED_FILE_SYSTEMS):
        # Before fstat: on these the answer comes from a server, which may never answer.
        return (f"is on a {remote} file system, whose server could stall mvpd's event loop "
                "(fstat and close wait for it)")
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}"
    if flags & os.O_PATH:
        return "was opened with O_PATH: it can be neither read nor written"
    if stat.S_ISDIR(mode):
        return "is a directory"
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
            or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        return "is not a file, pipe, socket, terminal or device (eventfd, epoll, signalfd...)"
    kind = file_system(fd)
    if kind is None:
        return "is on a file system mvpd cannot identify"
    name = _KERNEL_FILE_SYSTEMS.get(kind)
    if name is not None:
        return (f"is in {name}, one of the kernel's own file systems (/proc, /sys...), whose "
                "reads and writes can depend on who makes them: mvpd would make them as root")
    if stat.S_ISSOCK(mode):
        return _socket_refusal(fd, control_address)
    return None


def access_refusal(fd: int, *, writing: bool) -> str | None:
    """Why ``fd`` cannot be read (``writing``: written) by its access mode (None: it can)."""
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}"
    if writing and mode == os.O_RDONLY:
        return "is not open for writing"
    if not writing and mode == os.O_WRONLY:
        return "is not open for reading"
    return None


def mount_type(fd: int) -> str | None:
    """The type of the mount ``fd`` is on, as ``/proc/self/mountinfo`` names it (``ext4``,
    ``fuse.sshfs``...), found without asking the file system itself; None for the kernel's
    internal mounts (pipes, sockets, anonymous inodes) and when it cannot be read."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            mount_id = next(line.split()[1] for line in info if line.startswith("mnt_id:"))
        with open("/proc/self/mountinfo") as mounts:
            mountinfo = mounts.read()
    except (OSError, StopIteration, IndexError):
        return None
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if fields[0].split(" ", 1)[0] == mount_id and len(fields) == 2:
            return fields[1].split(" ", 1)[0]
    return None


def file_system(fd: int) -> int | None:
    """The ``statfs`` type of the file system ``fd`` is on (None if it cannot be had)."""
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buffer) != 0:
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


def _socket_refusal(fd: int, control_address: str | bytes) -> str | None:
    try:
        # A socket object only to ask: it shares the descriptor and lets go of it after.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}"
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "is a listening socket: it can be neither read nor written"
        if sock.family == socket.AF_UNIX and control_address:
            with contextlib.suppress(OSError):  # not connected: not ours either
                if sock.getpeername() == control_address:
                    return ("is a connection to mvpd's control socket, which mvpd cannot "
                            "copy to or from")
        return None
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}"
    finally:
        sock.detach()

class ControlSocket:
    """A connected Unix stream socket read with ``recvmsg``: bytes, and the descriptors
    passed with them (see the module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        # A client's end of a connection to this socket has this address as its peer's.
        self._address: str | bytes = sock.getsockname()
        self._pending: collections.deque[Passed] = collections.deque()
        self._warned = False
        self._closed = False

    def is_closing(self) -> bool:
        return self._closed

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (``b""`` at end of stream), keeping passed descriptors."""
        while True:
            if self._closed:
                return b""
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(
                    size, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if ancillary:
                self._keep(descriptors_in(ancillary))
            if flags & socket.MSG_CTRUNC:
                log.warning("control client passed descriptors that did not fit")
            return data

    async def _readable(self) -> None:
        ready = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_reader(fd, _set_result, ready)
        try:
            await ready
        finally:
            self._loop.remove_reader(fd)

    def _keep(self, fds: list[int]) -> None:
        extra = fds[max(0, MAX_PENDING - len(self._pending)):]
        if extra:
            if not self._warned:
                self._warned = True
                log.warning("control client passed more than %d descriptors; closing the rest",
                            MAX_PENDING)
            close_soon(extra)
        for fd in fds[: len(fds) - len(extra)]:
            reason = refusal(fd, self._address)
            if reason is None:
                self._pending.append(fd)
            else:
                close_soon([fd])
                self._pending.append(reason)

    def take_descriptors(self, count: int) -> list[Passed] | None:
        """The ``count`` oldest passed descriptors (the caller owns them now), each a
        descriptor or why it was refused; None (and nothing is taken) if fewer are waiting."""
        if len(self._pending) < count:
            return None
        return [self._pending.popleft() for _ in range(count)]

    def drop_descriptors(self) -> None:
        """Close the descriptors no request took."""
        if self._pending:
            log.debug("closing %d passed descriptors no request took", len(self._pending))
            self._drop()

    def _drop(self) -> None:
        close_soon([fd for fd in self._pending if isinstance(fd, int)])
        self._pending.clear()

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` (waits while the client does not read)."""
        if self._closed:
            raise ConnectionClosed("control client went away")
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        """Close the socket and every descriptor no request took (in a closer: descriptors
        still unread in the socket go with it)."""
        if self._closed:
            return
        self._closed = True
        self._drop()
        close_soon([self.sock.detach()])


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
