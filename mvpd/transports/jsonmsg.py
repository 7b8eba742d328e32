"""JSON mode: one JSON value per message."""

from __future__ import annotations

import json
from typing import Any

from .base import DecodeError, Transport

#: Nesting deeper than this from a peer is refused (json's recursion would be costly).
MAX_JSON_DEPTH = 64


class JsonTransport(Transport[Any]):
    """One JSON value (object, array, string, number, true/false/null) per message.

    Invalid JSON or invalid UTF-8 from the peer is counted (``invalid-json``) and reported
    through the error listeners; it is never fatal.
    """

    mode = "json"
    kind = "json"

    def decode(self, data: str | bytes) -> Any:
        try:
            text = data if isinstance(data, str) else data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid-json", f"message is not valid UTF-8: {exc}") from None
        if _depth_exceeds(text, MAX_JSON_DEPTH):
            raise DecodeError("invalid-json", f"JSON nested deeper than {MAX_JSON_DEPTH}")
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DecodeError("invalid-json", f"message is not JSON: {exc}") from None


def _depth_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside JSON strings nest deeper than ``limit`` (checked before
    parsing, so a hostile peer cannot make the decoder recurse deeply)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False
