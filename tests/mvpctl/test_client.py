"""mvpctl.client against real Unix sockets."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from mvpctl.client import _connect_unix


def test_a_full_listen_backlog_is_waited_out(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    waiting = []
    try:
        # Fill the backlog: further connects get EAGAIN until the daemon accepts.
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                break
            waiting.append(sock)
        threading.Timer(0.3, lambda: [listener.accept() for _ in range(len(waiting))]).start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5.0)
        started = time.monotonic()
        _connect_unix(client, path, 5.0)
        assert 0.2 < time.monotonic() - started < 5.0
        client.close()
        # Nobody accepting at all: the timeout ends the wait.
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.settimeout(0.3)
        with pytest.raises(TimeoutError):
            _connect_unix(stuck, path, 0.3)
        stuck.close()
    finally:
        for sock in waiting:
            sock.close()
        listener.close()
