"""Shared checks for transition tables: every legal transition, every illegal one refused."""

from __future__ import annotations

import enum
from typing import Any

import pytest

from mvpd.proto.errors import IllegalTransition
from mvpd.proto.fsm import StateMachine


def check_every_pair(table: Any, states: type[enum.Enum], events: type[enum.Enum]) -> int:
    """Drive a machine from every state with every event; return the legal pairs' count."""
    legal = 0
    for state in states:
        for event in events:
            machine: StateMachine[Any, Any] = StateMachine("test", table, state)
            if (state, event) in table:
                assert machine.accepts(event)
                assert machine.handle(event) is table[state, event]
                legal += 1
            else:
                assert not machine.accepts(event)
                with pytest.raises(IllegalTransition, match=f"'{event.value}'"):
                    machine.handle(event)
                assert machine.state is state
    return legal
