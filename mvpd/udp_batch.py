"""Sending a batch of datagrams on a UDP socket with few system calls (Linux UDP GSO).

One ``sendmsg`` with a ``UDP_SEGMENT`` control message hands the kernel a run of datagrams of
one size (the last may be shorter) as a single buffer list; the kernel splits it into
datagrams as late as it can (on the device, or in software just before it), so the sending
path through UDP, IP, routing and the qdisc runs once per run instead of once per datagram.
What arrives on the wire are ordinary datagrams: the receiver needs nothing.

:func:`gso_runs` splits a batch into such runs (consecutive, equal size, at most
:data:`MAX_SEGMENTS` and :data:`MAX_RUN_BYTES`); :class:`UdpBatchSender` sends them and falls
back, for good, to one ``sendto`` per datagram when the kernel refuses segmentation for this
socket (``EIO`` without checksum offload on the route's device, ``EINVAL`` for UDP checksums
turned off or a datagram larger than the route's MTU, ``ENOPROTOOPT``/``EOPNOTSUPP`` on old
kernels). When the socket's buffer is full (``EAGAIN``) the rest of the batch goes to the
``overflow`` callable, in order (the event loop's transport, which buffers it).

:class:`TransportBatchSenders` keeps one sender per event-loop datagram transport, on a
duplicate of its socket (the loop may close its own descriptor at any time). No aioice here:
the callers (:mod:`mvpd.rtc.aiortc_internals` for SCTP's DTLS records,
:mod:`mvpd.tun.ice_datagrams` for the tunnel's datagrams) find the transport.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: ``setsockopt``/cmsg level and type of UDP GSO (linux/udp.h; Python 3.11 lacks the names).
SOL_UDP = 17
UDP_SEGMENT = 103
#: Datagrams per ``sendmsg`` (the kernel's UDP_MAX_SEGMENTS was 64 before Linux 5.18).
MAX_SEGMENTS = 64
#: Bytes per ``sendmsg``: one UDP payload at most, IPv4's (65535 minus the 20-byte IPv4 and
#: 8-byte UDP headers; IPv6 would allow 20 more). Beyond it the kernel says EMSGSIZE.
MAX_RUN_BYTES = 65507
#: Errors that mean "no segmentation on this socket" (see the module docstring).
REFUSALS = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})

_SEGMENT_SIZE = struct.Struct("=H")
Address = Any  # what the socket's family takes: (host, port) or (host, port, flow, scope)


def gso_runs(
    datagrams: Sequence[bytes], max_segments: int = MAX_SEGMENTS, max_bytes: int = MAX_RUN_BYTES
) -> Iterator[Sequence[bytes]]:
    """Consecutive runs of ``datagrams`` that one GSO ``sendmsg`` can carry: every datagram of
    a run has the size of its first except the last, which may be shorter; a run has at most
    ``max_segments`` datagrams and ``max_bytes`` bytes. Order is kept."""
    count = len(datagrams)
    start = 0
    while start < count:
        size = len(datagrams[start])
        limit = min(count, start + max_segments, start + max(1, max_bytes // max(size, 1)))
        end = start + 1
        while end < limit:
            length = len(datagrams[end])
            if length != size:
                if length < size:  # a shorter one may close the run
                    end += 1
                break
            end += 1
        yield datagrams[start:end]
        start = end


class UdpBatchSender:
    """Batches of datagrams on one UDP socket (see the module docstring).

    ``sock`` is a non-blocking UDP socket, closed by :meth:`close`; ``overflow(datagram,
    addr)`` takes what the socket's buffer cannot.
    """

    def __init__(
        self, sock: socket.socket, overflow: Callable[[bytes, Address], None],
        *, gso: bool = True,
    ) -> None:
        self._sock = sock
        self._overflow = overflow
        #: Segmentation offload in use (off for good once the kernel refused it).
        self.gso = gso
        #: Calls of ``sendmsg``/``sendto`` that went out, and datagrams in them.
        self.calls = 0
        self.sent = 0
        #: Datagrams handed to ``overflow`` (socket buffer full) and lost to other errors.
        self.overflowed = 0
        self.failed = 0

    def send(self, datagrams: Sequence[bytes], addr: Address) -> int:
        """Send ``datagrams`` to ``addr`` in order (see the class docstring); return how many
        were lost to send errors (not those handed to ``overflow``)."""
        failed = self.failed
        self._send(datagrams, addr)
        return self.failed - failed

    def _send(self, datagrams: Sequence[bytes], addr: Address) -> None:
        if not self.gso:
            self._send_each(datagrams, addr, 0)
            return
        sendmsg = self._sock.sendmsg
        sendto = self._sock.sendto
        done = 0
        for run in gso_runs(datagrams):
            try:
                if len(run) == 1:
                    sendto(run[0], addr)
                else:
                    sendmsg(run, [(SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(len(run[0])))], 0,
                            addr)
            except BlockingIOError:
                self._spill(datagrams, done, addr)
                return
            except OSError as exc:
                if len(run) > 1 and exc.errno in REFUSALS:
                    self.gso = False
                    log.info("UDP segmentation offload refused (%s): one datagram per call "
                             "from now", exc.strerror)
                    self._send_each(datagrams, addr, done)
                    return
                self.failed += len(run)
                log.debug("UDP send of %d datagrams failed: %s", len(run), exc)
            else:
                self.calls += 1
                self.sent += len(run)
            done += len(run)

    def _send_each(self, datagrams: Sequence[bytes], addr: Address, start: int) -> None:
        """One ``sendto`` per datagram from ``start`` on."""
        sendto = self._sock.sendto
        for index in range(start, len(datagrams)):
            try:
                sendto(datagrams[index], addr)
            except BlockingIOError:
                self._spill(datagrams, index, addr)
                return
            except OSError as exc:
                self.failed += 1
                log.debug("UDP send failed: %s", exc)
                continue
            self.calls += 1
            self.sent += 1

    def _spill(self, datagrams: Sequence[bytes], start: int, addr: Address) -> None:
        overflow = self._overflow
        for index in range(start, len(datagrams)):
            overflow(datagrams[index], addr)
        self.overflowed += len(datagrams) - start

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


class TransportBatchSenders:
    """One :class:`UdpBatchSender` per event-loop datagram transport, made on first use.

    The sender works on a duplicate of the transport's socket and spills into the
    transport's own ``sendto``; a transport without a UDP socket (aioice's TURN transport)
    gets ``None``. ``on_new(sock)`` may tune a new socket (buffer sizes). ``gso=False`` makes
    every sender send one datagram per call (benchmarks, tests).
    """

    def __init__(
        self, *, gso: bool = True, on_new: Callable[[socket.socket], None] | None = None
    ) -> None:
        self._gso = gso
        self._on_new = on_new
        self._senders: dict[int, tuple[Any, UdpBatchSender | None]] = {}

    def get(self, transport: Any) -> UdpBatchSender | None:
        """The sender for ``transport`` (``None``: use ``transport.sendto``)."""
        known = self._senders.get(id(transport))
        if known is not None and known[0] is transport:
            return known[1]
        if known is not None and known[1] is not None:  # an earlier, closed transport's
            known[1].close()
        sender = self._make(transport)
        self._senders[id(transport)] = (transport, sender)
        return sender

    def _make(self, transport: Any) -> UdpBatchSender | None:
        try:
            sock = transport.get_extra_info("socket")
        except Exception:  # a transport that is closing
            return None
        if sock is None or sock.type != socket.SOCK_DGRAM:
            return None
        if self._on_new is not None:
            self._on_new(sock)
        try:
            own = socket.socket(fileno=os.dup(sock.fileno()))
            own.setblocking(False)
        except OSError as exc:
            log.debug("no batch sending on %s: %s", sock, exc)
            return None
        return UdpBatchSender(own, transport.sendto, gso=self._gso)

    def senders(self) -> list[UdpBatchSender]:
        """The senders made so far."""
        return [sender for _, sender in self._senders.values() if sender is not None]

    def close(self) -> None:
        """Close every sender's socket."""
        for sender in self.senders():
            sender.close()
        self._senders.clear()
