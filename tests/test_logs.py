"""mvpd.logs on stderr (in-process); the journal side is tested in tests/systemd."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from typing import Any

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


# --- nothing from the network forges a line ----------------------------------------------------

HOSTILE = "x\nFAKE LINE\x1b[31m"


def test_a_hostile_bye_reason_stays_on_one_line_on_stderr(stream: io.StringIO) -> None:
    log = logging.getLogger("mvpd.peer")
    log_event(log, logging.INFO, "peer-closed", "peer %s: closed (%s)", "bob",
              f"bob said bye: {HOSTILE}", peer="bob", reason=HOSTILE)
    text = stream.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text
    line = text.rstrip("\n")
    assert line.endswith(
        "mvpd.peer: peer bob: closed (bob said bye: x\\nFAKE LINE\\x1b[31m)"
        "  peer=bob event=peer-closed reason='x\\nFAKE LINE\\x1b[31m'"
    )


def test_field_values_without_spaces_are_escaped_too(stream: io.StringIO) -> None:
    log_event(logging.getLogger("t"), logging.INFO, "x", "m", about="a\x1b]0;owned\x07")
    text = stream.getvalue()
    assert "\x1b" not in text and "\x07" not in text and text.count("\n") == 1


def test_exception_text_cannot_start_a_line(stream: io.StringIO) -> None:
    try:
        raise ValueError(f"bad sdp {HOSTILE}")
    except ValueError:
        logging.getLogger("mvpd.peer").exception("cannot handle offer")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("mvpd.peer: cannot handle offer")
    assert all(line.startswith("  | ") for line in lines[1:])
    assert "\x1b" not in stream.getvalue()
    assert not any(line.startswith("FAKE") for line in lines)


def test_syslog_prefix_when_stderr_goes_to_journald_keeps_one_line_per_record() -> None:
    formatter = logs.StderrFormatter(syslog_prefix=True)
    handler = logging.StreamHandler(io.StringIO())
    record = logging.LogRecord("mvpd", logging.ERROR, __file__, 1, "%s", (HOSTILE,), None)
    logs.RedactSecrets().filter(record)
    handler.setFormatter(formatter)
    assert formatter.format(record) == "<3>mvpd: x\\nFAKE LINE\\x1b[31m"


class FakeJournal:
    """Stands in for systemd.journal: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: str, **fields: Any) -> None:
        self.sent.append({"MESSAGE": message, **fields})


def test_the_journal_gets_the_same_neutralised_message_and_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = FakeJournal()
    monkeypatch.setattr(logs, "_sd_journal", journal)
    root = logging.getLogger()
    old_level = root.level
    setup_logging("info", journal=True)
    try:
        log_event(logging.getLogger("mvpd.peer"), logging.INFO, "peer-closed",
                  "peer %s: closed (%s)", "bob", f"bob said bye: {HOSTILE}", peer="bob",
                  reason=HOSTILE)
    finally:
        for handler in list(logs._installed):
            root.removeHandler(handler)
        logs._installed.clear()
        root.setLevel(old_level)
    [entry] = journal.sent
    assert entry["MESSAGE"] == "peer bob: closed (bob said bye: x\\nFAKE LINE\\x1b[31m)"
    assert entry["REASON"] == "x\\nFAKE LINE\\x1b[31m"
    assert (entry["PEER_ID"], entry["EVENT"]) == ("bob", "peer-closed")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("plain ascii, é ✓ and C:\\path", "plain ascii, é ✓ and C:\\path"),
        ("a\r\nb\tc", "a\\r\\nb\\tc"),
        ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),
        ("line\u2028sep", "line\\u2028sep"),
        ("rtl \u202eevil", "rtl \\u202eevil"),
        # a backslash cannot fake an escape once something is escaped
        ("\\n\n", "\\\\n\\n"),
    ],
)
def test_neutralise(raw: str, clean: str) -> None:
    assert logs.neutralise(raw) == clean


def test_neutralise_caps_length() -> None:
    text = logs.neutralise("a" * 5000, limit=100)
    assert text == "a" * 100 + "... (4900 more characters)"


# --- RateLimitedLog ------------------------------------------------------------------------------


def test_rate_limited_log_first_then_one_summary_per_interval(stream: io.StringIO) -> None:
    now = [0.0]
    limited = logs.RateLimitedLog(logging.getLogger("mvpd.drop"), 10.0, clock=lambda: now[0])
    for i in range(5529):
        now[0] = i * 0.001  # 5.5 s of drops
        limited.warning("dropped a %s", "candidate")
    assert stream.getvalue().count("\n") == 1
    now[0] = 10.5
    limited.warning("dropped a %s", "offer")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("mvpd.drop: dropped a candidate")
    assert lines[1].endswith("dropped a candidate (and 5528 more like it in the last 10 s)")
    assert lines[2].endswith("dropped a offer")


def test_rate_limited_log_reports_a_burst_that_stops_inside_an_event_loop(
    stream: io.StringIO,
) -> None:
    async def main() -> None:
        limited = logs.RateLimitedLog(logging.getLogger("mvpd.drop"), 0.2)
        for _ in range(100):
            limited.warning("dropped one")
        await asyncio.sleep(0.4)

    asyncio.run(main())
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].endswith("dropped one (and 99 more like it in the last 0 s)")


def test_peer_inbox_overflow_logs_once_and_still_counts(stream: io.StringIO) -> None:
    """A peer flooding signaling messages gets one warning and a summary, not one each."""
    from mvpd.config import AgentSettings
    from mvpd.peer import PeerSession
    from mvpd.proto.signaling import Candidate, RoutedMessage

    async def main() -> int:
        async def send_signal(message: RoutedMessage) -> None:
            return None

        settings = AgentSettings(agent_id="alice", _env_file=None)
        session = PeerSession(settings, "bob", send_signal=send_signal)
        session._inbox_drop_log.interval = 1.0
        candidate = Candidate(sender="bob", to="alice", candidate=None)
        for _ in range(6000):  # synchronous: the worker gets no chance to drain
            session.deliver(candidate)
        dropped = session.inbox_dropped
        await asyncio.sleep(1.3)
        await session.close("test over")
        return dropped

    dropped = asyncio.run(main())
    assert dropped > 5000
    drops = [line for line in stream.getvalue().splitlines() if "too many signaling" in line]
    assert len(drops) == 2
    assert drops[1].endswith(f"dropped a candidate (and {dropped - 1} more like it in the "
                             "last 1 s)  peer=bob")
