"""`mvpctl pipe` when the other side ends mid-stream: both ends exit non-zero within seconds,
saying what happened, whichever way the far side went (its daemon killed, `mvpctl
disconnect`, Ctrl-C on its `mvpctl pipe`); and a pipe that ends normally loses nothing, not
even over 200 MiB. Real daemons, signaling server and mvpctl.

scripts/test.sh runs this module a second time with ``MVPD_PURE_SCTP=1``, which the
daemons inherit: both builds of mvpd.sctp carry the pipe."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest

import mvpd.sctp
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


#: "Nothing lost": this many random bytes through a pipe.
BIG = 200 * 1024 * 1024
#: Generated, written and hashed this much at a time (never the whole file in memory).
BLOCK = 1 << 20


def write_random_file(path: Path, size: int, seed: int) -> str:
    """``size`` pseudo-random bytes (reproducible from ``seed``) into ``path``, one block
    at a time; their sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for offset in range(0, size, BLOCK):
            block = rng.randbytes(min(BLOCK, size - offset))
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def sctp_build_of(daemon: Daemon) -> str:
    """The build of mvpd.sctp the daemon process runs: ``compiled`` when its extension
    modules are mapped into the process, else ``pure``."""
    maps = Path(f"/proc/{daemon.pid}/maps").read_text()
    return "compiled" if "/mvpd/sctp/_native__mypyc" in maps else "pure"


class Digest:
    """Reads a stream to its end on a thread: byte count and sha256, nothing kept."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.size = 0
        self._digest = hashlib.sha256()
        self._stream = stream
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while block := self._stream.read(BLOCK):
            self.size += len(block)
            self._digest.update(block)

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@pytest.mark.timeout(600)
def test_200_mib_through_a_pipe_arrive_whole(daemons: Daemons, tmp_path: Path) -> None:
    """Every byte arrives, in order: same length and sha256 at the receiver, and both
    `mvpctl pipe` exit 0 (the sender's stdin a file, the receiver's stdout hashed as it
    streams)."""
    seed = random.randrange(1 << 32)
    source = tmp_path / "random.bin"
    expected = write_random_file(source, BIG, seed)
    alice, bob = daemons.many("alice", "bob")
    sender_err, receiver_err = tmp_path / "sender.err", tmp_path / "receiver.err"
    with receiver_err.open("wb") as err:
        receiver = subprocess.Popen(
            [*MVPCTL, "--socket", str(bob.socket), "pipe", "alice"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=err, env=base_env(), cwd=tmp_path,
        )
    assert receiver.stdout is not None
    received = Digest(receiver.stdout)
    started = time.monotonic()
    with source.open("rb") as src, sender_err.open("wb") as err:
        sender = subprocess.Popen(
            [*MVPCTL, "--socket", str(alice.socket), "pipe", "bob"], stdin=src,
            stdout=subprocess.DEVNULL, stderr=err, env=base_env(), cwd=tmp_path,
        )
    try:
        sent_code = sender.wait(540)
        assert received.wait(60), "the receiver's mvpctl pipe did not reach end of file"
        took = time.monotonic() - started
        received_code = receiver.wait(30)
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert sent_code == 0, sender_err.read_text()
    assert received_code == 0, receiver_err.read_text()
    assert received.size == BIG, f"{received.size} of {BIG} bytes arrived (seed {seed})"
    assert received.hexdigest() == expected, f"the bytes differ (seed {seed})"
    build = sctp_build_of(alice)
    assert build == sctp_build_of(bob) == mvpd.sctp.BUILD
    print(f"{BIG >> 20} MiB through mvpctl pipe ({build} mvpd.sctp) in {took:.1f} s: "
          f"{BIG / took / 1e6:.1f} MB/s")
