"""The booted-systemd harness itself, proven with a tiny Type=notify service that uses
mvpd.sd_notify (READY, STATUS, STOPPING, RELOADING, watchdog) and mvpd.logs (journal fields)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from mvpd.units import (
    TMP_DIRS,
    home_paths_dropin,
    paths_under_home,
    paths_under_tmp,
    tmp_paths_dropin,
)
from tests.systemd.harness import PROJECT, PYTHON, SystemdContainer

pytestmark = pytest.mark.root

UNIT = "notify-probe.service"
UNIT_TEXT = f"""\
[Unit]
Description=notify probe for the systemd harness tests

[Service]
Type=notify
NotifyAccess=main
ExecStart={PYTHON} {PROJECT}/tests/systemd/notify_service.py
ExecReload=/bin/kill -HUP $MAINPID
Environment=PYTHONPATH={PROJECT} PYTHONDONTWRITEBYTECODE=1
WatchdogSec=2
TimeoutStopSec=3
Restart=on-failure
RestartSec=100ms
"""


@pytest.fixture
def notify_unit(systemd_container: SystemdContainer) -> Iterator[SystemdContainer]:
    c = systemd_container
    c.write_file(f"/etc/systemd/system/{UNIT}", UNIT_TEXT)
    c.systemctl("daemon-reload")
    c.systemctl("start", UNIT)
    yield c
    c.systemctl("stop", UNIT, check=False)
    c.systemctl("reset-failed", UNIT, check=False)


def test_container_is_booted_systemd(systemd_container: SystemdContainer) -> None:
    c = systemd_container
    assert c.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert c.run(["systemd-detect-virt", "--container"], check=False).stdout.strip()
    assert c.run(["systemctl", "is-system-running"], check=False).stdout.strip() in (
        "running", "degraded")
    # Host-wide sysctls are out of reach; the network namespace's own are writable.
    denied = c.run(["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq"], check=False)
    assert denied.returncode != 0
    c.run(["sh", "-c", "cat /proc/sys/net/ipv4/ip_forward > /proc/sys/net/ipv4/ip_forward"])
    assert c.run(["test", "-c", "/dev/net/tun"]).returncode == 0


def test_notify_ready_and_status(notify_unit: SystemdContainer) -> None:
    props = notify_unit.show(UNIT, "ActiveState", "SubState", "StatusText", "Type")
    assert props["ActiveState"] == "active", props
    assert props["Type"] == "notify"
    assert props["StatusText"] == "probe up: 2 peers"


def test_reload_goes_through_reloading_back_to_ready(notify_unit: SystemdContainer) -> None:
    notify_unit.systemctl("reload", UNIT)
    notify_unit.wait_for(UNIT, "StatusText", "probe up: reloaded")
    assert notify_unit.wait_for(UNIT, "ActiveState", "active") == "active"
    assert "reloaded" in notify_unit.journal("-u", UNIT, "EVENT=reloaded", "-o", "cat")


def test_watchdog_restarts_a_stopped_process(notify_unit: SystemdContainer) -> None:
    c = notify_unit
    before = c.show(UNIT, "MainPID", "NRestarts")
    assert before["NRestarts"] == "0"
    c.systemctl("kill", "--kill-whom=main", "-s", "SIGSTOP", UNIT)
    c.wait_for(UNIT, "NRestarts", "1", timeout=20)
    c.wait_for(UNIT, "ActiveState", "active", timeout=20)
    after = c.show(UNIT, "MainPID", "StatusText")
    assert after["MainPID"] != before["MainPID"]
    assert after["StatusText"] == "probe up: 2 peers"
    assert "Watchdog timeout" in c.journal("-u", UNIT, "-o", "cat")


def test_stop_sends_stopping_and_exits_cleanly(notify_unit: SystemdContainer) -> None:
    c = notify_unit
    c.systemctl("stop", UNIT)
    props = c.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert "stopping" in c.journal("-u", UNIT, "EVENT=stopping", "-o", "cat")


def test_journal_entries_carry_fields_and_no_secrets(notify_unit: SystemdContainer) -> None:
    c = notify_unit
    deadline = time.monotonic() + 10
    entries: list[dict[str, str]] = []
    while time.monotonic() < deadline and len(entries) < 1:
        out = c.journal("-u", UNIT, "PEER_ID=bob", "-o", "json")
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        time.sleep(0.1)
    assert entries, "no entry with PEER_ID=bob"
    bob = entries[-1]
    assert bob["MESSAGE"] == "peer bob connected"
    assert (bob["EVENT"], bob["MODE"], bob["PRIORITY"]) == ("connected", "chat", "6")
    assert bob["TOKEN"] == "***"
    assert bob["SYSLOG_IDENTIFIER"] == "mvpd"
    assert bob["LOGGER"] == "notify-probe"

    carol = json.loads(c.journal("-u", UNIT, "PEER_ID=carol", "-o", "json", "-n", "1"))
    assert carol["MESSAGE"] == "dropped 3 packets, token=***"
    assert (carol["EVENT"], carol["MODE"], carol["COUNT"], carol["PRIORITY"]) == (
        "drop", "tun", "3", "4")
    everything = c.journal("-u", UNIT, "-o", "verbose")
    assert "hunter2" not in everything


# --- mvpd.service's hardening, applied to a probe ---------------------------------------------

#: Options of mvpd.service that describe the daemon's lifecycle rather than its sandbox.
LIFECYCLE_KEYS = {"Type", "NotifyAccess", "ExecStart", "ExecReload", "WatchdogSec", "Restart",
                  "RestartSec", "RestartPreventExitStatus", "TimeoutStartSec", "TimeoutStopSec"}


def sandbox_of(unit_text: str) -> list[str]:
    """The [Service] lines of a unit except the lifecycle ones."""
    lines, section = [], ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif (section == "[Service]" and "=" in line and not line.startswith("#")
              and line.split("=", 1)[0] not in LIFECYCLE_KEYS):
            lines.append(line)
    return lines


def test_mvpd_hardening_keeps_tun_netlink_socket_and_webrtc_working(
    systemd_container: SystemdContainer,
) -> None:
    c = systemd_container
    shipped = (PROJECT / "packaging/systemd/mvpd.service").read_text()
    sandbox = sandbox_of(shipped)
    assert "ProtectSystem=strict" in sandbox and "DeviceAllow=/dev/net/tun rw" in sandbox
    probe = "\n".join([
        "[Service]",
        "Type=oneshot",
        f"ExecStart={PYTHON} {PROJECT}/tests/systemd/hardening_probe.py",
        *sandbox,
        f"Environment=PYTHONPATH={PROJECT}",
    ]) + "\n"
    # What install_units adds when the interpreter lives under a home directory (pyenv).
    home_paths = paths_under_home(PYTHON.parent / "mvpd")
    if home_paths:
        probe += home_paths_dropin(home_paths).split("[Service]\n", 1)[1]
        allowed = " ".join(p.relative_to(p.parents[-2]).parts[0] for p in home_paths)
        probe += f"Environment=PROBE_HOME_ALLOWED={allowed}\n"
    # What install_units adds when the venv or the source tree lives under /tmp (a CI
    # checkout), plus the probe itself.
    tmp_paths = paths_under_tmp(PYTHON.parent / "mvpd")
    if any(d in PROJECT.parents for d in TMP_DIRS):
        tmp_paths.append(PROJECT / "tests/systemd")
    if tmp_paths:
        probe += tmp_paths_dropin(tmp_paths).split("[Service]\n", 1)[1]
        allowed = " ".join(p.parts[2] for p in tmp_paths if p.parts[1] == "tmp")
        probe += f"Environment=PROBE_TMP_ALLOWED={allowed}\n"
    c.write_file("/etc/sysusers.d/mvp-agent.conf",
                 (PROJECT / "packaging/systemd/mvp-agent.conf").read_text())
    c.run(["systemd-sysusers"])
    c.write_file("/etc/systemd/system/mvpd-probe.service", probe)
    c.systemctl("daemon-reload")
    started = c.systemctl("start", "mvpd-probe.service", check=False)
    out = c.journal("-u", "mvpd-probe.service", "-o", "cat")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no probe output (start exited {started.returncode}):\n{out}"
    results = json.loads(lines[-1])
    failed = {k: v for k, v in results.items() if not v.startswith("ok")}
    assert not failed, json.dumps(results, indent=1)
    assert started.returncode == 0
    assert {"tun_create", "netlink_configure", "aiortc_data_channel", "control_socket_group",
            "open_file_limit", "home_hidden", "tmp_private", "no_write_usr",
            "bounding_set_nnp_seccomp"} <= set(results)
    assert c.run(["ip", "link", "show", "mvpprobe0"], check=False).returncode != 0
    # The probe's /tmp was its own: what it wrote there is not in the container's.
    assert c.run(["test", "-e", "/tmp/mvpd-probe-private"], check=False).returncode != 0
