"""Agent ids: the one pattern every layer checks them against.

Kept apart from the pydantic models that use it (signaling messages, RPC parameters, settings),
so that code which only needs the rule - ``mvpctl``, plain ``re`` checks - does not pay for
building those models at import.
"""

from __future__ import annotations

import re

#: Agent ids: what an operator types, what a journal field holds. No spaces, no control chars.
AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"

_AGENT_ID = re.compile(AGENT_ID_PATTERN)


def is_agent_id(value: object) -> bool:
    """Whether ``value`` is a str that is a valid agent id."""
    return isinstance(value, str) and _AGENT_ID.match(value) is not None


__all__ = ["AGENT_ID_PATTERN", "is_agent_id"]
