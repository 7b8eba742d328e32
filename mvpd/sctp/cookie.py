"""The state cookie of INIT ACK / COOKIE ECHO (RFC 9260 5.1.3), authenticated with an HMAC
under a secret only this association knows, so a cookie cannot be forged or altered."""

from __future__ import annotations

import hashlib
import hmac
import struct

from .errors import MalformedPacket

_FIELDS = struct.Struct("!IIIIIHHBd")
_MAC_SIZE = 16
COOKIE_SIZE = _FIELDS.size + _MAC_SIZE

FEATURE_FORWARD_TSN = 1
FEATURE_RECONFIG = 2


class CookieState:
    """What the association needs from the peer's INIT once the cookie comes back."""

    __slots__ = (
        "created_at",
        "features",
        "local_initial_tsn",
        "local_tag",
        "peer_a_rwnd",
        "peer_inbound_streams",
        "peer_initial_tsn",
        "peer_outbound_streams",
        "peer_tag",
    )

    def __init__(
        self, local_tag: int, peer_tag: int, local_initial_tsn: int, peer_initial_tsn: int,
        peer_a_rwnd: int, peer_outbound_streams: int, peer_inbound_streams: int,
        features: int, created_at: float,
    ) -> None:
        self.local_tag = local_tag
        self.peer_tag = peer_tag
        self.local_initial_tsn = local_initial_tsn
        self.peer_initial_tsn = peer_initial_tsn
        self.peer_a_rwnd = peer_a_rwnd
        self.peer_outbound_streams = peer_outbound_streams
        self.peer_inbound_streams = peer_inbound_streams
        self.features = features
        self.created_at = created_at

    def seal(self, secret: bytes) -> bytes:
        """The cookie bytes: the fields and their truncated HMAC-SHA256."""
        body = _FIELDS.pack(
            self.local_tag, self.peer_tag, self.local_initial_tsn, self.peer_initial_tsn,
            self.peer_a_rwnd, self.peer_outbound_streams, self.peer_inbound_streams,
            self.features, self.created_at,
        )
        return body + hmac.new(secret, body, hashlib.sha256).digest()[:_MAC_SIZE]

    @classmethod
    def open(cls, secret: bytes, cookie: bytes) -> CookieState:
        """Check a cookie's HMAC and return its fields; :class:`MalformedPacket` if it is
        not one of ours."""
        if len(cookie) != COOKIE_SIZE:
            raise MalformedPacket("state cookie of the wrong size")
        body = cookie[: _FIELDS.size]
        mac = hmac.new(secret, body, hashlib.sha256).digest()[:_MAC_SIZE]
        if not hmac.compare_digest(mac, cookie[_FIELDS.size :]):
            raise MalformedPacket("state cookie authentication failed")
        return cls(*_FIELDS.unpack(body))
