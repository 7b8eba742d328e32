"""The control server's streams (mvpd/control_streams.py): recv subscriptions and pipes,
against a real control socket served by the in-memory handler of control_harness."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mvpctl.client import Client
from mvpd.proto.control import ControlLimits
from mvpd.proto.errors import BadRequest, InvalidParams, MvpError, NotFound, PeerError, RpcError
from tests.mvpctl.control_harness import ServerThread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "run" / "mvpd.sock") as running:
        yield running


def test_recv_stream_delivers_each_kind_then_ends(server: ServerThread) -> None:
    with Client.connect(server.path) as client:
        client.call("connect", peer="bob")
        client.call("send", peer="bob", text="hello")
        client.call("send", peer="bob", json={"a": [1, None]})
        client.call("send", peer="bob", json=None)
        client.call("send", peer="bob", data=b"\x00\xff")
        stream = client.subscribe("recv", peer="bob")
        got = [(e.event, e.data["kind"], e.data["data"]) for e in stream]
        assert got == [
            ("message", "text", "hello"),
            ("message", "json", {"a": [1, None]}),
            ("message", "json", None),
            ("message", "bytes", b"\x00\xff"),
        ]
        assert stream.ended


def test_recv_follow_limit_cancel_and_error(server: ServerThread) -> None:
    with Client.connect(server.path) as client, Client.connect(server.path) as other:
        client.call("connect", peer="bob")
        follow = client.subscribe("recv", peer="bob", follow=True, limit=2)
        other.call("send", peer="bob", text="one")
        other.call("send", peer="bob", text="two")
        assert [e.data["data"] for e in follow] == ["one", "two"]

        endless = client.subscribe("recv", peer="bob", follow=True)
        endless.cancel()
        assert client.next_event(endless.sub, timeout=10).event == "end"
        with pytest.raises(NotFound):
            client.call("cancel", sub=endless.sub)

        broken = client.subscribe("recv", peer="bob", follow=True)
        other.call("send", peer="bob", text="explode")
        with pytest.raises(RpcError, match="channel broke"):
            list(broken)
        assert client.next_event(broken.sub, timeout=10).event == "end"
        assert server.handler.streams_closed == 3


def test_pipe_echoes_bytes_and_eof_then_ends(server: ServerThread) -> None:
    payload = os.urandom(300_000)
    with Client.connect(server.path) as client:
        client.call("connect", peer="bob")
        pipe = client.open_pipe("bob")
        requests = [
            client.pipe_write(pipe.sub, payload[i : i + 65536])
            for i in range(0, len(payload), 65536)
        ]
        requests.append(client.pipe_eof(pipe.sub))
        received = bytearray()
        events = []
        for event in pipe:
            events.append(event.event)
            if event.event == "data":
                received += event.data["data"]
        assert bytes(received) == payload
        assert events[-1] == "eof" and set(events[:-1]) == {"data"}
        assert all(client.wait(r) == {} for r in requests)
        with pytest.raises(NotFound):
            client.call("pipe.write", sub=pipe.sub, data=b"late")
    assert server.handler.pipes_closed == 1


def test_pipe_write_errors_and_wrong_subscriptions(server: ServerThread) -> None:
    with Client.connect(server.path) as client:
        client.call("connect", peer="bob")
        pipe = client.open_pipe("bob")
        with pytest.raises(RpcError, match="channel broke") as info:
            client.call("pipe.write", sub=pipe.sub, data=b"fail\n")
        assert info.value.code == "peer-error"
        recv = client.subscribe("recv", peer="bob", follow=True)
        with pytest.raises(InvalidParams, match="not a pipe"):
            client.call("pipe.write", sub=recv.sub, data=b"x")
        client.call("pipe.eof", sub=pipe.sub)
        # Refused: "already ended", or "no subscription" once the echo's EOF ended the pipe.
        with pytest.raises((BadRequest, NotFound)):
            client.call("pipe.write", sub=pipe.sub, data=b"x")


def test_a_pipe_closed_under_a_write_answers_it_instead_of_hanging(
    server: ServerThread,
) -> None:
    # The pipe's own ConnectionClosed (its peer went away) used to be taken for the client
    # leaving: no reply ever came and `mvpctl pipe` waited forever.
    with Client.connect(server.path, timeout=10) as client:
        client.call("connect", peer="bob")
        pipe = client.open_pipe("bob")
        with pytest.raises(MvpError, match="pipe closed"):
            client.call("pipe.write", sub=pipe.sub, data=b"closed\n", reply_timeout=10)
        assert client.call("status")["agent_id"] == "alice"  # the connection lives on


def test_a_pipe_that_breaks_while_idle_ends_with_an_error_event(server: ServerThread) -> None:
    with Client.connect(server.path, timeout=10) as client:
        client.call("connect", peer="bob")
        pipe = client.open_pipe("bob")
        echo = server.handler.pipes[-1]
        server.run(_set_result(echo.broken, PeerError("connection to bob lost: gone")))
        with pytest.raises(RpcError, match="connection to bob lost: gone"):
            for _ in pipe:
                pass
        assert client.next_event(pipe.sub, timeout=10).event == "end"
        with pytest.raises(NotFound):
            client.call("pipe.write", sub=pipe.sub, data=b"late")
    assert server.handler.pipes_closed == 1


async def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    future.set_result(value)


def test_a_client_going_away_closes_its_streams(server: ServerThread) -> None:
    with Client.connect(server.path) as client:
        client.call("connect", peer="bob")
        client.open_pipe("bob")
        client.subscribe("recv", peer="bob", follow=True)
    for _ in range(100):
        if server.handler.pipes_closed == 1 and server.handler.streams_closed == 1:
            break
        server.run(asyncio.sleep(0.05))
    assert (server.handler.pipes_closed, server.handler.streams_closed) == (1, 1)
    assert server.server.connections == 0


def test_stream_count_is_limited(tmp_path: Path) -> None:
    limits = ControlLimits(max_streams=2)
    with (
        ServerThread(tmp_path / "s.sock", limits=limits) as server,
        Client.connect(server.path) as client,
    ):
        client.call("connect", peer="bob")
        client.subscribe("recv", peer="bob", follow=True)
        client.subscribe("recv", peer="bob", follow=True)
        with pytest.raises(RpcError, match="too many streams") as info:
            client.subscribe("recv", peer="bob", follow=True)
        assert info.value.code == "busy"


# --- pipes that copy passed descriptors (pipe.open with attach) ---------------------------------


def _read_to_end(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as source:
        return source.read()


def test_an_attached_pipe_copies_the_passed_input_to_the_passed_output(
    server: ServerThread,
) -> None:
    payload = os.urandom(3_000_000)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with Client.connect(server.path) as client, ThreadPoolExecutor(2) as pool:
        client.call("connect", peer="bob")
        stream = client.attach_pipe("bob", in_r, out_w)
        os.close(in_r)
        os.close(out_w)  # from now on only the daemon holds these ends
        with pytest.raises(InvalidParams, match="copies the descriptors"):
            client.call("pipe.write", sub=stream.sub, data=b"x")
        feeding = pool.submit(lambda: os.fdopen(in_w, "wb").write(payload))
        reading = pool.submit(_read_to_end, out_r)
        assert list(stream) == []  # no data or eof events: only the end
        assert reading.result(30) == payload  # end of file: the daemon closed its copy
        assert feeding.result(30) == len(payload)
    assert server.handler.pipes_closed == 1
    assert server.server.attached_pipes.count == 0


def test_attach_without_descriptors_is_refused_and_stray_ones_are_closed(
    server: ServerThread,
) -> None:
    r, w = os.pipe()
    with Client.connect(server.path) as client:
        client.call("connect", peer="bob")
        with pytest.raises(InvalidParams, match="needs two descriptors"):
            client.call("pipe.open", peer="bob", attach=True)
        # Descriptors sent with a request that does not take them are closed at once.
        client.wait(client.request("status", fds=[w]))
        os.close(w)
        with pytest.raises(InvalidParams, match="needs two descriptors"):
            client.call("pipe.open", peer="bob", attach=True)
        assert os.read(r, 1) == b""  # no copy of the write end is left anywhere
        assert client.call("status")["agent_id"] == "alice"
    os.close(r)


def test_a_client_going_away_stops_an_attached_pipe_blocked_on_its_input(
    server: ServerThread,
) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with Client.connect(server.path) as client:
        client.call("connect", peer="bob")
        client.attach_pipe("bob", in_r, out_w)
        os.close(in_r)
        os.close(out_w)
    # Nothing was ever written: the daemon's reader waits on the input until the client
    # leaves, then lets go of both descriptors.
    assert _read_to_end(out_r) == b""
    os.set_blocking(in_w, False)
    for _ in range(500):
        try:
            os.write(in_w, b"x")
        except BrokenPipeError:
            break
        server.run(asyncio.sleep(0.01))
    else:
        pytest.fail("the daemon still holds the input")
    os.close(in_w)
    for _ in range(500):
        if server.handler.pipes_closed == 1:
            break
        server.run(asyncio.sleep(0.01))
    assert server.handler.pipes_closed == 1
    assert server.server.attached_pipes.count == 0


def test_an_output_nobody_reads_ends_the_pipe_with_output_closed(server: ServerThread) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)
    with Client.connect(server.path) as client:
        client.call("connect", peer="bob")
        stream = client.attach_pipe("bob", in_r, out_w)
        os.close(in_r)
        os.close(out_w)
        os.write(in_w, b"into the void")
        with pytest.raises(RpcError, match="cannot write the output") as info:
            list(stream)
        assert info.value.code == "output-closed"
        assert client.next_event(stream.sub, timeout=10).event == "end"
    os.close(in_w)


def test_attached_pipes_are_limited_daemon_wide(tmp_path: Path) -> None:
    limits = ControlLimits(max_attached_pipes=1)
    fds = [fd for _ in range(2) for fd in os.pipe()]
    with (
        ServerThread(tmp_path / "s.sock", limits=limits) as server,
        Client.connect(server.path) as one,
        Client.connect(server.path) as two,
    ):
        one.call("connect", peer="bob")
        first = one.attach_pipe("bob", fds[0], fds[3])
        with pytest.raises(RpcError, match="too many pipes copying") as info:
            two.attach_pipe("bob", fds[0], fds[3])
        assert info.value.code == "busy"
        first.cancel()
        assert one.next_event(first.sub, timeout=10).event == "end"
        second = two.attach_pipe("bob", fds[0], fds[3])  # the slot was given back
        second.cancel()
    for fd in fds:
        os.close(fd)
