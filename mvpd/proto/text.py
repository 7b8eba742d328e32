"""Text from the network made safe to show: one line, no terminal control.

Peer ids are validated, but much of what reaches a log line or a terminal is chosen by someone
else: bye reasons, signaling-server error messages, SDP and candidate text, exception texts
quoting them, chat messages. Written as they are, a newline forges a log line (or a chat line
in another peer's name) and an escape sequence drives the operator's terminal. The daemon's
log handlers (:mod:`mvpd.logs`) and ``mvpctl``'s output pass such text through
:func:`neutralise`; ``mvpctl recv`` keeps line breaks and tabs of a peer's text
(:func:`neutralise` with ``keep``) since a message may be several lines of the same peer.
"""

from __future__ import annotations

import re

#: Characters escaped besides categories Cc (controls), Zl and Zp (line and paragraph
#: separators): the bidirectional overrides and isolates, which can reorder what a terminal
#: shows.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI_CONTROLS}]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def neutralise(text: str, limit: int | None = None, *, keep: str = "") -> str:
    """``text`` made safe for one line of a log or a terminal: control characters, line
    separators and bidirectional overrides escaped (``\\n``, ``\\x1b``, ``\\u202e``), and at
    most ``limit`` characters kept. Printable text, including non-ASCII letters, is left
    alone; so are the characters in ``keep`` (e.g. ``"\\n\\t"``)."""
    if _UNSAFE.search(text):
        # Backslashes are doubled only when something is escaped, so that ordinary paths and
        # regexes read as before while an escape can never be faked by the text itself.
        text = _UNSAFE.sub(
            lambda m: m.group() if m.group() in keep else _escape(m.group()),
            text.replace("\\", "\\\\"),
        )
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text
