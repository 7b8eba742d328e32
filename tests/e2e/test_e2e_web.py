"""``mvpctl web`` driven by headless Chromium against real daemons: the page with the token
shows the peers and acts on them; without the token, from another origin or for another
host name, requests are refused. Saves a screenshot (``docs/web.png`` when
``MVP_UPDATE_SCREENSHOT=1``)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.chromium import Chromium, find_chromium
from tests.e2e.harness import MVPCTL, Daemon, Daemons, _stop_process, base_env, wait_until

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "web.png"


@contextlib.contextmanager
def web_server(daemon: Daemon) -> Iterator[tuple[str, str]]:
    """``mvpctl web`` for ``daemon``: the URL it printed (with its token), and its base."""
    proc = subprocess.Popen(
        [*MVPCTL, "--socket", str(daemon.socket), "web", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=base_env(), text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("mvpctl web: open http://127.0.0.1:"), (
            line + (proc.stderr.read() if proc.stderr else ""))
        url = line.split()[-1]
        yield url, url.split("?", 1)[0]
    finally:
        _stop_process(proc, grace=5)


def request(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
            body: dict[str, Any] | None = None) -> tuple[int, str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as reply:
            return reply.status, reply.read().decode(), reply.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_the_web_page_shows_the_peers_acts_and_refuses_strangers(
    daemons: Daemons, tmp_path: Path
) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    alice, bob, carol = daemons.many("alice", "bob", "carol")
    alice.ctl_ok("connect", "bob")
    alice.ctl_ok("connect", "carol")
    for i in range(20):
        alice.send("bob", text=f"traffic {i}")
    with web_server(alice) as (url, base):
        token = url.split("token=", 1)[1]
        host = base.removeprefix("http://").rstrip("/")

        # --- refusals, seen from outside a browser -------------------------------------
        assert request(base)[0] == 401
        assert request(base + "api/status")[0] == 401
        assert request(base + "?token=wrong")[0] == 401
        status, _, headers = request(url)
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert request(base + "api/status", headers={"Cookie": cookie})[0] == 200
        evil = {"Cookie": cookie, "Origin": "http://evil.example"}
        assert request(base + "api/status", headers=evil)[0] == 403
        rebound = {"Cookie": cookie, "Host": f"evil.example:{host.split(':')[1]}"}
        assert request(base + "api/status", headers=rebound)[0] == 403
        action = {"Cookie": cookie, "Origin": f"http://{host}",
                  "Content-Type": "application/json"}
        assert request(base + "api/disconnect", method="POST", headers=action,
                       body={"peer": "bob"})[0] == 401  # no token header
        assert request(base + "api/disconnect", method="POST",
                       headers={**action, "X-MVP-Token": token, "Origin": "http://evil.example"},
                       body={"peer": "bob"})[0] == 403
        assert request(base + "api/disconnect", method="GET",
                       headers={"Cookie": cookie})[0] == 404  # actions are POST only
        status, _, headers = request(base + "api/status", headers={"Cookie": cookie})
        assert "Access-Control-Allow-Origin" not in headers
        assert alice.peer_state("bob") == "connected"

        # --- the page in a browser ----------------------------------------------------
        env = base_env()
        env["HOME"] = str(tmp_path)
        browser = Chromium(binary, tmp_path / "chromium", env=env)
        try:
            browser.start(url)
            browser.command("Emulation.setDeviceMetricsOverride", session=browser._session,
                            width=1000, height=620, deviceScaleFactor=1, mobile=False)

            def shown() -> Any:
                return browser.evaluate(
                    "document.body && document.body.dataset.ready === '1' && "
                    "[...document.querySelectorAll('article.peer')].map(a => a.dataset.peer "
                    "+ ':' + a.querySelector('.state').textContent + ':' + "
                    "a.querySelectorAll('svg polyline').length)")

            cards = wait_until(lambda: (v := shown()) and len(v) == 2 and v, timeout=20,
                               what="the page to show both peers")
            assert sorted(c.split(":")[0] for c in cards) == ["bob", "carol"]
            assert all(c.split(":")[1] == "connected" for c in cards)
            assert browser.evaluate("document.getElementById('agent').textContent") == "alice"
            wait_until(lambda: all(word in browser.evaluate("document.body.innerText")
                                   for word in ("direct", "pair", "udp", "ICE rtt")),
                       what="the path, pair and ICE round trip on the page")
            # A message typed into the page arrives.
            browser.evaluate("document.getElementById('send-peer').value = 'bob';"
                             "document.getElementById('send-text').value = 'from the page';"
                             "document.querySelector('#send-form button').click()")
            assert "from the page" in bob.messages("alice", 21)
            # Some traffic over a few seconds for the plots, then the screenshot.
            for burst in range(6):
                for i in range(10 * (burst % 3 + 1)):
                    alice.send("bob", text=f"burst {burst} message {i}")
                    bob.send("alice", text=f"reply {burst} {i}")
                time.sleep(0.8)
            wait_until(lambda: browser.evaluate(
                "document.querySelectorAll('svg polyline').length") >= 4, timeout=20,
                what="the plots")
            shot = browser.command("Page.captureScreenshot", session=browser._session,
                                   format="png")
            png = base64.b64decode(shot["data"])
            assert png.startswith(b"\x89PNG")
            (tmp_path / "web.png").write_bytes(png)
            if os.environ.get("MVP_UPDATE_SCREENSHOT") == "1":
                DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
                DOCS_SCREENSHOT.write_bytes(png)

            # Another origin (here: another port of the same host) can neither read the
            # API nor act through it, cookie or not.
            with other_origin_page() as other_url:
                target = browser.command("Target.createTarget", url=other_url)["targetId"]
                session = browser.command("Target.attachToTarget", targetId=target,
                                          flatten=True)["sessionId"]
                probe = (
                    "Promise.all(["
                    f"fetch('{base}api/status', {{credentials: 'include'}})"
                    ".then(r => 'read ' + r.status, e => 'blocked'),"
                    f"fetch('{base}api/disconnect', {{method: 'POST', mode: 'no-cors', "
                    "credentials: 'include', headers: {'Content-Type': 'text/plain'}, "
                    "body: JSON.stringify({peer: 'bob'})}).then(r => 'sent', e => 'blocked')"
                    "])")
                outcome = browser.command("Runtime.evaluate", session=session,
                                          expression=probe, awaitPromise=True,
                                          returnByValue=True)["result"]["value"]
                assert outcome[0] == "blocked", outcome
            assert alice.peer_state("bob") == "connected"

            # A click on carol's disconnect button closes that session.
            browser.evaluate("document.querySelector('article[data-peer=\"carol\"] "
                             "button.disconnect').click()")
            wait_until(lambda: alice.peer_state("carol") in (None, "closed"),
                       what="the click to disconnect carol")
            wait_until(lambda: carol.peer_state("alice") in (None, "closed"),
                       what="carol to hear of it")
            assert alice.peer_state("bob") == "connected"
        finally:
            browser.stop()


@contextlib.contextmanager
def other_origin_page() -> Iterator[str]:
    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>elsewhere</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
