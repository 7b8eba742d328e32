"""Our WebRTC stack against headless Chromium (its own SCTP and DCEP), in both roles.

Chromium gathers candidates only on the interface with the default route, so both run in
the browser tests' network namespace (``lab``); our side is tests/rtc/rtc_child.py there,
the browser is driven over DevTools. Chromium's SDP is complete (it waits for gathering).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.chromium import Chromium
from tests.browser.conftest import chromium_binary, lab  # noqa: F401 (fixtures)
from tests.e2e.harness import base_env
from tests.netns import Namespace

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]

#: Page-side helpers: one peer connection, a log of what arrives, gathering awaited.
PAGE_SETUP = """
window.t = {received: [], closed: [], pc: new RTCPeerConnection()};
t.watch = ch => {
  ch.binaryType = 'arraybuffer';
  t.ch = ch;
  ch.onmessage = e => t.received.push(typeof e.data === 'string' ? e.data
    : 'bin:' + Array.from(new Uint8Array(e.data).slice(0, 4)).join(',') + ':' + e.data.byteLength);
  ch.onclose = () => t.closed.push(ch.label);
};
t.gathered = () => new Promise(r => {
  if (t.pc.iceGatheringState === 'complete') return r();
  t.pc.onicegatheringstatechange = () => t.pc.iceGatheringState === 'complete' && r();
});
t.pc.ondatachannel = e => t.watch(e.channel);
true
"""


class Child:
    """tests/rtc/rtc_child.py inside the namespace."""

    def __init__(self, namespace: Namespace) -> None:
        env = dict(base_env(), PYTHONPATH=str(REPO))
        self.proc = namespace.popen(sys.executable, "-m", "tests.rtc.rtc_child",
                                    cwd=str(REPO), env=env, bufsize=1)
        self.events: list[dict[str, Any]] = []
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 20.0) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the rtc child said nothing") from None
        if not line:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"the rtc child ended: {stderr[-3000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def wait_event(self, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.read(deadline - time.monotonic())
            self.events.append(message)
            if all(message.get(k) == v for k, v in match.items()):
                return message
        raise TimeoutError(f"no event {match}; got {self.events}")

    def reply(self) -> dict[str, Any]:
        while True:
            message = self.read()
            if "sdp" in message:
                return message
            self.events.append(message)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def page(chromium_binary: str, lab: Namespace, tmp_path: Path) -> Iterator[Chromium]:  # noqa: F811
    env = dict(base_env(), HOME=str(tmp_path))
    browser = Chromium(chromium_binary, tmp_path / "chromium", wrap=lab.argv(), env=env)
    try:
        browser.start("about:blank")
        assert browser.evaluate(PAGE_SETUP) is True
        yield browser
    finally:
        browser.stop()


@pytest.fixture
def child(lab: Namespace) -> Iterator[Child]:  # noqa: F811 (the fixture)
    peer = Child(lab)
    try:
        yield peer
    finally:
        peer.stop()


def wait_page(page: Chromium, expression: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.1)
    received = page.evaluate("JSON.stringify(t.received)")
    raise TimeoutError(f"{expression} stayed false; the page received {received}")


def exchange_messages(page: Chromium) -> None:
    """Text, empty text, 256 KiB binary and empty binary to our side and echoed back."""
    page.evaluate(
        "t.ch.send('hello'); t.ch.send(''); t.ch.send(new Uint8Array(262144).fill(7));"
        "t.ch.send(new Uint8Array([1, 2, 3])); t.ch.send(new ArrayBuffer(0)); true"
    )
    received = wait_page(page, "t.received.length >= 5 && t.received")
    # Sorted: the browser-made channel is unordered.
    assert sorted(received) == sorted(
        ["echo:hello", "echo:", "bin:7,7,7,7:262144", "bin:3,2,1:3", "bin::0"]
    )


def test_chromium_offers_to_our_stack(page: Chromium, child: Child) -> None:
    page.evaluate(
        "t.watch(t.pc.createDataChannel('browser', {ordered: false, maxRetransmits: 5})); true"
    )
    offer = page.evaluate(
        "(async () => { await t.pc.setLocalDescription(); await t.gathered();"
        " return t.pc.localDescription.sdp; })()"
    )
    child.send(op="answer", sdp=offer)
    answer = child.reply()["sdp"]
    page.evaluate(f"t.pc.setRemoteDescription({{type: 'answer', sdp: {json.dumps(answer)}}})"
                  ".then(() => true)")
    wait_page(page, "t.ch.readyState === 'open'")
    child.wait_event(event="open", label="browser")
    exchange_messages(page)
    # The browser closes its channel: a stream reset our side sees, the connection stays.
    page.evaluate("t.ch.close(); true")
    child.wait_event(event="close", label="browser")
    wait_page(page, "t.closed.includes('browser')")
    assert page.evaluate("t.pc.connectionState") == "connected"


def test_our_stack_offers_to_chromium(page: Chromium, child: Child) -> None:
    child.send(op="offer")
    offer = child.reply()["sdp"]
    answer = page.evaluate(
        "(async () => {"
        f" await t.pc.setRemoteDescription({{type: 'offer', sdp: {json.dumps(offer)}}});"
        " await t.pc.setLocalDescription(); await t.gathered();"
        " return t.pc.localDescription.sdp; })()"
    )
    child.send(op="remote", sdp=answer)
    wait_page(page, "t.ch && t.ch.readyState === 'open'")
    assert page.evaluate("[t.ch.label, t.ch.protocol, t.ch.ordered]") == ["c", "p", True]
    child.wait_event(event="open", label="c")
    exchange_messages(page)
    # Our side closes: Chromium sees a clean close of that channel only.
    child.send(op="close")
    wait_page(page, "t.closed.includes('c')")
    child.wait_event(event="close", label="c")
    assert page.evaluate("t.pc.connectionState") == "connected"
