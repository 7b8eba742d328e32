"""End-to-end fixtures: a signaling server subprocess on a free port and daemons on it,
all stopped by PID afterwards. The helpers live in :mod:`tests.e2e.harness`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Daemon,
    Daemons,
    SignalServer,
    running_daemons,
    running_signal_server,
)


@pytest.fixture
def signal_server(tmp_path: Path) -> Iterator[SignalServer]:
    with running_signal_server(tmp_path) as server:
        yield server


@pytest.fixture
def daemons(tmp_path: Path, signal_server: SignalServer) -> Iterator[Daemons]:
    """``daemons("alice", env={...})`` starts a daemon on the test's signaling server."""
    with running_daemons(tmp_path, signal_server.url) as factory:
        yield factory


@pytest.fixture
def pair(daemons: Daemons) -> tuple[Daemon, Daemon]:
    """Two daemons, alice and bob, on one signaling server (not yet connected)."""
    alice, bob = daemons.many("alice", "bob")
    return alice, bob
