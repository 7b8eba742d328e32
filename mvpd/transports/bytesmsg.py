"""Bytes mode: raw binary messages."""

from __future__ import annotations

from .base import Transport


class BytesTransport(Transport[bytes]):
    """Raw binary messages. Text messages from the peer arrive as their UTF-8 bytes."""

    mode = "bytes"
    kind = "bytes"

    def decode(self, data: str | bytes) -> bytes:
        return data.encode("utf-8") if isinstance(data, str) else data
