"""Descriptors passed over the control socket (mvpd/passed_descriptors.py): received with
``recvmsg``, kept only for the request they came with, closed otherwise."""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import socket
from pathlib import Path

import pytest

from mvpd import passed_descriptors
from mvpd.passed_descriptors import MAX_PENDING, ControlSocket


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_descriptors_come_with_the_bytes_they_were_sent_with() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        channel = ControlSocket(ours)
        r, w = os.pipe()
        try:
            theirs.sendall(b"before")
            send_fds(theirs, b"with", [r, w])
            got = b""
            while len(got) < 10:
                got += await channel.read(1024)
            assert got == b"beforewith"
            fds = channel.take_descriptors(2)
            assert fds is not None and len(fds) == 2
            assert channel.take_descriptors(1) is None
            # They are the same pipe: what goes into one copy comes out of the other.
            os.write(fds[1], b"x")
            assert os.read(r, 1) == b"x"
            # Not inherited by anything the daemon runs.
            assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
            passed_descriptors.close_all(fds)
        finally:
            channel.close()
            theirs.close()
            passed_descriptors.close_all([r, w])

    asyncio.run(main())


def test_a_connection_holds_few_descriptors_and_closes_the_rest() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        channel = ControlSocket(ours)
        pipes = [os.pipe() for _ in range(3)]
        try:
            send_fds(theirs, b"a", [w for _, w in pipes])
            assert await channel.read(16) == b"a"
            kept = channel.take_descriptors(MAX_PENDING)
            assert kept is not None and channel.take_descriptors(1) is None
            passed_descriptors.close_all(kept)
            # Every copy of the write ends is closed: each read end sees end of file.
            for r, w in pipes:
                os.close(w)
                assert os.read(r, 1) == b""
            send_fds(theirs, b"b", [os.dup(pipes[0][0])])
            assert await channel.read(16) == b"b"
            channel.drop_descriptors()
            assert channel.take_descriptors(1) is None
        finally:
            channel.close()
            theirs.close()
            passed_descriptors.close_all([r for r, _ in pipes])

    asyncio.run(main())


def test_closing_the_connection_closes_descriptors_no_request_took() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        channel = ControlSocket(ours)
        r, w = os.pipe()
        send_fds(theirs, b"z", [w])
        os.close(w)
        assert await channel.read(16) == b"z"
        channel.close()
        assert os.read(r, 1) == b""  # the daemon's copy is gone too
        assert await channel.read(16) == b""
        os.close(r)
        theirs.close()

    asyncio.run(main())


def test_the_mount_of_a_file_is_found_without_asking_its_file_system(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    try:
        mounts = Path("/proc/self/mountinfo").read_text()
        kind = passed_descriptors.mount_type(fd)
        assert kind and f" - {kind} " in mounts
        assert passed_descriptors.mount_type(r) is None  # pipes live on no listed mount
        assert passed_descriptors.refusal(fd) is None
    finally:
        passed_descriptors.close_all([fd, r, w])


def test_files_a_server_answers_for_are_refused_before_any_fstat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's FUSE server (or a dead NFS server) could leave fstat waiting for ever, on the
    # event loop: such files are refused from what /proc says alone.
    path = tmp_path / "file"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        monkeypatch.setattr(passed_descriptors, "mount_type", lambda fd: "fuse.sshfs")

        asked = []
        real_fstat = os.fstat

        def fstat(number: int) -> os.stat_result:
            asked.append(number)
            return real_fstat(number)

        monkeypatch.setattr(passed_descriptors.os, "fstat", fstat)
        reason = passed_descriptors.refusal(fd)
        assert reason is not None and "fuse.sshfs" in reason
        assert fd not in asked
    finally:
        os.close(fd)
