"""A pipe stream's life as a transition table (sans-I/O).

Two layers carry pipes and both follow this table: :class:`mvpd.transports.pipe.PipeTransport`
(the framed byte stream on a data channel, ``DATA``/``EOF``/``CREDIT``/``EOF-ACK``) and the
control server's pipe streams (``pipe.write``/``pipe.eof`` from the client, ``data``/``eof``
events to it).

States (:class:`PipeState`):

``opening``
    the channel is not open yet.
``open``
    data may flow both ways.
``half-closed-local``
    our side ended its direction (``EOF`` sent, ``pipe.eof`` done); the other may go on.
``half-closed-remote``
    the other side ended its direction (``EOF`` received, the peer's ``eof``); we may go on.
``closed``
    the stream ended cleanly: both directions ended.
``broken``
    the stream ended early: the channel closed mid-stream, the other side broke the protocol,
    or the far end went away. Whoever uses it must say so, never report success.

Events (:class:`PipeEvent`): ``opened``, ``eof-sent``, ``eof-received``, ``eof-ack-sent``
(our reader took everything up to the other side's ``EOF``), ``eof-ack-received`` (the other
side's reader took everything up to ours), ``channel-closed``, ``failed``.

The rules, all in :data:`PIPE_TRANSITIONS`:

* a stream is ``closed`` only once both directions ended with an ``EOF``; nothing else is a
  clean end. (mvpd writes one direction per data channel: when the reader has acknowledged
  the writer's ``EOF``, its channel closing is its own end of stream, which the I/O layer
  reports as ``eof-received``.)
* ``eof-ack-sent`` and ``eof-ack-received`` confirm one direction and leave the state as it
  is; they are legal only once that direction's ``EOF`` went through;
* ``channel-closed`` breaks a stream that is still ``opening``, ``open`` or
  ``half-closed-local``; in ``half-closed-remote`` everything up to the other side's ``EOF``
  is here already, so it changes nothing; in ``closed`` and ``broken`` nothing changes any
  more;
* ``failed`` (the other side broke the protocol, the far end went away) breaks every stream
  not yet ``closed``;
* an event where the table has none, e.g. a second ``EOF``, is a protocol violation for the
  I/O layer to report.
"""

from __future__ import annotations

import enum

from .fsm import StateMachine


class PipeState(str, enum.Enum):
    """See the module documentation."""

    OPENING = "opening"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed-local"
    HALF_CLOSED_REMOTE = "half-closed-remote"
    CLOSED = "closed"
    BROKEN = "broken"


class PipeEvent(str, enum.Enum):
    """See the module documentation."""

    OPENED = "opened"
    EOF_SENT = "eof-sent"
    EOF_RECEIVED = "eof-received"
    EOF_ACK_SENT = "eof-ack-sent"
    EOF_ACK_RECEIVED = "eof-ack-received"
    CHANNEL_CLOSED = "channel-closed"
    FAILED = "failed"


_S, _E = PipeState, PipeEvent

PIPE_TRANSITIONS: dict[tuple[PipeState, PipeEvent], PipeState] = {
    (_S.OPENING, _E.OPENED): _S.OPEN,
    (_S.OPENING, _E.CHANNEL_CLOSED): _S.BROKEN,
    (_S.OPENING, _E.FAILED): _S.BROKEN,
    (_S.OPEN, _E.EOF_SENT): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _E.EOF_RECEIVED): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _E.CHANNEL_CLOSED): _S.BROKEN,
    (_S.OPEN, _E.FAILED): _S.BROKEN,
    (_S.HALF_CLOSED_LOCAL, _E.EOF_RECEIVED): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.EOF_ACK_RECEIVED): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _E.CHANNEL_CLOSED): _S.BROKEN,
    (_S.HALF_CLOSED_LOCAL, _E.FAILED): _S.BROKEN,
    (_S.HALF_CLOSED_REMOTE, _E.EOF_SENT): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.EOF_ACK_SENT): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _E.CHANNEL_CLOSED): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _E.FAILED): _S.BROKEN,
    (_S.CLOSED, _E.EOF_ACK_SENT): _S.CLOSED,
    (_S.CLOSED, _E.EOF_ACK_RECEIVED): _S.CLOSED,
    (_S.CLOSED, _E.CHANNEL_CLOSED): _S.CLOSED,
    (_S.CLOSED, _E.FAILED): _S.CLOSED,
    (_S.BROKEN, _E.CHANNEL_CLOSED): _S.BROKEN,
    (_S.BROKEN, _E.FAILED): _S.BROKEN,
}


def eof_sent(state: PipeState) -> bool:
    """Whether our direction has ended (``EOF`` sent) in ``state``."""
    return state in (PipeState.HALF_CLOSED_LOCAL, PipeState.CLOSED)


def eof_received(state: PipeState) -> bool:
    """Whether the other side's direction has ended (``EOF`` received) in ``state``."""
    return state in (PipeState.HALF_CLOSED_REMOTE, PipeState.CLOSED)


def pipe_machine(state: PipeState = PipeState.OPENING) -> StateMachine[PipeState, PipeEvent]:
    """A pipe stream's machine, in ``state``."""
    return StateMachine("pipe stream", PIPE_TRANSITIONS, state)
