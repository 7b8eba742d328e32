"""Settings for the whole test suite."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import mvpd.peer
from tests.e2e.harness import TurnServer

#: Shared fixtures: ``copy_kind`` (both ways mvpd copies passed descriptors).
pytest_plugins = ["tests.descriptors"]

#: The machine's own state directory: tests keep theirs under tmp_path.
MACHINE_STATE = Path("/var/lib/mvpd")
_machine_state_existed = MACHINE_STATE.exists()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A test whose daemon or agent left the state directory out of its environment writes
    # an identity into the machine's: fail the run that does it, naming the directory.
    if not _machine_state_existed and MACHINE_STATE.exists():
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"ERROR: the tests created {MACHINE_STATE}: a test left "
                                "MVPD_STATE_DIR out of an agent's environment", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits
    # SIGINT ignored, and so would every mvpctl it starts: the tests that press Ctrl-C on one
    # would wait for ever. A handler here is reset to the default in each child at exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# A peer session event that its state table refuses is a bug: make it raise in tests (in
# production it is logged and ignored).
mvpd.peer.session.strict_transitions = True


@pytest.fixture(autouse=True)
def _own_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings made in a test keep their identity and known_peers in a temporary state
    directory, never in the machine's /var/lib/mvpd."""
    monkeypatch.setenv("MVPD_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def turn_server(tmp_path: Path) -> Iterator[TurnServer]:
    """Debian's coturn on 127.0.0.1 (one static user), stopped by PID after the test."""
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("coturn (turnserver) is not installed; scripts/setup.sh installs it")
    server = TurnServer(tmp_path)
    try:
        yield server.start(binary)
    finally:
        server.stop()
