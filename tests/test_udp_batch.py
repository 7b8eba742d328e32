"""Batches of datagrams with UDP segmentation offload: how batches split into runs, real
loopback sockets (IPv4 and IPv6) receiving every datagram in order with fewer calls, the
kernel refusing segmentation (UDP checksums off) and the fallback, a full socket buffer in
the middle of a batch."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from mvpd.udp_batch import MAX_RUN_BYTES, MAX_SEGMENTS, UdpBatchSender, gso_runs

SO_NO_CHECK = 11  # asm-generic/socket.h: no UDP checksum on IPv4, which rules out GSO


def sizes(runs: Iterator[Any]) -> list[list[int]]:
    return [[len(d) for d in run] for run in runs]


def test_runs_of_equal_size_end_at_a_shorter_datagram_and_keep_order() -> None:
    batch = [b"a" * 100] * 3 + [b"b" * 40] + [b"c" * 100] * 2 + [b"d" * 200, b"e" * 200]
    assert sizes(gso_runs(batch)) == [[100, 100, 100, 40], [100, 100], [200, 200]]
    assert [d for run in gso_runs(batch) for d in run] == batch


def test_a_longer_datagram_starts_a_new_run() -> None:
    assert sizes(gso_runs([b"x" * 10, b"y" * 20, b"z" * 20, b"w" * 5, b"v" * 5])) == [
        [10], [20, 20, 5], [5]]


def test_runs_stay_within_the_segment_and_byte_limits() -> None:
    many = [b"p" * 100] * (MAX_SEGMENTS * 2 + 3)
    assert [len(run) for run in gso_runs(many)] == [MAX_SEGMENTS, MAX_SEGMENTS, 3]
    big = [b"q" * 1452] * 100
    runs = list(gso_runs(big))
    assert all(sum(map(len, run)) <= MAX_RUN_BYTES for run in runs)
    assert sum(len(run) for run in runs) == 100
    assert len(runs[0]) == MAX_RUN_BYTES // 1452
    assert list(gso_runs([])) == []


def pair(family: socket.AddressFamily) -> tuple[socket.socket, socket.socket, Any]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    receiver = socket.socket(family, socket.SOCK_DGRAM)
    receiver.bind((host, 0))
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    receiver.settimeout(2)
    sender = socket.socket(family, socket.SOCK_DGRAM)
    sender.setblocking(False)
    return sender, receiver, receiver.getsockname()[:2]


def receive(receiver: socket.socket, count: int) -> list[bytes]:
    return [receiver.recv(65536) for _ in range(count)]


def mixed_batch() -> list[bytes]:
    """What a TUN read gives under TCP: full segments, an odd size, small ACKs."""
    batch = [bytes([i]) * 1452 for i in range(50)]
    batch.insert(7, b"\x07" * 60)
    batch += [b"ack%d" % i for i in range(5)] + [b"tail" * 300]
    return batch


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_every_datagram_arrives_in_order_with_fewer_calls(family: socket.AddressFamily) -> None:
    sender, receiver, addr = pair(family)
    with sender, receiver:
        spilled: list[bytes] = []
        batch = UdpBatchSender(sender, lambda d, a: spilled.append(d))
        datagrams = mixed_batch()
        batch.send(datagrams, addr)
        assert receive(receiver, len(datagrams)) == datagrams
        assert batch.gso and batch.sent == len(datagrams) and not spilled
        assert batch.calls < len(datagrams) // 4


@pytest.mark.parametrize("size", [1394, 1456, 1040])
def test_a_full_run_fits_an_ipv4_datagram(size: int) -> None:
    """Runs as long as the segment count allows must fit IPv4's 65507-byte UDP payload: at
    these sizes a run sized for IPv6's 65527 was refused with EMSGSIZE and lost."""
    sender, receiver, addr = pair(socket.AF_INET)
    with sender, receiver:
        batch = UdpBatchSender(sender, lambda d, a: pytest.fail("nothing overflows"))
        datagrams = [bytes([i]) * size for i in range(100)]
        assert batch.send(datagrams, addr) == 0
        assert receive(receiver, 100) == datagrams
        assert batch.failed == 0 and batch.calls < 10


def test_refused_segmentation_falls_back_to_one_datagram_per_call() -> None:
    sender, receiver, addr = pair(socket.AF_INET)
    with sender, receiver:
        sender.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)  # the kernel refuses GSO (EINVAL)
        batch = UdpBatchSender(sender, lambda d, a: pytest.fail("nothing overflows"))
        first, second = mixed_batch(), mixed_batch()[::-1]
        batch.send(first, addr)
        assert not batch.gso
        batch.send(second, addr)
        assert receive(receiver, len(first) + len(second)) == first + second
        assert batch.calls == batch.sent == len(first) + len(second)


class FillingSocket:
    """A socket whose buffer fills after ``room`` calls (a real UDP socket on loopback never
    says EAGAIN: the receiver drops instead)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent: list[bytes] = []

    def _take(self, datagrams: list[bytes]) -> None:
        if self.room == 0:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.room -= 1
        self.sent += datagrams

    def sendmsg(self, buffers: Any, cmsg: Any, flags: int, addr: Any) -> int:
        self._take(list(buffers))
        return sum(map(len, buffers))

    def sendto(self, data: bytes, addr: Any) -> int:
        self._take([data])
        return len(data)


@pytest.mark.parametrize("room", [0, 1, 2, 3])
def test_a_full_buffer_mid_batch_hands_the_rest_over_in_order(room: int) -> None:
    sock = FillingSocket(room)
    spilled: list[bytes] = []
    batch = UdpBatchSender(sock, lambda d, a: spilled.append(d))  # type: ignore[arg-type]
    datagrams = mixed_batch()
    batch.send(datagrams, ("192.0.2.1", 9))
    assert sock.sent + spilled == datagrams
    assert batch.sent == len(sock.sent) and batch.overflowed == len(spilled) > 0
    assert batch.gso


def test_other_send_errors_lose_that_run_only() -> None:
    class Refusing(FillingSocket):
        calls = 0

        def sendmsg(self, buffers: Any, cmsg: Any, flags: int, addr: Any) -> int:
            self.calls += 1
            if self.calls == 1:
                raise OSError(errno.ENETUNREACH, "unreachable")
            return super().sendmsg(buffers, cmsg, flags, addr)

    sock = Refusing(100)
    batch = UdpBatchSender(
        sock, lambda d, a: pytest.fail("nothing overflows"))  # type: ignore[arg-type]
    datagrams = mixed_batch()
    first_run = next(iter(gso_runs(datagrams)))
    assert batch.send(datagrams, ("192.0.2.1", 9)) == len(first_run)
    assert batch.failed == len(first_run) and batch.gso
    assert batch.send(datagrams, ("192.0.2.1", 9)) == 0
    assert sock.sent == datagrams[len(first_run):] + datagrams
