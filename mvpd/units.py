"""Installing mvpd as a systemd service: unit files, sysusers.d entry, example config.

:func:`install_units` copies the unit files, the sysusers.d entry and the example config into a
root (``/`` on a real machine) with ``ExecStart`` pointing at the installed ``mvpd`` (plus
drop-ins opening the paths under ``/home`` or ``/tmp`` an installation there needs);
:func:`activate_units` then creates the ``mvp`` group (``systemd-sysusers``) and makes systemd
read the units (``systemctl daemon-reload``). Talking to systemd at run time is
:mod:`mvpd.sd_notify`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .proto.errors import MvpError

log = logging.getLogger(__name__)

#: The path in the shipped unit files that :func:`install_units` replaces.
SHIPPED_BIN = "/usr/local/bin/mvpd"
UNIT_NAMES = ("mvpd.service", "mvp-signal.service")
#: What ``ProtectHome=yes`` hides from the services.
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
HOME_DROPIN = "50-home-paths.conf"
#: What ``PrivateTmp=yes`` replaces with an empty directory private to each service.
TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
TMP_DROPIN = "50-tmp-paths.conf"
SYSUSERS_NAME = "mvp-agent.conf"
CONFIG_NAME = "mvp-agent.yaml"
#: Where sd_booted(3) looks: this directory exists only when systemd is the running init.
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")



def data_dir() -> Path:
    """The files mvpd ships: ``systemd/`` with the units and the sysusers.d entry, and the
    example config. In the source tree ``mvpd/data`` holds links to ``packaging/systemd`` and
    ``etc/mvp-agent.yaml`` (the one copy of each); a wheel carries the files themselves."""
    return Path(__file__).resolve().parent / "data"


def units_dir() -> Path:
    """Where the shipped unit files and the sysusers.d entry live."""
    return data_dir() / "systemd"


def _rewrite_exec(text: str, bin_path: Path) -> str:
    """Point every ``Exec*=`` line that runs the shipped mvpd path at ``bin_path``."""
    if any(ch.isspace() for ch in str(bin_path)):
        raise MvpError(f"the mvpd path {str(bin_path)!r} contains white space; install it "
                       "somewhere without spaces")
    pattern = re.compile(rf"^(Exec[A-Za-z]*=[-@:+!]*){re.escape(SHIPPED_BIN)}(?=\s|$)", re.M)
    return pattern.sub(lambda m: m.group(1) + str(bin_path), text)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically: a crash never leaves a half-written unit behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


def _shebang_interpreter(script: Path) -> Path | None:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with script.open("rb") as f:
            first = f.readline(4096).decode()
        if first.startswith("#!"):
            parts = first[2:].split()
            if parts and parts[0].startswith("/"):
                return Path(parts[0])
    return None


def _same_installation(interpreter: Path) -> bool:
    """Whether ``interpreter`` is the Python running this code (its venv or prefix)."""
    prefix = interpreter.parent.parent
    with contextlib.suppress(OSError):
        if prefix == Path(sys.prefix) or prefix.resolve() == Path(sys.prefix).resolve():
            return True
    return False


def mvpd_package_dir(bin_path: Path) -> Path | None:
    """Where the Python behind ``bin_path`` imports the ``mvpd`` package from.

    An editable install (``pip install -e``) imports it from the source tree, which may lie
    outside the virtualenv. When ``bin_path`` runs this very installation (the usual case:
    ``mvpd install-units`` without ``--bin``) the answer is this module's package; for another
    interpreter it is asked (``python -I -c``). None when that interpreter cannot tell."""
    interpreter = _shebang_interpreter(bin_path)
    if interpreter is None or _same_installation(interpreter):
        return Path(__file__).absolute().parent
    code = ("import importlib.util as u; s = u.find_spec('mvpd'); "
            "print(s.origin if s is not None and s.origin else '')")
    try:
        result = subprocess.run([str(interpreter), "-I", "-c", code], capture_output=True,
                                text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("cannot ask %s where mvpd lives: %s", interpreter, exc)
        return None
    origin = result.stdout.strip()
    if result.returncode != 0 or not origin.startswith("/"):
        return None
    return Path(origin).parent


def _runtime_paths(bin_path: Path, package_dir: Path | None) -> list[Path]:
    """Every directory the services read to run ``bin_path``: its virtualenv, the Python
    installation behind it and the ``mvpd`` package (``package_dir``, or where
    :func:`mvpd_package_dir` finds it), each as written (Python opens it so) and with
    symlinks resolved."""
    if package_dir is None:
        package_dir = mvpd_package_dir(bin_path)
    venv = bin_path.parent.parent
    candidates = [venv if (venv / "pyvenv.cfg").is_file() else bin_path.parent]
    interpreter = _shebang_interpreter(bin_path)
    if interpreter is not None:
        candidates.append(interpreter.parent.parent)  # the venv, or a prefix like /usr/local
        with contextlib.suppress(OSError):
            candidates.append(interpreter.resolve().parent.parent)  # the real installation
    if package_dir is not None:
        candidates.append(package_dir)
        with contextlib.suppress(OSError):
            candidates.append(package_dir.resolve())
    return candidates


def _paths_below(bases: Sequence[Path], candidates: Sequence[Path]) -> list[Path]:
    """The candidates inside one of ``bases``, without those inside another one found."""
    found: list[Path] = []
    for path in candidates:
        if any(base == path or base in path.parents for base in bases) \
                and not any(p == path or p in path.parents for p in found):
            found = [p for p in found if path not in p.parents]
            found.append(path)
    return sorted(found)


def paths_under_home(bin_path: Path, package_dir: Path | None = None) -> list[Path]:
    """What the services must see under /home, /root or /run/user to run ``bin_path``: its
    virtualenv, the Python installation behind it (pyenv and ``pip --user`` put them there)
    and the ``mvpd`` package (an editable install's source tree; ``package_dir``, found by
    :func:`mvpd_package_dir` when None).
    ``ProtectHome=yes`` would hide them and the start fail with 203/EXEC."""
    return _paths_below(HOME_DIRS, _runtime_paths(bin_path, package_dir))


def paths_under_tmp(bin_path: Path, package_dir: Path | None = None) -> list[Path]:
    """What the services must see under /tmp or /var/tmp to run ``bin_path`` (the same
    candidates as :func:`paths_under_home`): a checkout or virtualenv made there, e.g. by
    CI, would be hidden by ``PrivateTmp=yes``."""
    return _paths_below(TMP_DIRS, _runtime_paths(bin_path, package_dir))


def home_paths_dropin(paths: list[Path]) -> str:
    """A unit drop-in keeping the home directories hidden except ``paths`` (read-only)."""
    return (
        "# Written by mvpd install-units: mvpd's Python lives under a home directory, which\n"
        "# ProtectHome=yes would hide. Everything else there stays hidden.\n"
        "[Service]\nProtectHome=tmpfs\n"
        f"BindReadOnlyPaths={' '.join(str(p) for p in paths)}\n"
    )


def tmp_paths_dropin(paths: list[Path]) -> str:
    """A unit drop-in binding ``paths`` (read-only) into the service's private /tmp and
    /var/tmp; ``PrivateTmp=yes`` stays, so everything else there stays hidden."""
    return (
        "# Written by mvpd install-units: mvpd's Python or source tree lives under /tmp or\n"
        "# /var/tmp, which PrivateTmp=yes replaces with an empty directory of the service.\n"
        "# systemd creates the mount points inside that private directory (checked with\n"
        "# systemd 252), so the service sees these paths read-only and nothing else of /tmp.\n"
        "[Service]\n"
        f"BindReadOnlyPaths={' '.join(str(p) for p in paths)}\n"
    )


def install_units(
    prefix: Path = Path("/"),
    *,
    bin_path: Path,
    source: Path | None = None,
    config_source: Path | None = None,
    package_dir: Path | None = None,
) -> list[Path]:
    """Install the systemd units, the sysusers.d entry and the example config under ``prefix``.

    - ``etc/systemd/system/{mvpd,mvp-signal}.service`` with ``ExecStart`` rewritten to
      ``bin_path`` (the absolute path of the installed ``mvpd``), plus a drop-in
      ``50-home-paths.conf`` when that mvpd or its Python lives under a home directory
      (see :func:`paths_under_home`), and a drop-in ``50-tmp-paths.conf`` when they or
      the ``mvpd`` package (``package_dir``, by default :func:`mvpd_package_dir`) live under
      /tmp or /var/tmp (see :func:`paths_under_tmp`);
    - ``etc/sysusers.d/mvp-agent.conf`` (the ``mvp`` group);
    - ``etc/mvp-agent.yaml`` from ``config_source`` (by default the shipped example), mode
      0600 because it can hold tokens, only when no config exists there yet: an operator's
      config is never overwritten.

    Returns the paths written. Afterwards (with ``prefix`` ``/``) run ``systemd-sysusers`` and
    ``systemctl daemon-reload``. Raises :class:`MvpError` when the unit files cannot be found
    or ``bin_path`` is not absolute.
    """
    if not bin_path.is_absolute():
        raise MvpError(f"the mvpd path must be absolute, got {bin_path}")
    src = source if source is not None else units_dir()
    missing = [n for n in (*UNIT_NAMES, SYSUSERS_NAME) if not (src / n).is_file()]
    if missing:
        raise MvpError(f"unit files not found in {src}: {', '.join(missing)} (the mvp-agent "
                       "package is incomplete: reinstall it)")
    written: list[Path] = []
    unit_dir = prefix / "etc" / "systemd" / "system"
    package = package_dir if package_dir is not None else mvpd_package_dir(bin_path)
    dropins = (
        (HOME_DROPIN, paths_under_home(bin_path, package), home_paths_dropin),
        (TMP_DROPIN, paths_under_tmp(bin_path, package), tmp_paths_dropin),
    )
    # BindReadOnlyPaths= splits at white space and reads "a:b" as source and target.
    for bad in (str(p) for _, paths, _ in dropins for p in paths):
        if ":" in bad or any(ch.isspace() for ch in bad):
            raise MvpError(f"cannot bind {bad!r} into the services: white space or ':' in "
                           "the path; install mvpd somewhere without them")
    for name in UNIT_NAMES:
        text = _rewrite_exec((src / name).read_text(encoding="utf-8"), bin_path)
        target = unit_dir / name
        _write(target, text.encode(), 0o644)
        written.append(target)
        for dropin_name, paths, render in dropins:
            dropin = unit_dir / f"{name}.d" / dropin_name
            if paths:
                _write(dropin, render(paths).encode(), 0o644)
                written.append(dropin)
            else:
                dropin.unlink(missing_ok=True)  # left by an earlier install from elsewhere
    target = prefix / "etc" / "sysusers.d" / SYSUSERS_NAME
    _write(target, (src / SYSUSERS_NAME).read_bytes(), 0o644)
    written.append(target)
    config = config_source if config_source is not None else data_dir() / CONFIG_NAME
    target = prefix / "etc" / CONFIG_NAME
    if config.is_file() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never replace a config that appeared since the check.
        with contextlib.suppress(FileExistsError):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out, config.open("rb") as inp:
                shutil.copyfileobj(inp, out)
            written.append(target)
    return written


def systemd_is_running() -> bool:
    """Whether systemd is this machine's init (sd_booted(3)); ``systemctl`` fails otherwise."""
    return SYSTEMD_RUNTIME_DIR.is_dir()


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)


def activate_units(
    *,
    sysusers: bool = True,
    daemon_reload: bool = True,
    run: Runner = _run_command,
) -> list[str]:
    """After :func:`install_units` into ``/``: run ``systemd-sysusers`` for the installed
    sysusers.d entry (creates the ``mvp`` group) and ``systemctl daemon-reload``.

    Returns one line per step for the operator: what ran, or why it was skipped (turned off,
    or systemd is not running, e.g. in an image build). Raises :class:`MvpError` naming the
    command and its error output when one fails or is missing.
    """
    steps: list[tuple[bool, str, list[str], str]] = [
        (sysusers, "--no-sysusers", ["systemd-sysusers", f"/etc/sysusers.d/{SYSUSERS_NAME}"],
         "creates group mvp"),
        (daemon_reload, "--no-daemon-reload", ["systemctl", "daemon-reload"],
         "systemd reads the new units"),
    ]
    lines: list[str] = []
    for enabled, flag, argv, purpose in steps:
        shown = " ".join(argv)
        if not enabled:
            lines.append(f"skipped {shown} ({flag}); run it yourself before starting mvpd")
            continue
        if argv[0] == "systemctl" and not systemd_is_running():
            lines.append(f"skipped {shown}: systemd is not running here "
                         f"({SYSTEMD_RUNTIME_DIR} is missing)")
            continue
        try:
            result = run(argv)
        except FileNotFoundError:
            raise MvpError(f"{argv[0]} is not installed: run the equivalent yourself "
                           f"({purpose})") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise MvpError(f"{shown} failed: {exc}") from None
        if result.returncode != 0:
            detail = " ".join((result.stderr or result.stdout or "").split())[:500]
            raise MvpError(f"{shown} exited {result.returncode}: {detail or 'no output'}")
        lines.append(f"ran {shown} ({purpose})")
    return lines
