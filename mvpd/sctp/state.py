"""The association's states and the table of allowed transitions (RFC 9260 section 4).

As in h11, the table is data: :func:`next_state` says where a trigger leads from a state, or
``None`` when the trigger is not allowed there (the association then ignores the chunk or
refuses the call).  The association changes state only through this table.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    """RFC 9260 association states (CLOSED also after the association ended)."""

    CLOSED = "closed"
    COOKIE_WAIT = "cookie-wait"
    COOKIE_ECHOED = "cookie-echoed"
    ESTABLISHED = "established"
    SHUTDOWN_PENDING = "shutdown-pending"
    SHUTDOWN_SENT = "shutdown-sent"
    SHUTDOWN_RECEIVED = "shutdown-received"
    SHUTDOWN_ACK_SENT = "shutdown-ack-sent"


class Trigger(enum.Enum):
    """What moves the association from one state to another."""

    CONNECT = "connect"  # user: send INIT
    RECV_INIT_ACK = "recv-init-ack"
    RECV_VALID_COOKIE_ECHO = "recv-valid-cookie-echo"
    RECV_COOKIE_ACK = "recv-cookie-ack"
    SHUTDOWN = "shutdown"  # user: graceful close
    OUTSTANDING_DRAINED = "outstanding-drained"  # all our DATA acknowledged
    RECV_SHUTDOWN = "recv-shutdown"
    RECV_SHUTDOWN_ACK = "recv-shutdown-ack"
    RECV_SHUTDOWN_COMPLETE = "recv-shutdown-complete"
    END = "end"  # ABORT sent or received, retransmissions exhausted


S = State
T = Trigger

TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (S.CLOSED, T.CONNECT): S.COOKIE_WAIT,
    (S.COOKIE_WAIT, T.RECV_INIT_ACK): S.COOKIE_ECHOED,
    # A valid cookie establishes from any opening state (RFC 9260 5.1 and 5.2.4 case D).
    (S.CLOSED, T.RECV_VALID_COOKIE_ECHO): S.ESTABLISHED,
    (S.COOKIE_WAIT, T.RECV_VALID_COOKIE_ECHO): S.ESTABLISHED,
    (S.COOKIE_ECHOED, T.RECV_VALID_COOKIE_ECHO): S.ESTABLISHED,
    (S.ESTABLISHED, T.RECV_VALID_COOKIE_ECHO): S.ESTABLISHED,
    (S.COOKIE_ECHOED, T.RECV_COOKIE_ACK): S.ESTABLISHED,
    (S.ESTABLISHED, T.SHUTDOWN): S.SHUTDOWN_PENDING,
    (S.SHUTDOWN_PENDING, T.OUTSTANDING_DRAINED): S.SHUTDOWN_SENT,
    (S.SHUTDOWN_RECEIVED, T.OUTSTANDING_DRAINED): S.SHUTDOWN_ACK_SENT,
    (S.ESTABLISHED, T.RECV_SHUTDOWN): S.SHUTDOWN_RECEIVED,
    (S.SHUTDOWN_PENDING, T.RECV_SHUTDOWN): S.SHUTDOWN_RECEIVED,
    (S.SHUTDOWN_RECEIVED, T.RECV_SHUTDOWN): S.SHUTDOWN_RECEIVED,
    # Both sides closed at once: answer with SHUTDOWN ACK (RFC 9260 9.2).
    (S.SHUTDOWN_SENT, T.RECV_SHUTDOWN): S.SHUTDOWN_ACK_SENT,
    (S.SHUTDOWN_ACK_SENT, T.RECV_SHUTDOWN): S.SHUTDOWN_ACK_SENT,
    (S.SHUTDOWN_SENT, T.RECV_SHUTDOWN_ACK): S.CLOSED,
    (S.SHUTDOWN_ACK_SENT, T.RECV_SHUTDOWN_ACK): S.CLOSED,
    (S.SHUTDOWN_ACK_SENT, T.RECV_SHUTDOWN_COMPLETE): S.CLOSED,
}
for _state in State:
    TRANSITIONS[(_state, T.END)] = S.CLOSED


def next_state(state: State, trigger: Trigger) -> State | None:
    """The state ``trigger`` leads to from ``state``, or ``None`` if not allowed there."""
    return TRANSITIONS.get((state, trigger))


#: States in which the association accepts DATA from the peer.
RECEIVES_DATA = frozenset({S.ESTABLISHED, S.SHUTDOWN_PENDING, S.SHUTDOWN_SENT})
#: States in which the association sends (new or retransmitted) DATA.
SENDS_DATA = frozenset({S.ESTABLISHED, S.SHUTDOWN_PENDING, S.SHUTDOWN_RECEIVED})
#: States in which SACKs from the peer are processed.
RECEIVES_SACK = frozenset({S.ESTABLISHED, S.SHUTDOWN_PENDING, S.SHUTDOWN_SENT,
                           S.SHUTDOWN_RECEIVED})
#: States before establishment in which send() queues messages for later.
OPENING = frozenset({S.CLOSED, S.COOKIE_WAIT, S.COOKIE_ECHOED})
