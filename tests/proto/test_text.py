"""mvpd.proto.text: what a peer or a server wrote, made safe to show."""

from __future__ import annotations

import pytest

from mvpd.proto.text import neutralise


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, déjà vu", "plain text, déjà vu"),
        ("a\nb", "a\\nb"),
        ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
        ("abc\u202edcba", "abc\\u202edcba"),
        ("C:\\path\n", "C:\\\\path\\n"),  # an escape cannot be faked by the text itself
        ("C:\\path", "C:\\path"),  # nothing escaped: backslashes read as they are
    ],
)
def test_neutralise(raw: str, shown: str) -> None:
    assert neutralise(raw) == shown


def test_keep_leaves_the_named_characters() -> None:
    assert neutralise("a\nb\tc\x1b", keep="\n\t") == "a\nb\tc\\x1b"


def test_limit_says_what_was_cut() -> None:
    assert neutralise("a" * 10, 4) == "aaaa... (6 more characters)"
    assert neutralise("a" * 10) == "a" * 10
