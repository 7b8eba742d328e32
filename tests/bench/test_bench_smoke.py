"""Smoke test of bench/main_job.py --quick: every measurement produces a figure and nothing the
benchmark started outlives it. No timing is asserted (the machine is shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line, environment or working directory contains ``text``."""
    found = []
    needle = text.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text in str((proc / "cwd").readlink()):
                found.append(f"{proc.name}: cwd")
                continue
        except OSError:
            pass
        for part in ("cmdline", "environ"):
            try:
                if needle in (proc / part).read_bytes():
                    found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
                    break
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_quick_run_measures_everything_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    work_parent = tmp_path / "w"
    work_parent.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/main_job.py"),
            "--quick",
            "--json",
            str(out),
            "--tmpdir",
            str(work_parent),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["measure"]: row for row in result["rows"]}
    for prefix in (
        "mvpctl status, process",
        "status RPC: connect+hello+call",
        "connect: RPC to channel open",
        "connect: mvpctl connect process",
        "100 B echo round trip p50",
        "100 B echo round trip p99",
        "mvpctl ping round trip p50",
        "bulk throughput, mvpctl pipe",
        "hub RSS, 1 peer",
        "hub RSS, 3 peer",
    ):
        matching = [row for name, row in rows.items() if name.startswith(prefix)]
        assert matching, f"no row for {prefix!r}: {sorted(rows)}"
        row = matching[0]
        assert row["value"] > 0 and row["baseline"] > 0 and row["ratio"] > 0, row
    assert "| measure" in done.stdout  # the table was printed
    # Everything it started is gone, and so is its temporary directory.
    assert not _processes_mentioning(result["facts"]["workdir"])
    assert not any(work_parent.iterdir())
