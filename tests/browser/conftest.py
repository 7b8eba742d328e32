"""Fixtures for the browser tests: a network namespace with a default route, and in it the
signaling server, mvpd daemons, a static HTTP server for examples/browser and headless
Chromium, all stopped by PID and removed with the namespace.

Why a namespace: Chromium gathers ICE candidates only on the interface with the default
route, and never on loopback. Inside the namespace that interface is a veth end with an
address that exists only there, so the browser and the daemon meet on it whatever the
machine's own network looks like, and nothing they send can leave the namespace.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.chromium import Chromium, find_chromium
from tests.e2e import harness
from tests.e2e.harness import (
    Daemons,
    SignalServer,
    base_env,
    running_daemons,
    running_signal_server,
)
from tests.netns import Namespace, namespace, require_netns

ROOT = Path(__file__).resolve().parents[2]
PAGE_DIR = ROOT / "examples" / "browser"
#: The only routable address in the namespace (TEST-NET-like private range, never outside).
LAB_ADDRESS = "10.203.0.1/24"


@pytest.fixture
def chromium_binary() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; scripts/setup.sh "
                    "tries it)")
    return binary


@pytest.fixture
def lab(chromium_binary: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Namespace]:
    """The namespace: ``lo`` and a veth end with the default route. Every ``mvpd`` the
    e2e harness starts during the test runs inside it."""
    require_netns()
    with namespace("web") as ns:
        # No dummy driver in every kernel: a veth pair with both ends in the namespace does
        # the same (what leaves mvpweb0 reaches mvpweb1 and stops there).
        subprocess.run(["ip", "link", "add", "mvpweb0", "netns", ns.name, "type", "veth",
                        "peer", "name", "mvpweb1", "netns", ns.name],
                       check=True, capture_output=True)  # fmt: skip
        for args in (
            ("addr", "add", LAB_ADDRESS, "dev", "mvpweb0"),
            ("link", "set", "mvpweb0", "up"),
            ("link", "set", "mvpweb1", "up"),
            ("route", "add", "default", "dev", "mvpweb0"),
        ):
            subprocess.run(["ip", "-n", ns.name, *args], check=True, capture_output=True)
        # The harness builds its commands from MVPD; wrapped, they start inside the namespace
        # (``ip netns exec`` execs, so the PIDs it stops are still mvpd's). The control sockets
        # are Unix sockets in tmp_path: reachable from here.
        monkeypatch.setattr(harness, "MVPD", ns.argv(*harness.MVPD))
        yield ns


@pytest.fixture
def signal_server(tmp_path: Path, lab: Namespace) -> Iterator[SignalServer]:
    with running_signal_server(tmp_path) as server:
        yield server


@pytest.fixture
def daemons(tmp_path: Path, signal_server: SignalServer) -> Iterator[Daemons]:
    with running_daemons(tmp_path, signal_server.url) as factory:
        yield factory


@pytest.fixture
def page_url(lab: Namespace) -> Iterator[str]:
    """examples/browser served by ``python -m http.server`` on 127.0.0.1 in the namespace."""
    proc = lab.popen(
        sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1",
        "--directory", str(PAGE_DIR), "0", stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://...) ..."
        assert "port" in line, f"http.server said {line!r}"
        port = int(line.split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}/index.html"
    finally:
        proc.kill()
        proc.wait(5)


class Browser:
    """Starts Chromium on the page (inside the lab) and stops every one it started."""

    def __init__(self, binary: str, lab: Namespace, workdir: Path, page_url: str) -> None:
        self.binary = binary
        self.lab = lab
        self.workdir = workdir
        self.page_url = page_url
        self.started: list[Chromium] = []

    def open(self, **query: str) -> Chromium:
        """Chromium on the page with these query parameters (the page starts on ``id``)."""
        url = self.page_url + "?" + urllib.parse.urlencode(query)
        env = base_env()
        env["HOME"] = str(self.workdir)
        browser = Chromium(self.binary, self.workdir / f"chromium-{len(self.started)}",
                           wrap=self.lab.argv(), env=env)
        self.started.append(browser)
        return browser.start(url)

    def stop_all(self) -> None:
        for browser in self.started:
            browser.stop()


@pytest.fixture
def browser(chromium_binary: str, lab: Namespace, tmp_path: Path,
            page_url: str) -> Iterator[Browser]:
    factory = Browser(chromium_binary, lab, tmp_path, page_url)
    try:
        yield factory
    finally:
        factory.stop_all()

