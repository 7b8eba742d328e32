"""The shipped unit files: install_units() output, and `systemd-analyze verify` on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import mvpd
import mvpd.units as units_module
from mvpd.proto.errors import MvpError
from mvpd.units import (
    HOME_DROPIN,
    SHIPPED_BIN,
    TMP_DROPIN,
    activate_units,
    data_dir,
    install_units,
    mvpd_package_dir,
    paths_under_home,
    paths_under_tmp,
    units_dir,
)

MVPD_BIN = Path(sys.executable).parent / "mvpd"


def unit_options(text: str, section: str = "Service") -> dict[str, list[str]]:
    """KEY -> values of one section of a unit file."""
    options: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif line and not line.startswith(("#", ";")) and current == section and "=" in line:
            key, value = line.split("=", 1)
            options.setdefault(key, []).append(value)
    return options


def test_install_writes_units_sysusers_and_config(tmp_path: Path) -> None:
    written = install_units(tmp_path, bin_path=Path("/opt/mvp/bin/mvpd"))
    etc = tmp_path / "etc"
    unit = etc / "systemd/system/mvpd.service"
    assert unit in written and etc / "sysusers.d/mvp-agent.conf" in written
    service = unit_options(unit.read_text())
    assert service["ExecStart"] == ["/opt/mvp/bin/mvpd run"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    signal = unit_options((etc / "systemd/system/mvp-signal.service").read_text())
    assert signal["ExecStart"][0].startswith("/opt/mvp/bin/mvpd signal --listen ")
    assert SHIPPED_BIN not in unit.read_text().replace("# install_units", "")
    assert (etc / "sysusers.d/mvp-agent.conf").read_text().splitlines()[-1].split()[:2] == [
        "g", "mvp"]
    assert unit.stat().st_mode & 0o777 == 0o644
    assert etc / "mvp-agent.yaml" in written
    assert (etc / "mvp-agent.yaml").stat().st_mode & 0o777 == 0o600
    assert (etc / "mvp-agent.yaml").read_bytes() == (data_dir() / "mvp-agent.yaml").read_bytes()


def _setuptools_builds_wheels() -> bool:
    try:
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        try:
            import wheel  # noqa: F401
        except ImportError:
            return False
    return True


SHIPPED_DATA = ("mvpd/data/systemd/mvpd.service", "mvpd/data/systemd/mvp-signal.service",
                "mvpd/data/systemd/mvp-agent.conf", "mvpd/data/mvp-agent.yaml")


def test_a_wheel_install_carries_the_units_and_the_config(tmp_path: Path) -> None:
    """`pip install .` (not editable) into a fresh virtualenv: install-units finds the units
    and the example config inside the installed package."""
    repo = Path(__file__).resolve().parents[2]
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, source / name)
    for name in ("mvpd", "mvpctl"):
        shutil.copytree(repo / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}

    def run(*argv: str | Path) -> str:
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env, check=False)
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
        return done.stdout

    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")
    # This virtualenv's setuptools when it can build wheels by itself (>= 70.1, or with the
    # wheel package); else pip's isolated build, from the configured package index.
    isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
    run(*pip, "wheel", "--no-deps", *isolation, "-w", tmp_path / "dist", source)
    (wheel,) = (tmp_path / "dist").glob("mvp_agent-*.whl")
    assert set(SHIPPED_DATA) <= set(zipfile.ZipFile(wheel).namelist())

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .strip())
    # The dependencies come from this virtualenv (a .pth line adds its site-packages after the
    # new one's; .pth files in there, such as the editable install's, are not read).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel)

    where = run(python, "-c", "import mvpd.units as s; print(s.units_dir())").strip()
    assert Path(where) == site / "mvpd" / "data" / "systemd"
    assert "--prefix" in run(venv / "bin" / "mvpd", "install-units", "--help")
    prefix = tmp_path / "root"
    run(venv / "bin" / "mvpd", "install-units", "--prefix", prefix, "--no-sysusers",
        "--no-daemon-reload")
    unit = unit_options((prefix / "etc/systemd/system/mvpd.service").read_text())
    assert unit["ExecStart"] == [f"{venv}/bin/mvpd run"]
    assert (prefix / "etc/sysusers.d/mvp-agent.conf").is_file()
    assert (prefix / "etc/mvp-agent.yaml").read_bytes() == \
        (data_dir() / "mvp-agent.yaml").read_bytes()


def test_install_keeps_an_existing_config(tmp_path: Path) -> None:
    config = tmp_path / "etc/mvp-agent.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("agent_id: mine\n")
    source_config = tmp_path / "shipped.yaml"
    source_config.write_text("agent_id: shipped\n")
    written = install_units(tmp_path, bin_path=MVPD_BIN, config_source=source_config)
    assert config not in written
    assert config.read_text() == "agent_id: mine\n"
    # Installing again replaces the units (an upgrade) and still keeps the config.
    again = install_units(tmp_path, bin_path=MVPD_BIN, config_source=source_config)
    assert [p.name for p in again] == [p.name for p in written]


def test_install_rejects_relative_or_spaced_paths_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(MvpError, match="absolute"):
        install_units(tmp_path, bin_path=Path("bin/mvpd"))
    with pytest.raises(MvpError, match="white space"):
        install_units(tmp_path, bin_path=Path("/opt/my apps/mvpd"))
    with pytest.raises(MvpError, match="not found"):
        install_units(tmp_path, bin_path=MVPD_BIN, source=tmp_path / "nowhere")


def test_hardening_keeps_what_tun_needs() -> None:
    service = unit_options((units_dir() / "mvpd.service").read_text())
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30"] and service["Restart"] == ["on-failure"]
    assert service["RuntimeDirectory"] == ["mvpd"]
    assert service["LimitNOFILE"] == ["1024:524288"]  # the daemon raises its soft limit
    # The identity key lives on across restarts, root only.
    assert service["StateDirectory"] == ["mvpd"] and service["StateDirectoryMode"] == ["0700"]
    assert "CAP_NET_ADMIN" in service["CapabilityBoundingSet"][0].split()
    assert service["DeviceAllow"] == ["/dev/net/tun rw"]
    assert "AF_NETLINK" in service["RestrictAddressFamilies"][0].split()
    # Known to break TUN (see DESIGN.md section 7).
    assert "PrivateDevices" not in service and "PrivateUsers" not in service
    signal = unit_options((units_dir() / "mvp-signal.service").read_text())
    assert signal["DynamicUser"] == ["yes"] and signal["CapabilityBoundingSet"] == [""]
    assert "User" not in signal


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.skipif(not MVPD_BIN.exists(), reason="the mvpd console script is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    written = install_units(tmp_path, bin_path=MVPD_BIN)
    units = [str(p) for p in written if p.suffix == ".service"]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_python_under_a_home_dir_gets_a_read_only_bind(tmp_path: Path) -> None:
    script = tmp_path / "bin/mvpd"
    script.parent.mkdir()
    script.write_text("#!/home/alice/venv/bin/python\nimport sys\n")
    assert paths_under_home(script) == [Path("/home/alice/venv")]
    prefix = tmp_path / "root"
    written = install_units(prefix, bin_path=script)
    dropin = prefix / "etc/systemd/system/mvpd.service.d" / HOME_DROPIN
    assert dropin in written
    options = unit_options(dropin.read_text())
    assert options == {"ProtectHome": ["tmpfs"], "BindReadOnlyPaths": ["/home/alice/venv"]}
    # Reinstalled from a system path: the drop-in goes away.
    script.write_text("#!/usr/bin/python3\n")
    assert paths_under_home(script) == []
    install_units(prefix, bin_path=script)
    assert not dropin.exists()


@pytest.fixture
def var_tmp_checkout() -> Iterator[Path]:
    """An empty directory under /var/tmp (PrivateTmp hides it too), removed afterwards:
    unlike tmp_path it is under a private-tmp directory wherever TMPDIR points."""
    path = Path(tempfile.mkdtemp(prefix="mvp-ci-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def make_venv(root: Path, interpreter: str | None = None) -> Path:
    """A virtualenv-shaped tree with an mvpd script (not a working Python)."""
    (root / ".venv/bin").mkdir(parents=True)
    (root / ".venv/pyvenv.cfg").write_text("home = /usr/bin\n")
    python = root / ".venv/bin/python"
    python.write_text("#!/bin/sh\n" if interpreter is None else interpreter)
    python.chmod(0o755)
    script = root / ".venv/bin/mvpd"
    script.write_text(f"#!{python}\nimport sys\n")
    return script


def test_checkout_under_tmp_gets_a_read_only_bind_into_the_private_tmp(
    var_tmp_checkout: Path, tmp_path: Path
) -> None:
    """A CI checkout under /var/tmp with an editable install: the venv and the source tree
    are bound read-only (PrivateTmp=yes stays); a system install gets no drop-in."""
    checkout = var_tmp_checkout
    script = make_venv(checkout)
    package = checkout / "mvpd"
    package.mkdir()
    assert paths_under_tmp(script, package) == [checkout / ".venv", package]
    assert paths_under_home(script, package) == []
    # Nested paths are bound once, through the outer one.
    assert paths_under_tmp(script, checkout / ".venv/lib/site-packages/mvpd") == [
        checkout / ".venv"]
    prefix = tmp_path / "root"
    written = install_units(prefix, bin_path=script, package_dir=package)
    for unit in ("mvpd.service", "mvp-signal.service"):
        dropin = prefix / f"etc/systemd/system/{unit}.d" / TMP_DROPIN
        assert dropin in written
        assert unit_options(dropin.read_text()) == {
            "BindReadOnlyPaths": [f"{checkout}/.venv {package}"]}
        assert not (dropin.parent / HOME_DROPIN).exists()
    # Reinstalled from a system path with the package installed there: the drop-in goes away.
    install_units(prefix, bin_path=Path("/usr/bin/mvpd"),
                  package_dir=Path("/usr/lib/python3/dist-packages/mvpd"))
    assert not (prefix / "etc/systemd/system/mvpd.service.d" / TMP_DROPIN).exists()


def test_source_under_tmp_is_found_through_a_symlink(var_tmp_checkout: Path) -> None:
    """Python imports the package through the path as written; both it and its target are
    bound when the link points elsewhere."""
    real = var_tmp_checkout / "real/mvpd"
    real.mkdir(parents=True)
    link = var_tmp_checkout / "link"
    link.symlink_to(real.parent)
    found = paths_under_tmp(Path("/opt/mvp/bin/mvpd"), link / "mvpd")
    assert found == [link / "mvpd", real]


def test_the_mvpd_package_is_located_for_the_interpreter_of_the_script(
    var_tmp_checkout: Path,
) -> None:
    # This installation: the package this code runs from (the source tree when editable).
    assert mvpd_package_dir(MVPD_BIN) == Path(mvpd.__file__).absolute().parent
    assert mvpd_package_dir(Path("/opt/nothing/mvpd")) == Path(mvpd.__file__).absolute().parent
    # Another interpreter is asked; this one answers like `python -c 'find_spec(...)'`.
    source = var_tmp_checkout / "src/mvpd"
    script = make_venv(var_tmp_checkout, f"#!/bin/sh\necho {source}/__init__.py\n")
    assert mvpd_package_dir(script) == source
    assert paths_under_tmp(script) == [var_tmp_checkout / ".venv", source]
    # One that cannot tell (no mvpd there, or it fails): nothing is guessed.
    (script.parent / "python").write_text("#!/bin/sh\necho\n")
    assert mvpd_package_dir(script) is None
    (script.parent / "python").write_text("#!/bin/sh\nexit 3\n")
    assert mvpd_package_dir(script) is None
    (script.parent / "python").unlink()
    assert mvpd_package_dir(script) is None


def test_paths_the_bind_cannot_express_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MvpError, match="white space or ':'"):
        install_units(tmp_path, bin_path=Path("/opt/mvp/bin/mvpd"),
                      package_dir=Path("/tmp/my src/mvpd"))
    with pytest.raises(MvpError, match="white space or ':'"):
        install_units(tmp_path, bin_path=Path("/opt/mvp/bin/mvpd"),
                      package_dir=Path("/var/tmp/a:b/mvpd"))
    assert not (tmp_path / "etc/systemd/system/mvpd.service").exists()


class FakeRunner:
    """Records the commands activate_units would run; answers with a fixed exit code."""

    def __init__(self, returncode: int = 0, stderr: str = "") -> None:
        self.calls: list[list[str]] = []
        self.returncode = returncode
        self.stderr = stderr

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), self.returncode, "", self.stderr)


def test_activate_units_runs_sysusers_then_daemon_reload(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(units_module, "SYSTEMD_RUNTIME_DIR", tmp_path)  # systemd runs
    runner = FakeRunner()
    lines = activate_units(run=runner)
    assert runner.calls == [["systemd-sysusers", "/etc/sysusers.d/mvp-agent.conf"],
                            ["systemctl", "daemon-reload"]]
    assert lines == [
        "ran systemd-sysusers /etc/sysusers.d/mvp-agent.conf (creates group mvp)",
        "ran systemctl daemon-reload (systemd reads the new units)",
    ]
    runner = FakeRunner()
    lines = activate_units(sysusers=False, daemon_reload=False, run=runner)
    assert runner.calls == []
    assert [line.split(" (")[0] for line in lines] == [
        "skipped systemd-sysusers /etc/sysusers.d/mvp-agent.conf",
        "skipped systemctl daemon-reload"]
    assert "--no-sysusers" in lines[0] and "--no-daemon-reload" in lines[1]


def test_activate_units_without_systemd_or_with_a_failing_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(units_module, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent")
    runner = FakeRunner()
    lines = activate_units(run=runner)
    # systemd-sysusers works on files alone (image builds); systemctl needs a running systemd.
    assert runner.calls == [["systemd-sysusers", "/etc/sysusers.d/mvp-agent.conf"]]
    assert lines[1].startswith("skipped systemctl daemon-reload: systemd is not running")
    with pytest.raises(MvpError, match=r"systemd-sysusers \S+ exited 1: bad line 3"):
        activate_units(run=FakeRunner(1, "bad line 3\n"))

    def missing(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(argv[0])

    with pytest.raises(MvpError, match="systemd-sysusers is not installed"):
        activate_units(run=missing)


@pytest.mark.skipif(not MVPD_BIN.exists(), reason="the mvpd console script is not installed")
def test_install_units_command_under_a_prefix(tmp_path: Path) -> None:
    """`mvpd install-units --prefix DIR` installs there and runs nothing on this machine."""
    argv = [str(MVPD_BIN), "install-units", "--prefix", str(tmp_path), "--bin", "/opt/mvp/mvpd"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert f"installed {tmp_path}/etc/systemd/system/mvpd.service" in out
    assert f"not run for --prefix {tmp_path}: systemd-sysusers, systemctl daemon-reload" in out
    unit = unit_options((tmp_path / "etc/systemd/system/mvpd.service").read_text())
    assert unit["ExecStart"] == ["/opt/mvp/mvpd run"]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert f"kept      {tmp_path}/etc/mvp-agent.yaml (an existing config is never " \
           "overwritten)" in again.stdout.splitlines()

