"""mvpd: the mvp-agent daemon, and the library API of the original design.

``from mvpd import load_settings, SignalingClient, AgentCore, create_transport`` works as
``from agent import ...`` did. Names are imported lazily, so ``import mvpd.proto`` (what
``mvpctl`` uses) does not load aiortc, websockets or pyroute2.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AgentSettings": "mvpd.config",
    "load_settings": "mvpd.config",
    "SignalingClient": "mvpd.signaling.client",
    "SignalingServer": "mvpd.signaling.server",
    "AgentCore": "mvpd.core",
    "PeerSession": "mvpd.peer",
    "Transport": "mvpd.transports",
    "ChatTransport": "mvpd.transports",
    "JsonTransport": "mvpd.transports",
    "BytesTransport": "mvpd.transports",
    "TunTransport": "mvpd.transports",
    "create_transport": "mvpd.transports",
    "MvpError": "mvpd.proto.errors",
    "ConfigError": "mvpd.proto.errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mvpd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
