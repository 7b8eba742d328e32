"""Chat mode: UTF-8 text messages."""

from __future__ import annotations

from .base import DecodeError, Transport


class ChatTransport(Transport[str]):
    """UTF-8 text. Binary messages from the peer are accepted when they are valid UTF-8;
    invalid UTF-8 is counted (``invalid-utf8``) and reported, never fatal."""

    mode = "chat"
    kind = "text"

    def decode(self, data: str | bytes) -> str:
        if isinstance(data, str):
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid-utf8", f"message is not valid UTF-8: {exc}") from None
