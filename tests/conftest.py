"""Settings for the whole test suite."""

from __future__ import annotations

import pytest

import mvpd.peer

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
