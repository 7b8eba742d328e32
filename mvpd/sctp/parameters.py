"""Variable-length parameters and error causes (RFC 9260 section 3.2.1 and 3.3.10), and the
stream re-configuration parameters of RFC 6525.

Both are type-length-value records padded to four bytes; they are kept as ``(type, value)``
pairs except the two re-configuration parameters the association acts on.
"""

from __future__ import annotations

import struct

from .errors import MalformedPacket

# Parameter types (RFC 9260 section 3.3.2.1, RFC 3758, RFC 5061, RFC 6525).
PARAM_HEARTBEAT_INFO = 1
PARAM_STATE_COOKIE = 7
PARAM_UNRECOGNIZED_PARAMETER = 8
PARAM_OUTGOING_SSN_RESET_REQUEST = 13
PARAM_INCOMING_SSN_RESET_REQUEST = 14
PARAM_RECONFIG_RESPONSE = 16
PARAM_ADD_OUTGOING_STREAMS = 17
PARAM_SUPPORTED_EXTENSIONS = 0x8008
PARAM_FORWARD_TSN_SUPPORTED = 0xC000

# Error cause codes (RFC 9260 section 3.3.10).
CAUSE_INVALID_STREAM = 1
CAUSE_MISSING_MANDATORY_PARAMETER = 2
CAUSE_STALE_COOKIE = 3
CAUSE_OUT_OF_RESOURCE = 4
CAUSE_UNRECOGNIZED_CHUNK = 6
CAUSE_INVALID_MANDATORY_PARAMETER = 7
CAUSE_NO_USER_DATA = 9
CAUSE_USER_INITIATED_ABORT = 12
CAUSE_PROTOCOL_VIOLATION = 13

# Re-configuration results (RFC 6525 section 4.4).
RESULT_SUCCESS_NOTHING_TO_DO = 0
RESULT_SUCCESS_PERFORMED = 1
RESULT_DENIED = 2
RESULT_ERROR_WRONG_SSN = 3
RESULT_ERROR_REQUEST_ALREADY_IN_PROGRESS = 4
RESULT_ERROR_BAD_SEQUENCE_NUMBER = 5
RESULT_IN_PROGRESS = 6

_TLV = struct.Struct("!HH")

TLV = tuple[int, bytes]


def encode_tlvs(items: list[TLV]) -> bytes:
    """Parameters or error causes as they go on the wire, each padded to four bytes."""
    out = bytearray()
    for kind, value in items:
        length = 4 + len(value)
        out += _TLV.pack(kind, length)
        out += value
        out += b"\x00" * (-length % 4)
    return bytes(out)


def decode_tlvs(data: bytes) -> list[TLV]:
    """The ``(type, value)`` pairs in ``data``; the last one may lack its padding."""
    items: list[TLV] = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise MalformedPacket("truncated parameter header")
        kind, length = _TLV.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            raise MalformedPacket(f"parameter {kind} length {length} is out of bounds")
        items.append((kind, bytes(data[pos + 4 : pos + length])))
        pos += length + (-length % 4)
    return items


def cause_text(causes: list[TLV]) -> str:
    """A short human-readable rendering of error causes (for AssociationLost reasons)."""
    names = {
        CAUSE_INVALID_STREAM: "invalid stream",
        CAUSE_MISSING_MANDATORY_PARAMETER: "missing mandatory parameter",
        CAUSE_STALE_COOKIE: "stale cookie",
        CAUSE_OUT_OF_RESOURCE: "out of resource",
        CAUSE_UNRECOGNIZED_CHUNK: "unrecognized chunk",
        CAUSE_INVALID_MANDATORY_PARAMETER: "invalid mandatory parameter",
        CAUSE_NO_USER_DATA: "no user data",
        CAUSE_USER_INITIATED_ABORT: "user-initiated abort",
        CAUSE_PROTOCOL_VIOLATION: "protocol violation",
    }
    parts = []
    for code, value in causes:
        name = names.get(code, f"cause {code}")
        if code in (CAUSE_USER_INITIATED_ABORT, CAUSE_PROTOCOL_VIOLATION) and value:
            name += ": " + value.decode("utf-8", "replace")
        parts.append(name)
    return ", ".join(parts) or "no cause given"


_RESET_REQUEST = struct.Struct("!III")
_RESPONSE = struct.Struct("!II")


class OutgoingSsnResetRequest:
    """RFC 6525 section 4.1: the sender resets the SSNs of its outgoing ``streams`` (all
    streams when empty) once the receiver has every TSN up to ``last_tsn``."""

    __slots__ = ("last_tsn", "request_seq", "response_seq", "streams")

    def __init__(
        self, request_seq: int, response_seq: int, last_tsn: int, streams: list[int]
    ) -> None:
        self.request_seq = request_seq
        self.response_seq = response_seq
        self.last_tsn = last_tsn
        self.streams = streams

    def encode(self) -> TLV:
        value = _RESET_REQUEST.pack(self.request_seq, self.response_seq, self.last_tsn)
        value += struct.pack(f"!{len(self.streams)}H", *self.streams)
        return (PARAM_OUTGOING_SSN_RESET_REQUEST, value)

    @classmethod
    def decode(cls, value: bytes) -> OutgoingSsnResetRequest:
        if len(value) < 12 or len(value) % 2:
            raise MalformedPacket("bad Outgoing SSN Reset Request length")
        request_seq, response_seq, last_tsn = _RESET_REQUEST.unpack_from(value)
        streams = list(struct.unpack_from(f"!{(len(value) - 12) // 2}H", value, 12))
        return cls(request_seq, response_seq, last_tsn, streams)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutgoingSsnResetRequest) and (
            self.request_seq, self.response_seq, self.last_tsn, self.streams
        ) == (other.request_seq, other.response_seq, other.last_tsn, other.streams)

    def __repr__(self) -> str:
        return (
            f"OutgoingSsnResetRequest(request_seq={self.request_seq}, "
            f"last_tsn={self.last_tsn}, streams={self.streams})"
        )


class ReconfigResponse:
    """RFC 6525 section 4.4: the answer to the request numbered ``response_seq``."""

    __slots__ = ("response_seq", "result")

    def __init__(self, response_seq: int, result: int) -> None:
        self.response_seq = response_seq
        self.result = result

    def encode(self) -> TLV:
        return (PARAM_RECONFIG_RESPONSE, _RESPONSE.pack(self.response_seq, self.result))

    @classmethod
    def decode(cls, value: bytes) -> ReconfigResponse:
        if len(value) not in (8, 16):
            raise MalformedPacket("bad Re-configuration Response length")
        response_seq, result = _RESPONSE.unpack_from(value)
        return cls(response_seq, result)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReconfigResponse) and (self.response_seq, self.result) == (
            other.response_seq,
            other.result,
        )

    def __repr__(self) -> str:
        return f"ReconfigResponse(response_seq={self.response_seq}, result={self.result})"
