"""The control socket of a real daemon: authorisation by peer credentials with a second real
uid, and a fuzzed flood of bad frames that must leave the daemon and its peers unharmed."""

from __future__ import annotations

import contextlib
import json
import pwd
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvpd.proto import rpc
from tests.e2e.harness import PYTHON, Daemon, Daemons, base_env, wait_until
from tests.users import public_directory, run_admin, throwaway_user

pytestmark = pytest.mark.slow

# --- a second uid (the approach of tests/test_control.py) ------------------------------------


@pytest.fixture
def other_user() -> Iterator[tuple[str, str]]:
    """A throwaway system user and group, removed afterwards."""
    with throwaway_user("mvpe2eu", "mvpe2eg") as names:
        yield names


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is 0700)."""
    with public_directory("mvpd-e2e-") as path:
        yield path


def mvpctl_as(user: str, daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    env = base_env()
    env["PATH"] = "/usr/bin:/bin"
    return subprocess.run(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
         PYTHON, "-m", "mvpctl", "--socket", str(daemon.socket), *args],
        capture_output=True, text=True, cwd="/", env=env, timeout=60,
    )


def test_another_user_reads_but_may_not_write_unless_in_the_group(
    other_user: tuple[str, str], public_dir: Path, daemons: Daemons
) -> None:
    user, group = other_user
    alice = daemons("alice", env={"MVPD_SOCKET_GROUP": group},
                    socket_path=public_dir / "alice.sock")
    bob = daemons("bob")
    alice.ctl_ok("connect", "bob")

    status = mvpctl_as(user, alice, "status", "--json")
    assert status.returncode == 0, status.stderr
    (peer,) = json.loads(status.stdout)["peers"]
    assert (peer["peer"], peer["state"]) == ("bob", "connected")
    peers = mvpctl_as(user, alice, "peers")
    assert peers.returncode == 0 and "bob" in peers.stdout

    for args in (("send", "bob", "from a stranger"), ("connect", "carol"),
                 ("disconnect", "bob"), ("reload",)):
        refused = mvpctl_as(user, alice, *args)
        assert refused.returncode == 4, (args, refused.stdout, refused.stderr)
        assert "write access" in refused.stderr and repr(group) in refused.stderr, refused.stderr
    assert alice.peer_state("bob") == "connected"  # nothing happened

    # In the group, the same user may change things.
    run_admin("gpasswd", "-a", user, group)
    sent = mvpctl_as(user, alice, "send", "bob", "now a member")
    assert sent.returncode == 0, sent.stderr
    assert bob.messages("alice", 1) == ["now a member"]
    uid = pwd.getpwnam(user).pw_uid
    assert f"control call send by uid={uid}" in alice.log.read_text()  # changes name the caller


# --- fuzzing ---------------------------------------------------------------------------------


def _connect(path: Path, hello: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    if hello:
        sock.sendall(rpc.encode_frame(rpc.client_hello("fuzz")))
    return sock


FRAMES = st.lists(
    st.binary(max_size=64)  # garbage, often a huge length prefix
    | st.builds(  # a frame cut short
        lambda m, cut: rpc.encode_frame(m)[:cut],
        st.dictionaries(
            st.text(max_size=6), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=6), max_size=3
        ),
        st.integers(1, 12),
    )
    | st.builds(  # well framed, random maps
        rpc.encode_frame,
        st.dictionaries(
            st.text(max_size=8),
            st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8)
            | st.none(),
            max_size=3,
        ),
    )
    | st.builds(  # real methods, wrong or random parameters
        lambda i, m, p: rpc.encode_frame({"id": i, "method": m, "params": p}),
        st.integers(-2, 2**64 - 1) | st.text(max_size=4) | st.none(),
        st.sampled_from([*rpc.METHODS, "nope", ""]),
        st.dictionaries(
            st.sampled_from(["peer", "sub", "data", "text", "json", "follow", "limit", "mode",
                             "timeout", "wait"]),
            st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8)
            | st.booleans()
            | st.floats(allow_nan=True) | st.lists(st.integers(-5, 5), max_size=3),
            max_size=4,
        ),
    )
    | st.builds(  # well-formed calls with odd but valid-looking parameters
        lambda i, m, p: rpc.encode_frame({"id": i, "method": m, "params": p}),
        st.integers(0, 1000),
        st.sampled_from(["status", "peers", "connect", "send", "recv", "pipe.open", "cancel"]),
        st.fixed_dictionaries(
            {"peer": st.sampled_from(["bob", "ghost", "alice", "", "x" * 80, "bad id"])},
            optional={
                "text": st.text(max_size=20),
                "json": st.integers(-5, 5) | st.text(max_size=5),
                "data": st.binary(max_size=32),
                "wait": st.just(False),
                "follow": st.booleans(),
                "mode": st.sampled_from(["chat", "json", "bytes", "nope"]),
                "sub": st.integers(0, 5),
            },
        ),
    )
    | st.just(struct.pack(">I", rpc.MAX_FRAME + 1)),  # over the size limit
    max_size=6,
)


def test_fuzzed_control_clients_never_hurt_the_daemon_or_its_peers(
    pair: tuple[Daemon, Daemon],
) -> None:
    alice, bob = pair
    alice.ctl_ok("connect", "bob")
    wait_until(lambda: bob.peer_state("alice") == "connected", what="bob to see alice")
    since = alice.peers()["bob"]["since"]
    rounds = 0

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(hello=st.booleans(), chunks=FRAMES)
    def fuzz(hello: bool, chunks: list[bytes]) -> None:
        nonlocal rounds
        rounds += 1
        sock = _connect(alice.socket, hello)
        with contextlib.suppress(OSError):
            for chunk in chunks:
                sock.sendall(chunk)
        sock.close()

    fuzz()
    assert rounds >= 80
    assert alice.proc is not None and alice.proc.poll() is None
    status = alice.status()  # through mvpctl, a fresh client
    assert status["agent_id"] == "alice"
    # The established connection is the same one, and still carries messages.
    assert alice.peers()["bob"]["since"] == since
    assert bob.peer_state("alice") == "connected"
    bob.ctl_ok("recv", "alice")  # drop anything the fuzzer may have sent
    alice.send("bob", text="still carrying messages")
    assert bob.messages("alice", 1) == ["still carrying messages"]
    assert "Traceback" not in alice.log.read_text()
