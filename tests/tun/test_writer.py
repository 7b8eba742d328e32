"""The TUN writer thread: order kept, refusals and overflow counted, close stops it and closes
its own descriptor only."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from mvpd.tun import writer as writer_module
from mvpd.tun.writer import DeviceWriter


def wait(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_packets_arrive_in_order_and_are_counted() -> None:
    r, w = os.pipe()
    try:
        writer = DeviceWriter(w, "test")
        packets = [bytes([i]) * 10 for i in range(100)]
        assert all(writer.write(p) for p in packets)
        wait(lambda: writer.written == 100)
        assert os.read(r, 4096) == b"".join(packets)
        assert writer.pending == 0 and writer.failed == 0
        writer.close()
        assert not writer._thread.is_alive()
        os.write(w, b"still open")  # the caller's descriptor is untouched
        assert os.read(r, 100) == b"still open"
    finally:
        os.close(r)
        os.close(w)


def test_refused_writes_are_counted() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        writer = DeviceWriter(fd, "test")
        assert writer.write(b"x") and writer.write(b"y")
        wait(lambda: writer.failed == 2)
        assert writer.written == 0 and writer.pending == 0
        writer.close()
    finally:
        os.close(fd)


def test_a_stuck_device_overflows_and_counts_instead_of_growing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writer_module, "MAX_PENDING", 8)
    r, w = os.pipe()
    try:
        writer = DeviceWriter(w, "test")
        big = b"z" * (1 << 20)  # fills the pipe: the thread blocks in write
        accepted = sum(writer.write(big) for _ in range(20))
        assert accepted <= 9 and writer.overflowed == 20 - accepted
        assert not writer.write(b"more") and writer.overflowed == 21 - accepted
        writer._stopping = True  # as close() does; then unblock the thread
        os.set_blocking(r, False)
        while writer._thread.is_alive():
            with contextlib.suppress(BlockingIOError):
                os.read(r, 1 << 20)
            writer._thread.join(0.01)
        writer.close()
    finally:
        os.close(r)
        os.close(w)


def test_close_drops_what_is_queued_and_refuses_more() -> None:
    r, w = os.pipe()
    try:
        writer = DeviceWriter(w, "test")
        writer.close()
        assert not writer._thread.is_alive()
        assert not writer.write(b"late") and writer.overflowed == 1
        writer.close()  # idempotent
    finally:
        os.close(r)
        os.close(w)


def test_with_a_loop_one_iteration_becomes_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setattr(writer_module, "DIRECT_AFTER", 0)  # every packet via the thread

    async def body() -> None:
        r, w = os.pipe()
        try:
            writer = DeviceWriter(w, "test", asyncio.get_running_loop())
            for i in range(10):
                writer.write(bytes([i]))
            assert writer._queue.qsize() == 0  # nothing handed over inside the iteration
            assert len(writer._batch) == 10
            await asyncio.sleep(0)
            assert writer._batch == []  # one list for the thread
            wait(lambda: writer.written == 10)
            assert os.read(r, 100) == bytes(range(10))
            writer.close()
        finally:
            os.close(r)
            os.close(w)

    asyncio.run(body())


def test_a_packet_after_a_lull_is_written_from_the_loop_and_a_burst_through_the_thread() -> None:
    """A lone packet (a ping) skips the thread hand-over; the packets of a flow go through the
    thread; the device sees everything in order either way."""
    import asyncio

    async def body(r: int, w: int) -> None:
        writer = DeviceWriter(w, "test", asyncio.get_running_loop())
        try:
            assert writer.write(b"ping")
            assert writer.written_direct == 1 and writer.queued == 0
            assert os.read(r, 100) == b"ping"  # already there: no thread, no loop turn
            burst = [bytes([i]) * 10 for i in range(50)]
            assert all(writer.write(p) for p in burst)
            assert writer.written_direct == 1 and writer.queued == 50
            await asyncio.sleep(0)  # the loop hands the batch over
            await asyncio.to_thread(wait, lambda: writer.written == 50)
            assert os.read(r, 4096) == b"".join(burst)
            await asyncio.sleep(writer_module.DIRECT_AFTER * 2)
            assert writer.write(b"later")
            assert writer.written_direct == 2 and os.read(r, 100) == b"later"
        finally:
            writer.close()

    r, w = os.pipe()
    try:
        asyncio.run(body(r, w))
    finally:
        os.close(r)
        os.close(w)
