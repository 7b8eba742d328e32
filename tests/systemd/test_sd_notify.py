"""mvpd.sd_notify's functions against a real AF_UNIX datagram socket (what systemd
listens on), and their no-op behaviour outside systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvpd import sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.mark.parametrize("stdlib", [False, True], ids=["systemd-python", "stdlib"])
def test_messages(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch,
                  stdlib: bool) -> None:
    if stdlib:
        monkeypatch.setattr(sd_notify, "_sd_daemon", None)
    assert sd_notify.notify_ready("up: 2 peers")
    assert received(notify_socket) == {"READY": "1", "STATUS": "up: 2 peers"}
    assert sd_notify.notify_status("line one\nline two")
    assert received(notify_socket) == {"STATUS": "line one line two"}
    assert sd_notify.notify_stopping()
    assert received(notify_socket) == {"STOPPING": "1"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sd_notify.notify_reloading("reloading config")
    msg = received(notify_socket)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1" and msg["STATUS"] == "reloading config"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_socket_with_stdlib(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mvpd-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        monkeypatch.setattr(sd_notify, "_sd_daemon", None)
        assert sd_notify.notify_watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"


def test_long_status_is_cut(notify_socket: socket.socket) -> None:
    sd_notify.notify_status("x" * 1000)
    assert len(received(notify_socket)["STATUS"]) == 200


def test_no_ops_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert not sd_notify.notify_ready()
    assert not sd_notify.notify_status("x")
    assert sd_notify.watchdog_interval() is None


def test_a_vanished_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    monkeypatch.setattr(sd_notify, "_sd_daemon", None)
    assert sd_notify.notify_ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "1", None),
        ("0", None, None),
        ("junk", None, None),
        ("1000000", "junk", None),
        (None, None, None),
    ],
)
def test_watchdog_interval(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch,
                           usec: str | None, pid: str | None, expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert sd_notify.watchdog_interval() == expected


def test_watchdog_task_pings_from_the_loop(notify_socket: socket.socket,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def scenario() -> None:
        task = sd_notify.start_watchdog()
        assert task is not None
        await asyncio.sleep(0.12)  # a ping at 0 and at least one more at 0.05
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    notify_socket.settimeout(0)
    pings = []
    with pytest.raises(BlockingIOError):
        while True:
            pings.append(notify_socket.recv(100))
    assert len(pings) >= 2 and set(pings) == {b"WATCHDOG=1"}


def test_watchdog_rejects_nonsense_interval() -> None:
    with pytest.raises(ValueError):
        asyncio.run(sd_notify.run_watchdog(0))
