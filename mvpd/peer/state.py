"""The life of a peer session: its states and the record of each change."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PeerState(str, enum.Enum):
    """Life of a session: new -> connecting -> connected -> closed | failed."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (PeerState.CLOSED, PeerState.FAILED)


@dataclass(frozen=True)
class StateChange:
    """One entry of a session's history: the state entered, when (UNIX time) and why."""

    state: PeerState
    at: float
    reason: str = ""
