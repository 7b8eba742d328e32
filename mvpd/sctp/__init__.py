"""A sans-I/O SCTP association for WebRTC data channels.

:class:`Association` is the entry point; see :mod:`mvpd.sctp.association`.  The I/O layer
(the WebRTC stack in :mod:`mvpd.rtc`) feeds it DTLS application data and drains its packets,
events and deadlines.

The hot modules may be compiled (mypyc, see ``setup.py``); :data:`BUILD` says whether the
compiled ones are loaded (``compiled``) or the ``.py`` files (``pure``).  ``MVPD_PURE_SCTP=1``
in the environment loads the ``.py`` files even when compiled ones are present (the test
suite runs the SCTP tests both ways).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


class _SourceFirstFinder(importlib.abc.MetaPathFinder):
    """Loads this package's submodules from their ``.py`` files, never the compiled ones."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__:
            return None
        source = Path(__file__).with_name(f"{name}.py")
        if not source.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _compiled_is_stale(here: Path = Path(__file__).parent) -> bool:
    """In a source checkout, a compiled module older than its ``.py`` (the source changed
    since ``scripts/setup.sh`` built it in place): loading it would run old code, so the
    ``.py`` files are used until the next build.  (An installed wheel's files all carry
    its installation time: no check there.)"""
    if not (here.parent.parent / ".git").exists():
        return False
    for native in here.glob("*.cpython-*.so"):
        source = here / f"{native.name.split('.', 1)[0]}.py"
        if source.exists() and source.stat().st_mtime > native.stat().st_mtime:
            return True
    return False


#: Why the ``.py`` files are loaded although compiled modules may exist ("" if they are not).
PURE_REASON = (
    "MVPD_PURE_SCTP is set" if os.environ.get("MVPD_PURE_SCTP", "") not in ("", "0")
    else "the compiled modules are older than the sources (run scripts/setup.sh)"
    if _compiled_is_stale() else ""
)
if PURE_REASON:
    sys.meta_path.insert(0, _SourceFirstFinder())

from .association import Association  # noqa: E402
from .errors import (  # noqa: E402
    AssociationNotOpen,
    InvalidStream,
    MalformedPacket,
    MessageTooLarge,
    ProtocolViolation,
    SctpError,
    SendError,
    StreamClosing,
)
from .events import (  # noqa: E402
    AssociationClosed,
    AssociationEstablished,
    AssociationLost,
    BufferedAmountLow,
    Event,
    MessageReceived,
    MessageRefused,
    OutgoingStreamsReset,
    StreamsReset,
)
from .state import State  # noqa: E402

#: ``compiled`` when the mypyc-compiled modules are loaded, ``pure`` for the ``.py`` files.
BUILD = "pure" if (sys.modules[Association.__module__].__file__ or "").endswith(".py") else (
    "compiled"
)

__all__ = [
    "BUILD",
    "Association",
    "AssociationClosed",
    "AssociationEstablished",
    "AssociationLost",
    "AssociationNotOpen",
    "BufferedAmountLow",
    "Event",
    "InvalidStream",
    "MalformedPacket",
    "MessageReceived",
    "MessageRefused",
    "MessageTooLarge",
    "OutgoingStreamsReset",
    "ProtocolViolation",
    "SctpError",
    "SendError",
    "State",
    "StreamClosing",
    "StreamsReset",
]
