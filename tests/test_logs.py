"""mvpd.logs on stderr (in-process); the journal side is tested in tests/systemd."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from mvpd import logs
from mvpd.logs import FieldsAdapter, fields, log_event, redact_text, setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    setup_logging("info", journal=False, stream=out)
    yield out
    for handler in list(logs._installed):
        root.removeHandler(handler)
    logs._installed.clear()
    root.setLevel(old_level)


def test_fields_follow_the_message_on_stderr(stream: io.StringIO) -> None:
    log = logging.getLogger("mvpd.test")
    log_event(log, logging.INFO, "connected", "peer %s connected", "bob", peer="bob", mode="chat")
    line = stream.getvalue().strip()
    expected = "INFO    mvpd.test: peer bob connected  peer=bob mode=chat event=connected"
    assert line.endswith(expected)


def test_adapter_binds_fields_and_merges_per_call_fields(stream: io.StringIO) -> None:
    peer_log = FieldsAdapter(logging.getLogger("mvpd.peer"), peer="carol", mode="tun")
    peer_log.warning("dropped %d", 3, extra=fields(event="drop", count=3))
    peer_log.bind(channel="ip").info("open")
    first, second = stream.getvalue().strip().splitlines()
    assert "WARNING mvpd.peer: dropped 3  peer=carol mode=tun event=drop count=3" in first
    assert "open  peer=carol mode=tun channel=ip" in second


def test_values_with_spaces_are_quoted(stream: io.StringIO) -> None:
    log_event(logging.getLogger("t"), logging.INFO, "x", "m", reason="no route")
    assert "reason='no route'" in stream.getvalue()


def test_level_filters_and_verbose(stream: io.StringIO) -> None:
    log = logging.getLogger("mvpd.level")
    log.debug("hidden")
    assert stream.getvalue() == ""
    setup_logging("warning", verbose=True, journal=False, stream=stream)
    log.debug("shown")
    assert "DEBUG   mvpd.level: shown" in stream.getvalue()
    assert len(logging.getLogger().handlers) >= 1
    assert sum(h in logs._installed for h in logging.getLogger().handlers) == 1


def test_chatty_libraries_stay_quiet_unless_verbose(stream: io.StringIO) -> None:
    logging.getLogger("aioice.ice").info("check pair")
    assert stream.getvalue() == ""
    setup_logging("info", verbose=True, journal=False, stream=stream)
    logging.getLogger("aioice.ice").info("check pair")
    assert "check pair" in stream.getvalue()


def test_secret_fields_and_text_are_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("mvpd.secret")
    log_event(log, logging.INFO, "register", "registering with token=%s at %s", "s3cr3t",
              "wss://alice:pw123@example.org/ws?token=abc", peer="alice", token="s3cr3t",
              ice_credential="pw123")
    log.info("config %s", {"signaling_token": "s3cr3t", "credential": "pw123"})
    text = stream.getvalue()
    assert "s3cr3t" not in text and "pw123" not in text and "abc" not in text
    assert "token=***" in text and "wss://alice:***@example.org" in text
    assert "ice_credential=***" in text


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("token=abc def", "token=*** def"),
        ('{"token": "abc", "x": 1}', '{"token": "***", "x": 1}'),
        ("password: hunter2", "password: ***"),
        ("ws://host:8765/path?token=abc&x=1", "ws://host:8765/path?token=***&x=1"),
        ("turn:user:pw@host", "turn:user:pw@host"),  # not a URL with // (no userinfo form)
        ("tokens_file=/etc/x", "tokens_file=/etc/x"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redact_text(raw: str, clean: str) -> None:
    assert redact_text(raw) == clean


def test_broken_format_string_is_still_logged(stream: io.StringIO) -> None:
    logging.getLogger("mvpd.broken").info("%d items", "not a number")
    assert "%d items" in stream.getvalue()


def test_field_names_follow_journal_rules() -> None:
    assert logs.field_name("peer") == "PEER_ID"
    assert logs.field_name("caller-uid") == "CALLER_UID"
    assert logs.field_name("_hidden") == "HIDDEN"
    assert logs.field_name("2fa") == "F_2FA"


def test_syslog_prefix_when_stderr_goes_to_journald() -> None:
    formatter = logs.StderrFormatter(syslog_prefix=True)
    record = logging.LogRecord("mvpd", logging.ERROR, __file__, 1, "a\nb", (), None)
    assert formatter.format(record) == "<3>mvpd: a\n<3>b"


def test_under_systemd_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not logs.running_under_systemd()
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not logs.stderr_is_journal()
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert logs.running_under_systemd()


def test_unknown_level_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud", journal=False, stream=io.StringIO())
