"""Data-path pings between two agents: the ``mvp-ping`` channel's wire format (sans-I/O).

``mvpctl ping PEER`` measures the round trip over the data path itself (DTLS, SCTP, the
selected ICE pair, any TURN relay), not the ICE layer's STUN checks. The pinging side opens a
data channel labelled :data:`PING_LABEL` with protocol :data:`PING_PROTOCOL`, negotiated
in-band (DCEP), unordered and never retransmitted (``maxRetransmits=0``): a lost probe is a
lost probe, not a late one. Each probe is one binary message::

    0      1      2      4            8                   16
    +------+------+------+------------+-------------------+----------------+
    | type | ver  | zero | sequence   | sender timestamp  | padding ...    |
    +------+------+------+------------+-------------------+----------------+

``type`` is 1 (request) or 2 (reply), ``ver`` 1, then two zero bytes, the sequence number
(u32, network order) and the sender's own timestamp (u64, opaque to the other side), then
optional padding; at most :data:`MAX_PROBE_SIZE` bytes in all. The answering agent sends each
valid request back unchanged but for ``type`` = 2 and ignores anything else (counted). A peer
that does not know the label (an older mvpd, a browser page) closes the channel or never
answers: the pinging side reports that the peer does not answer data-path pings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import ProtocolError

#: The data channel label and protocol of pings.
PING_LABEL = "mvp-ping"
PING_PROTOCOL = "mvp-ping/1"
REQUEST = 1
REPLY = 2
VERSION = 1
_HEADER = struct.Struct("!BBHIQ")
#: Bytes of a probe without padding.
HEADER_SIZE = _HEADER.size
#: The largest probe either side accepts (padding included).
MAX_PROBE_SIZE = 1024


@dataclass(frozen=True)
class Probe:
    """One ping message."""

    kind: int
    sequence: int
    timestamp: int
    padding: int = 0

    @property
    def is_request(self) -> bool:
        return self.kind == REQUEST


def encode_request(sequence: int, timestamp: int, padding: int = 0) -> bytes:
    """A request probe; ``padding`` zero bytes make it bigger (path MTU tests)."""
    if not 0 <= padding <= MAX_PROBE_SIZE - HEADER_SIZE:
        raise ValueError(f"padding must be 0..{MAX_PROBE_SIZE - HEADER_SIZE} bytes")
    header = _HEADER.pack(REQUEST, VERSION, 0, sequence & 0xFFFFFFFF, timestamp & (2**64 - 1))
    return header + bytes(padding)


def parse_probe(data: bytes) -> Probe:
    """Decode a probe; :class:`ProtocolError` says what is wrong with a bad one."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("a ping probe is a binary message")
    if not HEADER_SIZE <= len(data) <= MAX_PROBE_SIZE:
        raise ProtocolError(f"a ping probe has {HEADER_SIZE} to {MAX_PROBE_SIZE} bytes, "
                            f"not {len(data)}")
    kind, version, zero, sequence, timestamp = _HEADER.unpack_from(data)
    if version != VERSION or zero != 0:
        raise ProtocolError(f"unknown ping version {version}")
    if kind not in (REQUEST, REPLY):
        raise ProtocolError(f"unknown ping message type {kind}")
    return Probe(kind, sequence, timestamp, len(data) - HEADER_SIZE)


def reply_to(data: bytes) -> bytes | None:
    """The reply to a received message, or ``None`` when it is not a valid request."""
    try:
        probe = parse_probe(data)
    except ProtocolError:
        return None
    if not probe.is_request:
        return None
    return bytes([REPLY]) + bytes(data[1:])


__all__ = [
    "HEADER_SIZE",
    "MAX_PROBE_SIZE",
    "PING_LABEL",
    "PING_PROTOCOL",
    "REPLY",
    "REQUEST",
    "Probe",
    "encode_request",
    "parse_probe",
    "reply_to",
]
