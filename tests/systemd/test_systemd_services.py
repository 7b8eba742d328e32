"""The shipped units, installed by install_units() into the booted container, running the real
mvpd: `mvpd run` under mvpd.service and `mvpd signal` under mvp-signal.service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PROJECT, PYTHON, SystemdContainer

from mvpd.systemd import install_units

pytestmark = pytest.mark.root

MVPD_BIN = PYTHON.parent / "mvpd"
HAS_DAEMON = (PROJECT / "mvpd" / "daemon.py").exists()


@pytest.fixture(scope="module")
def installed(systemd_container: SystemdContainer) -> Iterator[SystemdContainer]:
    """The units, sysusers entry and config installed as `mvpd install-units` would."""
    if not MVPD_BIN.exists():
        pytest.skip("the mvpd console script is not installed in the venv")
    c = systemd_container
    root = Path(f"/proc/{c.pid}/root")
    written = install_units(root, bin_path=MVPD_BIN)
    assert root / "etc/systemd/system/mvpd.service" in written
    c.run(["systemd-sysusers"])
    c.systemctl("daemon-reload")
    yield c
    for unit in ("mvpd.service", "mvp-signal.service"):
        c.systemctl("stop", unit, check=False)
        c.systemctl("reset-failed", unit, check=False)


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


@pytest.mark.skipif(not HAS_DAEMON, reason="mvpd/daemon.py (mvpd run) is not written yet")
def test_mvpd_start_reaches_ready_and_stop_is_clean(installed: SystemdContainer) -> None:
    c = installed
    unit = "mvpd.service"
    # Keep /run/mvpd after stop, to see that mvpd itself removed its socket.
    c.write_file("/run/systemd/system/mvpd.service.d/90-test.conf",
                 "[Service]\nRuntimeDirectoryPreserve=yes\n")
    c.systemctl("daemon-reload")
    c.systemctl("start", unit)  # returns once READY=1 arrived
    props = c.show(unit, "ActiveState", "SubState", "StatusText", "WatchdogUSec")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["StatusText"], "mvpd sent no STATUS="
    assert props["WatchdogUSec"] == "30s"
    assert c.run(["test", "-S", "/run/mvpd/mvpd.sock"], check=False).returncode == 0
    c.systemctl("stop", unit)
    props = c.show(unit, "ActiveState", "Result", "ExecMainStatus")
    log = c.journal("-u", unit, "-o", "cat")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, log
    assert c.run(["test", "-e", "/run/mvpd/mvpd.sock"], check=False).returncode != 0, log
    assert "Traceback" not in log, log
    c.run(["rm", "-rf", "/run/systemd/system/mvpd.service.d", "/run/mvpd"])
    c.systemctl("daemon-reload")
