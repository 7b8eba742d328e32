"""Child processes for the benchmarks: started with a death signal, tracked, stopped by PID.

:class:`Children` remembers every process it starts and :meth:`Children.stop_all` stops each
one by its PID (SIGTERM, then SIGKILL after a grace period), so a benchmark that fails half way
leaves nothing running. Children also get ``PR_SET_PDEATHSIG`` = SIGTERM, so even a SIGKILLed
benchmark takes its children with it.

:func:`daemon_env` builds a hermetic environment for ``mvpd run``: inherited mvpd settings are
dropped and ``AGENT_CONFIG`` points at a file the benchmark wrote, so /etc/mvp-agent.yaml and
any .env are never read.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from mvpd.config import is_setting_variable

REPO = Path(__file__).resolve().parents[1]
#: The venv's bin directory (not resolved: .venv/bin/python is a symlink to the system one).
VENV_BIN = Path(sys.executable).parent
MVPD = VENV_BIN / "mvpd"
MVPCTL = VENV_BIN / "mvpctl"

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the parent goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any mvpd setting, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not is_setting_variable(key)}
    env.update(extra)
    return env


def daemon_env(agent_id: str, url: str, socket: Path, config: Path) -> dict[str, str]:
    """The environment of one ``mvpd run``."""
    return clean_env(
        AGENT_ID=agent_id,
        SIGNALING_URL=url,
        MVPD_SOCKET=str(socket),
        AGENT_CONFIG=str(config),
        # Each daemon its own identity (the default /var/lib/mvpd is the machine's).
        MVPD_STATE_DIR=str(socket.parent / f"{agent_id}.state"),
    )


def write_config(path: Path) -> Path:
    """A config file with no ICE servers at all (loopback host candidates only). The offer
    rate limit is raised: the connect benchmark reconnects the same pair many times a
    minute, more than the default (30 offers a minute per peer) lets through."""
    path.write_text("ice_servers: []\nlog_level: warning\nconnect_timeout: 30\n"
                    "offers_per_minute: 600\n")
    return path


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else 0


class Children:
    """Every process a benchmark started."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [os.fspath(a) for a in argv],
            env=env,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=die_with_parent,
        )
        self.procs.append((name, proc))
        return proc

    def run_timed(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> float:
        """Run a short command to its end; its wall time in seconds. Raises on failure."""
        started = time.perf_counter()
        proc = self.start(name, argv, env=env, cwd=cwd, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{name} did not finish within {timeout:g} s") from None
        elapsed = time.perf_counter() - started
        self.forget(proc)
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()[-500:]
            raise RuntimeError(f"{name} failed with exit code {proc.returncode}: {text}")
        return elapsed

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
        """Stop ``proc`` by its PID: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.forget(proc)
        return proc.returncode

    def stop_all(self) -> None:
        """Stop everything still tracked, newest first (clients before servers)."""
        for _, proc in reversed(list(self.procs)):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)
