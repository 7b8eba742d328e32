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
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

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
    """Masks secrets before any handler sees a record: secret-named fields, and secret-looking
    ``key=value`` text in the message (after %-formatting, so arguments are covered)."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = record_fields(record)
        if values:
            setattr(record, FIELDS_ATTR, {
                k: (REDACTED if k in SECRET_FIELDS else _redact_value(v))
                for k, v in values.items()
            })
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = f"{record.msg!r} % {record.args!r}"
        cleaned = redact_text(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, ()
        return True


def _redact_value(value: Any) -> Any:
    return redact_text(value) if isinstance(value, str) else value


class StderrFormatter(logging.Formatter):
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
    text = str(value)
    return repr(text) if not text or any(c.isspace() or c in "\"'=" for c in text) else text


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
        handler.setFormatter(logging.Formatter("%(message)s"))
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
