"""Copying through passed descriptors (mvpd/descriptor_copy.py), both ways it is done: on
the event loop (pipes, sockets) and in a thread (everything else, or where the kernel lacks
RWF_NOWAIT). Neither may ever block the event loop."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mvpd import descriptor_copy
from mvpd.descriptor_copy import (
    READ_SIZE,
    LoopReader,
    LoopWriter,
    ThreadReader,
    ThreadWriter,
    open_reader,
    open_writer,
)
from mvpd.proto.errors import DescriptorFailed
from tests.descriptors import drained_to_eof


def fd_is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


async def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_pipes_and_sockets_are_copied_on_the_loop_the_rest_in_threads(tmp_path: Path) -> None:
    async def main() -> None:
        r, w = os.pipe()
        a, b = socket.socketpair()
        path = tmp_path / "file"
        path.write_bytes(b"")
        readers = [open_reader(r), open_reader(a.detach()),
                   open_reader(os.open(path, os.O_RDONLY))]
        writers = [open_writer(w), open_writer(b.detach()),
                   open_writer(os.open(path, os.O_WRONLY))]
        assert [type(x) for x in readers] == [LoopReader, LoopReader, ThreadReader]
        assert [type(x) for x in writers] == [LoopWriter, LoopWriter, ThreadWriter]
        for each in [*readers, *writers]:
            each.stop()

    asyncio.run(main())


def test_the_reader_copies_a_pipe_then_a_file_to_the_end(tmp_path: Path, copy_kind: str) -> None:
    payload = os.urandom(3 * READ_SIZE + 17)
    path = tmp_path / "input"
    path.write_bytes(payload)

    async def read_all(reader: descriptor_copy.InputReader) -> bytes:
        parts = []
        while chunk := await reader.read():
            parts.append(chunk)
        return b"".join(parts)

    async def main() -> None:
        r, w = os.pipe()
        reader = open_reader(r)
        writing = asyncio.get_running_loop().run_in_executor(None, _write_and_close, w, payload)
        assert await read_all(reader) == payload
        await writing
        await wait_for(lambda: not fd_is_open(r))  # the thread closed its descriptor
        fd = os.open(path, os.O_RDONLY)
        os.lseek(fd, 10, os.SEEK_SET)  # a shared offset is honoured, as any reader would
        assert await read_all(open_reader(fd)) == payload[10:]

    asyncio.run(main())


def _write_and_close(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def test_a_reader_that_waits_keeps_the_loop_free_and_stops_when_told(copy_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()  # the writer never writes: a read here would block forever
        reader = open_reader(os.dup(r))
        pending = asyncio.ensure_future(reader.read())
        started = time.monotonic()
        await asyncio.sleep(0.2)  # the loop runs on
        assert time.monotonic() - started < 1 and not pending.done()
        reader.stop()
        pending.cancel()
        # The thread woke, closed its copy: the pipe has no reader left but ours.
        os.close(r)
        await wait_for(lambda: _write_fails(w))
        os.close(w)

    asyncio.run(main())


def _write_fails(fd: int) -> bool:
    try:
        os.write(fd, b"x")
    except BrokenPipeError:
        return True
    return False


def test_a_read_error_is_reported_not_raised_in_the_loop(tmp_path: Path) -> None:
    async def main() -> None:
        reader = open_reader(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
        with pytest.raises(DescriptorFailed, match="cannot read the input: Is a directory"):
            await reader.read()

    asyncio.run(main())


def test_the_writer_writes_everything_then_closes(copy_kind: str) -> None:
    payload = os.urandom(5 * 1024 * 1024 + 3)

    async def main() -> None:
        r, w = os.pipe()
        writer = open_writer(w)
        reading = asyncio.get_running_loop().run_in_executor(None, _read_to_end, r)
        for i in range(0, len(payload), 100_000):
            await writer.write(payload[i : i + 100_000])
        await writer.finish()
        assert await reading == payload  # end of file: the daemon's copy was closed

    asyncio.run(main())


def _read_to_end(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as source:
        return source.read()


def test_a_stalled_output_blocks_only_the_writer_and_stop_wakes_it(copy_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()
        writer = open_writer(os.dup(w))
        os.close(w)
        # Nobody reads: the pipe fills, the thread waits, write() waits once the buffer is
        # full, and the loop stays free all along.
        filling = asyncio.ensure_future(_write_forever(writer))
        await asyncio.sleep(0.3)
        assert not filling.done()
        writer.stop()
        filling.cancel()
        await wait_for(lambda: drained_to_eof(r))
        os.close(r)

    asyncio.run(main())


async def _write_forever(writer: descriptor_copy.OutputWriter) -> None:
    while True:
        await writer.write(b"y" * 65536)


def test_a_closed_output_is_output_closed_and_a_read_only_one_an_error(
    tmp_path: Path, copy_kind: str
) -> None:
    async def main() -> None:
        r, w = os.pipe()
        os.close(r)
        writer = open_writer(w)
        with pytest.raises(DescriptorFailed, match="Broken pipe") as info:
            await writer.write(b"nobody reads this")
            await writer.finish()
        assert info.value.code == "output-closed"
        assert (await writer.failed()) is info.value

        path = tmp_path / "read-only"
        path.write_bytes(b"")
        writer = open_writer(os.open(path, os.O_RDONLY))
        with pytest.raises(DescriptorFailed, match="cannot write the output") as info:
            await writer.write(b"x")
            await writer.finish()
        assert info.value.code == "descriptor"
        assert path.read_bytes() == b""

    asyncio.run(main())


def test_the_thread_writer_takes_many_small_pieces_in_order(tmp_path: Path) -> None:
    # A peer sending one-byte messages queues far more pieces than one writev may take.
    pieces = [bytes([i % 251]) for i in range(20_000)]
    path = tmp_path / "out"

    async def main() -> None:
        writer = open_writer(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        assert isinstance(writer, ThreadWriter)
        for piece in pieces:
            await writer.write(piece)
        await writer.finish()

    asyncio.run(main())
    assert path.read_bytes() == b"".join(pieces)
