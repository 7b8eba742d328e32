"""The control socket server over real Unix sockets: hello, calls, errors, streams, the socket
file, bad input, limits, and authorisation by peer credentials (with a second real uid)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvpctl.client import Client
from mvpd.control import ControlServer, resolve_access
from mvpd.proto import rpc
from mvpd.proto.control import ControlLimits
from mvpd.proto.errors import (
    ConfigError,
    ConnectionClosed,
    InvalidParams,
    MvpError,
    NotFound,
    RpcError,
    RpcTimeout,
    UnknownMethod,
)
from mvpd.socket_file import SocketFile
from tests.mvpctl.control_harness import FakeDaemon, ServerThread
from tests.users import public_directory, run_admin, throwaway_user

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "run" / "mvpd.sock") as running:
        yield running


def raw_connect(path: Path, hello: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    if hello:
        sock.sendall(rpc.encode_frame(rpc.client_hello("test")))
        assert read_messages(sock, 1)[0]["access"] == "write"
    return sock


def read_messages(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    decoder = rpc.FrameDecoder()
    out: list[dict[str, Any]] = []
    while len(out) < count:
        data = sock.recv(65536)
        if not data:
            break
        out.extend(decoder.feed(data))
    return out


def read_until_closed(sock: socket.socket) -> list[dict[str, Any]]:
    decoder = rpc.FrameDecoder()
    out: list[dict[str, Any]] = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out.extend(decoder.feed(data))


def assert_serving(path: Path) -> None:
    with Client.connect(path, timeout=10) as client:
        assert client.call("status")["agent_id"] == "alice"


# --- hello, calls, errors ------------------------------------------------------------------------


def test_hello_and_calls(server: ServerThread) -> None:
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o666
    with Client.connect(server.path) as client:
        assert (client.hello.agent_id, client.access) == ("alice", "write")
        assert client.hello.server == "mvpd 0.1.0"
        peer = client.call("connect", peer="bob", mode="json")
        assert (peer["peer"], peer["state"], peer["mode"], peer["path"]) == (
            "bob",
            "connected",
            "json",
            "direct",
        )
        status = client.call("status")
        assert [p["peer"] for p in status["peers"]] == ["bob"]
        assert status["signaling"]["state"] == "connected"
        assert client.call("peers")[0]["peer"] == "bob"
        assert client.call("send", peer="bob", text="hé") == {"bytes": 2}
        assert client.call("reload") == {"applied": ["log_level"], "not_applied": ["socket"]}
        assert client.call("disconnect", peer="bob") == {}
        assert client.call("peers") == []
    assert [name for name, _ in server.handler.calls][:2] == ["connect", "status"]
    caller = server.handler.calls[0][1]
    assert (caller.uid, caller.pid, caller.access) == (0, os.getpid(), "write")


def test_error_replies(server: ServerThread) -> None:
    with Client.connect(server.path) as client:
        with pytest.raises(UnknownMethod):
            client.call("launch")
        with pytest.raises(InvalidParams, match="wait"):
            client.call("connect", peer="bob", wait="yes")
        with pytest.raises(InvalidParams, match="exactly one"):
            client.call("send", peer="bob", text="a", data=b"b")
        with pytest.raises(NotFound, match="no peer 'ghost'"):
            client.call("disconnect", peer="ghost")
        with pytest.raises(RpcError, match="offline") as info:
            client.call("connect", peer="unreachable")
        assert info.value.code == "peer-error"
        with pytest.raises(RpcError) as info:
            client.call("connect", peer="crash")
        assert info.value.code == "internal" and "a bug" not in info.value.message
        with pytest.raises(RpcTimeout, match="no open channel"):
            client.call("connect", peer="slow", timeout=0.05)
        # Still a working connection after all that.
        assert client.call("status")["agent_id"] == "alice"


def test_calls_run_concurrently_and_pipelined_requests_are_all_answered(
    server: ServerThread,
) -> None:
    with Client.connect(server.path) as client:
        slow = client.request("connect", peer="slow", timeout=2)
        # A slow call does not hold up the others on the same connection.
        assert client.call("status")["agent_id"] == "alice"
        ids = [client.request("peers") for _ in range(300)]
        assert all(client.wait(i) == [] for i in ids)
        with pytest.raises(RpcTimeout):
            client.wait(slow)


def test_version_mismatch_gets_an_error_and_the_connection_closed(server: ServerThread) -> None:
    sock = raw_connect(server.path, hello=False)
    sock.sendall(rpc.encode_frame({"hello": 99, "client": "future"}))
    replies = read_until_closed(sock)
    assert replies[0]["id"] is None
    assert replies[0]["error"]["code"] == "version-mismatch"
    assert "speaks version 1" in replies[0]["error"]["message"]
    assert_serving(server.path)


def test_a_request_before_the_hello_is_refused(server: ServerThread) -> None:
    sock = raw_connect(server.path, hello=False)
    sock.sendall(rpc.encode_frame(rpc.request(1, "status", {})))
    replies = read_until_closed(sock)
    assert replies[0]["error"]["code"] == "bad-request"


# --- the socket file -----------------------------------------------------------------------------


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "mvpd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # what a crashed daemon leaves behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with ServerThread(path) as server:
        assert_serving(server.path)
    assert not path.exists()


def test_a_live_daemons_socket_is_never_stolen(server: ServerThread) -> None:
    second = ControlServer(server.path, server.handler, agent_id="intruder")
    with pytest.raises(MvpError, match=f"another mvpd is running on {server.path}"):
        asyncio.run(second.start())
    assert_serving(server.path)


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "mvpd.sock"
    path.write_text("precious")
    with pytest.raises(MvpError, match="exists and is not a socket"):
        asyncio.run(ControlServer(path, object(), agent_id="a").start())  # type: ignore[arg-type]
    assert path.read_text() == "precious"


# --- bad input -----------------------------------------------------------------------------------


def test_malformed_frames_get_errors_and_the_server_carries_on(server: ServerThread) -> None:
    other = Client.connect(server.path)  # a well-behaved client, connected all along

    sock = raw_connect(server.path)
    not_a_map = msgpack.packb([1, 2, 3])
    sock.sendall(struct.pack(">I", len(not_a_map)) + not_a_map)
    sock.sendall(rpc.encode_frame({"id": 4, "method": 12}))
    sock.sendall(rpc.encode_frame(rpc.request(5, "status", {})))
    replies = read_messages(sock, 3)
    assert replies[0] == {
        "id": None,
        "error": {"code": "bad-frame", "message": "frame must hold a msgpack map, not list"},
    }
    assert replies[1]["id"] == 4 and replies[1]["error"]["code"] == "bad-request"
    assert replies[2]["id"] == 5 and replies[2]["result"]["agent_id"] == "alice"

    sock.sendall(struct.pack(">I", rpc.MAX_FRAME + 1))
    replies = read_until_closed(sock)
    assert replies[0]["error"]["code"] == "too-large"

    truncated = raw_connect(server.path)
    truncated.sendall(rpc.encode_frame(rpc.request(1, "status", {}))[:7])
    truncated.close()

    assert other.call("status")["agent_id"] == "alice"
    other.close()
    assert_serving(server.path)


def test_read_only_callers_get_a_small_frame_limit(tmp_path: Path) -> None:
    # Exercised directly: the decoder limit is what protects the daemon's memory.
    limits = ControlLimits()
    assert limits.read_only_max_frame < limits.max_frame
    decoder = rpc.FrameDecoder(limits.read_only_max_frame)
    with pytest.raises(rpc.FrameTooLarge):
        decoder.feed(rpc.encode_frame({"x": b"y" * limits.read_only_max_frame}))


def test_hello_must_come_in_time(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "s.sock", limits=ControlLimits(hello_timeout=0.2)) as server:
        sock = raw_connect(server.path, hello=False)
        replies = read_until_closed(sock)
        assert replies[0]["error"]["message"] == "no hello received in time"
        assert_serving(server.path)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as tmp, ServerThread(Path(tmp) / "fuzz.sock") as server:
        yield server


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    hello=st.booleans(),
    chunks=st.lists(
        st.binary(max_size=64)
        | st.builds(
            lambda m: rpc.encode_frame(m),
            st.dictionaries(
                st.text(max_size=8),
                st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
                max_size=3,
            ),
        )
        | st.builds(
            lambda i, m, p: rpc.encode_frame({"id": i, "method": m, "params": p}),
            st.integers(-2, 2**64 - 1),
            st.sampled_from([*rpc.METHODS, "nope", ""]),
            st.dictionaries(
                st.sampled_from(["peer", "sub", "data", "text", "follow"]),
                st.integers(-(2**63), 2**64 - 1)
                | st.text(max_size=8)
                | st.binary(max_size=8)
                | st.booleans(),
                max_size=3,
            ),
        ),
        max_size=6,
    ),
)
def test_fuzzed_clients_never_hurt_the_server(
    fuzz_server: ServerThread, hello: bool, chunks: list[bytes]
) -> None:
    sock = raw_connect(fuzz_server.path, hello=hello)
    with contextlib.suppress(OSError):
        for chunk in chunks:
            sock.sendall(chunk)
    sock.close()
    assert_serving(fuzz_server.path)


# --- authorisation -------------------------------------------------------------------------------


def test_resolve_access_for_root_and_unknown_users() -> None:
    assert resolve_access(0, 0, "no-such-group-xyz", "none") == "write"
    assert resolve_access(54321, 54321, "no-such-group-xyz", "read") == "read"
    assert resolve_access(54321, 54321, "no-such-group-xyz", "none") is None


AS_USER = """
import json, sys
from mvpctl.client import Client
from mvpd.proto.errors import MvpError
out = {}
try:
    client = Client.connect(sys.argv[1])
except MvpError as exc:
    print(json.dumps({"connect": exc.code, "message": exc.message}))
    raise SystemExit
out["access"] = client.access
for method, params in (("status", {}), ("peers", {}), ("connect", {"peer": "bob"})):
    try:
        client.call(method, **params)
        out[method] = "ok"
    except MvpError as exc:
        out[method] = exc.code
        out[method + "_message"] = exc.message
print(json.dumps(out))
"""


@pytest.fixture
def other_user() -> Iterator[tuple[str, str]]:
    """A throwaway system user and group, removed afterwards."""
    with throwaway_user("mvpctlt", "mvpctlg") as names:
        yield names


def run_as(user: str, *args: str) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            PYTHON,
            *args,
        ],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
    )


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is 0700)."""
    with public_directory("mvpd-ctl-") as path:
        yield path


def test_second_uid_reads_but_writes_only_in_the_group(
    other_user: tuple[str, str], public_dir: Path
) -> None:
    user, group = other_user
    with ServerThread(public_dir / "mvpd.sock", group=group) as server:
        assert grp.getgrgid(os.stat(server.path).st_gid).gr_name == group
        done = run_as(user, "-c", AS_USER, str(server.path))
        result = json.loads(done.stdout or done.stderr)
        assert result["access"] == "read"
        assert (result["status"], result["peers"], result["connect"]) == ("ok", "ok", "forbidden")
        assert f"group {group!r}" in result["connect_message"]
        uid = pwd.getpwnam(user).pw_uid
        assert [c.uid for name, c in server.handler.calls if name == "status"] == [uid]
        assert not [c for name, c in server.handler.calls if name == "connect"]

        cli = run_as(user, "-m", "mvpctl", "--socket", str(server.path), "connect", "bob")
        assert cli.returncode == 4, cli.stderr
        assert "write access" in cli.stderr and group in cli.stderr

        run_admin("gpasswd", "-a", user, group)
        result = json.loads(run_as(user, "-c", AS_USER, str(server.path)).stdout)
        assert result == {"access": "write", "status": "ok", "peers": "ok", "connect": "ok"}
        assert [c.uid for name, c in server.handler.calls if name == "connect"] == [uid]


def test_others_none_refuses_by_mode_and_by_credentials(
    other_user: tuple[str, str], public_dir: Path
) -> None:
    user, group = other_user
    with ServerThread(public_dir / "mvpd.sock", group=group, others_access="none") as server:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660
        done = run_as(user, "-m", "mvpctl", "--socket", str(server.path), "status")
        assert done.returncode == 4, done.stderr
        assert "permission denied" in done.stderr and repr(group) in done.stderr

        # The file mode is not the only gate: opened up, the daemon still refuses.
        os.chmod(server.path, 0o666)
        result = json.loads(run_as(user, "-c", AS_USER, str(server.path)).stdout)
        assert result["connect"] == "forbidden"
        assert f"group {group!r}" in result["message"]
        assert not server.handler.calls


def test_connection_closed_error_when_daemon_goes_away(tmp_path: Path) -> None:
    server = ServerThread(tmp_path / "s.sock").start()
    client = Client.connect(server.path)
    server.stop()
    with pytest.raises(ConnectionClosed):
        client.call("status")
    client.close()


# --- the socket's directory (a second uid must not be able to change it) ------------------------


def start_fails(path: Path) -> MvpError:
    """Start a server at ``path``, expecting it to refuse; return the error."""
    server = ControlServer(path, FakeDaemon(), agent_id="alice")
    with pytest.raises(MvpError) as info:
        asyncio.run(server.start())
    return info.value


def test_directories_are_created_root_owned_0755_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        with ServerThread(tmp_path / "a" / "b" / "mvpd.sock") as server:
            for directory in (tmp_path / "a", tmp_path / "a" / "b"):
                st = os.stat(directory)
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o755)
            assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o666
            assert_serving(server.path)
    finally:
        os.umask(old)
    assert not (tmp_path / "a" / "b" / "mvpd.sock").exists()
    assert not [p for p in (tmp_path / "a" / "b").iterdir()]  # no temporary name left


def test_directories_another_user_can_change_are_refused(
    other_user: tuple[str, str], public_dir: Path
) -> None:
    user, _ = other_user
    uid = pwd.getpwnam(user).pw_uid
    theirs = public_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, uid, -1)
    error = start_fails(theirs / "mvpd.sock")
    assert isinstance(error, ConfigError)
    assert f"{theirs} is owned by uid {uid}" in error.message
    # A root-owned directory below theirs is no better: they can rename it away.
    (theirs / "run").mkdir(mode=0o755)
    error = start_fails(theirs / "run" / "mvpd.sock")
    assert f"{theirs} is owned by uid {uid}" in error.message
    assert not (theirs / "run" / "mvpd.sock").exists()

    for mode in (0o777, 0o1777, 0o775):
        shared = public_dir / f"shared{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        error = start_fails(shared / "mvpd.sock")
        assert isinstance(error, ConfigError)
        assert f"{shared} is writable by other users (mode {mode:04o})" in error.message
        assert not (shared / "mvpd.sock").exists()

    # A sticky directory above is fine (like /tmp) as long as the socket's own is root's...
    sticky = public_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with ServerThread(sticky / "run" / "mvpd.sock") as server:
        assert_serving(server.path)
    # ... but not a symlink there that the other user owns (they may point it anywhere).
    link = sticky / "link"
    link.symlink_to(sticky / "run")
    os.chown(link, uid, -1, follow_symlinks=False)
    error = start_fails(link / "mvpd.sock")
    assert f"symlink {link} is owned by uid {uid}" in error.message


def test_the_daemons_own_directory_may_not_be_tmp(tmp_path: Path) -> None:
    error = start_fails(Path("/tmp") / f"mvpd-test-{os.getpid()}.sock")
    assert "/tmp is writable by other users (mode 1777)" in error.message
    assert "root-owned subdirectory" in error.message
    with tempfile.TemporaryDirectory() as tmp, ServerThread(Path(tmp) / "mvpd.sock") as server:
        assert_serving(server.path)


def test_symlinks_in_checked_directories_are_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o755)
    (tmp_path / "link").symlink_to("real")
    with ServerThread(tmp_path / "link" / "mvpd.sock") as server:
        assert stat.S_ISSOCK(os.lstat(tmp_path / "real" / "mvpd.sock").st_mode)
        assert_serving(server.path)


def test_a_symlink_at_the_socket_path_is_never_followed(tmp_path: Path) -> None:
    precious = tmp_path / "shadow"
    precious.write_text("root only")
    precious.chmod(0o600)
    path = tmp_path / "mvpd.sock"
    path.symlink_to(precious)
    error = start_fails(path)
    assert isinstance(error, ConfigError) and "exists and is not a socket" in error.message
    assert stat.S_IMODE(os.stat(precious).st_mode) == 0o600
    assert precious.read_text() == "root only" and path.is_symlink()

    # A symlink to a dead socket elsewhere: neither the link nor its target is removed.
    elsewhere = tmp_path / "other.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(elsewhere))
    dead.close()
    path.unlink()
    path.symlink_to(elsewhere)
    start_fails(path)
    assert path.is_symlink() and stat.S_ISSOCK(os.lstat(elsewhere).st_mode)


def test_a_socket_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "mvpd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    socket_file = SocketFile(path)
    try:
        stale = socket_file.existing()  # found dead ...
        assert stale is not None
        os.unlink(path)  # ... but another daemon took the path meanwhile
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
            live.bind(str(path))
            live.listen()
            for found in (stale, None):
                with pytest.raises(FileExistsError):
                    socket_file.bind(group_id=None, mode=0o666, backlog=8, stale=found)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(path))  # still the other daemon's
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mvpd.sock"]
    finally:
        socket_file.close()


# --- admission: no local user can lock out root or the group -------------------------------------

HOLD_CONNECTIONS = """
import json, select, socket, sys, time
from mvpd.proto import rpc
path, count, hello = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hello"
socks = []
seen = {"busy": 0, "hello": 0}
waiting = []

def answer(s):
    messages = rpc.FrameDecoder().feed(s.recv(65536))
    code = messages[0]["error"]["code"] if messages and "error" in messages[0] else "hello"
    seen[code] = seen.get(code, 0) + 1

for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    socks.append(s)
    if hello:  # one after the other, as a client does
        try:
            s.sendall(rpc.encode_frame(rpc.client_hello("hog")))
        except BrokenPipeError:
            pass  # refused and closed already; its answer is waiting
        s.settimeout(10)
        answer(s)
    else:
        waiting.append(s)
# Refused connections get their frame at once, the others nothing before their hello.
# Once `answered` have an answer, the server has taken all of them.
deadline = time.monotonic() + 3  # less than any hello timeout
while sum(seen.values()) < int(sys.argv[4]) and time.monotonic() < deadline:
    readable, _, _ = select.select(waiting, [], [], deadline - time.monotonic())
    for s in readable:
        waiting.remove(s)
        answer(s)
print("ready", flush=True)
sys.stdin.readline()
readable, _, _ = select.select(waiting, [], [], 0.5) if waiting else ([], [], [])
for s in readable:
    waiting.remove(s)
    answer(s)
seen["nothing"] = len(waiting)
print(json.dumps(seen), flush=True)
"""


def hold_connections(
    user: str, path: Path, count: int, *, hello: bool, answered: int
) -> subprocess.Popen[str]:
    """``count`` connections from ``user``, held open until a line arrives on stdin; then
    it prints what each got (a ``busy`` refusal, a hello reply, or nothing yet). Returns
    once ``answered`` of them have had their answer, or after 3 s."""
    entry = pwd.getpwnam(user)
    process = subprocess.Popen(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
         PYTHON, "-c", HOLD_CONNECTIONS, str(path), str(count), "hello" if hello else "-",
         str(answered)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/", env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line == "ready\n", line + process.communicate(timeout=30)[1]
    return process


def held_result(process: subprocess.Popen[str]) -> dict[str, int]:
    out, err = process.communicate("go\n", timeout=60)
    assert process.returncode == 0, err
    result: dict[str, int] = json.loads(out)
    return result


def test_a_user_outside_the_group_cannot_lock_out_root(
    other_user: tuple[str, str], public_dir: Path
) -> None:
    user, group = other_user
    with ServerThread(public_dir / "mvpd.sock", group=group) as server:
        hog = hold_connections(user, server.path, 600, hello=False, answered=560)
        try:
            # Every one of root's calls gets through while the 600 connections are open.
            for _ in range(6):
                with Client.connect(server.path, timeout=5) as client:
                    assert client.call("status")["agent_id"] == "alice"
        finally:
            seen = held_result(hog)
        limits = ControlLimits()
        assert limits.hello_timeout <= 5
        # What one uid outside the group may hold, before its hellos.
        held = min(limits.max_pre_hello_per_uid, limits.max_read_only_per_uid)
        # The excess was accepted at once and told why (not left in the listen backlog); the
        # others wait for their hello (or were told it did not come in time).
        assert seen["busy"] == 600 - held and seen["hello"] == 0, seen

        # With their hellos, read-only connections are capped per uid as well.
        hog = hold_connections(user, server.path, 40, hello=True, answered=40)
        try:
            assert_serving(server.path)
        finally:
            seen = held_result(hog)
        assert seen == {"busy": 40 - limits.max_read_only_per_uid,
                        "hello": limits.max_read_only_per_uid, "nothing": 0}, seen


def test_a_group_member_cannot_lock_out_root(
    other_user: tuple[str, str], public_dir: Path
) -> None:
    user, group = other_user
    run_admin("gpasswd", "-a", user, group)
    limits = ControlLimits()
    with ServerThread(public_dir / "mvpd.sock", group=group) as server:
        hog = hold_connections(user, server.path, 100, hello=True, answered=100)
        try:
            assert_serving(server.path)
        finally:
            seen = held_result(hog)
        assert seen == {"busy": 100 - limits.max_connections_per_uid,
                        "hello": limits.max_connections_per_uid, "nothing": 0}, seen

    # Several members together still leave root its reserved slots.
    small = ControlLimits(max_connections=40, reserved_for_root=8, max_connections_per_uid=100)
    with ServerThread(public_dir / "mvpd.sock", group=group, limits=small) as server:
        hog = hold_connections(user, server.path, 50, hello=True, answered=50)
        try:
            clients = [Client.connect(server.path, timeout=5) for _ in range(8)]
            assert all(c.call("status")["agent_id"] == "alice" for c in clients)
            for c in clients:
                c.close()
        finally:
            seen = held_result(hog)
        assert seen == {"busy": 18, "hello": 32, "nothing": 0}, seen


# --- out of file descriptors ---------------------------------------------------------------------

FD_STARVED_SERVER = """
import asyncio, contextlib, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.mvpctl.control_harness import FakeDaemon
from mvpd.control import ControlServer
from mvpd.logs import setup_logging
with contextlib.suppress(ImportError):  # what the daemon runs on when it is installed
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
setup_logging("info", journal=False)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
async def main():
    server = ControlServer(Path(sys.argv[1]), FakeDaemon(), agent_id="alice")
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def test_running_out_of_file_descriptors_is_logged_and_serving_goes_on(tmp_path: Path) -> None:
    path, log_file = tmp_path / "run" / "mvpd.sock", tmp_path / "server.log"
    with log_file.open("w") as log_out:
        server = subprocess.Popen(
            [PYTHON, "-c", FD_STARVED_SERVER, str(path), str(ROOT)],
            stdout=subprocess.PIPE, stderr=log_out, text=True, cwd=tmp_path,
        )
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n", \
            log_file.read_text()
        held: list[socket.socket] = []
        for _ in range(100):  # more than the 64 descriptors the server may have
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2)
            sock.connect(str(path))
            held.append(sock)
            sock.sendall(rpc.encode_frame(rpc.client_hello("test")))
            try:
                read_messages(sock, 1)
            except TimeoutError:
                break  # it could not accept this one
        else:
            pytest.fail("the server never ran out of descriptors")
        for _ in range(50):
            if "cannot accept connections" in log_file.read_text():
                break
            server.poll()
            time.sleep(0.1)
        time.sleep(1.5)  # accept is retried every 0.2 s meanwhile
        text = log_file.read_text()
        assert "control socket: cannot accept connections: Too many open files " \
               "(open file limit 64)" in text, text
        assert text.count("cannot accept connections") == 1  # rate-limited
        for sock in held:
            sock.close()
        assert_serving(path)  # descriptors are free again: accepting resumed
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(10)
