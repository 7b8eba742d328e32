"""The signaling client's transition table."""

from __future__ import annotations

from mvpd.proto.fsm import legal_events
from mvpd.proto.signaling_states import (
    SIGNALING_TRANSITIONS,
    SignalingEvent,
    SignalingState,
    signaling_machine,
)
from tests.proto.fsm_checks import check_every_pair

S, E = SignalingState, SignalingEvent


def test_every_transition_legal_or_refused() -> None:
    assert check_every_pair(SIGNALING_TRANSITIONS, S, E) == len(SIGNALING_TRANSITIONS)


def test_nothing_reconnects_while_stopping_or_closed() -> None:
    for state in S:
        may_retry = (state, E.RETRY) in SIGNALING_TRANSITIONS
        assert may_retry == (state in (S.BACKOFF, S.REJECTED)), state
    assert E.START not in legal_events(SIGNALING_TRANSITIONS, S.STOPPING)
    assert legal_events(SIGNALING_TRANSITIONS, S.CLOSED) == [E.CLOSE]


def test_what_is_under_way_may_end_while_stopping() -> None:
    for event in (E.OPENED, E.OPEN_FAILED, E.LOST, E.REFUSED, E.STOP):
        assert SIGNALING_TRANSITIONS[S.STOPPING, event] is S.STOPPING


def test_a_refusal_is_never_final() -> None:
    machine = signaling_machine()
    for event in (E.START, E.OPENED, E.REFUSED, E.RETRY, E.OPENED):
        machine.handle(event)
    assert machine.state is S.CONNECTED


def test_a_life() -> None:
    machine = signaling_machine()
    assert machine.state is S.DISCONNECTED
    seen = [machine.handle(e) for e in (E.START, E.OPEN_FAILED, E.RETRY, E.OPENED, E.LOST,
                                        E.STOP, E.CLOSE, E.CLOSE)]
    assert seen == [S.CONNECTING, S.BACKOFF, S.CONNECTING, S.CONNECTED, S.BACKOFF,
                    S.STOPPING, S.CLOSED, S.CLOSED]
