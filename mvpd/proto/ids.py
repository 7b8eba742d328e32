"""Agent ids: the one pattern every layer checks them against.

Kept apart from the pydantic models that use it (signaling messages, RPC parameters, settings),
so that code which only needs the rule does not pay for building those models at import.
"""

from __future__ import annotations

#: Agent ids: what an operator types, what a journal field holds. No spaces, no control chars.
AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"

__all__ = ["AGENT_ID_PATTERN"]
