"""The peer session's transition table."""

from __future__ import annotations

import pytest

from mvpd.proto.errors import IllegalTransition
from mvpd.proto.fsm import legal_events
from mvpd.proto.session_states import (
    SESSION_TRANSITIONS,
    PeerState,
    SessionEvent,
    session_machine,
)
from tests.proto.fsm_checks import check_every_pair

S, E = PeerState, SessionEvent


def test_every_transition_legal_or_refused() -> None:
    assert check_every_pair(SESSION_TRANSITIONS, S, E) == len(SESSION_TRANSITIONS)


def test_final_states_accept_nothing() -> None:
    for state in (S.CLOSED, S.FAILED):
        assert state.is_final
        assert legal_events(SESSION_TRANSITIONS, state) == []


def test_only_an_offer_starts_and_only_an_open_channel_connects() -> None:
    into_connecting = {(s, e) for (s, e), t in SESSION_TRANSITIONS.items()
                       if t is S.CONNECTING and s is not S.CONNECTING}
    assert into_connecting == {(S.NEW, E.OFFER_SENT), (S.NEW, E.OFFER_RECEIVED)}
    into_connected = [k for k, t in SESSION_TRANSITIONS.items() if t is S.CONNECTED]
    assert into_connected == [(S.CONNECTING, E.CHANNEL_OPEN)]


@pytest.mark.parametrize("state", [S.NEW, S.CONNECTING, S.CONNECTED])
def test_every_live_state_can_end_both_ways(state: PeerState) -> None:
    for event, final in ((E.BYE, S.CLOSED), (E.CLOSE_REQUESTED, S.CLOSED),
                         (E.TIMEOUT, S.FAILED), (E.ERROR, S.FAILED)):
        assert SESSION_TRANSITIONS[state, event] is final


def test_an_offerers_life_with_glare_and_a_bye() -> None:
    machine = session_machine()
    seen = [machine.handle(e) for e in (E.OFFER_SENT, E.GLARE_YIELD, E.OFFER_RECEIVED,
                                        E.CHANNEL_OPEN, E.BYE)]
    assert seen == [S.CONNECTING, S.CONNECTING, S.CONNECTING, S.CONNECTED, S.CLOSED]
    with pytest.raises(IllegalTransition):
        machine.handle(E.CHANNEL_OPEN)


def test_a_connected_session_cannot_take_an_offer_or_answer() -> None:
    machine = session_machine(S.CONNECTED)
    for event in (E.OFFER_SENT, E.OFFER_RECEIVED, E.ANSWER_RECEIVED, E.GLARE_YIELD):
        assert not machine.accepts(event)
