"""Attacks on the descriptors a control client passes with its requests (``pipe.open`` with
``attach``; mvpd/passed_descriptors.py, mvpd/descriptor_copy.py, mvpd/control_streams.py).

The attacker is a local user allowed on the control socket, or a buggy client: it passes
too many descriptors, descriptors with the wrong requests or none, odd kinds of
descriptors, descriptors whose last close blocks, the control socket itself, and dies in
the middle. Each attack runs against the real control server (control_harness's
ServerThread, in this process: its descriptors and threads are counted here) while another
connection keeps asking ``status``: the daemon must answer it promptly throughout, leak no
descriptor or thread once the attacker is gone, and tell the attacker what went wrong.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import pty
import resource
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mvpctl.client import Client
from mvpd.proto.control import ControlLimits
from mvpd.proto.errors import Busy, DescriptorFailed, InvalidParams, MvpError
from mvpd.proto.rpcwire import client_hello, encode_frame, request
from tests.descriptors import drained_to_eof
from tests.mvpctl.control_harness import ServerThread

MVPCTL = [sys.executable, "-c", "import sys; from mvpctl.app import main; sys.exit(main())"]

#: The slowest ``status`` answer tolerated while an attack runs (the machine is shared).
PROMPT = 2.0
#: How long a lingering socket's last close may block (SO_LINGER), in seconds.
LINGER = 10


# --- the harness: a prompt-answer probe, a leak check, raw requests ----------------------


class StatusProbe:
    """Another client asking ``status`` every 20 ms on its own connection, in a thread,
    recording the slowest answer."""

    def __init__(self, path: Path) -> None:
        self.client = Client.connect(path, timeout=30)
        self.slowest = 0.0
        self._asked_at: float | None = None  # the call waiting for its answer
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-probe")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.02):
                self._asked_at = started = time.monotonic()
                assert self.client.call("status", reply_timeout=30)["agent_id"] == "alice"
                self._asked_at = None
                self.slowest = max(self.slowest, time.monotonic() - started)
        except BaseException as exc:  # reported by check()
            self.failure = exc

    def check(self) -> None:
        """The daemon answered every time, and promptly (the call waiting now included)."""
        asked_at = self._asked_at
        if asked_at is not None:
            self.slowest = max(self.slowest, time.monotonic() - asked_at)
        assert self.failure is None, f"status failed during the attack: {self.failure!r}"
        assert self.slowest < PROMPT, (
            f"status took {self.slowest:.1f} s during the attack: the event loop was blocked")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()


@dataclass
class Resources:
    """The descriptors and threads of this process (the server's, since it runs here)."""

    fds: dict[int, str]
    threads: list[str]

    @classmethod
    def now(cls) -> Resources:
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        return cls(fds, sorted(t.name for t in threading.enumerate()))


@contextlib.contextmanager
def attack(server: ServerThread) -> Iterator[StatusProbe]:
    """Run an attack: ``status`` answers promptly throughout; afterwards (once the test has
    closed what it opened) no descriptor, thread, attached pipe or connection is left."""
    probe = StatusProbe(server.path)
    try:
        # Closing what came before (the fixture's connection) takes a moment, in a thread.
        wait_for("earlier closes", lambda: "mvpd-fd-closer" not in Resources.now().threads)
        before = Resources.now()
        yield probe
        probe.check()
        deadline = time.monotonic() + 15
        while True:
            after = Resources.now()
            # New descriptors (the listing's own aside); the test closes some of the old.
            extra = {fd: what for fd, what in after.fds.items()
                     if before.fds.get(fd) != what and not what.startswith("/proc/")}
            if (not extra and after.threads == before.threads and
                    server.server.attached_pipes.count == 0 and
                    server.server.connections == 1):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"left behind: descriptors {extra}, threads "
                    f"{after.threads} (before: {before.threads}), "
                    f"{server.server.attached_pipes.count} attached pipes, "
                    f"{server.server.connections} connections (the probe's is 1)")
            time.sleep(0.05)
        probe.check()
    finally:
        probe.close()


def frame(request_id: int, method: str, **params: Any) -> bytes:
    return encode_frame(request(request_id, method, params))


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send ``data`` (all of it) with ``fds`` riding on its first byte."""
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    sock.sendall(data[sent:])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def closed_everywhere(read_end: int) -> bool:
    """Whether every copy of the write end of the pipe ``read_end`` is closed (EOF)."""
    ready, _, _ = select.select([read_end], [], [], 0)
    return bool(ready) and os.read(read_end, 1) == b""


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def lingering_socket() -> tuple[socket.socket, socket.socket, socket.socket]:
    """A TCP socket (loopback) whose last close blocks for :data:`LINGER` seconds: its
    send queue is full (the receiver never reads) and SO_LINGER is on. Returns it, the
    listener and the receiving end (close that to release a close stuck on it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.socket()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender.connect(listener.getsockname())
    receiver, _ = listener.accept()
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sender.setblocking(False)
    while True:  # until the receiver's window is closed too: nothing more goes out
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                sent += sender.send(b"x" * 65536)
        if not sent:
            break
        time.sleep(0.05)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER))
    return sender, listener, receiver


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "mvpd.sock") as running:
        with Client.connect(running.path) as client:
            client.call("connect", peer="bob")
        yield running


# --- descriptors where no request takes them ------------------------------------------------


def test_more_descriptors_than_fit_in_a_message_are_all_closed(server: ServerThread) -> None:
    r, w = os.pipe()
    with attack(server), Client.connect(server.path) as client:
        # 253 is what the kernel lets one message carry.
        copies = [os.dup(w) for _ in range(252)]
        send_with_fds(client.sock, frame(1, "status"), [w, *copies])
        os.close(w)
        for fd in copies:
            os.close(fd)
        assert client.wait(1)["agent_id"] == "alice"
        wait_for("every passed copy of the write end closed", lambda: closed_everywhere(r))
        os.close(r)


def test_descriptors_on_every_request_are_closed(server: ServerThread) -> None:
    r, w = os.pipe()
    with attack(server), Client.connect(server.path) as client:
        pipe = client.open_pipe("bob")
        calls: list[tuple[str, dict[str, Any]]] = [
            ("status", {}), ("peers", {}), ("connect", {"peer": "bob"}),
            ("pipe.open", {"peer": "bob"}), ("pipe.write", {"sub": pipe.sub, "data": b"x"}),
            ("pipe.open", {"peer": "nobody", "attach": True}), ("no.such.method", {}),
            ("send", {"peer": "bob", "text": "hi"}), ("cancel", {"sub": 999}),
        ]
        for number, (method, params) in enumerate(calls * 5, start=100):
            send_with_fds(client.sock, frame(number, method, **params), [w, w, w])
            with contextlib.suppress(MvpError):
                client.wait(number)
        os.close(w)
        assert client.call("status")["agent_id"] == "alice"
        wait_for("every passed copy closed", lambda: closed_everywhere(r))
        os.close(r)


def test_descriptors_on_the_hello_are_closed(server: ServerThread) -> None:
    r, w = os.pipe()
    with attack(server):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(server.path))
        send_with_fds(sock, encode_frame(client_hello("attacker")), [w, w])
        os.close(w)
        sock.sendall(frame(1, "pipe.open", peer="bob", attach=True))
        replies = _replies(sock, 2)
        assert replies[0]["hello"] == 1
        assert "needs two descriptors" in replies[1]["error"]["message"]
        wait_for("the hello's descriptors closed", lambda: closed_everywhere(r))
        sock.close()
        os.close(r)


def _replies(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    from mvpd.proto.rpcwire import FrameDecoder

    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    sock.settimeout(15)
    while len(got) < count:
        data = sock.recv(65536)
        assert data, f"the daemon closed the connection after {got}"
        got.extend(decoder.feed(data))
    return got


def test_a_request_split_over_sends_takes_the_descriptors_sent_with_its_first_byte(
    server: ServerThread,
) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with attack(server), Client.connect(server.path) as client:
        data = frame(7, "pipe.open", peer="bob", attach=True)
        client.sock.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [in_r, out_w]))])
        os.close(in_r)
        os.close(out_w)
        for i in range(1, len(data)):
            time.sleep(0.01)
            client.sock.send(data[i : i + 1])
        sub = client.wait(7)["sub"]
        os.write(in_w, b"split but whole")
        os.close(in_w)
        assert read_all(out_r) == b"split but whole"
        assert client.next_event(sub, timeout=15).event == "end"
        os.close(out_r)


@pytest.mark.parametrize("split", [False, True])
def test_descriptors_then_a_close_before_the_request_is_complete(
    server: ServerThread, split: bool
) -> None:
    r, w = os.pipe()
    with attack(server):
        client = Client.connect(server.path)
        data = frame(3, "pipe.open", peer="bob", attach=True)
        cut = 1 if split else len(data) - 1
        send_with_fds(client.sock, data[:cut], [w, w])
        os.close(w)
        client.close()
        wait_for("the descriptors of the half request closed", lambda: closed_everywhere(r))
        os.close(r)


def test_duplicate_request_ids_do_not_lose_descriptors(server: ServerThread) -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    with attack(server), Client.connect(server.path) as client:
        # Two pipe.open with the same id in one read: the first takes the descriptors.
        data = frame(77, "pipe.open", peer="bob", attach=True)
        send_with_fds(client.sock, data + data, [r, out_w])
        os.close(r)
        os.close(out_w)
        replies = _replies(client.sock, 2)
        assert sorted("result" in reply for reply in replies) == [False, True], replies
        assert any("needs two descriptors" in str(reply.get("error")) for reply in replies)
    wait_for("the passed output closed", lambda: closed_everywhere(out_r))
    os.close(w)
    os.close(out_r)


# --- descriptors whose last close blocks ----------------------------------------------------


@pytest.mark.parametrize("how", ["with a request", "beyond what fits", "half a request",
                                 "attached and cancelled", "unread at close"])
def test_a_lingering_socket_never_blocks_the_event_loop(server: ServerThread, how: str) -> None:
    """A TCP socket with SO_LINGER and a full send queue blocks the thread that drops its
    last reference for the linger time (forever with a large one). Whatever the daemon does
    with it, that must never be the event loop."""
    sender, listener, receiver = lingering_socket()
    out_r, out_w = os.pipe()
    with attack(server) as probe, Client.connect(server.path) as client:
        fd = sender.detach()
        if how == "with a request":
            send_with_fds(client.sock, frame(1, "status"), [fd])
            os.close(fd)
            client.wait(1)
        elif how == "beyond what fits":
            # The kernel closes what does not fit in the daemon's buffer, in its recvmsg.
            send_with_fds(client.sock, frame(1, "status"), [out_w] * 8 + [fd])
            os.close(fd)
            client.wait(1)
        elif how == "half a request":
            send_with_fds(client.sock, frame(1, "status")[:2], [fd])
            os.close(fd)
            client.close()
        elif how == "attached and cancelled":
            stream = client.attach_pipe("bob", fd, out_w)
            os.close(fd)
            stream.cancel()
            assert client.next_event(stream.sub, timeout=15).event == "end"
        else:
            # A frame too large ends the connection; the descriptors sent right after it
            # are still unread in the socket when the daemon closes it.
            client.sock.sendall(struct.pack(">I", 1 << 30))
            with contextlib.suppress(OSError):
                send_with_fds(client.sock, b"x", [fd])
            os.close(fd)
            client.close()
        time.sleep(PROMPT + 0.5)  # longer than a status answer may take
        probe.check()
        receiver.close()  # lets the stuck close finish, wherever it is
        listener.close()
        os.close(out_w)
        os.close(out_r)


# --- odd kinds of descriptors -------------------------------------------------------------


@dataclass
class Kind:
    """A descriptor to pass, and what must happen."""

    make: Callable[[Path], int]
    outcome: str  # "refused: <text>", "error: <text>" or "works"


def _fd_of(sock: socket.socket) -> int:
    return sock.detach()


def _listening(_: Path) -> int:
    return _fd_of(socket.create_server(("127.0.0.1", 0)))


def _udp_unconnected(_: Path) -> int:
    return _fd_of(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))


def _memfd(_: Path) -> int:
    fd = os.memfd_create("input")
    os.write(fd, b"from a memfd")
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _epoll(_: Path) -> int:
    ep = select.epoll()
    fd = os.dup(ep.fileno())
    ep.close()
    return fd


def _file(mode: int) -> Callable[[Path], int]:
    def make(tmp: Path) -> int:
        path = tmp / "file"
        path.write_bytes(b"a file")
        return os.open(path, mode)

    return make


INPUTS = {
    "directory": Kind(lambda tmp: os.open(tmp, os.O_RDONLY | os.O_DIRECTORY),
                      "refused: is a directory"),
    "O_PATH": Kind(lambda tmp: os.open(tmp / "..", os.O_PATH), "refused: O_PATH"),
    "write-only": Kind(_file(os.O_WRONLY), "refused: not open for reading"),
    "eventfd": Kind(lambda _: os.eventfd(0), "refused: not a file"),
    "epoll": Kind(_epoll, "refused: not a file"),
    "/proc file": Kind(lambda _: os.open("/proc/1/stat", os.O_RDONLY), "refused: /proc"),
    "/sys file": Kind(lambda _: os.open("/sys/kernel/uevent_seqnum", os.O_RDONLY),
                      "refused: /proc"),
    "listening socket": Kind(_listening, "refused: listening socket"),
    "memfd": Kind(_memfd, "works: from a memfd"),
    "/dev/null": Kind(lambda _: os.open("/dev/null", os.O_RDONLY), "works: "),
}

OUTPUTS = {
    "directory": Kind(lambda tmp: os.open(tmp, os.O_RDONLY | os.O_DIRECTORY),
                      "refused: is a directory"),
    "read-only": Kind(_file(os.O_RDONLY), "refused: not open for writing"),
    "eventfd": Kind(lambda _: os.eventfd(0), "refused: not a file"),
    "epoll": Kind(_epoll, "refused: not a file"),
    "/proc file": Kind(lambda _: os.open("/proc/self/timerslack_ns", os.O_WRONLY),
                       "refused: /proc"),
    "/dev/full": Kind(lambda _: os.open("/dev/full", os.O_WRONLY),
                      "error: No space left on device"),
    "listening socket": Kind(_listening, "refused: listening socket"),
    "unconnected UDP socket": Kind(_udp_unconnected, "error: cannot write the output"),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_odd_inputs(server: ServerThread, tmp_path: Path, name: str, copy_kind: str) -> None:
    out_r, out_w = os.pipe()
    _odd(server, INPUTS[name], lambda kind: (kind.make(tmp_path), out_w), out_r)


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_odd_outputs(server: ServerThread, tmp_path: Path, name: str, copy_kind: str) -> None:
    in_r, in_w = os.pipe()
    os.write(in_w, b"to an odd output")
    os.close(in_w)
    _odd(server, OUTPUTS[name], lambda kind: (in_r, kind.make(tmp_path)), None)


def _odd(
    server: ServerThread,
    kind: Kind,
    make: Callable[[Kind], tuple[int, int]],
    out_r: int | None,
) -> None:
    outcome, _, text = kind.outcome.partition(": ")
    with attack(server), Client.connect(server.path) as client:
        source, sink = make(kind)
        opened = len(server.handler.pipes)
        try:
            if outcome == "refused":
                with pytest.raises(InvalidParams, match=text):
                    client.attach_pipe("bob", source, sink)
                assert len(server.handler.pipes) == opened, "refused after opening the pipe"
            else:
                stream = client.attach_pipe("bob", source, sink)
        finally:
            for fd in {source, sink}:
                os.close(fd)
        if outcome == "error":
            with pytest.raises(DescriptorFailed, match=text):
                list(stream)
        elif outcome == "works":
            assert out_r is not None
            assert read_all(out_r) == text.encode()
            assert list(stream) == []
        assert client.call("status")["agent_id"] == "alice"
    if out_r is not None:
        os.close(out_r)


def test_an_endless_input_stops_when_cancelled(server: ServerThread, copy_kind: str) -> None:
    out_r, out_w = os.pipe()
    with attack(server), Client.connect(server.path) as client:
        zero = os.open("/dev/zero", os.O_RDONLY)
        stream = client.attach_pipe("bob", zero, out_w)
        os.close(zero)
        os.close(out_w)
        got = 0
        while got < 4 << 20:
            got += len(os.read(out_r, 1 << 20))
        stream.cancel()
        assert client.next_event(stream.sub, timeout=15).event == "end"
        wait_for("the output closed", lambda: drained_to_eof(out_r))
        os.close(out_r)


def test_a_udp_socket_carries_datagrams(server: ServerThread, copy_kind: str) -> None:
    receiving = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiving.bind(("127.0.0.1", 0))
    out_r, out_w = os.pipe()
    with attack(server), Client.connect(server.path) as client:
        stream = client.attach_pipe("bob", receiving.fileno(), out_w)
        os.close(out_w)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sending:
            sending.sendto(b"one datagram", receiving.getsockname())
        assert os.read(out_r, 100) == b"one datagram"
        stream.cancel()
        assert client.next_event(stream.sub, timeout=15).event == "end"
        receiving.close()
    os.close(out_r)


def test_the_control_socket_itself_is_refused_as_input_or_output(server: ServerThread) -> None:
    r, w = os.pipe()
    with attack(server), Client.connect(server.path) as client, \
            Client.connect(server.path) as other:
        for fds in ([client.fileno(), w], [r, client.fileno()], [other.fileno(), w]):
            with pytest.raises(InvalidParams, match="control socket"):
                client.attach_pipe("bob", *fds)
            assert client.call("status")["agent_id"] == "alice"
        os.close(w)
        os.close(r)


def test_a_client_that_leaves_its_own_socket_with_the_daemon_is_still_noticed(
    server: ServerThread,
) -> None:
    """The daemon holding a copy of the client's end of a connection would keep that
    connection open forever after the client died (it never sees end of file)."""
    with attack(server):
        for cut in (1, None):
            client = Client.connect(server.path)
            data = frame(1, "pipe.open", peer="bob", attach=True)[:cut]
            with contextlib.suppress(OSError):
                send_with_fds(client.sock, data, [client.fileno(), client.fileno()])
            client.close()


def test_a_fifo_another_process_also_reads_never_blocks_the_loop(
    server: ServerThread, tmp_path: Path, copy_kind: str
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # holds the FIFO open without blocking
    reader = os.open(fifo, os.O_RDONLY)
    out_r, out_w = os.pipe()
    with attack(server), Client.connect(server.path) as client, ThreadPoolExecutor(1) as pool:
        thief = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.DEVNULL)
        stream = client.attach_pipe("bob", reader, out_w)
        os.close(reader)
        os.close(out_w)
        received = pool.submit(read_all, out_r)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # small writes both readers race for
            os.write(writer, b"z")
            time.sleep(0.001)
        os.close(writer)  # end of file for both readers
        assert thief.wait(15) == 0
        assert set(received.result(15)) <= {ord("z")}
        assert list(stream) == []
    os.close(out_r)


def test_one_socket_as_both_input_and_output_echoes(server: ServerThread, copy_kind: str) -> None:
    ours, theirs = socket.socketpair()
    payload = os.urandom(1 << 20)
    with attack(server), Client.connect(server.path) as client, ThreadPoolExecutor(1) as pool:
        stream = client.attach_pipe("bob", theirs.fileno(), theirs.fileno())
        theirs.close()
        sending = pool.submit(_send_then_shut, ours, payload)
        got = bytearray()
        while chunk := ours.recv(1 << 20):
            got += chunk
        sending.result(15)
        assert bytes(got) == payload
        assert list(stream) == []
        ours.close()


def _send_then_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("blocking", [True, False])
def test_the_clients_file_flags_are_left_as_they_were(
    server: ServerThread, copy_kind: str, blocking: bool
) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    for fd in (in_r, out_w, slave):
        os.set_blocking(fd, blocking)
    flags = {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in (in_r, out_w, slave)}
    with attack(server), Client.connect(server.path) as client:
        pipe_stream = client.attach_pipe("bob", in_r, out_w)
        tty_stream = client.attach_pipe("bob", slave, slave)
        os.write(in_w, b"through pipes")
        os.close(in_w)
        os.write(master, b"through a terminal\n\x04")
        assert list(pipe_stream) == [] and list(tty_stream) == []
        assert {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in flags} == flags
        os.close(out_w)
        assert read_all(out_r) == b"through pipes"
        assert os.read(master, 100) == b"through a terminal\r\n"
        for fd in (in_r, out_r, master, slave):
            os.close(fd)


# --- clients that die, and the daemon-wide limit ------------------------------------------


def _mvpctl_pipe(server: ServerThread, stdin: int, stdout: int) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([*MVPCTL, "--socket", str(server.path), "pipe", "bob"],
                             stdin=stdin, stdout=stdout)
    os.close(stdin)
    os.close(stdout)
    return child


def _feed(fd: int) -> None:
    """Write to ``fd`` until nobody reads it any more."""
    chunk = os.urandom(1 << 16)
    try:
        while True:
            os.write(fd, chunk)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def test_killing_the_client_mid_copy_stops_both_directions(
    server: ServerThread, copy_kind: str
) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with attack(server), ThreadPoolExecutor(2) as pool:
        child = _mvpctl_pipe(server, in_r, out_w)
        wait_for("mvpctl to attach", lambda: server.server.attached_pipes.count == 1)
        feeding = pool.submit(_feed, in_w)
        draining: Future[bytes] = pool.submit(read_all, out_r)
        time.sleep(0.5)
        child.kill()
        child.wait()
        feeding.result(15)  # the daemon let go of the input
        assert len(draining.result(15)) > 0  # ... and of the output: end of file
        os.close(out_r)


def test_killing_the_client_while_its_output_is_full(server: ServerThread, copy_kind: str) -> None:
    """Nobody reads the output: the daemon's writer waits (with a copy in a thread, in a
    write it cannot be woken from). Once the client is killed, everything is let go as soon
    as the output moves; until then the attached-pipe slot stays taken, so stuck threads
    are bounded by ControlLimits.max_attached_pipes."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)
    with attack(server), ThreadPoolExecutor(1) as pool:
        child = _mvpctl_pipe(server, in_r, out_w)
        wait_for("mvpctl to attach", lambda: server.server.attached_pipes.count == 1)
        feeding = pool.submit(_feed, in_w)
        time.sleep(0.5)
        child.kill()
        child.wait()
        wait_for("the connection to end", lambda: server.server.connections == 1)
        writers = [t for t in threading.enumerate() if t.name == "mvpd-fd-writer"]
        if copy_kind == "thread":
            assert writers, "the writer thread was expected to wait in its write"
            assert server.server.attached_pipes.count == 1, "a stuck thread's slot was freed"
        os.close(out_r)  # the output moves (EPIPE): the stuck writer ends
        feeding.result(15)


def test_attached_pipes_limit_from_many_connections_then_freed(tmp_path: Path) -> None:
    limits = ControlLimits(max_attached_pipes=3)
    with ServerThread(tmp_path / "s.sock", limits=limits) as server:
        with Client.connect(server.path) as client:
            client.call("connect", peer="bob")
        with attack(server):
            clients = [Client.connect(server.path) for _ in range(5)]
            pipes = [os.pipe() for _ in clients]
            results: list[str] = []
            for client, (r, w) in zip(clients, pipes, strict=True):
                try:
                    client.attach_pipe("bob", r, w)
                    results.append("attached")
                except Busy:
                    results.append("busy")
            assert results == ["attached"] * 3 + ["busy"] * 2
            for client in clients[:3]:
                client.close()
            wait_for("the slots freed", lambda: server.server.attached_pipes.count == 0)
            for client, (r, w) in zip(clients[3:], pipes[3:], strict=True):
                client.attach_pipe("bob", r, w)
            for client in clients[3:]:
                client.close()
            for r, w in pipes:
                os.close(r)
                os.close(w)


def test_running_out_of_descriptors_while_attaching_is_a_clear_busy(
    server: ServerThread, tmp_path: Path
) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"a file: copied in a thread, which needs a wake-up pipe")
    source = os.open(path, os.O_RDONLY)
    out_r, out_w = os.pipe()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with attack(server), Client.connect(server.path) as client:
        opened = len(server.handler.pipes)
        in_use = {int(name) for name in os.listdir("/proc/self/fd")}
        free = [n for n in range(soft) if n not in in_use]
        # Room for the two passed descriptors, none for the copy's own.
        resource.setrlimit(resource.RLIMIT_NOFILE, (free[2], hard))
        try:
            with pytest.raises(Busy, match="descriptors"):
                client.attach_pipe("bob", source, out_w)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert all(pipe.closed for pipe in server.handler.pipes[opened:])
        os.close(source)
        os.close(out_w)
        assert client.call("status")["agent_id"] == "alice"
        wait_for("the passed output closed", lambda: closed_everywhere(out_r))
        os.close(out_r)


def test_mvpctl_pipe_falls_back_to_framing_for_a_refused_input(server: ServerThread) -> None:
    """What mvpd refuses to read as root, mvpctl reads itself, as its user."""
    expected = Path("/proc/version").read_bytes()
    with attack(server), open("/proc/version", "rb") as stdin:
        done = subprocess.run([*MVPCTL, "--socket", str(server.path), "pipe", "bob"],
                              stdin=stdin, capture_output=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, expected), done.stderr
