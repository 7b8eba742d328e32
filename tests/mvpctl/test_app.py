"""mvpctl against a real control socket (served by the in-memory handler of control_harness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mvpctl.app import EXIT_CODES, _fail, app
from mvpctl.client import Client
from mvpd.proto.control import ControlLimits
from tests.mvpctl.control_harness import ServerThread

PYTHON = sys.executable
runner = CliRunner()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "mvpd.sock") as running:
        yield running


def mvpctl(server: ServerThread, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--socket", str(server.path), *args])
    return result.exit_code, result.stdout, result.stderr


def mvpctl_process(
    socket: Path, *args: str, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [PYTHON, "-m", "mvpctl", "--socket", str(socket), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


def test_importing_the_cli_loads_no_daemon_machinery_and_no_pydantic() -> None:
    # mvpctl must start fast: it speaks the plain wire layer, never the pydantic models.
    code = (
        "import sys, mvpctl.app, mvpctl.client\n"
        "heavy = ('aiortc', 'aioice', 'pyroute2', 'systemd', 'websockets', 'asyncio',\n"
        "         'mvpd.control', 'mvpd.peer', 'mvpd.daemon', 'mvpd.config', 'mvpd.signaling',\n"
        "         'mvpd.transports', 'mvpd.tun.device', 'pydantic_settings', 'yaml',\n"
        "         'pydantic', 'pydantic_core', 'mvpd.proto.rpc', 'mvpd.proto.signaling')\n"
        "print([m for m in sys.modules if m.split('.')[0] in heavy or m in heavy\n"
        "       or any(m.startswith(h + '.') for h in heavy)])\n"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_daemon_exits_3_with_the_message(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    done = mvpctl_process(missing, "status")
    assert done.returncode == 3
    assert done.stderr.decode().strip() == (
        f"mvpctl: mvpd is not running (no socket at {missing}); start it with "
        "`systemctl start mvpd` or `mvpd run`"
    )


def test_environment_names_the_socket(server: ServerThread) -> None:
    env = {**os.environ, "MVPD_SOCKET": str(server.path)}
    done = subprocess.run(
        [PYTHON, "-m", "mvpctl", "peers"], capture_output=True, text=True, env=env, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "no peers")


def test_help_documents_the_exit_codes() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for code, text in EXIT_CODES.items():
        assert f"{code}  {text}" in result.stdout
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5]


def test_connect_status_peers_disconnect(server: ServerThread) -> None:
    assert mvpctl(server, "connect", "bob", "--mode", "json")[:2] == (0, "bob: connected\n")
    code, out, _ = mvpctl(server, "status")
    assert code == 0
    assert "agent      alice" in out and "connected (ws://127.0.0.1:8765)" in out
    header, row = out.splitlines()[-2:]
    assert header.split()[:5] == ["PEER", "STATE", "MODE", "PATH", "SINCE"]
    assert row.split()[:4] == ["bob", "connected", "json", "direct"]
    assert "(1m05s ago)" in row
    code, out, _ = mvpctl(server, "status", "--json")
    assert code == 0 and json.loads(out)["peers"][0]["peer"] == "bob"
    code, out, _ = mvpctl(server, "--json", "peers")
    assert code == 0 and json.loads(out)[0]["state"] == "connected"
    assert mvpctl(server, "disconnect", "bob")[0] == 0
    code, _, err = mvpctl(server, "disconnect", "bob")
    assert (code, err) == (1, "mvpctl: no peer 'bob'\n")


def test_send_and_recv(server: ServerThread, tmp_path: Path) -> None:
    mvpctl(server, "connect", "bob")
    assert mvpctl(server, "send", "bob", "hello there")[0] == 0
    assert mvpctl(server, "send", "bob", "--json", '{"n": 1}')[0] == 0
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\x01")
    assert mvpctl(server, "send", "bob", "--file", str(blob))[0] == 0
    code, out, _ = mvpctl(server, "recv", "bob", "--limit", "2")
    assert (code, out) == (0, 'hello there\n{"n": 1}\n')
    code, out, _ = mvpctl(server, "recv", "bob", "--json")
    assert json.loads(out) == {"peer": "bob", "kind": "bytes", "data": {"base64": "AAE="}}


def test_usage_errors_exit_2(server: ServerThread) -> None:
    assert mvpctl(server, "send", "bob", "text", "--json", "1")[0] == 2
    assert mvpctl(server, "send", "bob", "--json", "{nope")[0] == 2
    assert mvpctl(server, "connect", "bob", "--mode", "tap")[0] == 2
    assert mvpctl(server, "frobnicate")[0] == 2


def test_daemon_errors_exit_1_and_timeouts_exit_5(server: ServerThread) -> None:
    code, _, err = mvpctl(server, "connect", "unreachable")
    assert (code, err) == (1, "mvpctl: unreachable is offline on the signaling server\n")
    code, _, err = mvpctl(server, "connect", "slow", "--timeout", "0.05")
    assert code == 5 and "no open channel" in err
    code, _, err = mvpctl(server, "connect", "bad id")
    assert code == 1 and "peer" in err


@pytest.mark.parametrize("framed", [False, True], ids=["attached", "framed"])
def test_pipe_carries_bytes_and_eof_both_ways(server: ServerThread, framed: bool) -> None:
    payload = os.urandom(2_000_000) + b"\n"
    done = mvpctl_process(server.path, "pipe", "bob", *(["--framed"] if framed else []),
                          stdin=payload)
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload  # the echo peer returns everything, then its EOF
    assert server.handler.pipes_closed == 1
    # By default mvpd copies stdin and stdout itself; --framed carries them through mvpctl.
    assert server.handler.pipes_attached == [not framed]


@pytest.mark.parametrize("framed", [False, True], ids=["attached", "framed"])
def test_pipe_with_nothing_to_send(server: ServerThread, framed: bool) -> None:
    done = mvpctl_process(server.path, "pipe", "bob", *(["--framed"] if framed else []))
    assert (done.returncode, done.stdout) == (0, b"")


@pytest.mark.parametrize("framed", [False, True], ids=["attached", "framed"])
def test_pipe_error_exits_1(server: ServerThread, framed: bool) -> None:
    done = mvpctl_process(server.path, "pipe", "bob", *(["--framed"] if framed else []),
                          stdin=b"fail\n")
    assert done.returncode == 1
    assert b"channel broke" in done.stderr


@pytest.mark.parametrize("framed", [False, True], ids=["attached", "framed"])
def test_pipe_into_a_reader_that_quits_exits_0_quietly(
    server: ServerThread, framed: bool
) -> None:
    # `mvpctl pipe bob | head -c 10`: the reader leaving is not an error, as for any filter.
    done = subprocess.run(
        f"{PYTHON} -m mvpctl --socket {server.path} pipe bob {'--framed' if framed else ''}"
        " < /dev/zero | head -c 10 > /dev/null; echo ${PIPESTATUS[0]}",
        shell=True, executable="/bin/bash", capture_output=True, timeout=60,
    )
    assert done.stdout == b"0\n" and done.stderr == b""


def test_pipe_leaves_a_terminal_on_stdin_to_mvpctl(server: ServerThread) -> None:
    # A terminal stays under the shell's job control: mvpctl reads it, not the daemon.
    controller, terminal = os.openpty()
    try:
        os.write(controller, b"typed\n\x04")
        done = subprocess.run(
            [PYTHON, "-m", "mvpctl", "--socket", str(server.path), "pipe", "bob"],
            stdin=terminal, capture_output=True, timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert (done.returncode, done.stdout) == (0, b"typed\n"), done.stderr
    assert server.handler.pipes_attached == [False]


def test_pipe_falls_back_to_framing_when_mvpd_is_busy(tmp_path: Path) -> None:
    limits = ControlLimits(max_attached_pipes=0)
    with ServerThread(tmp_path / "mvpd.sock", limits=limits) as busy:
        done = mvpctl_process(busy.path, "pipe", "bob", stdin=b"still works")
        assert (done.returncode, done.stdout) == (0, b"still works"), done.stderr
        assert busy.handler.pipes_attached == [False]  # refused before it reached the handler


def test_chat_sends_lines_and_prints_the_peers(server: ServerThread) -> None:
    # The echo peer answers each line; "bye" makes it end the stream, which ends the chat.
    chat = subprocess.Popen(
        [PYTHON, "-m", "mvpctl", "--socket", str(server.path), "chat", "bob"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert chat.stdin is not None and chat.stdout is not None
    try:
        for line in (b"hi\n", b"how are you\n"):
            chat.stdin.write(line)
            chat.stdin.flush()
            assert chat.stdout.readline() == line
        chat.stdin.write(b"bye\n")
        chat.stdin.flush()
        chat.wait(timeout=60)  # stdin still open: the peer's end is what stops it
        _, err = chat.communicate(timeout=60)
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()
    assert chat.returncode == 0, err
    assert "bob is gone" in err.decode()
    with Client.connect(server.path) as client:
        peer = client.call("peers")[0]
    assert peer["messages_out"] == 3


def test_chat_ends_at_end_of_input(server: ServerThread) -> None:
    last = "last line without newline"
    done = mvpctl_process(server.path, "chat", "bob", stdin=f"one\n{last}".encode())
    assert done.returncode == 0, done.stderr
    with Client.connect(server.path) as client:
        peer = client.call("peers")[0]
    assert (peer["messages_out"], peer["bytes_out"]) == (2, len("one") + len(last))


def _recv_on_a_terminal(socket: Path) -> bytes:
    """``mvpctl recv bob --limit 1`` with its stdout on a pseudo-terminal; what it printed."""
    import pty

    main_fd, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [PYTHON, "-m", "mvpctl", "--socket", str(socket), "recv", "bob", "--limit", "1"],
            stdout=terminal, stderr=subprocess.PIPE, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        os.close(terminal)
        terminal = -1
        out = b""
        while True:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(main_fd)
        if terminal >= 0:
            os.close(terminal)


def test_a_peers_text_cannot_drive_the_terminal(server: ServerThread) -> None:
    hostile = "red\x1b[31m alert\u202e\tok\nsecond line"
    mvpctl(server, "connect", "bob")
    assert mvpctl(server, "send", "bob", hostile)[0] == 0
    shown = _recv_on_a_terminal(server.path).decode()
    # The terminal turns "\n" into "\r\n"; the escape and the bidi override arrive as text.
    assert shown == "red\\x1b[31m alert\\u202e\tok\r\nsecond line\r\n"
    # Into a pipe the text goes as it came.
    assert mvpctl(server, "send", "bob", hostile)[0] == 0
    assert mvpctl(server, "recv", "bob", "--limit", "1")[1] == hostile + "\n"


def test_errors_stay_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    _fail("bob said bye: x\nmvpctl: forged\x1b[2J", 1)
    assert capsys.readouterr().err == "mvpctl: bob said bye: x\\nmvpctl: forged\\x1b[2J\n"


def test_every_commands_help_is_reflowed_to_the_terminal() -> None:
    # The help renderer keeps a docstring's line breaks: left in, a paragraph written at the
    # source's width breaks again mid-line on an 80-column terminal.
    for command in app.registered_commands:
        assert command.help, command.name
        for paragraph in command.help.split("\n\n"):
            assert "\n" not in paragraph, (command.callback, paragraph)
    done = subprocess.run(
        [PYTHON, "-m", "mvpctl", "stats", "--help"], capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "80"}, timeout=60,
    )
    assert "round trip of the liveness checks" in " ".join(done.stdout.split())
    assert "trip of\n" not in done.stdout
