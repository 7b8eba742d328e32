"""Fixtures for tests that need a booted systemd (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.systemd.harness import (
    MVPD_BIN,
    InstalledUnits,
    SystemdContainer,
    unsupported_reason,
)


@pytest.fixture(scope="session")
def systemd_container() -> Iterator[SystemdContainer]:
    """One booted systemd container shared by the session; tests leave their units stopped."""
    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(f"booted-systemd tests need: {reason}")
    container = SystemdContainer()
    container.start()
    try:
        yield container
    finally:
        container.stop()


@pytest.fixture(scope="session")
def installed_units(systemd_container: SystemdContainer) -> Iterator[InstalledUnits]:
    """``mvpd install-units`` run inside the container as an operator would (into ``/``,
    with systemd-sysusers and daemon-reload); the units are stopped again at the end."""
    if not MVPD_BIN.exists():
        pytest.skip("the mvpd console script is not installed in the venv")
    c = systemd_container
    result = c.run([str(MVPD_BIN), "install-units"])
    yield InstalledUnits(c, result.stdout + result.stderr)
    for unit in ("mvpd.service", "mvp-signal.service"):
        c.systemctl("stop", unit, check=False)
        c.systemctl("reset-failed", unit, check=False)
