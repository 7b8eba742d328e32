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
read-only in the daemon, whoever passed it.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import os
import socket

from .proto.errors import ConnectionClosed

log = logging.getLogger(__name__)

#: Passed descriptors a connection holds that no request has taken yet; more are closed.
MAX_PENDING = 2
#: Room for descriptors in one ``recvmsg`` (what does not fit, the kernel closes).
_ANCILLARY_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


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
    """Close descriptors, ignoring those already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ControlSocket:
    """A connected Unix stream socket read with ``recvmsg``: bytes, and the descriptors
    passed with them (see the module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._pending: collections.deque[int] = collections.deque()
        self._closed = False

    def is_closing(self) -> bool:
        return self._closed

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (``b""`` at end of stream), keeping passed descriptors."""
        while True:
            if self._closed:
                return b""
            try:
                data, ancillary, _flags, _ = self.sock.recvmsg(
                    size, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if ancillary:
                self._keep(descriptors_in(ancillary))
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
        for fd in fds:
            if len(self._pending) < MAX_PENDING:
                self._pending.append(fd)
            else:
                log.warning("control client passed more than %d descriptors; closing the rest",
                            MAX_PENDING)
                close_all([fd])

    def take_descriptors(self, count: int) -> list[int] | None:
        """The ``count`` oldest passed descriptors (the caller owns them now), or None (and
        nothing is taken) if fewer are waiting."""
        if len(self._pending) < count:
            return None
        return [self._pending.popleft() for _ in range(count)]

    def drop_descriptors(self) -> None:
        """Close the descriptors no request took."""
        if self._pending:
            log.debug("closing %d passed descriptors no request took", len(self._pending))
            close_all(list(self._pending))
            self._pending.clear()

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` (waits while the client does not read)."""
        if self._closed:
            raise ConnectionClosed("control client went away")
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        """Close the socket and every descriptor no request took."""
        if self._closed:
            return
        self._closed = True
        close_all(list(self._pending))
        self._pending.clear()
        self.sock.close()


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
