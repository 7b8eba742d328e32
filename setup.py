"""Optional native build: the hot modules of mvpd.sctp compiled with mypyc.

``pip install .`` builds a wheel with them compiled when mypyc and a C compiler are there
(``MVPD_COMPILE=0`` builds a pure-Python wheel).  ``scripts/setup.sh`` installs the project
editable as pure Python and then compiles the same modules in place
(``python setup.py build_ext --inplace``), next to their ``.py`` files.  Either way the
``.py`` files stay the fallback: ``MVPD_PURE_SCTP=1`` at run time, or no compiled module,
loads them (``mvpd --version`` says which build is in use).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import setup

#: The modules compiled, by profile: the association and its parts, packet building and
#: parsing, DATA/SACK bookkeeping, congestion control.  (The package's __init__ chooses
#: between them and the .py files.)
NATIVE_MODULES = [
    "mvpd/sctp/association.py",
    "mvpd/sctp/chunks.py",
    "mvpd/sctp/congestion.py",
    "mvpd/sctp/data_tracker.py",
    "mvpd/sctp/events.py",
    "mvpd/sctp/handshake.py",
    "mvpd/sctp/packet.py",
    "mvpd/sctp/reassembly.py",
    "mvpd/sctp/receiver.py",
    "mvpd/sctp/retransmission_queue.py",
    "mvpd/sctp/send_queue.py",
    "mvpd/sctp/sender.py",
    "mvpd/sctp/shutdown.py",
    "mvpd/sctp/stream_reset.py",
    "mvpd/sctp/timers.py",
    "mvpd/sctp/tsn.py",
]


def _can_compile() -> bool:
    if os.environ.get("MVPD_COMPILE", "1") == "0":
        return False
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if not include.exists() or shutil.which(compiler.split()[0]) is None:
        print("mvp-agent: no C compiler or Python headers: installing pure Python")
        return False
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        print("mvp-agent: mypyc is not installed: installing pure Python")
        return False
    return True


def native_extensions() -> list:  # type: ignore[type-arg]
    if not _can_compile():
        return []
    from mypyc.build import mypycify

    try:
        return mypycify(
            # No config file: pyproject's [tool.mypy] loads plugins (pydantic) that a wheel's
            # build environment does not have, and these modules need none. That environment
            # has none of the runtime dependencies either (google_crc32c, which crc32c.py
            # imports when it is there): their types do not matter to the compiled modules.
            ["--config-file=", "--ignore-missing-imports", *NATIVE_MODULES],
            opt_level="3",
            # The shared runtime library lives inside the package (not at the top level), so
            # an editable install finds it like any other module of mvpd.sctp.
            group_name="mvpd.sctp._native",
        )
    except (Exception, SystemExit) as exc:  # mypyc reports type errors by exiting
        print(f"mvp-agent: compiling mvpd.sctp failed ({exc}): installing pure Python")
        return []


setup(ext_modules=native_extensions())
