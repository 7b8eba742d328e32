"""`mvpctl pipe` when the other side ends mid-stream: both ends exit non-zero within seconds,
saying what happened, whichever way the far side went (its daemon killed, `mvpctl
disconnect`, Ctrl-C on its `mvpctl pipe`). Real daemons, signaling server and mvpctl."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

import pytest

from tests.e2e.harness import MVPCTL, Daemon, Daemons, base_env, wait_until

#: Short, so that a killed daemon is noticed quickly (the 1.2 x peer_timeout rule).
PEER_TIMEOUT = 2.0
#: How long the surviving `mvpctl pipe` may take to exit after the far side ended.
EXIT_WITHIN = PEER_TIMEOUT * 1.2 + 6.0
SENT = 100_000


class PipeEnd:
    """One `mvpctl pipe PEER` with a stdin the test holds open (mid-stream: no EOF)."""

    def __init__(self, daemon: Daemon, peer: str, workdir: Path) -> None:
        self.out_path = workdir / f"{daemon.agent_id}-pipe.out"
        self.err_path = workdir / f"{daemon.agent_id}-pipe.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [*MVPCTL, "--socket", str(daemon.socket), "pipe", peer],
                stdin=subprocess.PIPE, stdout=out, stderr=err, env=base_env(),
                cwd=workdir,
            )
        assert self.proc.stdin is not None
        self.stdin: IO[bytes] = self.proc.stdin

    def received(self) -> int:
        return self.out_path.stat().st_size

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        started = time.monotonic()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mvpctl pipe still running {timeout:g} s after the far side ended")
        return code, time.monotonic() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.stdin.close()


def streaming(daemons: Daemons, tmp_path: Path) -> tuple[Daemon, Daemon, PipeEnd, PipeEnd]:
    """alice and bob with `mvpctl pipe` running on both sides, alice's bytes reaching bob."""
    env = {"MVPD_PEER_TIMEOUT": str(PEER_TIMEOUT)}
    alice, bob = daemons.many("alice", "bob", env=env)
    receiver = PipeEnd(bob, "alice", tmp_path)
    sender = PipeEnd(alice, "bob", tmp_path)
    sender.stdin.write(b"x" * SENT)
    sender.stdin.flush()
    wait_until(lambda: receiver.received() == SENT, 30, what="the first bytes to arrive")
    return alice, bob, sender, receiver


def end_side(daemon: Daemon, peer: str, end: PipeEnd, how: str) -> None:
    if how == "daemon-killed":
        daemon.kill()
    elif how == "disconnect":
        daemon.ctl_ok("disconnect", peer)
    else:
        assert how == "ctrl-c"
        os.kill(end.proc.pid, signal.SIGINT)


EXPECTED = {
    "daemon-killed": "connection to {peer} lost",
    "disconnect": "connection to {peer} closed",
    "ctrl-c": "{peer} closed the pipe",
}


@pytest.mark.parametrize("how", ["daemon-killed", "disconnect", "ctrl-c"])
@pytest.mark.parametrize("ending", ["receiver", "sender"])
def test_pipe_exits_non_zero_when_the_far_side_ends_mid_stream(
    daemons: Daemons, tmp_path: Path, how: str, ending: str
) -> None:
    alice, bob, sender, receiver = streaming(daemons, tmp_path)
    try:
        if ending == "receiver":
            gone, gone_end, survivor, far = bob, receiver, sender, "bob"
        else:
            gone, gone_end, survivor, far = alice, sender, receiver, "alice"
        end_side(gone, "bob" if gone is alice else "alice", gone_end, how)
        code, took = survivor.wait_exit(EXIT_WITHIN)
        message = survivor.stderr()
        assert code == 1, (code, message)
        assert EXPECTED[how].format(peer=far) in message, message
        if ending == "sender":
            # Whatever arrived stays, but a truncated stream is not reported as complete.
            assert receiver.received() == SENT
        print(f"{ending} {how}: exited {code} after {took:.1f} s: {message.strip()}")
    finally:
        sender.stop()
        receiver.stop()


def test_a_complete_pipe_still_exits_zero(daemons: Daemons, tmp_path: Path) -> None:
    alice, bob = daemons.many("alice", "bob")
    receiver = PipeEnd(bob, "alice", tmp_path)
    sender = PipeEnd(alice, "bob", tmp_path)
    try:
        receiver.stdin.close()  # nothing to say back
        sender.stdin.write(b"y" * SENT)
        sender.stdin.close()
        assert sender.wait_exit(30)[0] == 0, sender.stderr()
        assert receiver.wait_exit(30)[0] == 0, receiver.stderr()
        assert receiver.received() == SENT
    finally:
        sender.stop()
        receiver.stop()
