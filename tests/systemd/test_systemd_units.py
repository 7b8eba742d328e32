"""The shipped unit files: install_units() output, and `systemd-analyze verify` on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mvpd.proto.errors import MvpError
from mvpd.systemd import (
    HOME_DROPIN,
    SHIPPED_BIN,
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
