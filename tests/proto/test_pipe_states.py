"""The pipe stream's transition table."""

from __future__ import annotations

from mvpd.proto.fsm import legal_events
from mvpd.proto.pipe_states import (
    PIPE_TRANSITIONS,
    PipeEvent,
    PipeState,
    eof_received,
    eof_sent,
    pipe_machine,
)
from tests.proto.fsm_checks import check_every_pair

S, E = PipeState, PipeEvent


def test_every_transition_legal_or_refused() -> None:
    assert check_every_pair(PIPE_TRANSITIONS, S, E) == len(PIPE_TRANSITIONS)


def test_closed_only_when_both_directions_ended() -> None:
    into_closed = {k for k, t in PIPE_TRANSITIONS.items() if t is S.CLOSED and k[0] is not S.CLOSED}
    assert into_closed == {(S.HALF_CLOSED_LOCAL, E.EOF_RECEIVED),
                           (S.HALF_CLOSED_REMOTE, E.EOF_SENT)}
    for order in ((E.EOF_SENT, E.EOF_RECEIVED), (E.EOF_RECEIVED, E.EOF_SENT)):
        machine = pipe_machine()
        machine.handle(E.OPENED)
        assert [machine.handle(e) for e in order][-1] is S.CLOSED


def test_a_channel_closing_mid_stream_breaks_it_but_not_after_the_remote_eof() -> None:
    for state in (S.OPENING, S.OPEN, S.HALF_CLOSED_LOCAL):
        assert PIPE_TRANSITIONS[state, E.CHANNEL_CLOSED] is S.BROKEN
    assert PIPE_TRANSITIONS[S.HALF_CLOSED_REMOTE, E.CHANNEL_CLOSED] is S.HALF_CLOSED_REMOTE


def test_acks_confirm_a_direction_that_ended_and_change_nothing() -> None:
    for (state, event), target in PIPE_TRANSITIONS.items():
        if event is E.EOF_ACK_SENT:
            assert eof_received(state) and target is state
        if event is E.EOF_ACK_RECEIVED:
            assert eof_sent(state) and target is state


def test_a_second_eof_and_anything_after_broken_are_refused() -> None:
    assert E.EOF_SENT not in legal_events(PIPE_TRANSITIONS, S.HALF_CLOSED_LOCAL)
    assert E.EOF_RECEIVED not in legal_events(PIPE_TRANSITIONS, S.HALF_CLOSED_REMOTE)
    assert set(legal_events(PIPE_TRANSITIONS, S.BROKEN)) == {E.CHANNEL_CLOSED, E.FAILED}
