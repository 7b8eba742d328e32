"""The signaling client's life as a transition table (sans-I/O).

States (:class:`SignalingState`, reported by ``mvpctl status`` as ``signaling``):

``disconnected``
    created, not started yet.
``connecting``
    opening the WebSocket and registering.
``connected``
    registered (as far as a routing-only server lets us know: nothing is waited for).
``backoff``
    the attempt failed or the connection was lost; waiting before the next attempt.
``rejected``
    the server refused the registration (id held elsewhere, bad token, throttled); waiting
    before the next attempt. A refusal is never final: one message from a server must not
    take the agent off signaling for good.
``stopping``
    the daemon is shutting down: a connection that is up stays up (peers are told ``bye``
    through it), but nothing connects again.
``closed``
    closed for good.

Events (:class:`SignalingEvent`): ``start``, ``opened``, ``open-failed``, ``lost``,
``refused``, ``retry`` (the backoff delay is over), ``stop`` (shutdown began), ``close``.

The rules, all in :data:`SIGNALING_TRANSITIONS`:

* ``retry`` is legal only in ``backoff`` and ``rejected``: in particular nothing reconnects
  while ``stopping`` or once ``closed``;
* ``stop`` and ``close`` are legal everywhere but ``closed`` (``stop`` also in ``stopping``,
  ``close`` also in ``closed``: both idempotent);
* while ``stopping``, a connection attempt already under way may still finish or fail, and a
  connection may be lost or refused: the state stays ``stopping``;
* ``closed`` accepts nothing but ``close``.
"""

from __future__ import annotations

import enum

from .fsm import StateMachine


class SignalingState(str, enum.Enum):
    """See the module documentation."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    REJECTED = "rejected"
    STOPPING = "stopping"
    CLOSED = "closed"


class SignalingEvent(str, enum.Enum):
    """See the module documentation."""

    START = "start"
    OPENED = "opened"
    OPEN_FAILED = "open-failed"
    LOST = "lost"
    REFUSED = "refused"
    RETRY = "retry"
    STOP = "stop"
    CLOSE = "close"


_S, _E = SignalingState, SignalingEvent

SIGNALING_TRANSITIONS: dict[tuple[SignalingState, SignalingEvent], SignalingState] = {
    (_S.DISCONNECTED, _E.START): _S.CONNECTING,
    (_S.CONNECTING, _E.OPENED): _S.CONNECTED,
    (_S.CONNECTING, _E.OPEN_FAILED): _S.BACKOFF,
    (_S.CONNECTED, _E.LOST): _S.BACKOFF,
    (_S.CONNECTED, _E.REFUSED): _S.REJECTED,
    (_S.BACKOFF, _E.RETRY): _S.CONNECTING,
    (_S.REJECTED, _E.RETRY): _S.CONNECTING,
    # Shutting down: what is under way may end, nothing new starts.
    (_S.STOPPING, _E.OPENED): _S.STOPPING,
    (_S.STOPPING, _E.OPEN_FAILED): _S.STOPPING,
    (_S.STOPPING, _E.LOST): _S.STOPPING,
    (_S.STOPPING, _E.REFUSED): _S.STOPPING,
    **{(state, _E.STOP): _S.STOPPING for state in _S if state != _S.CLOSED},
    **{(state, _E.CLOSE): _S.CLOSED for state in _S},
}


def signaling_machine() -> StateMachine[SignalingState, SignalingEvent]:
    """A new signaling client's machine, in ``disconnected``."""
    return StateMachine("signaling client", SIGNALING_TRANSITIONS, _S.DISCONNECTED)

