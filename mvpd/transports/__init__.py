"""Data-channel transports: one per data channel, chosen by mode.

``create_transport(mode)`` builds the main channel's transport for ``chat``, ``json``,
``bytes`` or ``tun``; pipes (``mvpctl pipe``) have channels of their own, one per direction,
each with a :class:`PipeTransport`. Nothing here imports
aiortc: transports accept any object shaped like an ``RTCDataChannel``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..proto.errors import TransportError
from ..proto.modes import MAX_MESSAGE_SIZE, mode_list
from .base import (
    ChannelOptions,
    DataChannelLike,
    DecodeError,
    Transport,
    TransportCounters,
    TransportErrorEvent,
)
from .bytesmsg import BytesTransport
from .chat import ChatTransport
from .jsonmsg import JsonTransport
from .pipe import PIPE_LABEL, PipeTransport
from .tun import TunTransport

__all__ = [
    "MAX_MESSAGE_SIZE",
    "PIPE_LABEL",
    "TRANSPORTS",
    "BytesTransport",
    "ChannelOptions",
    "ChatTransport",
    "DataChannelLike",
    "DecodeError",
    "JsonTransport",
    "PipeTransport",
    "Transport",
    "TransportCounters",
    "TransportErrorEvent",
    "TunTransport",
    "create_transport",
    "transport_class",
]

#: Mode name -> transport factory. A tun transport moves packets once the daemon's tunnel
#: (``mvpd.tun.tunnel``) binds it to the shared TUN device.
TRANSPORTS: dict[str, Callable[..., Transport[Any]]] = {
    "chat": ChatTransport,
    "json": JsonTransport,
    "bytes": BytesTransport,
    "tun": TunTransport,
}


def transport_class(mode: str) -> Callable[..., Transport[Any]]:
    """The factory for ``mode``; :class:`TransportError` naming the known modes if none."""
    factory = TRANSPORTS.get(mode)
    if factory is None:
        raise TransportError(f"unknown transport mode {mode!r}; known modes: {mode_list()}")
    return factory


def create_transport(mode: str, **kwargs: Any) -> Transport[Any]:
    """A new, unattached transport for ``mode`` (``chat``, ``json``, ``bytes`` or ``tun``)."""
    return transport_class(mode)(**kwargs)
