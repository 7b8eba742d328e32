"""Hostile input: random bytes and mangled chunks raise nothing but SctpError.

The default run tries a few hundred examples; ``-m slow`` runs the 10^5-example versions.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvpd.sctp import Association, SctpError
from mvpd.sctp.crc32c import crc32c
from mvpd.sctp.packet import COMMON_HEADER, parse_packet

from .harness import Pair

CHUNK_TYPES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 130, 192, 0x40, 0x80, 0xC0, 0xFF]


@st.composite
def chunk_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(CHUNK_TYPES))
    flags = draw(st.integers(0, 255))
    body = draw(st.binary(max_size=64))
    if kind == 0 and draw(st.booleans()):
        # A DATA header with plausible fields, so reassembly is reached.
        body = struct.pack("!IHHI", draw(st.integers(0, 2**32 - 1)),
                           draw(st.integers(0, 8)), draw(st.integers(0, 4)), 53) + body
    length = 4 + len(body)
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(0, 0xFFFF))  # a lie about the length
    chunk = struct.pack("!BBH", kind, flags, length) + body
    return chunk + b"\x00" * (-len(chunk) % 4)


def _packet(tag: int, chunks: list[bytes], src: int = 5000, dst: int = 5000) -> bytes:
    packet = bytearray(COMMON_HEADER.pack(src, dst, tag, 0) + b"".join(chunks))
    struct.pack_into("<I", packet, 8, crc32c(bytes(packet)))
    return bytes(packet)


class _Target:
    """An established association to throw packets at (renewed once it ends)."""

    def __init__(self) -> None:
        self.pair: Pair | None = None
        self.now = 0.0

    def get(self) -> Association:
        if self.pair is None or self.pair.b.association.closed:
            self.pair = Pair()
            self.pair.connect()
            self.pair.a.association.send(1, 53, b"pending" * 100, now=self.pair.now)
            self.pair.b.association.send(1, 53, b"pending" * 100, now=self.pair.now)
            self.now = self.pair.now
        return self.pair.b.association


def _check_parser(data: bytes) -> None:
    for check_crc in (True, False):
        with contextlib.suppress(SctpError):
            parse_packet(data, check_crc=check_crc).decoded()


def _check_association(target: _Target, tag_choice: int, chunks: list[bytes],
                       raw: bytes) -> None:
    association = target.get()
    tags = [association.local_tag, 0, association.peer_tag, 0x12345678]
    packets = [_packet(tags[tag_choice], chunks), raw]
    for data in packets:
        target.now += 0.01
        with contextlib.suppress(SctpError):
            association.receive_packet(data, target.now)
        association.handle_timeout(target.now)
        association.packets_to_send()
        association.events()


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parser_refuses_garbage_with_its_own_error(data: bytes) -> None:
    _check_parser(data)


_TARGET = _Target()


@given(st.integers(0, 3), st.lists(chunk_bytes(), min_size=1, max_size=4), st.binary(max_size=80))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_association_survives_hostile_packets(tag_choice: int, chunks: list[bytes],
                                              raw: bytes) -> None:
    _check_association(_TARGET, tag_choice, chunks, raw)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(st.binary(max_size=300))
@settings(max_examples=100_000, deadline=None)
def test_parser_refuses_garbage_slow(data: bytes) -> None:
    _check_parser(data)


_SLOW_TARGET = _Target()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(st.integers(0, 3), st.lists(chunk_bytes(), min_size=1, max_size=4), st.binary(max_size=80))
@settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))
def test_association_survives_hostile_packets_slow(tag_choice: int, chunks: list[bytes],
                                                   raw: bytes) -> None:
    _check_association(_SLOW_TARGET, tag_choice, chunks, raw)
