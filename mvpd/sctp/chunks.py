"""The SCTP chunks (RFC 9260 section 3.3, RFC 3758, RFC 6525): one class per chunk type,
each with ``encode()`` (the chunk as it goes on the wire, without trailing padding) and
``decode(flags, body)``.

These objects are for control chunks, tests and debugging.  The association's hot path
(DATA out, DATA in) reads and writes DATA headers in place with the ``struct`` objects at
the end of this module instead of making an object per chunk.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from .errors import MalformedPacket
from .parameters import (
    PARAM_HEARTBEAT_INFO,
    TLV,
    decode_tlvs,
    encode_tlvs,
)

# Chunk types.
DATA = 0
INIT = 1
INIT_ACK = 2
SACK = 3
HEARTBEAT = 4
HEARTBEAT_ACK = 5
ABORT = 6
SHUTDOWN = 7
SHUTDOWN_ACK = 8
ERROR = 9
COOKIE_ECHO = 10
COOKIE_ACK = 11
SHUTDOWN_COMPLETE = 14
RECONFIG = 130
FORWARD_TSN = 192

# DATA chunk flags.
DATA_END = 0x01
DATA_BEGINNING = 0x02
DATA_UNORDERED = 0x04
DATA_IMMEDIATE = 0x08

#: ABORT and SHUTDOWN COMPLETE: the verification tag is the sender's own ("reflected").
FLAG_T = 0x01

CHUNK_HEADER = struct.Struct("!BBH")
#: type, flags, length, TSN, stream id, stream sequence number, payload protocol id
DATA_HEADER = struct.Struct("!BBHIHHI")
DATA_HEADER_SIZE = 16
_INIT = struct.Struct("!IIHHI")
_SACK = struct.Struct("!IIHH")
_U32 = struct.Struct("!I")


class Chunk:
    """Base of the chunk classes: ``type`` and ``flags``."""

    type: ClassVar[int] = -1
    flags: int

    def body(self) -> bytes:
        """The chunk's value (what follows the four-byte chunk header)."""
        return b""

    def encode(self) -> bytes:
        """The chunk with its header, without trailing padding."""
        body = self.body()
        return CHUNK_HEADER.pack(self.type, self.flags, 4 + len(body)) + body

    def _fields(self) -> tuple[object, ...]:
        return (self.flags,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chunk) and type(other) is type(self) and (
            self._fields() == other._fields()
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._fields()!r}"


class DataChunk(Chunk):
    """DATA: one fragment of a user message."""

    type = DATA

    def __init__(
        self, tsn: int, stream_id: int, ssn: int, ppid: int, data: bytes, flags: int = 3
    ) -> None:
        self.flags = flags
        self.tsn = tsn
        self.stream_id = stream_id
        self.ssn = ssn
        self.ppid = ppid
        self.data = data

    def encode(self) -> bytes:
        return (
            DATA_HEADER.pack(
                DATA, self.flags, DATA_HEADER_SIZE + len(self.data), self.tsn,
                self.stream_id, self.ssn, self.ppid,
            )
            + self.data
        )

    @classmethod
    def decode(cls, flags: int, body: bytes) -> DataChunk:
        if len(body) < 12:
            raise MalformedPacket("DATA chunk shorter than its header")
        tsn, sid, ssn, ppid = struct.unpack_from("!IHHI", body)
        return cls(tsn, sid, ssn, ppid, bytes(body[12:]), flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.tsn, self.stream_id, self.ssn, self.ppid, self.data)


class InitChunk(Chunk):
    """INIT: opens an association."""

    type = INIT

    def __init__(
        self,
        initiate_tag: int,
        a_rwnd: int,
        outbound_streams: int,
        inbound_streams: int,
        initial_tsn: int,
        params: list[TLV] | None = None,
        flags: int = 0,
    ) -> None:
        self.flags = flags
        self.initiate_tag = initiate_tag
        self.a_rwnd = a_rwnd
        self.outbound_streams = outbound_streams
        self.inbound_streams = inbound_streams
        self.initial_tsn = initial_tsn
        self.params: list[TLV] = params if params is not None else []

    def body(self) -> bytes:
        head = _INIT.pack(
            self.initiate_tag, self.a_rwnd, self.outbound_streams, self.inbound_streams,
            self.initial_tsn,
        )
        return head + encode_tlvs(self.params)

    @classmethod
    def decode(cls, flags: int, body: bytes) -> InitChunk:
        if len(body) < 16:
            raise MalformedPacket(f"{cls.__name__} shorter than its fixed part")
        tag, rwnd, out_streams, in_streams, tsn = _INIT.unpack_from(body)
        return cls(tag, rwnd, out_streams, in_streams, tsn, decode_tlvs(body[16:]), flags)

    def _fields(self) -> tuple[object, ...]:
        return (
            self.flags, self.initiate_tag, self.a_rwnd, self.outbound_streams,
            self.inbound_streams, self.initial_tsn, self.params,
        )


class InitAckChunk(InitChunk):
    """INIT ACK: the answer to INIT, with the state cookie."""

    type = INIT_ACK


class SackChunk(Chunk):
    """SACK: cumulative TSN ack, receiver window, gap ack blocks (offsets from the
    cumulative TSN, inclusive) and duplicate TSNs."""

    type = SACK

    def __init__(
        self,
        cumulative_tsn: int,
        a_rwnd: int,
        gaps: list[tuple[int, int]] | None = None,
        duplicates: list[int] | None = None,
        flags: int = 0,
    ) -> None:
        self.flags = flags
        self.cumulative_tsn = cumulative_tsn
        self.a_rwnd = a_rwnd
        self.gaps: list[tuple[int, int]] = gaps if gaps is not None else []
        self.duplicates: list[int] = duplicates if duplicates is not None else []

    def body(self) -> bytes:
        out = bytearray(_SACK.pack(
            self.cumulative_tsn, self.a_rwnd, len(self.gaps), len(self.duplicates)
        ))
        for start, end in self.gaps:
            out += struct.pack("!HH", start, end)
        for tsn in self.duplicates:
            out += _U32.pack(tsn)
        return bytes(out)

    @classmethod
    def decode(cls, flags: int, body: bytes) -> SackChunk:
        if len(body) < 12:
            raise MalformedPacket("SACK chunk shorter than its fixed part")
        cum, rwnd, ngaps, ndups = _SACK.unpack_from(body)
        if len(body) < 12 + 4 * ngaps + 4 * ndups:
            raise MalformedPacket("SACK chunk shorter than its gap and duplicate lists")
        values = struct.unpack_from(f"!{2 * ngaps}H", body, 12)
        gaps = [(values[i], values[i + 1]) for i in range(0, 2 * ngaps, 2)]
        dups = list(struct.unpack_from(f"!{ndups}I", body, 12 + 4 * ngaps))
        return cls(cum, rwnd, gaps, dups, flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.cumulative_tsn, self.a_rwnd, self.gaps, self.duplicates)


class HeartbeatChunk(Chunk):
    """HEARTBEAT: ``info`` is opaque to the peer, which echoes it in HEARTBEAT ACK."""

    type = HEARTBEAT

    def __init__(self, info: bytes, flags: int = 0) -> None:
        self.flags = flags
        self.info = info

    def body(self) -> bytes:
        return encode_tlvs([(PARAM_HEARTBEAT_INFO, self.info)])

    @classmethod
    def decode(cls, flags: int, body: bytes) -> HeartbeatChunk:
        params = decode_tlvs(body)
        if not params or params[0][0] != PARAM_HEARTBEAT_INFO:
            raise MalformedPacket(f"{cls.__name__} without Heartbeat Info")
        return cls(params[0][1], flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.info)


class HeartbeatAckChunk(HeartbeatChunk):
    """HEARTBEAT ACK: echoes a HEARTBEAT's info."""

    type = HEARTBEAT_ACK


class AbortChunk(Chunk):
    """ABORT: ends the association at once, with error causes."""

    type = ABORT

    def __init__(self, causes: list[TLV] | None = None, flags: int = 0) -> None:
        self.flags = flags
        self.causes: list[TLV] = causes if causes is not None else []

    def body(self) -> bytes:
        return encode_tlvs(self.causes)

    @classmethod
    def decode(cls, flags: int, body: bytes) -> AbortChunk:
        return cls(decode_tlvs(body), flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.causes)


class ErrorChunk(AbortChunk):
    """ERROR: reports error causes without ending the association."""

    type = ERROR


class ShutdownChunk(Chunk):
    """SHUTDOWN: graceful close, carries the sender's cumulative TSN ack."""

    type = SHUTDOWN

    def __init__(self, cumulative_tsn: int, flags: int = 0) -> None:
        self.flags = flags
        self.cumulative_tsn = cumulative_tsn

    def body(self) -> bytes:
        return _U32.pack(self.cumulative_tsn)

    @classmethod
    def decode(cls, flags: int, body: bytes) -> ShutdownChunk:
        if len(body) != 4:
            raise MalformedPacket("SHUTDOWN chunk length is not 8")
        return cls(_U32.unpack(body)[0], flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.cumulative_tsn)


class _EmptyChunk(Chunk):
    def __init__(self, flags: int = 0) -> None:
        self.flags = flags

    @classmethod
    def decode(cls, flags: int, body: bytes) -> Chunk:
        return cls(flags)


class ShutdownAckChunk(_EmptyChunk):
    """SHUTDOWN ACK."""

    type = SHUTDOWN_ACK


class CookieAckChunk(_EmptyChunk):
    """COOKIE ACK: the association is established."""

    type = COOKIE_ACK


class ShutdownCompleteChunk(_EmptyChunk):
    """SHUTDOWN COMPLETE."""

    type = SHUTDOWN_COMPLETE


class CookieEchoChunk(Chunk):
    """COOKIE ECHO: returns the state cookie of the INIT ACK."""

    type = COOKIE_ECHO

    def __init__(self, cookie: bytes, flags: int = 0) -> None:
        self.flags = flags
        self.cookie = cookie

    def body(self) -> bytes:
        return self.cookie

    @classmethod
    def decode(cls, flags: int, body: bytes) -> CookieEchoChunk:
        return cls(bytes(body), flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.cookie)


class ReconfigChunk(Chunk):
    """RE-CONFIG (RFC 6525): one or two re-configuration parameters."""

    type = RECONFIG

    def __init__(self, params: list[TLV], flags: int = 0) -> None:
        self.flags = flags
        self.params = params

    def body(self) -> bytes:
        return encode_tlvs(self.params)

    @classmethod
    def decode(cls, flags: int, body: bytes) -> ReconfigChunk:
        return cls(decode_tlvs(body), flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.params)


class ForwardTsnChunk(Chunk):
    """FORWARD TSN (RFC 3758): the receiver moves its cumulative TSN to
    ``new_cumulative_tsn`` and skips the listed ``(stream id, ssn)`` of ordered streams."""

    type = FORWARD_TSN

    def __init__(
        self, new_cumulative_tsn: int, streams: list[tuple[int, int]] | None = None,
        flags: int = 0,
    ) -> None:
        self.flags = flags
        self.new_cumulative_tsn = new_cumulative_tsn
        self.streams: list[tuple[int, int]] = streams if streams is not None else []

    def body(self) -> bytes:
        out = bytearray(_U32.pack(self.new_cumulative_tsn))
        for sid, ssn in self.streams:
            out += struct.pack("!HH", sid, ssn)
        return bytes(out)

    @classmethod
    def decode(cls, flags: int, body: bytes) -> ForwardTsnChunk:
        if len(body) < 4 or len(body) % 4:
            raise MalformedPacket("bad FORWARD TSN chunk length")
        values = struct.unpack_from(f"!I{(len(body) - 4) // 2}H", body)
        streams = [(values[i], values[i + 1]) for i in range(1, len(values), 2)]
        return cls(values[0], streams, flags)

    def _fields(self) -> tuple[object, ...]:
        return (self.flags, self.new_cumulative_tsn, self.streams)


class UnknownChunk(Chunk):
    """A chunk type this implementation does not know."""

    def __init__(self, chunk_type: int, flags: int, body: bytes) -> None:
        self.chunk_type = chunk_type
        self.flags = flags
        self.value = body

    def encode(self) -> bytes:
        return CHUNK_HEADER.pack(self.chunk_type, self.flags, 4 + len(self.value)) + self.value

    def _fields(self) -> tuple[object, ...]:
        return (self.chunk_type, self.flags, self.value)


_DECODERS = {
    DATA: DataChunk.decode,
    INIT: InitChunk.decode,
    INIT_ACK: InitAckChunk.decode,
    SACK: SackChunk.decode,
    HEARTBEAT: HeartbeatChunk.decode,
    HEARTBEAT_ACK: HeartbeatAckChunk.decode,
    ABORT: AbortChunk.decode,
    SHUTDOWN: ShutdownChunk.decode,
    SHUTDOWN_ACK: ShutdownAckChunk.decode,
    ERROR: ErrorChunk.decode,
    COOKIE_ECHO: CookieEchoChunk.decode,
    COOKIE_ACK: CookieAckChunk.decode,
    SHUTDOWN_COMPLETE: ShutdownCompleteChunk.decode,
    RECONFIG: ReconfigChunk.decode,
    FORWARD_TSN: ForwardTsnChunk.decode,
}


def decode_chunk(chunk_type: int, flags: int, body: bytes) -> Chunk:
    """The chunk object for one chunk; :class:`UnknownChunk` for unknown types."""
    decoder = _DECODERS.get(chunk_type)
    if decoder is None:
        return UnknownChunk(chunk_type, flags, bytes(body))
    chunk: Chunk = decoder(flags, body)
    return chunk
