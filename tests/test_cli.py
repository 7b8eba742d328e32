"""The ``mvpd`` command: exit codes and messages an operator sees."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvpd.config import is_setting_variable

MVPD = [sys.executable, "-m", "mvpd.cli"]


def run_mvpd(
    *args: str, tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mvp-agent.yaml"
    if not config.exists():
        config.write_text("")
    clean = {k: v for k, v in os.environ.items() if not is_setting_variable(k)}
    return subprocess.run(
        [*MVPD, *args],
        # Never the machine's /var/lib/mvpd: a test's identity stays in its tmp_path.
        env={**clean, "AGENT_CONFIG": str(config), "MVPD_STATE_DIR": str(tmp_path / "state"),
             **(env or {})},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_invalid_config_exits_78_naming_key_and_value(tmp_path: Path) -> None:
    done = run_mvpd("run", tmp_path=tmp_path, env={"MODE": "smoke-signals"})
    assert done.returncode == 78
    assert "mode (environment MODE)" in done.stderr
    assert "smoke-signals" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_config_file_exits_78(tmp_path: Path) -> None:
    (tmp_path / "mvp-agent.yaml").write_text("signaling_token: hunter2\nmodee: chat\n")
    done = run_mvpd("check-config", tmp_path=tmp_path)
    assert done.returncode == 78
    assert "unknown key(s) modee" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_check_config_prints_effective_settings_without_secrets(tmp_path: Path) -> None:
    done = run_mvpd(
        "check-config",
        tmp_path=tmp_path,
        env={"SIGNALING_TOKEN": "hunter2", "ICE_URL": "turn:relay.test:3478",
             "ICE_CREDENTIAL": "hunter3", "AGENT_ID": "alice"},
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["agent_id"] == "alice"
    assert shown["signaling_token"] == "***"
    assert "hunter" not in done.stdout + done.stderr
    assert shown["config_file"] == str(tmp_path / "mvp-agent.yaml")


def test_a_live_daemons_socket_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    try:
        done = run_mvpd(
            "run",
            "--socket",
            str(path),
            tmp_path=tmp_path,
            env={"AGENT_ID": "alice", "SIGNALING_URL": "ws://127.0.0.1:9"},
        )
    finally:
        listener.close()
    assert done.returncode == 1
    assert "another mvpd" in done.stderr
    assert path.exists()


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["signal", "--help"]])
def test_help_explains(command: list[str], tmp_path: Path) -> None:
    done = run_mvpd(*command, tmp_path=tmp_path)
    assert done.returncode == 0
    assert "Usage" in done.stdout


DAEMON_ENV = {"AGENT_ID": "alice", "SIGNALING_URL": "ws://127.0.0.1:9"}


def bad_socket_path(kind: str, tmp_path: Path) -> Path:
    if kind == "too long":
        return tmp_path / ("d" * 120) / "mvpd.sock"
    if kind == "parent is a file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "mvpd.sock"
    if kind == "parent not creatable":
        return Path("/proc/1/mvpd/mvpd.sock")
    shared = tmp_path / "shared"  # writable by everyone
    shared.mkdir()
    shared.chmod(0o1777)
    return shared / "mvpd.sock"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("too long", "bytes long; Unix sockets allow 107: set a shorter one"),
        ("parent is a file", "file is not a directory"),
        ("parent not creatable", "control socket directory /proc/1/mvpd: cannot create it"),
        ("writable by others", "is writable by other users (mode 1777)"),
    ],
)
def test_a_bad_socket_path_exits_78_with_one_clear_line(
    kind: str, message: str, tmp_path: Path
) -> None:
    path = bad_socket_path(kind, tmp_path)
    done = run_mvpd("run", "--socket", str(path), tmp_path=tmp_path, env=DAEMON_ENV)
    assert done.returncode == 78, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "invalid configuration: control socket" in errors[0], errors
    assert message in errors[0]


def start_mvpd(
    args: list[str], tmp_path: Path, limits: tuple[int, int] | None = None
) -> subprocess.Popen[str]:
    """The daemon in the background, on a control socket under ``tmp_path``; returns once it
    is ready (its socket answers)."""
    config = tmp_path / "mvp-agent.yaml"
    config.write_text("")
    clean = {k: v for k, v in os.environ.items() if not is_setting_variable(k)}
    socket_path = tmp_path / "run" / "mvpd.sock"

    def set_limits() -> None:
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    process = subprocess.Popen(
        [*MVPD, *args], cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**clean, **DAEMON_ENV, "AGENT_CONFIG": str(config), "MVPD_SOCKET": str(socket_path),
             "MVPD_STATE_DIR": str(tmp_path / "state")},
        preexec_fn=set_limits,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(socket_path))
            return process
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"mvpd did not start: {process.communicate(timeout=10)[1]}")


def stop_mvpd(process: subprocess.Popen[str]) -> str:
    """SIGTERM, expect a clean exit; return what it logged."""
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return err


def test_mvpd_without_a_command_runs_the_daemon(tmp_path: Path) -> None:
    process = start_mvpd([], tmp_path)  # the README: `mvpd` alone is `mvpd run`
    err = stop_mvpd(process)
    assert "mvpd ready: control socket" in err and "Traceback" not in err


def test_mvpd_raises_its_soft_open_file_limit(tmp_path: Path) -> None:
    process = start_mvpd(["run"], tmp_path, limits=(256, 4096))
    try:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        err = stop_mvpd(process)
    assert "open file limit raised from 256 to 4096 (the hard limit)" in err
