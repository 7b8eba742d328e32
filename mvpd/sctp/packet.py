"""SCTP packets: the common header, the CRC32c, and the chunks inside (RFC 9260 section 3).

:func:`parse_packet` checks a packet and lists its chunks as ``(type, flags, start, end)``
offsets into the packet (no copies); :class:`PacketWriter` fills one preallocated buffer
with chunks up to the path MTU and seals it with the checksum.
"""

from __future__ import annotations

import struct

from .chunks import CHUNK_HEADER, DATA_HEADER, Chunk, decode_chunk
from .crc32c import crc32c, crc32c_extend
from .errors import MalformedPacket

COMMON_HEADER = struct.Struct("!HHII")
COMMON_HEADER_SIZE = 12
_CRC = struct.Struct("<I")
_ZERO_CRC = b"\x00\x00\x00\x00"

#: ``(chunk type, flags, value start, value end)``: offsets into the packet.
ChunkSpan = tuple[int, int, int, int]


class Packet:
    """A parsed packet: ports, verification tag and the spans of its chunks."""

    __slots__ = ("chunks", "data", "dst_port", "src_port", "verification_tag")

    def __init__(
        self, data: bytes, src_port: int, dst_port: int, verification_tag: int,
        chunks: list[ChunkSpan],
    ) -> None:
        self.data = data
        self.src_port = src_port
        self.dst_port = dst_port
        self.verification_tag = verification_tag
        self.chunks = chunks

    def value(self, span: ChunkSpan) -> bytes:
        """The value (body) of one chunk, as bytes."""
        return self.data[span[2] : span[3]]

    def decoded(self) -> list[Chunk]:
        """Every chunk as an object (for tests and debugging)."""
        return [decode_chunk(kind, flags, self.value((kind, flags, s, e)))
                for kind, flags, s, e in self.chunks]


def parse_packet(data: bytes, *, check_crc: bool = True) -> Packet:
    """Check ``data`` (length, checksum, chunk lengths) and list its chunks.

    Raises :class:`MalformedPacket` on anything wrong; never anything else.
    """
    if type(data) is not bytes:
        data = bytes(data)
    size = len(data)
    if size < COMMON_HEADER_SIZE + 4:
        raise MalformedPacket(f"SCTP packet of {size} bytes is too short")
    src, dst, vtag, _checksum = COMMON_HEADER.unpack_from(data)
    if check_crc:
        # The checksum is computed with its own field zeroed and stored little-endian.
        crc = crc32c_extend(crc32c_extend(crc32c(data[:8]), _ZERO_CRC), data[12:])
        if _CRC.unpack_from(data, 8)[0] != crc:
            raise MalformedPacket("SCTP packet checksum mismatch")
    chunks: list[ChunkSpan] = []
    pos = COMMON_HEADER_SIZE
    while pos + 4 <= size:
        kind, flags, length = CHUNK_HEADER.unpack_from(data, pos)
        if length < 4 or pos + length > size:
            raise MalformedPacket(f"chunk type {kind} length {length} runs past the packet")
        chunks.append((kind, flags, pos + 4, pos + length))
        pos += length + (-length % 4)
    if pos < size and any(data[pos:]):
        raise MalformedPacket("trailing bytes after the last chunk")
    if not chunks:
        raise MalformedPacket("SCTP packet without chunks")
    return Packet(data, src, dst, vtag, chunks)


class PacketWriter:
    """Builds packets of at most ``mtu`` bytes from chunks, in one reused buffer."""

    __slots__ = ("_buf", "_pos", "_view", "dst_port", "mtu", "src_port")

    def __init__(self, src_port: int, dst_port: int, mtu: int) -> None:
        self.src_port = src_port
        self.dst_port = dst_port
        self.mtu = mtu
        self._buf = bytearray(mtu + 4)
        self._view = memoryview(self._buf)
        self._pos = 0

    def start(self, verification_tag: int) -> None:
        """Begin a packet for the peer with ``verification_tag``."""
        COMMON_HEADER.pack_into(self._buf, 0, self.src_port, self.dst_port,
                                verification_tag, 0)
        self._pos = COMMON_HEADER_SIZE

    @property
    def empty(self) -> bool:
        """No chunk in the current packet yet."""
        return self._pos <= COMMON_HEADER_SIZE

    @property
    def room(self) -> int:
        """Bytes still free in the current packet (for a chunk and its padding)."""
        return self.mtu - self._pos

    def add(self, chunk: bytes) -> None:
        """Append an encoded chunk (the caller checked :attr:`room`); pads it."""
        pos = self._pos
        end = pos + len(chunk)
        self._view[pos:end] = chunk
        padded = (end + 3) & ~3
        if padded != end:
            self._view[end:padded] = b"\x00" * (padded - end)
        self._pos = padded

    def add_data(self, flags: int, tsn: int, stream_id: int, ssn: int, ppid: int,
                 payload: memoryview) -> None:
        """Append a DATA chunk, written in place from the message's bytes."""
        pos = self._pos
        n = len(payload)
        DATA_HEADER.pack_into(self._buf, pos, 0, flags, 16 + n, tsn, stream_id, ssn, ppid)
        start = pos + 16
        end = start + n
        self._view[start:end] = payload
        padded = (end + 3) & ~3
        if padded != end:
            self._view[end:padded] = b"\x00" * (padded - end)
        self._pos = padded

    def finish(self) -> bytes:
        """Seal the current packet with its checksum and return it."""
        pos = self._pos
        view = self._view
        # The C CRC32c takes only bytes: checksum a copy, then copy out the sealed packet.
        _CRC.pack_into(self._buf, 8, crc32c(bytes(view[:pos])))
        self._pos = 0
        return bytes(view[:pos])



def build_packet(src_port: int, dst_port: int, verification_tag: int, chunk: bytes) -> bytes:
    """A packet holding the one encoded ``chunk``, whatever its size."""
    packet = bytearray(COMMON_HEADER.pack(src_port, dst_port, verification_tag, 0))
    packet += chunk
    packet += b"\x00" * (-len(chunk) % 4)
    _CRC.pack_into(packet, 8, crc32c(bytes(packet)))
    return bytes(packet)
