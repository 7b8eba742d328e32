"""The seed's chat examples, run as programs against a real signaling server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mvpd.config import is_setting_variable

REPO = Path(__file__).resolve().parents[1]


def test_chat_offer_and_answer_talk(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "mvpd.signaling.server", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    procs: list[subprocess.Popen[str]] = [server]
    try:
        assert server.stdout is not None
        url = re.search(r"ws://\S+", server.stdout.readline())
        assert url, "the server printed no URL"
        env = {
            **{k: v for k, v in os.environ.items() if not is_setting_variable(k)},
            "SIGNALING_URL": url.group(0),
            "AGENT_CONFIG": str(tmp_path / "empty.yaml"),
        }
        (tmp_path / "empty.yaml").write_text("")

        def start(agent: str, *args: str) -> subprocess.Popen[str]:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "examples" / args[0]), *args[1:]],
                # Each agent its own state directory: never the machine's /var/lib/mvpd.
                env={**env, "AGENT_ID": agent, "MVPD_STATE_DIR": str(tmp_path / f"{agent}.state")},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
            )
            procs.append(proc)
            return proc

        answer = start("alice", "chat_answer.py")
        assert answer.stderr is not None
        assert "registered" in answer.stderr.readline()
        offer = start("bob", "chat_offer.py", "alice")
        assert offer.stderr is not None and offer.stdin is not None and answer.stdin is not None
        deadline = time.monotonic() + 20
        while "connected to alice" not in offer.stderr.readline():
            assert time.monotonic() < deadline
        offer.stdin.write("hello from bob\n")
        offer.stdin.flush()
        time.sleep(1.0)
        answer.stdin.write("hello from alice\n")
        answer.stdin.flush()
        time.sleep(1.0)
        offer.stdin.close()
        answer.stdin.close()
        assert offer.wait(timeout=20) == 0 and answer.wait(timeout=20) == 0
        assert offer.stdout is not None and answer.stdout is not None
        out_offer, out_answer = offer.stdout.read(), answer.stdout.read()
        assert "<bob> hello from bob" in out_answer
        assert "<alice> hello from alice" in out_offer
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
