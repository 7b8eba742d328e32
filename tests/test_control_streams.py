"""The control server's streams (mvpd/control_streams.py): recv subscriptions and pipes,
against a real control socket served by the in-memory handler of control_harness."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
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
