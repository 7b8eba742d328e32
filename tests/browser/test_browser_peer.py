"""examples/browser/index.html as a real peer of a real mvpd: headless Chromium runs the page,
which speaks our signaling protocol, trickles its candidates and chats with the daemon over
the ``mvp`` data channel, in both roles. The page's state is read over DevTools."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.browser.chromium import Chromium
from tests.browser.conftest import LAB_ADDRESS, Browser
from tests.e2e.harness import Daemon, Daemons, SignalServer, TurnServer, wait_until
from tests.netns import Namespace

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(120)]

BROWSER_ID = "web"
DAEMON_ID = "alice"


def page_state(page: Chromium) -> dict[str, Any] | None:
    """The page's ``window.mvp.state``; None while the page is still loading."""
    return page.evaluate("window.mvp ? window.mvp.state : null")  # type: ignore[no-any-return]


def wait_page(page: Chromium, check: str, what: str, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until the page's state satisfies the JS expression ``check`` (over ``s``)."""
    def ready() -> dict[str, Any] | None:
        state = page_state(page)
        if state is None:
            return None
        if state["errors"]:
            pytest.fail(f"the page reported errors: {state['errors']}\n" + "\n".join(state["log"]))
        # The check and the state come from one evaluation, so they agree.
        return page.evaluate(  # type: ignore[no-any-return]
            f"(s => ({check}) ? s : null)(window.mvp.state)"
        )

    try:
        return wait_until(ready, timeout, interval=0.2, what=what)  # type: ignore[no-any-return]
    except pytest.fail.Exception:
        state = page_state(page)
        print("--- page log ---\n" + "\n".join(state["log"] if state else ["(not loaded)"]))
        raise


def chat_both_ways(daemon: Daemon, page: Chromium) -> None:
    """The page's first line reaches the daemon; the daemon's reply shows on the page."""
    assert daemon.messages(BROWSER_ID, 1) == ["hello from the browser"]
    assert daemon.peer_state(BROWSER_ID) == "connected"
    daemon.send(BROWSER_ID, text="hello from mvpd")
    state = wait_page(page, "s.received.includes('hello from mvpd')", "the reply on the page")
    assert state["received"] == ["hello from mvpd"]
    assert state["mode"] == "chat"
    # The browser trickled a host candidate with the namespace's address (its SDP has none),
    # and the daemon's ICE runs directly to that address.
    lab_ip = LAB_ADDRESS.split("/")[0]
    assert any(f" {lab_ip} " in c and "typ host" in c for c in state["localCandidates"]), state
    peer = daemon.peers()[BROWSER_ID]
    assert peer["path"] == "direct" and f" {lab_ip} " in peer["remote_candidate"], peer


def test_browser_offers_to_the_daemon(
    daemons: Daemons, signal_server: SignalServer, browser: Browser
) -> None:
    # The page comes first: the server says alice is offline, and the page offers again
    # until she is there.
    page = browser.open(signal=signal_server.url, id=BROWSER_ID, peer=DAEMON_ID, mode="chat",
                        offer="1", send="hello from the browser")
    wait_page(page, "s.log.some(line => line.includes('is not connected'))", "a refused offer")
    alice = daemons(DAEMON_ID)
    wait_page(page, "s.channel === 'open'", "the data channel to open")
    chat_both_ways(alice, page)
    assert alice.peers()[BROWSER_ID]["mode"] == "chat"


def test_daemon_offers_to_the_browser(
    daemons: Daemons, signal_server: SignalServer, browser: Browser
) -> None:
    alice = daemons(DAEMON_ID)
    page = browser.open(signal=signal_server.url, id=BROWSER_ID, send="hello from the browser")
    wait_page(page, "s.signaling === 'registered'", "the page to register")
    alice.ctl_ok("connect", BROWSER_ID, "--mode", "chat", "--timeout", "20")
    state = wait_page(page, "s.channel === 'open'", "the data channel to open")
    assert state["role"] == "answer" and state["peer"] == DAEMON_ID
    # The page shows the daemon's identity; the daemon remembers the page's (first use).
    assert state["peerFingerprint"] == alice.call("id")["current"]["fingerprint"]
    assert alice.peers()[BROWSER_ID]["identity"] == "new"
    chat_both_ways(alice, page)
    # Disconnecting closes the channel first (stream reset, then SCTP SHUTDOWN: tests/
    # test_peer.py checks the chunks), so the page sees its channel close by itself, with no
    # RTCError (the page fails on one), before the bye closes its connection.
    alice.ctl_ok("disconnect", BROWSER_ID)
    state = wait_page(page, "s.channel !== 'open' && s.connection === 'closed'",
                      "the page to close")
    assert state["channelEnd"] == "closed", state["log"]
    assert any(line.endswith("channel closed") for line in state["log"]), state["log"]
    # The page keeps its certificate across connections: still the one remembered.
    alice.ctl_ok("connect", BROWSER_ID, "--mode", "chat", "--timeout", "20")
    wait_page(page, "s.channel === 'open'", "the data channel to open again")
    assert alice.peers()[BROWSER_ID]["identity"] == "remembered"


def test_page_comes_back_after_the_signaling_server_restarts(
    daemons: Daemons, signal_server: SignalServer, browser: Browser
) -> None:
    alice = daemons(DAEMON_ID)
    page = browser.open(signal=signal_server.url, id=BROWSER_ID)
    wait_page(page, "s.signaling === 'registered'", "the page to register")
    signal_server.kill()
    wait_page(page, "s.signaling !== 'registered'", "the page to see the server go")
    signal_server.start()  # same port
    wait_page(page, "s.signaling === 'registered'", "the page to register again")
    wait_until(lambda: alice.call("status")["signaling"]["state"] == "connected",
               what="alice to reconnect")
    alice.ctl_ok("connect", BROWSER_ID, "--timeout", "20")
    wait_page(page, "s.channel === 'open'", "the data channel to open")


def test_browser_trickling_before_its_offer_connects_through_a_relay(
    daemons: Daemons, signal_server: SignalServer, browser: Browser, lab: Namespace,
    tmp_path: Path,
) -> None:
    # Relay only on both sides, and the page sends every candidate before its offer (which
    # carries none): the daemon must keep them for the session the offer creates, or coturn
    # has no permission for the browser's relay address and nothing connects.
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("coturn (turnserver) is not installed; scripts/setup.sh installs it")
    turn = TurnServer(tmp_path).start(binary, wrap=lab.argv())
    try:
        alice = daemons(DAEMON_ID, env={**turn.daemon_env(), "MVPD_CONNECT_TIMEOUT": "20"})
        page = browser.open(signal=signal_server.url, id=BROWSER_ID, peer=DAEMON_ID,
                            mode="chat", offer="1", send="hello from the browser",
                            turn=turn.url, turnUser=turn.USER, turnPass=turn.PASSWORD,
                            relay="1", candidatesFirst="1")
        state = wait_page(page, "s.channel === 'open'", "the data channel to open", timeout=40)
        offered = next(i for i, line in enumerate(state["log"]) if " offered " in line)
        trickled = [i for i, line in enumerate(state["log"]) if " candidate " in line]
        assert trickled and max(trickled) < offered, state["log"]
        assert all("typ relay" in c for c in state["localCandidates"]), state
        assert alice.messages(BROWSER_ID, 1) == ["hello from the browser"]
        peer = alice.peers()[BROWSER_ID]
        assert peer["state"] == "connected" and peer["path"] == "relayed", peer
    finally:
        turn.stop()
