"""End-to-end helpers: real ``mvpd run`` daemons, a real ``mvpd signal`` server and the real
``mvpctl`` command, all as subprocesses on loopback.

Every daemon gets its own empty config file (``AGENT_CONFIG`` in ``tmp_path``, so the
machine's /etc/mvp-agent.yaml never leaks in), a control socket under ``tmp_path`` and a
clean environment. Everything started here is stopped by PID afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mvpctl.client import Client
from mvpd.proto.errors import MvpError

BIN = Path(sys.executable).parent
PYTHON = sys.executable
#: Seconds a daemon may take to open its control socket.
START_TIMEOUT = 20.0


def _command(name: str) -> list[str]:
    """The console script from this venv, else the module run by this interpreter."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    module = {"mvpd": "mvpd.cli", "mvpctl": "mvpctl.app"}[name]
    return [PYTHON, "-c", f"import sys; from {module} import main; sys.exit(main())"]


MVPD = _command("mvpd")
MVPCTL = _command("mvpctl")


def base_env() -> dict[str, str]:
    """A minimal environment: nothing of the test runner's MVPD_* or ICE_* settings (but
    its choice of the mvpd.sctp build, ``MVPD_PURE_SCTP``)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    # Which build of mvpd.sctp to load is not a setting but what the run tests: the
    # pure-Python pass (scripts/test.sh) must reach the daemons too.
    if "MVPD_PURE_SCTP" in os.environ:
        env["MVPD_PURE_SCTP"] = os.environ["MVPD_PURE_SCTP"]
    return env


def wait_until(
    predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


#: Seconds coturn has to answer its first binding request (it starts slowly on a busy machine).
STUN_WAIT = 30

#: wait_for_stun inside a network namespace: the same probe, run there by a child process.
_STUN_PROBE = """
import os, socket, struct, sys, time
STUN_WAIT = float(sys.argv[2])
request = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, os.urandom(12))
deadline = time.monotonic() + STUN_WAIT
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        sock.sendto(request, ("127.0.0.1", int(sys.argv[1])))
        try:
            sock.recv(2048)
            sys.exit(0)
        except OSError:
            continue
sys.exit(1)
"""


def wait_for_stun(port: int, proc: subprocess.Popen[Any], wrap: Sequence[str] = ()) -> None:
    """Until the STUN/TURN server ``proc`` answers a binding request on 127.0.0.1:``port``
    (in the network namespace that ``wrap``, e.g. ``ip netns exec NS``, runs commands in)."""
    if wrap:
        probe = subprocess.run([*wrap, sys.executable, "-c", _STUN_PROBE, str(port),
                                str(STUN_WAIT)], capture_output=True, timeout=STUN_WAIT + 10)
        if probe.returncode != 0:
            pytest.fail(f"turnserver did not answer STUN in time (exited: {proc.poll()})")
        return
    request = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, os.urandom(12))
    deadline = time.monotonic() + STUN_WAIT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"turnserver exited with {proc.returncode}")
            sock.sendto(request, ("127.0.0.1", port))
            try:
                sock.recv(2048)
                return
            except OSError:
                continue
    pytest.fail("turnserver did not answer STUN in time")


def free_udp_tcp_port() -> int:
    """A port number free for both UDP and TCP on 127.0.0.1 right now (coturn takes both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the signaling server ------------------------------------------------------------------


class SignalServer:
    """``mvpd signal`` as a subprocess. ``url`` is known once :meth:`start` returns."""

    def __init__(self, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        #: More ``mvpd signal`` options, e.g. ``("--redis", url)``.
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""
        self.starts = 0

    def start(self, port: int | None = None) -> SignalServer:
        """Start on ``port`` (default: the previous port, or any free one)."""
        listen_port = self.port if port is None else port
        self.starts += 1
        out = self.workdir / f"signal-{self.starts}.out"
        err = self.workdir / f"signal-{self.starts}.log"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [*MVPD, "signal", "--listen", f"127.0.0.1:{listen_port}", *self.extra_args],
                stdout=stdout, stderr=stderr, env=base_env(), cwd=self.workdir,
                stdin=subprocess.DEVNULL,
            )
        proc = self.proc

        def first_line() -> str | None:
            if proc.poll() is not None:
                pytest.fail(f"mvpd signal exited with {proc.returncode}: {err.read_text()}")
            text = out.read_text()
            return text.split("\n", 1)[0] if "\n" in text else None

        line = wait_until(first_line, START_TIMEOUT, what="the signaling server to listen")
        assert line.startswith("listening on ws://127.0.0.1:"), line
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL: no close frames, the clients just lose the TCP connection."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)




# --- daemons -------------------------------------------------------------------------------


class Daemon:
    """One ``mvpd run`` with its own id, config file, socket and log."""

    def __init__(
        self, workdir: Path, agent_id: str, signaling_url: str, env: dict[str, str] | None = None,
        config: str = "", socket_path: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.agent_id = agent_id
        self.signaling_url = signaling_url
        self.extra_env = dict(env or {})
        self.config = workdir / f"{agent_id}.yaml"
        self.config.write_text(config)
        self.socket = socket_path or workdir / f"{agent_id}.sock"
        self.log = workdir / f"{agent_id}.log"
        self.state_dir = workdir / f"{agent_id}.state"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = base_env()
        env.update(
            AGENT_ID=self.agent_id,
            AGENT_CONFIG=str(self.config),
            SIGNALING_URL=self.signaling_url,
            MVPD_SOCKET=str(self.socket),
            # Each daemon its own identity; kept across restarts of the same daemon.
            MVPD_STATE_DIR=str(self.state_dir),
        )
        env.update(self.extra_env)
        return env

    def start(self) -> Daemon:
        """Launch and wait until the control socket answers."""
        return self.launch().wait_serving()

    def launch(self) -> Daemon:
        """Start the process without waiting for it."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*MVPD, "run"], stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                cwd=self.workdir, stdin=subprocess.DEVNULL,
            )
        return self

    def wait_serving(self) -> Daemon:
        """Wait until the control socket answers (fail the test if the daemon exits)."""
        proc = self.proc
        assert proc is not None

        def serving() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"mvpd {self.agent_id} exited with {proc.returncode}:\n"
                            f"{self.log.read_text()[-4000:]}")
            if not self.socket.exists():
                return False
            try:
                return bool(self.call("status"))
            except MvpError:
                return False

        wait_until(serving, START_TIMEOUT, interval=0.1, what=f"mvpd {self.agent_id} to serve")
        return self

    def ctl(
        self, *args: str, input: bytes | str | None = None, timeout: float = 60.0,
        stdin: Any = None, stdout: Any = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``mvpctl --socket SOCK ARGS`` (text mode unless binary input is given)."""
        text = not isinstance(input, bytes) and stdout is None and stdin is None
        kwargs: dict[str, Any] = {"capture_output": True} if stdout is None else {
            "stdout": stdout, "stderr": subprocess.PIPE}
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [*MVPCTL, "--socket", str(self.socket), *args],
            input=input, stdin=stdin, text=text, env=base_env(), timeout=timeout,
            cwd=self.workdir, **kwargs,
        )

    def ctl_ok(self, *args: str, timeout: float = 60.0) -> str:
        done = self.ctl(*args, timeout=timeout)
        assert done.returncode == 0, (
            f"mvpctl {' '.join(args)} failed ({done.returncode}): {done.stderr}\n"
            f"--- {self.agent_id} log ---\n{self.log.read_text()[-3000:]}"
        )
        return str(done.stdout)

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl_ok("status", "--json"))  # type: ignore[no-any-return]

    def call(self, method: str, **params: Any) -> Any:
        """One RPC through :class:`mvpctl.client.Client` in this process: for polling,
        where starting ``mvpctl`` (half a second each) would make tests slow."""
        with Client.connect(self.socket, timeout=30) as client:
            return client.call(method, **params)

    def peers(self) -> dict[str, dict[str, Any]]:
        """The peers as the daemon reports them, by peer id."""
        return {p["peer"]: p for p in self.call("peers")}

    def send(self, peer: str, **params: Any) -> Any:
        """``send`` over RPC: ``text=``, ``json=`` or ``data=``."""
        return self.call("send", peer=peer, **params)

    def messages(self, peer: str, count: int, timeout: float = 20.0) -> list[Any]:
        """The data of the next ``count`` messages from ``peer``, waiting for them
        (``recv --follow --limit COUNT``): a send returns before the peer has the message."""
        with Client.connect(self.socket, timeout=30) as client:
            stream = client.subscribe("recv", peer=peer, follow=True, limit=count)
            found: list[Any] = []
            while not stream.ended:
                event = client.next_event(stream.sub, timeout=timeout)
                if stream.check(event) and event.event == "message":
                    found.append(event.data["data"])
            return found

    def peer_state(self, peer: str) -> str | None:
        entry = self.peers().get(peer)
        return entry["state"] if entry else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        _stop_process(self.proc)
        return self.proc.returncode


class Daemons:
    """Starts daemons for one test and stops every one of them afterwards."""

    def __init__(self, workdir: Path, signaling_url: str) -> None:
        self.workdir = workdir
        self.signaling_url = signaling_url
        self.started: list[Daemon] = []

    def __call__(self, agent_id: str, signaling_url: str | None = None, **kwargs: Any) -> Daemon:
        daemon = Daemon(self.workdir, agent_id, signaling_url or self.signaling_url, **kwargs)
        self.started.append(daemon)
        return daemon.start()

    def many(self, *agent_ids: str, **kwargs: Any) -> list[Daemon]:
        """Start several daemons side by side (quicker than one after the other)."""
        started = []
        for agent_id in agent_ids:
            daemon = Daemon(self.workdir, agent_id, self.signaling_url, **kwargs)
            self.started.append(daemon)
            started.append(daemon.launch())
        return [daemon.wait_serving() for daemon in started]

    def stop_all(self) -> None:
        for daemon in self.started:
            with contextlib.suppress(Exception):
                daemon.stop()





# --- a TURN relay --------------------------------------------------------------------------


class TurnServer:
    """Debian's coturn on 127.0.0.1 with one static user (``u``/``p``), as in
    tests/test_peer.py; stopped by PID."""

    USER, PASSWORD = "u", "p"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}"

    def daemon_env(self) -> dict[str, str]:
        """What a daemon needs to go through this relay, and only through it."""
        return {
            "ICE_URL": self.url,
            "ICE_USERNAME": self.USER,
            "ICE_CREDENTIAL": self.PASSWORD,
            "ICE_TRANSPORT_POLICY": "relay",
        }

    def start(self, binary: str, wrap: Sequence[str] = (), attempts: int = 3) -> TurnServer:
        """Start coturn (through ``wrap``, e.g. in a network namespace) and wait for it.

        coturn listens on TCP at its UDP port number too; on a busy machine that number is
        now and then some client's ephemeral port by the time coturn binds it, so a start
        that does not answer is tried again on another port."""
        for attempt in range(attempts):
            self.port = free_udp_tcp_port()
            base = 40000 + (self.port % 20000)
            self.proc = subprocess.Popen(
                [*wrap, binary, "-n", f"--listening-port={self.port}",
                 "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--min-port={base}",
                 f"--max-port={base + 200}", f"--user={self.USER}:{self.PASSWORD}",
                 "--lt-cred-mech", "--realm=test", "--allowed-peer-ip=127.0.0.1",
                 "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls",
                 "--no-software-attribute", "--verbose", f"--db={self.workdir}/turndb",
                 f"--log-file={self.workdir}/turn.log", f"--pidfile={self.workdir}/turn.pid"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )
            try:
                wait_for_stun(self.port, self.proc, wrap)
                return self
            except pytest.fail.Exception:
                self.stop()
                if attempt == attempts - 1:
                    raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, grace=5)


@contextlib.contextmanager
def running_signal_server(workdir: Path) -> Iterator[SignalServer]:
    """A signaling server on a free port for the length of the block."""
    server = SignalServer(workdir)
    try:
        yield server.start(0)
    finally:
        server.stop()


@contextlib.contextmanager
def running_daemons(workdir: Path, signaling_url: str) -> Iterator[Daemons]:
    """A :class:`Daemons` factory whose daemons are all stopped when the block ends."""
    factory = Daemons(workdir, signaling_url)
    try:
        yield factory
    finally:
        factory.stop_all()
