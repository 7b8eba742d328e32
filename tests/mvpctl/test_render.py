"""mvpctl's renderers: results as text for humans, received messages on stdout."""

from __future__ import annotations

import sys

import pytest

from mvpctl.render import format_status, print_message


def test_format_status_shows_bytes_and_messages() -> None:
    text = format_status(
        {
            "agent_id": "alice",
            "version": "1",
            "uptime": 3700,
            "signaling": {"url": "ws://x", "state": "reconnecting"},
            "peers": [
                {
                    "peer": "bob",
                    "state": "connected",
                    "mode": "tun",
                    "path": "relayed",
                    "since": None,
                    "bytes_in": 2048,
                    "bytes_out": 10,
                    "messages_in": 3,
                    "messages_out": 4,
                    "dropped": {"bad-source": 2},
                    "error": None,
                }
            ],
        }
    )
    assert "uptime     1h01m" in text and "reconnecting" in text
    assert "relayed" in text and "2.0 KiB" in text and "10 B" in text and "3/4" in text


def test_format_status_shows_every_drop_counter_and_the_inboxes() -> None:
    peer = {"peer": "bob", "state": "connected", "mode": "chat", "path": "direct",
            "dropped": {"inbox-full": 500, "message-too-large": 3},
            "inbox": {"queued": 1000, "queued_bytes": 70000}}
    text = format_status({
        "agent_id": "alice", "version": "1", "uptime": 1, "signaling": {},
        "inboxes": {"inboxes": 1, "queued": 1000, "queued_bytes": 70000,
                    "waiting_followers": 2},
        "dropped": {"inbox-expired": 7},
        "peers": [peer],
    })
    assert "inboxes    1 peers, 1000 messages unread (68.4 KiB), 2 followers" in text
    assert "dropped    inbox-expired 7 (peers not listed below)" in text
    assert "bob: dropped: inbox-full 500, message-too-large 3" in text
    assert "bob: inbox 1000 messages unread (68.4 KiB)" in text
    # The table's DROPPED column is the sum.
    assert "503" in text
    quiet = format_status({"agent_id": "a", "version": "1", "uptime": 1, "signaling": {}})
    assert "dropped    none" in quiet and "0 messages unread" in quiet


def test_chat_lines_stay_one_line(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    print_message({"kind": "text", "data": "hi\nalice> fake"}, False, "bob> ", one_line=True)
    assert capsys.readouterr().out == "bob> hi\\nalice> fake\n"
