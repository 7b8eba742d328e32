"""Smoke test of bench/rtc_pipe.py: one short round of each stack yields every figure and the
answerer process is gone afterwards. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_one_round_measures_both_stacks() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/rtc_pipe.py"), "--rounds", "1",
         "--bulk-bytes", str(1 << 20), "--echoes", "5", "--timeout", "60"],
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    figures = {"mb_s", "sender_cpu_s_per_mb", "receiver_cpu_s_per_mb", "echo_ms"}
    for stack in ("ours", "stock"):
        assert set(result["median"][stack]) == figures
        assert all(value > 0 for value in result["median"][stack].values())
        assert len(result["samples"][stack]["echo_ms"]) == 5
    assert set(result["ratio"]) == figures
    leftovers = subprocess.run(["pgrep", "-f", "rtc_pipe.py --serve"], capture_output=True)
    assert leftovers.stdout == b""
