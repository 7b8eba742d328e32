"""The shipped units, installed by `mvpd install-units` into the booted container:
`mvpd signal` under mvp-signal.service (mvpd.service itself: test_mvpd_service.py)."""

from __future__ import annotations

import time

import pytest

from tests.systemd.harness import MVPD_BIN, InstalledUnits, SystemdContainer

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def installed(installed_units: InstalledUnits) -> SystemdContainer:
    """The units, sysusers entry and config installed by `mvpd install-units`."""
    return installed_units.container


def inner_status(c: SystemdContainer, unit: str) -> dict[str, str]:
    pid = c.show(unit, "MainPID")["MainPID"]
    text = c.run(["cat", f"/proc/{pid}/status"]).stdout
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_units_are_loaded_from_the_install(installed: SystemdContainer) -> None:
    props = installed.show("mvpd.service", "LoadState", "ExecStart", "DropInPaths")
    assert props["LoadState"] == "loaded"
    assert str(MVPD_BIN) in props["ExecStart"]
    assert installed.run(["getent", "group", "mvp"]).stdout.startswith("mvp:")


def test_signal_server_runs_without_root(installed: SystemdContainer) -> None:
    c = installed
    unit = "mvp-signal.service"
    c.systemctl("start", unit)
    assert c.wait_for(unit, "ActiveState", "active") == "active"
    deadline = time.monotonic() + 20
    while True:  # Type=exec: active once exec'd; the port opens a moment later
        probe = c.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8765"], check=False)
        if probe.returncode == 0:
            break
        assert time.monotonic() < deadline, c.journal("-u", unit, "-o", "cat")
        time.sleep(0.2)
    status = inner_status(c, unit)
    uids = status["Uid"].split()
    assert "0" not in uids, status["Uid"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    c.systemctl("stop", unit)
    props = c.show(unit, "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, \
        c.journal("-u", unit, "-o", "cat")
