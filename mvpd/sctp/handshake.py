"""Setting up an association (RFC 9260 5.1-5.2): INIT, INIT ACK, COOKIE ECHO, COOKIE ACK, and
what they negotiate (stream counts, FORWARD TSN, RE-CONFIG).

The side that connects sends INIT and echoes the state cookie of the peer's INIT ACK; the
side that answers keeps nothing until its cookie comes back valid (RFC 9260 5.1.3), so an
INIT costs it no memory.  WebRTC endpoints both connect: each answers the other's INIT and
the first valid cookie establishes the one association (RFC 9260 5.2).  T1-init repeats the
INIT or COOKIE ECHO, backed off, until answered.

A part of :class:`~mvpd.sctp.association.Association`, which owns the state it changes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .chunks import (
    FORWARD_TSN,
    RECONFIG,
    CookieAckChunk,
    CookieEchoChunk,
    InitAckChunk,
    InitChunk,
)
from .congestion import CongestionControl
from .cookie import FEATURE_FORWARD_TSN, FEATURE_RECONFIG, CookieState
from .data_tracker import DataTracker
from .errors import MalformedPacket
from .events import AssociationEstablished
from .packet import COMMON_HEADER_SIZE
from .parameters import (
    PARAM_FORWARD_TSN_SUPPORTED,
    PARAM_STATE_COOKIE,
    PARAM_SUPPORTED_EXTENSIONS,
    TLV,
)
from .retransmission_queue import RetransmissionQueue
from .state import OPENING, State, Trigger, next_state
from .timers import Timer

if TYPE_CHECKING:
    from .association import Association

__all__ = ["Handshake", "extension_params", "peer_features", "random_u32"]


def random_u32(nonzero: bool = False) -> int:
    """A random 32-bit value (verification tags, initial TSNs, heartbeat nonces)."""
    while True:
        value = int.from_bytes(os.urandom(4), "big")
        if value or not nonzero:
            return value


def extension_params(forward_tsn: bool) -> list[TLV]:
    """The parameters of our INIT or INIT ACK that announce our extensions."""
    if not forward_tsn:
        return [(PARAM_SUPPORTED_EXTENSIONS, bytes([RECONFIG]))]
    return [
        (PARAM_FORWARD_TSN_SUPPORTED, b""),
        (PARAM_SUPPORTED_EXTENSIONS, bytes([FORWARD_TSN, RECONFIG])),
    ]


def peer_features(params: list[TLV]) -> int:
    """Which of our extensions the peer's INIT or INIT ACK says it supports."""
    features = 0
    for kind, value in params:
        if kind == PARAM_FORWARD_TSN_SUPPORTED:
            features |= FEATURE_FORWARD_TSN
        elif kind == PARAM_SUPPORTED_EXTENSIONS:
            if FORWARD_TSN in value:
                features |= FEATURE_FORWARD_TSN
            if RECONFIG in value:
                features |= FEATURE_RECONFIG
    return features


class Handshake:
    """The association's setup chunks, its T1-init timer and its cookie secret."""

    def __init__(self, association: Association) -> None:
        self._association = association
        #: Repeats the INIT or COOKIE ECHO (``_chunk``) until the peer answers it.
        self.t1 = Timer("t1-init")
        self._chunk = b""
        # Peer parameters learnt from INIT ACK, used once COOKIE ACK arrives.
        self._pending_peer: CookieState | None = None
        self._secret = os.urandom(32)

    def send_init(self, now: float) -> None:
        """Queue our INIT (the caller moves to COOKIE-WAIT)."""
        a = self._association
        init = InitChunk(
            a.local_tag, a.receive_window, a._our_outbound_streams, a._our_inbound_streams,
            a.local_initial_tsn, extension_params(a.forward_tsn),
        )
        self._chunk = init.encode()
        a._control.append((0, self._chunk))
        self.t1.start(now, a._rto.rto_initial)

    def on_init(self, init: InitChunk, now: float) -> None:
        """Answer an INIT with an INIT ACK carrying our sealed state cookie."""
        a = self._association
        if init.initiate_tag == 0 or init.outbound_streams == 0 or init.inbound_streams == 0:
            return
        if a.state not in OPENING and init.initiate_tag != a.peer_tag:
            return  # a restart: not supported (a new peer gets a new association)
        cookie = CookieState(
            a.local_tag, init.initiate_tag, a.local_initial_tsn, init.initial_tsn,
            init.a_rwnd, init.outbound_streams, init.inbound_streams,
            peer_features(init.params), now,
        )
        params = [
            *extension_params(a.forward_tsn),
            (PARAM_STATE_COOKIE, cookie.seal(self._secret)),
        ]
        ack = InitAckChunk(
            a.local_tag, a.receive_window, a._our_outbound_streams,
            a._our_inbound_streams, a.local_initial_tsn, params,
        )
        a._control.append((init.initiate_tag, ack.encode()))

    def on_init_ack(self, ack: InitChunk, now: float) -> None:
        """Echo the cookie of the INIT ACK answering our INIT."""
        a = self._association
        target = next_state(a.state, Trigger.RECV_INIT_ACK)
        if target is None or ack.initiate_tag == 0:
            return
        cookie = next((v for k, v in ack.params if k == PARAM_STATE_COOKIE), None)
        if cookie is None:
            return
        self._pending_peer = CookieState(
            a.local_tag, ack.initiate_tag, a.local_initial_tsn, ack.initial_tsn,
            ack.a_rwnd, ack.outbound_streams, ack.inbound_streams,
            peer_features(ack.params), now,
        )
        a.peer_tag = ack.initiate_tag
        self._chunk = CookieEchoChunk(cookie).encode()
        a._control.append((a.peer_tag, self._chunk))
        self.t1.start(now, a._rto.rto_initial)
        a._set_state(target)

    def on_cookie_echo(self, value: bytes, now: float) -> None:
        """Establish on a valid cookie of ours (or acknowledge it again once established)."""
        a = self._association
        try:
            cookie = CookieState.open(self._secret, value)
        except MalformedPacket:
            return  # not a cookie of ours
        if cookie.local_tag != a.local_tag or now - cookie.created_at > a.cookie_lifetime:
            return
        if a.state not in OPENING:
            if cookie.peer_tag == a.peer_tag and a.state is State.ESTABLISHED:
                a._control.append((a.peer_tag, CookieAckChunk().encode()))
            return
        target = next_state(a.state, Trigger.RECV_VALID_COOKIE_ECHO)
        if target is None:
            return
        a.peer_tag = cookie.peer_tag
        a._control.append((a.peer_tag, CookieAckChunk().encode()))
        self._establish(cookie, now)
        a._set_state(target)

    def on_cookie_ack(self, now: float) -> None:
        """Establish with what the INIT ACK told us."""
        a = self._association
        target = next_state(a.state, Trigger.RECV_COOKIE_ACK)
        if target is None or self._pending_peer is None:
            return
        self._establish(self._pending_peer, now)
        a._set_state(target)

    def _establish(self, peer: CookieState, now: float) -> None:
        a = self._association
        self.t1.stop()
        self._chunk = b""
        self._pending_peer = None
        a.outbound_streams = min(a._our_outbound_streams, peer.peer_inbound_streams)
        a.inbound_streams = min(a._our_inbound_streams, peer.peer_outbound_streams)
        a.peer_supports_forward_tsn = a.forward_tsn and bool(
            peer.features & FEATURE_FORWARD_TSN
        )
        a.peer_supports_reconfig = bool(peer.features & FEATURE_RECONFIG)
        a.tracker = DataTracker(peer.peer_initial_tsn)
        congestion = CongestionControl(
            a.mtu - COMMON_HEADER_SIZE, peer.peer_a_rwnd,
            emulated_flows=a.emulated_flows,
        )
        a.retransmissions = RetransmissionQueue(
            a.local_initial_tsn, congestion, a._rto, peer.peer_a_rwnd,
            unreliable_losses_reduce_cwnd=a.unreliable_losses_reduce_cwnd,
            partial_reliability=a.peer_supports_forward_tsn,
        )
        a.resets.established(peer.peer_initial_tsn)
        if a.heartbeat_interval > 0:
            a._heartbeat.start(now, a.heartbeat_interval)
        a._events.append(AssociationEstablished())

    def on_t1_expired(self, now: float) -> None:
        """T1-init expired: send the INIT or COOKIE ECHO again, or give up."""
        a = self._association
        if self.t1.expirations > a.max_init_retransmissions:
            a._lost("the peer did not answer the association setup", now)
            return
        tag = 0 if a.state is State.COOKIE_WAIT else a.peer_tag
        a._control.append((tag, self._chunk))
        self.t1.restart_backed_off(now, min(self.t1.duration * 2, a._rto.rto_max))
