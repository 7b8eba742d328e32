"""The data-channel modes, defined once: names, what each carries, the message size limit,
and how a message of one kind is put on a channel of another.

Sans-I/O: config, transports, the RPC layer and ``mvpctl`` all take their mode names and
rules from here.

* ``chat``: UTF-8 text messages; ``json``: one JSON value per text message; ``bytes``: binary
  messages. These three are *message modes*: what the peer sends waits in the receiving
  daemon's inbox for ``mvpctl recv``, as a message of kind ``text``, ``json`` or ``bytes``.
* ``tun``: IP packets between TUN devices; never in an inbox.
* ``pipe``: byte streams (``mvpctl pipe``) on channels of their own, next to any main mode;
  not a mode a connection is made in.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from .errors import PeerError, TransportError

#: The mode of a connection's main channel.
Mode = Literal["chat", "json", "bytes", "tun"]
#: Every mode, in the order help texts list them.
MODES: tuple[Mode, ...] = get_args(Mode)
#: The kind of one message in an inbox, on the RPC wire and in ``mvpctl recv --json``.
MessageKind = Literal["text", "json", "bytes"]
#: A message mode's kind of message.
KIND_OF_MODE: dict[str, MessageKind] = {"chat": "text", "json": "json", "bytes": "bytes"}
#: The modes whose messages go to the inbox.
MESSAGE_MODES: frozenset[str] = frozenset(KIND_OF_MODE)
#: The label-less kind of the pipe channels (see :mod:`mvpd.transports.pipe`).
PIPE = "pipe"

#: The largest message we send and accept on any channel. We advertise it as
#: ``a=max-message-size`` (aiortc does, as Chromium does); a peer's larger message is refused.
MAX_MESSAGE_SIZE = 262144


def mode_list() -> str:
    """``chat, json, bytes or tun``: for help texts and errors."""
    return ", ".join(MODES[:-1]) + f" or {MODES[-1]}"


def is_mode(name: str) -> bool:
    """Whether ``name`` is a mode a connection can be made in."""
    return name in MODES


def wire_size(data: str | bytes) -> int:
    """Bytes a message occupies on the channel (an empty one travels as one byte)."""
    if isinstance(data, str):
        size = len(data) if data.isascii() else len(data.encode("utf-8"))
    else:
        size = len(data)
    return max(size, 1)


def encode_json(value: Any) -> str:
    """Compact JSON text for one value; :class:`TransportError` if it is not JSON-able."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TransportError(f"value cannot be sent as JSON: {exc}") from None


def encode_message(mode: str, kind: MessageKind, value: Any) -> str | bytes:
    """What goes on a ``mode`` channel for a message of ``kind``: text for chat and json
    channels, bytes for bytes channels. :class:`PeerError` when the channel cannot carry it
    (bytes that are not UTF-8 on a text channel, non-JSON text on a json channel, any
    message on a tun channel)."""
    if mode not in MESSAGE_MODES:
        raise PeerError(f"the connection is in {mode} mode, which carries no messages")
    if kind == "json":
        text = encode_json(value)
    elif kind == "text":
        text = str(value)
    else:
        data = bytes(value)
        if mode == "bytes":
            return data
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PeerError(
                f"the connection is in {mode} mode, which carries text; this data is not "
                "UTF-8: connect with --mode bytes"
            ) from None
    if mode == "bytes":
        return text.encode("utf-8")
    if mode == "json" and kind != "json":
        try:
            json.loads(text)
        except ValueError:
            raise PeerError(
                "the connection is in json mode and this is not JSON; use --json or connect "
                "with --mode chat"
            ) from None
    return text
