"""Headless Chromium for tests, driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` makes Chromium read DevTools commands (JSON, each ended by a NUL
byte) on fd 3 and write replies and events on fd 4. A pipe needs no port, no
DevToolsActivePort polling, and works when Chromium runs inside a network namespace the test
process is not in.

Flags that matter here (see DESIGN.md):

* ``--no-sandbox``: the tests run as root, where Chromium refuses its sandbox;
* ``--disable-features=WebRtcHideLocalIpsWithMdns``: real host candidates, not ``.local``
  names (aiortc cannot resolve mDNS);
* ``--headless --disable-gpu --disable-quic --no-first-run --disable-background-networking
  --disable-component-update --disable-sync`` and a new empty ``--user-data-dir``: otherwise
  it tries to reach Google hosts.

Chromium gathers candidates only on the interface with the default route.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Debian's real binary; /usr/bin/chromium is a shell wrapper around it.
_DEBIAN_BINARY = Path("/usr/lib/chromium/chromium")


def find_chromium() -> str | None:
    """The Chromium binary to run, or None when none is installed."""
    if _DEBIAN_BINARY.exists() and shutil.which("chromium"):
        return str(_DEBIAN_BINARY)
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsError(Exception):
    """A DevTools command failed, timed out, or Chromium went away."""


class Chromium:
    """One headless Chromium showing one page, stopped by :meth:`stop` (by PID).

    ``wrap`` prefixes the command (e.g. ``ip netns exec NS``); it must exec the command so
    the PID stays Chromium's.
    """

    def __init__(
        self, binary: str, profile: Path, *, wrap: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.profile = profile
        self.wrap = list(wrap)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = profile.parent / f"{profile.name}.stderr"
        self._to_browser = -1
        self._from_browser = -1
        self._buffer = b""
        self._next_id = 0
        self._session = ""

    def start(self, url: str) -> Chromium:
        """Launch Chromium on ``url`` and attach to that page."""
        self.profile.mkdir(parents=True)
        command_read, self._to_browser = os.pipe()
        self._from_browser, reply_write = os.pipe()
        argv = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps",
            "--disable-extensions", "--disable-features=WebRtcHideLocalIpsWithMdns",
            "--remote-debugging-pipe", f"--user-data-dir={self.profile}", url,
        ]  # fmt: skip
        # The pipes must be fds 3 and 4 in Chromium: bash moves them there, then execs (dash
        # cannot redirect fds above 9).
        script = (f'exec "$@" 3<&{command_read} 4>&{reply_write} '
                  f"{command_read}<&- {reply_write}>&-")
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [*self.wrap, "bash", "-c", script, "bash", *argv],
                pass_fds=(command_read, reply_write), stdin=subprocess.DEVNULL,
                stdout=stderr, stderr=stderr, env=self.env,
            )
        os.close(command_read)
        os.close(reply_write)
        self._session = self._attach(url)
        return self

    def _attach(self, url: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        base = url.split("?", 1)[0]
        while True:
            targets = self.command("Target.getTargets")["targetInfos"]
            pages = [t for t in targets if t["type"] == "page" and t["url"].startswith(base)]
            if pages:
                attached = self.command(
                    "Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True
                )
                return str(attached["sessionId"])
            if time.monotonic() > deadline:
                raise DevToolsError(f"no page for {url} among {targets}")
            time.sleep(0.1)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable results)."""
        result = self.command(
            "Runtime.evaluate", session=self._session, expression=expression,
            returnByValue=True, awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def command(self, method: str, session: str = "", timeout: float = 10.0,
                **params: Any) -> dict[str, Any]:
        """Send one DevTools command and wait for its reply (events are skipped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._to_browser, data):]
        except OSError as exc:
            gone = f"{method}: Chromium is gone ({exc})"
            raise DevToolsError(gone + self._stderr_tail()) from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]

    def _read_message(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DevToolsError(f"{method}: no reply in time{self._stderr_tail()}")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise DevToolsError(f"{method}: Chromium closed the pipe{self._stderr_tail()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)  # type: ignore[no-any-return]

    def _stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n--- chromium ---\n" + self.stderr_path.read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        """Close the browser (DevTools ``Browser.close``), else SIGTERM, else SIGKILL."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(DevToolsError, OSError):
                self.command("Browser.close", timeout=3)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_browser = self._from_browser = -1
