"""The ``mvpd`` command: exit codes and messages an operator sees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
        env={**clean, "AGENT_CONFIG": str(config), **(env or {})},
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
