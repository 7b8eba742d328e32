"""A peer session's life as a transition table (sans-I/O).

States (:class:`PeerState`, reported by ``mvpctl peers``):

``new``
    created, nothing negotiated yet.
``connecting``
    an offer went out or came in; ICE, DTLS and SCTP are being set up.
``connected``
    the main data channel is open.
``closed``
    ended on purpose: closed here, ``bye`` from the peer, the channel or connection closed.
``failed``
    ended by a failure: ICE or DTLS failed, no channel within ``connect_timeout``, the peer
    stopped answering, or an error (a bad offer, signaling that cannot carry ours).

Events (:class:`SessionEvent`): ``offer-sent``, ``offer-received``, ``answer-received``,
``glare-yield`` (both sides offered and we are the one to answer), ``channel-open``,
``channel-closed``, ``transport-failed`` (ICE or DTLS), ``timeout``, ``bye``,
``close-requested`` and ``error``.

The rules, all in :data:`SESSION_TRANSITIONS`:

* only an offer (sent or received) leaves ``new`` for ``connecting``, and only
  ``channel-open`` reaches ``connected``, from ``connecting``;
* ``answer-received``, ``glare-yield`` and a further ``offer-received`` keep a connecting
  session connecting (a restart of a connected session is a new session: the daemon's core
  replaces it);
* a live session ends ``closed`` on ``bye``, ``close-requested`` or ``channel-closed``, and
  ``failed`` on ``transport-failed``, ``timeout`` or ``error``;
* ``closed`` and ``failed`` are final: they accept no event at all.

:class:`mvpd.peer.PeerSession` asks this table on every change; an illegal event raises
:class:`~mvpd.proto.errors.IllegalTransition` in the test suite and is logged and ignored in
production (a bug there must not take a session down with it).
"""

from __future__ import annotations

import enum

from .fsm import StateMachine


class PeerState(str, enum.Enum):
    """See the module documentation."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """``closed`` or ``failed``: the session is over."""
        return self in (PeerState.CLOSED, PeerState.FAILED)


class SessionEvent(str, enum.Enum):
    """See the module documentation."""

    OFFER_SENT = "offer-sent"
    OFFER_RECEIVED = "offer-received"
    ANSWER_RECEIVED = "answer-received"
    GLARE_YIELD = "glare-yield"
    CHANNEL_OPEN = "channel-open"
    CHANNEL_CLOSED = "channel-closed"
    TRANSPORT_FAILED = "transport-failed"
    TIMEOUT = "timeout"
    BYE = "bye"
    CLOSE_REQUESTED = "close-requested"
    ERROR = "error"


_S, _E = PeerState, SessionEvent

#: How a live session ends, whatever state it is in.
_ENDINGS = {
    _E.BYE: _S.CLOSED,
    _E.CLOSE_REQUESTED: _S.CLOSED,
    _E.TIMEOUT: _S.FAILED,
    _E.ERROR: _S.FAILED,
}

SESSION_TRANSITIONS: dict[tuple[PeerState, SessionEvent], PeerState] = {
    (_S.NEW, _E.OFFER_SENT): _S.CONNECTING,
    (_S.NEW, _E.OFFER_RECEIVED): _S.CONNECTING,
    **{(_S.NEW, event): state for event, state in _ENDINGS.items()},
    (_S.CONNECTING, _E.OFFER_RECEIVED): _S.CONNECTING,
    (_S.CONNECTING, _E.ANSWER_RECEIVED): _S.CONNECTING,
    (_S.CONNECTING, _E.GLARE_YIELD): _S.CONNECTING,
    (_S.CONNECTING, _E.CHANNEL_OPEN): _S.CONNECTED,
    (_S.CONNECTING, _E.CHANNEL_CLOSED): _S.CLOSED,
    (_S.CONNECTING, _E.TRANSPORT_FAILED): _S.FAILED,
    **{(_S.CONNECTING, event): state for event, state in _ENDINGS.items()},
    (_S.CONNECTED, _E.CHANNEL_CLOSED): _S.CLOSED,
    (_S.CONNECTED, _E.TRANSPORT_FAILED): _S.FAILED,
    **{(_S.CONNECTED, event): state for event, state in _ENDINGS.items()},
}


def session_machine(state: PeerState = PeerState.NEW) -> StateMachine[PeerState, SessionEvent]:
    """A session's machine, in ``state``."""
    return StateMachine("peer session", SESSION_TRANSITIONS, state)
