"""`mvpctl pipe` hands its stdin and stdout to a real mvpd (attach): killing it in the middle
of a transfer both ways leaves the daemon as it was, with its other clients answered
promptly throughout (the in-process attacks are in tests/test_control_attacks_descriptors.py)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from mvpctl.client import Client
from tests.e2e.harness import MVPCTL, Daemon, Daemons, base_env, wait_until


def _descriptors(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.pid}/fd"))


def _threads(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.pid}/task"))


class _Flow:
    """`mvpctl pipe PEER` fed endlessly on stdin, its stdout drained, by two threads."""

    def __init__(self, daemon: Daemon, peer: str, workdir: Path) -> None:
        in_r, self._in_w = os.pipe()
        self._out_r, out_w = os.pipe()
        self.received = 0
        self.proc = subprocess.Popen(
            [*MVPCTL, "--socket", str(daemon.socket), "pipe", peer],
            stdin=in_r, stdout=out_w, env=base_env(), cwd=workdir)
        os.close(in_r)
        os.close(out_w)
        self._threads = [threading.Thread(target=self._feed), threading.Thread(target=self._drain)]
        for thread in self._threads:
            thread.start()

    def _feed(self) -> None:
        chunk = os.urandom(1 << 16)
        try:
            while True:
                os.write(self._in_w, chunk)
        except BrokenPipeError:
            pass
        finally:
            os.close(self._in_w)

    def _drain(self) -> None:
        while chunk := os.read(self._out_r, 1 << 20):
            self.received += len(chunk)
        os.close(self._out_r)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def join(self) -> None:
        """Both threads end: the daemon let go of its copies of the pipes."""
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), "the daemon still holds the client's stdin or stdout"


def test_killing_mvpctl_pipe_mid_transfer_leaves_the_daemon_as_it_was(
    daemons: Daemons, tmp_path: Path
) -> None:
    alice, bob = daemons.many("alice", "bob")
    alice.ctl_ok("connect", "bob")
    wait_until(lambda: alice.status()["peers"], 30, what="bob to be connected")
    time.sleep(1)  # let the new connection's descriptors and threads settle
    fds, threads = _descriptors(alice), _threads(alice)
    with Client.connect(alice.socket) as other:
        receiver = _Flow(bob, "alice", tmp_path)
        sender = _Flow(alice, "bob", tmp_path)
        wait_until(lambda: receiver.received > 1 << 20 and sender.received > 0, 60,
                   what="bytes to flow both ways")
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            other.call("status")
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        sender.kill()
        receiver.kill()
        sender.join()
        receiver.join()
        assert slowest < 2.0, f"status took {slowest:.1f} s while the pipes copied"
        assert other.call("status")["agent_id"] == "alice"
    wait_until(lambda: _descriptors(alice) <= fds and _threads(alice) <= threads, 30,
               what=f"alice back to {fds} descriptors and {threads} threads")
