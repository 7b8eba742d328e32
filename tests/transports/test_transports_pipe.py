"""The pipe: 20 MiB lossless with EOF, a late reader, bounded buffers on both sides."""

from __future__ import annotations

import asyncio
import hashlib

from mvpd.proto.pipe_states import PipeState
from mvpd.transports import PipeTransport
from mvpd.transports.pipe import DEFAULT_WINDOW
from tests.peerlink import connected_pair, run, wait_for

TOTAL = 20 * 1024 * 1024


def test_20_mib_pipe_with_late_reader_and_eof() -> None:
    async def body() -> None:
        sa, sb, _, _ = await connected_pair("chat")
        pa = await sa.open_pipe()
        pb = await sb.wait_pipe(timeout=10)
        assert isinstance(pb, PipeTransport) and pb.is_open

        payload = hashlib.sha256(b"seed").digest() * (TOTAL // 32)
        writer_done = asyncio.Event()

        async def write() -> None:
            # Odd sizes, so frames do not line up with the window.
            view = memoryview(payload)
            step = 300_001
            for pos in range(0, len(view), step):
                await pa.write(view[pos : pos + step])
            await pa.write_eof()
            writer_done.set()

        writer = asyncio.ensure_future(write())
        # Nobody reads on bob's side yet: alice may send one window and then must wait.
        await wait_for(lambda: pb.buffered == DEFAULT_WINDOW)
        await asyncio.sleep(0.3)
        assert pa.payload_out == DEFAULT_WINDOW
        assert pb.buffered == DEFAULT_WINDOW
        assert not writer_done.is_set()

        # The reader attaches late and reads slowly in small pieces at first.
        digest = hashlib.sha256()
        got = 0
        highest = 0
        while True:
            chunk = await pb.read(4096 if got < 100_000 else -1)
            if not chunk:
                break
            highest = max(highest, pb.buffered + len(chunk))
            digest.update(chunk)
            got += len(chunk)
        await writer
        assert got == TOTAL
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert pb.at_eof
        assert highest <= DEFAULT_WINDOW
        assert pb.counters.errors == {} and pa.counters.errors == {}
        # The pipe works the other way round too, and EOF is per direction.
        await pb.write(b"reply")
        await pb.write_eof()
        assert await pa.read_all() == b"reply"
        await sa.close()
        await sb.close()

    run(body(), timeout=300)


def test_pipes_opened_by_both_sides_at_once_are_separate_streams() -> None:
    async def body() -> None:
        sa, sb, _, _ = await connected_pair("bytes")
        pa_out, pb_out = await asyncio.gather(sa.open_pipe(), sb.open_pipe())
        pa_in, pb_in = await asyncio.gather(sa.wait_pipe(10), sb.wait_pipe(10))
        assert pa_in is not pa_out and pb_in is not pb_out
        await asyncio.gather(pa_out.write(b"from alice"), pb_out.write(b"from bob"))
        await asyncio.gather(pa_out.write_eof(), pb_out.write_eof())
        assert await pb_in.read_all() == b"from alice"
        assert await pa_in.read_all() == b"from bob"
        pa_in.close()
        pb_in.close()
        # Closed pipes leave the session's table but not its traffic counters.
        await wait_for(lambda: not any(k.startswith("mvp-pipe") for k in sa.transports))
        assert sa.closed_pipes.bytes_in > 0 and sa.closed_pipes.bytes_out > 0
        await sa.close()
        await sb.close()

    run(body())


def test_pipe_closed_before_eof_is_not_a_clean_end() -> None:
    async def body() -> None:
        sa, sb, _, _ = await connected_pair("bytes")
        pa = await sa.open_pipe()
        pb = await sb.wait_pipe(timeout=10)
        await pa.write(b"partial")
        assert await pb.read() == b"partial"
        pa.close()
        from mvpd.proto.errors import ConnectionClosed

        try:
            await asyncio.wait_for(pb.read(), 10)
        except ConnectionClosed:
            pass
        else:
            raise AssertionError("a truncated stream must not look like EOF")
        assert pb.stream_state == PipeState.BROKEN
        await sa.close()
        await sb.close()

    run(body())


def test_the_writer_learns_whether_its_reader_took_the_whole_stream() -> None:
    async def body() -> None:
        from mvpd.proto.errors import ConnectionClosed

        sa, sb, _, _ = await connected_pair("bytes")
        # Read to the end: EOF-ACK comes back only once the reader has taken EOF.
        pa = await sa.open_pipe()
        pb = await sb.wait_pipe(timeout=10)
        await pa.write(b"whole")
        await pa.write_eof()
        acknowledged = asyncio.ensure_future(pa.wait_eof_acknowledged())
        await asyncio.sleep(0.3)
        assert not acknowledged.done() and not pa.eof_acknowledged
        assert await pb.read_all() == b"whole"
        await asyncio.wait_for(acknowledged, 10)
        assert pa.eof_acknowledged
        # The reader quits before reading everything: the writer hears it, not success.
        pa2 = await sa.open_pipe()
        pb2 = await sb.wait_pipe(timeout=10)
        await pa2.write(b"cut")
        await pa2.write_eof()
        pb2.close()
        try:
            await asyncio.wait_for(pa2.wait_eof_acknowledged(), 10)
        except ConnectionClosed:
            pass
        else:
            raise AssertionError("a stream its reader never took must not count as delivered")
        assert not pa2.eof_acknowledged
        assert pa2.stream_state == PipeState.BROKEN
        # The first reader closes its channel after taking everything: for the writer that
        # is the reader's own end of stream, a clean close.
        assert pb.stream_state == PipeState.HALF_CLOSED_REMOTE
        pb.close()
        await wait_for(lambda: pa.is_closed)
        assert pa.stream_state == PipeState.CLOSED
        await sa.close()
        await sb.close()

    run(body())


def test_a_second_eof_breaks_the_stream() -> None:
    async def body() -> None:
        sa, sb, _, _ = await connected_pair("bytes")
        pa = await sa.open_pipe()
        pb = await sb.wait_pipe(timeout=10)
        await pa.write(b"x")
        await pa.write_eof()
        assert pa.stream_state == PipeState.HALF_CLOSED_LOCAL
        pa._send(bytes([0x01]))  # a broken peer: EOF again
        await wait_for(lambda: pb.is_closed)
        assert pb.stream_state == PipeState.BROKEN
        assert pb.counters.errors == {"credit-violation": 1}
        await sa.close()
        await sb.close()

    run(body())


def test_a_reader_behind_gets_the_waiting_frames_joined_up_to_its_size() -> None:
    """Frames that piled up while nobody read come out as one piece of at most ``n`` bytes
    (fewer, larger reads for a slow reader), in order and without loss."""

    async def body() -> None:
        sa, sb, _, _ = await connected_pair("chat")
        pa = await sa.open_pipe()
        pb = await sb.wait_pipe(timeout=10)
        assert isinstance(pb, PipeTransport)
        frames = [bytes([i]) * 10_000 for i in range(8)]
        for frame in frames:  # each write one DATA frame (below the chunk size)
            await pa.write(frame)
        await wait_for(lambda: pb.buffered == 80_000)
        first = await pb.read(35_000)  # three whole frames fit, the fourth waits
        assert first == b"".join(frames[:3])
        rest = await pb.read(1 << 20)
        assert first + rest == b"".join(frames)
        assert pb.buffered == 0
        await sa.close()
        await sb.close()

    run(body())
