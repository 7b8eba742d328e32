"""``mvpctl web``'s address rules, and that only that command loads the web server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mvpctl.web.server import make_server, parse_listen


def test_only_loopback_addresses_are_served() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen("localhost:8080") == ("localhost", 8080)
    assert parse_listen(":8080") == ("127.0.0.1", 8080)
    for bad in ("0.0.0.0:8080", "192.0.2.1:80", "example.org:80"):
        with pytest.raises(ValueError, match="not a loopback address"):
            parse_listen(bad)
    for bad in ("127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def test_each_server_has_its_own_long_random_token() -> None:
    first, url1 = make_server("127.0.0.1:0", None)
    second, url2 = make_server("127.0.0.1:0", None)
    try:
        token1, token2 = url1.split("token=")[1], url2.split("token=")[1]
        assert token1 != token2 and len(token1) >= 32
        assert url1.startswith(f"http://127.0.0.1:{first.server_address[1]}/?token=")
    finally:
        first.server_close()
        second.server_close()


def test_the_web_server_is_imported_by_mvpctl_web_only() -> None:
    code = ("import sys, mvpctl.app\n"
            "print([m for m in sys.modules if m.startswith(('mvpctl.web', 'http.server'))])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
