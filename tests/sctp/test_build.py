"""Which mvpd.sctp build is loaded: compiled (mypyc, setup.py) or the .py files."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mvpd.sctp

SCTP_DIR = Path(mvpd.sctp.__file__).parent
PROBE = (
    "import mvpd.sctp as s, mvpd.sctp.association as a, mvpd.sctp.packet as p;"
    "print(s.BUILD, a.__file__.endswith('.py'), p.__file__.endswith('.py'))"
)


def probe(**env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env},
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


def test_pure_switch_loads_every_module_from_its_source() -> None:
    assert probe(MVPD_PURE_SCTP="1") == "pure True True"


#: The modules of mvpd.sctp that ``import mvpd.sctp`` loads as Python on purpose in the
#: compiled build (not on the per-packet path, or a C extension does their work).
PURE_ON_PURPOSE = {
    "mvpd.sctp", "mvpd.sctp.cookie", "mvpd.sctp.crc32c", "mvpd.sctp.errors",
    "mvpd.sctp.parameters", "mvpd.sctp.state",
}
PURE_MODULES_PROBE = (
    "import sys, mvpd.sctp; print(sorted(n for n, m in sys.modules.items()"
    " if n.startswith('mvpd.sctp') and (getattr(m, '__file__', '') or '').endswith('.py')))"
)


@pytest.mark.skipif(not list(SCTP_DIR.glob("association.*.so")), reason="not compiled")
@pytest.mark.skipif(mvpd.sctp._compiled_is_stale(), reason="sources changed since the build")
def test_compiled_modules_are_loaded_when_built_and_current() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MVPD_PURE_SCTP"}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "compiled False False"
    # A module the association imports but setup.py does not compile (a new part, say)
    # would run as Python under the compiled association: add it to NATIVE_MODULES.
    result = subprocess.run([sys.executable, "-c", PURE_MODULES_PROBE], env=env,
                            capture_output=True, text=True, check=True)
    assert set(ast.literal_eval(result.stdout)) == PURE_ON_PURPOSE


def test_build_matches_the_loaded_module() -> None:
    loaded_pure = mvpd.sctp.association.__file__.endswith(".py")
    assert ("pure" if loaded_pure else "compiled") == mvpd.sctp.BUILD


def test_mvpd_version_names_the_build() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mvpd.cli", "--version"], capture_output=True, text=True,
        check=True,
    )
    assert result.stdout.startswith("mvpd ")
    assert f"(sctp: {mvpd.sctp.BUILD}" in result.stdout


def test_stale_compiled_modules_in_a_checkout_are_not_loaded(tmp_path: Path) -> None:
    package = tmp_path / "mvpd" / "sctp"
    package.mkdir(parents=True)
    source, native = package / "packet.py", package / "packet.cpython-311-x86_64-linux-gnu.so"
    source.write_text("")
    native.write_bytes(b"")
    os.utime(source, (1000, 1000))
    os.utime(native, (2000, 2000))
    assert not mvpd.sctp._compiled_is_stale(package)  # no checkout: never stale
    (tmp_path / ".git").mkdir()
    assert not mvpd.sctp._compiled_is_stale(package)  # built after the last edit
    os.utime(source, (3000, 3000))
    assert mvpd.sctp._compiled_is_stale(package)  # edited since the build


def test_pip_builds_a_compiled_wheel_in_an_isolated_build(tmp_path: Path) -> None:
    """`pip wheel .` as a user runs it: an isolated build environment with only the build
    requirements (setuptools, mypy), none of the runtime dependencies. It compiles the hot
    modules (it once failed here: mypyc could not find google_crc32c's types)."""
    import shutil
    import zipfile

    repo = SCTP_DIR.parents[1]
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy2(repo / name, source / name)
    for name in ("mvpd", "mvpctl"):
        shutil.copytree(repo / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "MVPD_", "VIRTUAL_ENV"))}
    # A fresh virtualenv's pip, as a user has it (this one's pip lets the isolated build see
    # more than a user's would).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env,
                   capture_output=True, timeout=300)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "wheel", "--no-deps", "--disable-pip-version-check",
         "--no-input", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mvp_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    compiled = {Path(n).name.split(".")[0] for n in names
                if n.startswith("mvpd/sctp/") and n.endswith(".so")}
    assert {"association", "packet", "receiver", "sender"} <= compiled, sorted(compiled)
