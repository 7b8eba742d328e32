"""The 10^5-example fuzz runs (marked ``slow``) take minutes: they run only when asked for
with a marker expression naming ``slow`` (``pytest tests/sctp -m slow``)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="10^5-example fuzzing: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None and "sctp" in item.nodeid:
            item.add_marker(skip)
