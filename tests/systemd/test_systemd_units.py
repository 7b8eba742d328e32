"""The shipped unit files: install_units() output, and `systemd-analyze verify` on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import mvpd.systemd as systemd_module
from mvpd.proto.errors import MvpError
from mvpd.systemd import (
    HOME_DROPIN,
    SHIPPED_BIN,
    activate_units,
    install_units,
    packaging_dir,
    paths_under_home,
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
    shipped_config = packaging_dir().parent.parent / "etc/mvp-agent.yaml"
    if shipped_config.is_file():
        assert etc / "mvp-agent.yaml" in written
        assert (etc / "mvp-agent.yaml").stat().st_mode & 0o777 == 0o600
        assert (etc / "mvp-agent.yaml").read_bytes() == shipped_config.read_bytes()


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
    service = unit_options((packaging_dir() / "mvpd.service").read_text())
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30"] and service["Restart"] == ["on-failure"]
    assert service["RuntimeDirectory"] == ["mvpd"]
    assert "CAP_NET_ADMIN" in service["CapabilityBoundingSet"][0].split()
    assert service["DeviceAllow"] == ["/dev/net/tun rw"]
    assert "AF_NETLINK" in service["RestrictAddressFamilies"][0].split()
    # Known to break TUN (see DESIGN.md section 7).
    assert "PrivateDevices" not in service and "PrivateUsers" not in service
    signal = unit_options((packaging_dir() / "mvp-signal.service").read_text())
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
    monkeypatch.setattr(systemd_module, "SYSTEMD_RUNTIME_DIR", tmp_path)  # systemd runs
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
    monkeypatch.setattr(systemd_module, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent")
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

