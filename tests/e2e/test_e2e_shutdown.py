"""Shutdown is a state: a real mvpd told SIGTERM while its signaling client waits to reconnect
exits without connecting again, even while it still has a peer to say bye to (which used to
hold the stop for as long as a bye may take, long enough for the backoff to run out and a new
attempt to start)."""

from __future__ import annotations

import signal
import socket
import threading
import time

from tests.e2e.harness import Daemons, SignalServer, wait_until


class CountingServer:
    """A TCP listener on 127.0.0.1 that notes when each connection came and closes it at once
    (a signaling server that is down in the most annoying way)."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.arrivals: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.arrivals.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


def test_sigterm_during_reconnect_backoff_makes_no_new_attempt(
    daemons: Daemons, signal_server: SignalServer
) -> None:
    alice, bob = daemons.many("alice", "bob")
    alice.ctl_ok("connect", "bob")
    # bob vanishes without a word and so does signaling: alice still holds a session to say
    # bye to, and her signaling client keeps failing against a server that hangs up at once.
    bob.kill()
    signal_server.kill()
    server = CountingServer(signal_server.port)
    try:
        wait_until(lambda: len(server.arrivals) >= 2, what="two failed attempts")
        assert alice.proc is not None
        alice.proc.send_signal(signal.SIGTERM)
        terminated = time.monotonic()
        assert alice.proc.wait(30) == 0
        log = alice.log.read_text()
        after = [t for t in server.arrivals if t > terminated]
        assert after == [], f"{len(after)} connection attempts after SIGTERM\n{log[-3000:]}"
        tail = log[log.index("stopping (SIGTERM)"):]
        assert "signaling connecting" not in tail, tail
        assert "signaling stopping" in tail, tail
    finally:
        server.close()
