"""The HTTP side of ``mvpctl web``: a page and a small JSON API over the control socket.

Runs as the user who started it and reaches mvpd through :class:`mvpctl.client.Client`
with that user's rights: a reader sees status and stats, a member of the socket's group
may also connect, disconnect, send and ping. The daemon decides, as for any mvpctl call.

Who may use the page: only a browser that was given the URL with the random token this
process prints. The rules, all enforced here:

* Loopback only: the listen address must be 127.0.0.0/8, ``::1`` or ``localhost``.
* The ``Host`` header must name this server (``127.0.0.1:PORT``, ``localhost:PORT``,
  ``[::1]:PORT``): a page from elsewhere whose host name was re-pointed at 127.0.0.1 (DNS
  rebinding) is refused.
* ``GET /?token=T`` with the right token sets an ``HttpOnly; SameSite=Strict`` cookie and
  redirects to ``/`` (the token leaves the address bar). Every other request needs that
  cookie: 401 without it.
* Actions are ``POST`` only, with the token in an ``X-MVP-Token`` header (the page has it;
  another site cannot read it) and an ``Origin`` equal to this server's; a request whose
  ``Origin`` or ``Sec-Fetch-Site`` says it comes from another site is refused with 403,
  whatever the method. No CORS headers are ever sent, so no other origin can read answers.
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import secrets
import socket
import sys
import urllib.parse
import webbrowser
from importlib import resources
from typing import Any

from mvpd.proto.errors import DaemonNotRunning, Forbidden, MvpError, NotFound

from ..client import Client

COOKIE = "mvp_web"
TOKEN_HEADER = "X-MVP-Token"
#: Largest JSON body of an action.
MAX_BODY = 64 * 1024
_STATIC = {
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
#: The daemon call behind each action, with the parameters it takes from the body.
_ACTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "/api/connect": ("connect", ("peer", "mode")),
    "/api/disconnect": ("disconnect", ("peer",)),
    "/api/send": ("send", ("peer", "text")),
    "/api/ping": ("ping", ("peer",)),
}
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
}


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` on loopback; ``ValueError`` saying what is wrong otherwise."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    host = host.strip("[]") or "127.0.0.1"
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"{host} is not a loopback address: the page acts with your "
                             "rights on mvpd, so it is served on this machine only "
                             "(use an SSH tunnel to reach it from elsewhere)")
    return host, int(port_text)


class WebApp:
    """What the handlers share: the socket to reach mvpd, the token, the allowed hosts."""

    def __init__(self, socket_path: str | None, token: str) -> None:
        self.socket_path = socket_path
        self.token = token
        self.port = 0

    @property
    def hosts(self) -> set[str]:
        return {f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}"}

    def origins(self) -> set[str]:
        return {f"http://{host}" for host in self.hosts}

    def token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def call(self, method: str, **params: Any) -> Any:
        with Client.connect(self.socket_path, timeout=30, client="mvpctl-web") as client:
            return client.call(method, reply_timeout=60, **params)


class Handler(http.server.BaseHTTPRequestHandler):
    """One request of the page or its API."""

    app: WebApp
    server_version = "mvpctl-web"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the terminal shows the URL; requests are not news

    # --- checks ------------------------------------------------------------------------------

    def _cookie_token(self) -> str | None:
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return None

    def _refusal(self) -> tuple[int, str] | None:
        """Why this request is refused (status, text), or None when it may go on."""
        if self.headers.get("Host") not in self.app.hosts:
            return 403, "wrong Host header: open the URL that mvpctl web printed"
        origin = self.headers.get("Origin")
        if origin is not None and origin not in self.app.origins():
            return 403, "cross-origin requests are refused"
        fetch_site = self.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return 403, "cross-site requests are refused"
        return None

    # --- GET ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._text(*refusal)
            return
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/" and "token" in query:
            if not self.app.token_ok(query["token"][0]):
                self._text(401, "wrong token: open the URL that mvpctl web printed")
                return
            self.send_response(303)
            self.send_header("Location", "/")
            self.send_header("Set-Cookie", f"{COOKIE}={self.app.token}; HttpOnly; "
                             "SameSite=Strict; Path=/")
            self._finish_headers(0)
            return
        if not self.app.token_ok(self._cookie_token()):
            self._text(401, "no token: open the URL that mvpctl web printed")
            return
        if url.path == "/":
            self._page()
        elif url.path in _STATIC:
            name, content_type = _STATIC[url.path]
            self._body(200, (resources.files(__package__) / "static" / name).read_bytes(),
                       content_type)
        elif url.path == "/api/status":
            self._api(lambda: self.app.call("status"))
        elif url.path == "/api/stats":
            peer = (query.get("peer") or [""])[0]
            self._api(lambda: self.app.call("stats", peer=peer))
        else:
            self._text(404, "not found")

    def _page(self) -> None:
        html = (resources.files(__package__) / "static" / "index.html").read_text()
        self._body(200, html.replace("{{TOKEN}}", self.app.token).encode(),
                   "text/html; charset=utf-8")

    # --- POST --------------------------------------------------------------------------------

    def do_POST(self) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._text(*refusal)
            return
        if self.headers.get("Origin") is None:
            self._text(403, "actions need an Origin header (sent by every browser)")
            return
        if not self.app.token_ok(self.headers.get(TOKEN_HEADER)):
            self._text(401, f"actions need the {TOKEN_HEADER} header")
            return
        action = _ACTIONS.get(urllib.parse.urlsplit(self.path).path)
        if action is None:
            self._text(404, "not found")
            return
        body = self._json_body()
        if body is None:
            return
        method, names = action
        params = {name: body[name] for name in names if body.get(name) is not None}
        if method == "connect":
            params["wait"] = False
        self._api(lambda: self.app.call(method, **params))

    def _json_body(self) -> dict[str, Any] | None:
        if (self.headers.get("Content-Type") or "").split(";")[0] != "application/json":
            self._text(415, "send application/json")
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._text(413, f"at most {MAX_BODY} bytes")
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._text(400, "send a JSON object")
            return None
        return body

    # --- answers -----------------------------------------------------------------------------

    def _api(self, call: Any) -> None:
        try:
            result = call()
        except MvpError as exc:
            statuses: dict[type[MvpError], int] = {
                Forbidden: 403, NotFound: 404, DaemonNotRunning: 503,
            }
            status = statuses.get(type(exc), 502)
            self._json(status, {"error": exc.message, "code": exc.code})
            return
        self._json(200, {} if result is None else result)

    def _json(self, status: int, value: Any) -> None:
        self._body(status, json.dumps(value, default=_json_default).encode(),
                   "application/json")

    def _text(self, status: int, text: str) -> None:
        self._body(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self._finish_headers(len(body))
        self.wfile.write(body)

    def _finish_headers(self, length: int) -> None:
        self.send_header("Content-Length", str(length))
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _Server(http.server.ThreadingHTTPServer):
    """A threading HTTP server on IPv4 or (for ``::1``) IPv6."""

    def __init__(self, address: tuple[str, int], handler: Any,
                 family: socket.AddressFamily | None = None) -> None:
        if family is not None:
            self.address_family = family
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a closed tab is not news
            super().handle_error(request, client_address)


def make_server(listen: str, socket_path: str | None) -> tuple[http.server.HTTPServer, str]:
    """The server (not yet serving) and the URL with its token."""
    host, port = parse_listen(listen)
    app = WebApp(socket_path, secrets.token_urlsafe(24))
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = _Server((host, port), handler, family=socket.AF_INET6 if ":" in host else None)
    server.daemon_threads = True
    app.port = int(server.server_address[1])
    shown = "127.0.0.1" if host == "localhost" else (f"[{host}]" if ":" in host else host)
    return server, f"http://{shown}:{app.port}/?token={app.token}"


def serve(listen: str, socket_path: str | None, *, open_browser: bool = False) -> None:
    """Serve until interrupted, after printing the URL."""
    try:
        server, url = make_server(listen, socket_path)
    except (ValueError, OSError) as exc:
        raise MvpError(f"cannot serve the page on {listen}: {exc}") from None
    # Check now that mvpd answers, so a wrong socket shows at once and not in the page.
    Client.connect(socket_path, timeout=10, client="mvpctl-web").close()
    print(f"mvpctl web: open {url}", flush=True)
    print("(anyone with this URL acts with your rights on mvpd; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
