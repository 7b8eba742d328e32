"""Signaling over WebSocket: the agent's client and the reference server.

``SignalingClient`` is imported lazily so that ``import mvpd.signaling.server`` (the standalone
server) does not load the client, and the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import SignalingClient
    from .server import SignalingServer, serve

__all__ = ["SignalingClient", "SignalingServer", "serve"]


def __getattr__(name: str) -> Any:
    if name == "SignalingClient":
        from .client import SignalingClient

        return SignalingClient
    if name in ("SignalingServer", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
