"""The life of a peer session: its states (the table is :mod:`mvpd.proto.session_states`)
and the record of each change."""

from __future__ import annotations

from dataclasses import dataclass

# PeerState is re-exported: the rest of the daemon knows it from mvpd.peer.
from ..proto.session_states import PeerState as PeerState


@dataclass(frozen=True)
class StateChange:
    """One entry of a session's history: the state entered, when (UNIX time) and why."""

    state: PeerState
    at: float
    reason: str = ""
