"""Writing packets to the TUN device from a thread of its own.

A write to a TUN device is where the kernel does the receiving host's whole job for that
packet (IP, TCP, waking the application, often queueing its ACK), inside the ``write`` call:
measured through the datagram path it was the largest single cost of a receiving daemon, tens
of microseconds per packet. ``os.write`` releases the GIL, so a writer thread lets the event
loop go on decrypting the next datagrams meanwhile: through mvpd's tunnel, iperf3 TCP ran
25-75 % faster with it on this 2-core machine (BENCHMARKS.md, "TUN mode").

The event loop hands packets over with :meth:`DeviceWriter.write` (never blocks; drops and
counts beyond :data:`MAX_PENDING` queued packets, as a full device queue would). Given the
loop, the writer collects what arrives in one loop iteration (aioice's socket delivers
datagrams in bursts) and passes the thread one list: waking the thread, and the GIL hand-over
that follows, cost tens of microseconds each, once per batch rather than once per packet. The thread
writes to a duplicate of the device's descriptor that it closes itself, so closing the device
never leaves it writing to a descriptor number the process has reused.

A packet that arrives after a lull, while the thread has nothing left to write (a ping, a
keystroke, the first packet of a request), is written at once from the event loop instead:
handing it over would cost a thread wake-up and two GIL hand-overs on each tunnel end, tens of
microseconds of round trip. Packets of a flow come faster than :data:`DIRECT_AFTER` apart
and keep going through the thread, in order (a direct write only happens when the thread has
written everything it was given).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time

log = logging.getLogger(__name__)

#: Packets queued for the thread at most (about 6 MB of 1420-byte packets).
MAX_PENDING = 4096
#: Seconds without a packet after which the next one is written from the event loop (when
#: the thread is idle); 0 turns direct writes off.
DIRECT_AFTER = 0.001


class DeviceWriter:
    """A thread that writes IP packets to one TUN device (see the module docstring)."""

    def __init__(
        self, fd: int, name: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._fd = os.dup(fd)
        self._loop = loop
        self._batch: list[bytes] = []
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        # Each counter is changed by one thread only, so no lock is needed.
        self.queued = 0  # event loop
        self.written = 0  # writer thread
        self.failed = 0  # writer thread
        self.overflowed = 0  # event loop
        self.written_direct = 0  # event loop
        self.failed_direct = 0  # event loop
        self._last_packet = 0.0  # event loop
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"tun-writer-{name}",
                                        daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Packets handed over and not yet written (or refused)."""
        return self.queued - self.written - self.failed

    def write(self, packet: bytes) -> bool:
        """Queue one packet for the device; False (counted) when the queue is full or the
        writer stopped."""
        if self._stopping or self.pending >= MAX_PENDING:
            self.overflowed += 1
            return False
        batch = self._batch
        if self._loop is not None and DIRECT_AFTER:
            now = time.monotonic()
            lull = now - self._last_packet >= DIRECT_AFTER
            self._last_packet = now
            if lull and not batch and self.pending == 0:
                self._write_now(packet)
                return True
        self.queued += 1
        batch.append(packet)
        if self._loop is None:
            self.flush()
        elif len(batch) == 1:
            self._loop.call_soon(self.flush)
        return True

    def _write_now(self, packet: bytes) -> None:
        try:
            os.write(self._fd, packet)
            self.written_direct += 1
        except OSError as exc:
            self.failed_direct += 1
            log.debug("TUN write refused: %s", exc)

    @property
    def dropped(self) -> int:
        """Packets refused by the device or beyond the queue."""
        return self.failed + self.failed_direct + self.overflowed

    def flush(self) -> None:
        """Hand the packets collected so far to the thread."""
        if self._batch:
            batch, self._batch = self._batch, []
            self._queue.put(batch)

    def _run(self) -> None:
        get = self._queue.get
        write = os.write
        fd = self._fd
        try:
            while True:
                batch = get()
                if batch is None or self._stopping:
                    break
                for packet in batch:
                    try:
                        write(fd, packet)
                        self.written += 1
                    except OSError as exc:
                        self.failed += 1
                        log.debug("TUN write refused: %s", exc)
        finally:
            os.close(fd)

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread (what is still queued is dropped) and wait for it briefly."""
        if self._stopping:
            return
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)
