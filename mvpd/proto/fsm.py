"""Transition tables, the shape every state machine in :mod:`mvpd.proto` shares.

A machine is a set of states, a set of events and one table ``{(state, event): next state}``;
anything not in the table is illegal. Writing the table out (instead of ``if`` chains and
boolean flags spread over the I/O code) keeps every rule in one place where it can be read
and tested exhaustively, the way h11 does it.

:class:`StateMachine` holds the current state and applies events: a legal one moves it (the
table may map a state to itself: a legal event that changes nothing), an illegal one raises
:class:`~mvpd.proto.errors.IllegalTransition` and leaves the state as it was. The I/O layers
ask the machine instead of keeping flags of their own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

from .errors import IllegalTransition

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)

#: The table type: (state, event) -> next state.
Table = Mapping[tuple[S, E], S]


class StateMachine(Generic[S, E]):
    """The current state of one machine described by ``table``, starting at ``initial``."""

    def __init__(self, name: str, table: Table[S, E], initial: S) -> None:
        self.name = name
        self.table = table
        self.state = initial

    def accepts(self, event: E) -> bool:
        """Whether ``event`` is legal in the current state."""
        return (self.state, event) in self.table

    def next_state(self, event: E) -> S:
        """Where ``event`` would take the machine; :class:`IllegalTransition` if nowhere."""
        try:
            return self.table[self.state, event]
        except KeyError:
            raise IllegalTransition(
                f"{self.name}: event {event.value!r} is not allowed in state "
                f"{self.state.value!r}"
            ) from None

    def handle(self, event: E) -> S:
        """Apply ``event`` and return the new state (raising, unchanged, if illegal)."""
        self.state = self.next_state(event)
        return self.state


def legal_events(table: Table[S, E], state: S) -> list[E]:
    """The events ``state`` accepts, in table order (for messages and tests)."""
    return [event for (source, event) in table if source == state]
