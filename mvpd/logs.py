"""Logging for mvpd: journald with structured fields under systemd, readable stderr otherwise.

Structured fields travel on a log record as ``record.mvp_fields`` (journal names, upper-case):
``PEER_ID``, ``MODE``, ``EVENT`` and whatever else a call adds. Attach them with
:func:`log_event`, with ``extra=fields(...)``, or with a :class:`FieldsAdapter` bound to a peer::

    log_event(log, logging.INFO, "connected", "peer %s connected", "bob", peer="bob", mode="chat")
    peer_log = FieldsAdapter(log, peer="bob", mode="tun")
    peer_log.warning("dropped %d packets", 3, extra=fields(event="drop", count=3))

In the journal, ``journalctl -u mvpd PEER_ID=bob`` then finds a peer's story. On stderr the
fields follow the message: ``... peer bob connected  peer=bob mode=chat event=connected``.

Secrets never reach a handler: :class:`RedactSecrets` (installed by :func:`setup_logging` on
every handler) masks fields named like secrets and ``token=...``-style text in messages.

Nothing from the network can forge a log line: the same filter escapes control characters
(newlines, escape sequences, ...) in every message and string field, a newline becoming the
two characters ``\\n`` and ESC ``\\x1b`` (see :func:`neutralise`), and caps their length; a
traceback keeps its lines but each one is indented, so none can pass for a record of its own.

A message that may repeat many times a second (drops, floods) goes through a
:class:`RateLimitedLog`: the first one is logged, then one summary per interval with the count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

from .proto.text import neutralise as neutralise_text

try:  # systemd-python is optional; without it the journal still gets stderr (with levels).
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - depends on the installation
    _sd_journal = None

FIELDS_ATTR = "mvp_fields"
#: Keyword names with a fixed journal field name; every other keyword is upper-cased.
FIELD_ALIASES: Mapping[str, str] = {"peer": "PEER_ID", "peer_id": "PEER_ID", "mode": "MODE",
                                    "event": "EVENT"}
#: Field names (journal spelling) whose values are always replaced by ``***``.
SECRET_FIELDS = frozenset({
    "TOKEN", "SIGNALING_TOKEN", "CREDENTIAL", "ICE_CREDENTIAL", "PASSWORD", "SECRET",
    "AUTHORIZATION",
})
REDACTED = "***"
SYSLOG_IDENTIFIER = "mvpd"
#: Chatty libraries kept at WARNING unless verbose logging is asked for.
QUIET_LOGGERS = ("aioice", "aiortc", "websockets", "pyroute2")

_SECRET_WORDS = r"(?:signaling_token|ice_credential|credential|token|password|passwd|secret)"
_SECRET_TEXT = re.compile(
    rf"(?i)(?P<key>\b{_SECRET_WORDS}\b[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"'&,;}}\]]+)"
)
_URL_PASSWORD = re.compile(r"(?P<key>\b[a-z][a-z0-9+.-]*://[^\s/:@]*:)(?P<value>[^\s/@]+)(?=@)")
_FIELD_NAME_BAD = re.compile(r"[^A-Z0-9_]")

#: Longest message and longest string field kept in a record (the rest is cut, and the cut said).
MAX_MESSAGE_CHARS = 4096
MAX_FIELD_CHARS = 1024
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def field_name(key: str) -> str:
    """The journal field name for a keyword: ``peer`` -> ``PEER_ID``, ``caller-uid`` ->
    ``CALLER_UID``. Journal names are upper-case letters, digits and ``_`` and must not start
    with ``_`` or a digit."""
    if key in FIELD_ALIASES:
        return FIELD_ALIASES[key]
    name = _FIELD_NAME_BAD.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:64]


def fields(*, peer: str | None = None, mode: str | None = None, event: str | None = None,
           **more: Any) -> dict[str, Any]:
    """``extra=`` for a logging call carrying structured fields (None values are left out)."""
    values: dict[str, Any] = {"peer": peer, "mode": mode, "event": event, **more}
    return {FIELDS_ATTR: {field_name(k): v for k, v in values.items() if v is not None}}


def log_event(
    logger: logging.Logger | logging.LoggerAdapter[Any],
    level: int,
    event: str,
    msg: str,
    *args: object,
    peer: str | None = None,
    mode: str | None = None,
    exc_info: bool = False,
    **more: Any,
) -> None:
    """Log ``msg % args`` with EVENT=``event`` (and PEER_ID, MODE and ``more`` when given)."""
    logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2,
               extra=fields(peer=peer, mode=mode, event=event, **more))


class FieldsAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that adds fixed fields (e.g. one peer's id and mode) to every record; fields
    given per call with ``extra=fields(...)`` are merged over them."""

    def __init__(self, logger: logging.Logger, **bound: Any) -> None:
        super().__init__(logger, fields(**bound)[FIELDS_ATTR])

    def bind(self, **more: Any) -> FieldsAdapter:
        """A new adapter with more fields bound."""
        adapter = FieldsAdapter(self.logger)
        adapter.extra = {**(self.extra or {}), **fields(**more)[FIELDS_ATTR]}
        return adapter

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra[FIELDS_ATTR] = {**(self.extra or {}), **extra.get(FIELDS_ATTR, {})}
        kwargs["extra"] = extra
        return msg, kwargs


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record (empty when it has none)."""
    value = getattr(record, FIELDS_ATTR, None)
    return dict(value) if isinstance(value, Mapping) else {}


def redact_text(text: str) -> str:
    """``token=abc`` -> ``token=***``; ``wss://user:pw@host`` -> ``wss://user:***@host``."""
    text = _SECRET_TEXT.sub(lambda m: m["key"] + REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m["key"] + REDACTED, text)


class RedactSecrets(logging.Filter):
    """Makes a record safe before any handler sees it: secrets masked (secret-named fields,
    and secret-looking ``key=value`` text in the message, after %-formatting, so arguments
    are covered), and the message and string fields neutralised (:func:`neutralise`): one
    line each, whatever a peer or a server put in them."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = record_fields(record)
        if values:
            setattr(record, FIELDS_ATTR, {
                k: (REDACTED if k in SECRET_FIELDS else _neutralise_value(_redact_value(v)))
                for k, v in values.items()
            })
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = f"{record.msg!r} % {record.args!r}"
        cleaned = neutralise(redact_text(message))
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, ()
        return True


class RateLimitedLog:
    """Logs the first of a run of like messages at once, then at most one summary per
    ``interval`` seconds counting the ones held back: ``... (and 5528 more like it in the
    last 10 s)``. The summary comes with the next message after the interval, or, inside an
    event loop, by a timer at the end of the interval, so a burst that stops is still
    reported. Keep one per place and subject (e.g. per peer session)."""

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._window_start: float | None = None
        #: Messages held back in the current interval, and the last of them.
        self.suppressed = 0
        self._last: tuple[int, str, tuple[object, ...], dict[str, Any]] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def warning(self, msg: str, *args: object, **kwargs: Any) -> None:
        """:meth:`log` at WARNING."""
        kwargs.setdefault("stacklevel", 3)  # the caller's line, not this module's
        self.log(logging.WARNING, msg, *args, **kwargs)

    def log(self, level: int, msg: str, *args: object, **kwargs: Any) -> None:
        """Log ``msg % args`` now, or count it for the next summary."""
        kwargs.setdefault("stacklevel", 2)
        now = self._clock()
        if self._window_start is not None and now - self._window_start < self.interval:
            self.suppressed += 1
            self._last = (level, msg, args, kwargs)
            self._arm_timer(self._window_start + self.interval - now)
            return
        self.flush()
        self._window_start = now
        self.logger.log(level, msg, *args, **kwargs)

    def flush(self) -> None:
        """Log the summary of what was held back, if anything was."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.suppressed or self._last is None:
            return
        level, msg, args, kwargs = self._last
        count, self.suppressed, self._last = self.suppressed, 0, None
        self._window_start = self._clock()
        self.logger.log(level, msg + " (and %d more like it in the last %.0f s)",
                        *args, count, self.interval, **kwargs)

    def _arm_timer(self, delay: float) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop: the summary comes with the next message
        self._timer = loop.call_later(max(0.0, delay), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()


def _redact_value(value: Any) -> Any:
    return redact_text(value) if isinstance(value, str) else value


def neutralise(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` made safe for one log line (see :func:`mvpd.proto.text.neutralise`), at most
    ``limit`` characters."""
    return neutralise_text(text, limit)


def _neutralise_value(value: Any) -> Any:
    return neutralise(value, MAX_FIELD_CHARS) if isinstance(value, str) else value


class SafeFormatter(logging.Formatter):
    """A formatter whose tracebacks and stacks are indented continuation lines with control
    characters escaped (the message itself was neutralised by :class:`RedactSecrets`)."""

    def format(self, record: logging.LogRecord) -> str:
        # logging caches the traceback text on the record; another handler's formatter may
        # have put its own, unescaped one there.
        cached, record.exc_text = record.exc_text, None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatException(self, ei: Any) -> str:
        return _indent_block(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent_block(super().formatStack(stack_info))


class StderrFormatter(SafeFormatter):
    """``TIME LEVEL logger: message  peer=bob event=connected``.

    With ``syslog_prefix`` (stderr captured by journald without systemd-python) the line starts
    with ``<N>`` so journald keeps the priority, and the time is left to journald."""

    def __init__(self, *, syslog_prefix: bool = False) -> None:
        fmt = "%(name)s: %(message)s" if syslog_prefix else \
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        super().__init__(fmt, datefmt="%Y-%m-%d %H:%M:%S")
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        values = record_fields(record)
        if values:
            text += "  " + " ".join(
                f"{_stderr_key(k)}={_stderr_value(v)}" for k, v in values.items()
            )
        if self.syslog_prefix:
            prefix = f"<{priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.splitlines())
        return text


def _stderr_key(name: str) -> str:
    return "peer" if name == "PEER_ID" else name.lower()


def _stderr_value(value: Any) -> str:
    text = neutralise(str(value), MAX_FIELD_CHARS)
    if not text or any(c.isspace() or c in "\"'=" or not c.isprintable() for c in text):
        return "'" + text.replace("'", "\\'") + "'"
    return text


def _indent_block(text: str) -> str:
    """A traceback or stack as continuation lines: control characters escaped in each line and
    every line indented, so text quoted in an exception cannot start a line of its own."""
    return "\n".join("  | " + neutralise(line) for line in text.splitlines())


def priority(levelno: int) -> int:
    """syslog priority for a logging level (debug 7 ... critical 2)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalHandler(logging.Handler):
    """Sends records to journald with MESSAGE, PRIORITY, LOGGER, CODE_* and the record's
    structured fields, nothing else (systemd-python's own handler would also send every record
    attribute, including the raw arguments)."""

    def __init__(self, level: int = logging.NOTSET, identifier: str = SYSLOG_IDENTIFIER) -> None:
        super().__init__(level)
        if _sd_journal is None:
            raise RuntimeError("systemd-python is not installed")
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            extra: dict[str, Any] = {}
            for key, value in record_fields(record).items():
                extra[key] = value if isinstance(value, bytes | str) else str(value)
            if record.exc_info and record.exc_info[1] is not None:
                extra.setdefault("EXCEPTION", type(record.exc_info[1]).__name__)
            assert _sd_journal is not None
            _sd_journal.send(
                message,
                PRIORITY=str(priority(record.levelno)),
                SYSLOG_IDENTIFIER=self.identifier,
                LOGGER=record.name,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **extra,
            )
        except Exception:
            self.handleError(record)


def journal_available() -> bool:
    """Whether systemd-python's journal module could be imported."""
    return _sd_journal is not None


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """Whether stderr is connected to journald (``JOURNAL_STREAM`` names its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        dev, ino = (int(part) for part in value.split(":", 1))
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def running_under_systemd() -> bool:
    """Started by systemd as a service: stderr goes to the journal, or ``INVOCATION_ID`` is
    set (which systemd sets for every unit it runs)."""
    return stderr_is_journal() or bool(os.environ.get("INVOCATION_ID"))


_installed: list[logging.Handler] = []


def setup_logging(
    level: str | int = "info",
    *,
    verbose: bool = False,
    journal: bool | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Configure the root logger once for the process; calling again replaces the handler.

    ``level`` is a name (``debug``, ``info``, ``warning``, ``error``; as in ``log_level``) or a
    number; ``verbose`` forces debug and lets the chatty libraries (aioice, aiortc, websockets,
    pyroute2) log below WARNING. ``journal`` None means: the journal when running under systemd
    and systemd-python is installed, otherwise ``stream`` (stderr). Returns the handler."""
    numeric = logging.DEBUG if verbose else _level_number(level)
    use_journal = journal if journal is not None else (
        running_under_systemd() and journal_available())
    handler: logging.Handler
    if use_journal:
        handler = JournalHandler()
        handler.setFormatter(SafeFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(StderrFormatter(syslog_prefix=stream is None and stderr_is_journal()))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed[:] = [handler]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else max(numeric,
                                                                           logging.WARNING))
    logging.captureWarnings(True)
    return handler


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return value
