"""Fixtures for tests that need a booted systemd (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import SystemdContainer, project_paths_reason, unsupported_reason


@pytest.fixture(scope="session")
def systemd_container() -> Iterator[SystemdContainer]:
    """One booted systemd container shared by the session; tests leave their units stopped."""
    reason = unsupported_reason() or project_paths_reason()
    if reason is not None:
        pytest.skip(f"booted-systemd tests need: {reason}")
    container = SystemdContainer()
    container.start()
    try:
        yield container
    finally:
        container.stop()
