"""The reference signaling server: WebSocket I/O around :class:`SignalingRouter`.

Every decision (who is registered, where a message goes, which limits apply) lives in
:mod:`mvpd.proto.router`; this module only accepts connections, feeds frames to the router and
carries out the sends and closes it returns.

Runs inside the daemon (:func:`serve`) or alone::

    python -m mvpd.signaling.server --listen 127.0.0.1:8765 [--token T] [--tokens-file F]
        [--redis redis://HOST:PORT/DB]

With a Redis URL (``--redis``, ``signaling_server.redis``) several servers share one set of
registrations and route to each other's agents (:mod:`mvpd.signaling.cluster`).

Standalone, the first line on stdout is ``listening on ws://HOST:PORT`` (with the real port
when ``--listen`` asks for port 0); SIGTERM or SIGINT stop it with exit status 0. The shared
token may also come from the environment (``MVPD_SIGNALING_SERVER__TOKEN``), which keeps it out
of the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import resource
import signal
import ssl as ssl_module
import sys
from collections import deque
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import SecretStr, ValidationError
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from ..config import EX_CONFIG, SignalingServerSettings, split_host_port
from ..logs import setup_logging
from ..proto.errors import ConfigError
from ..proto.router import (
    LIVENESS_TIMEOUT,
    Action,
    CheckLiveness,
    ClaimId,
    Close,
    Forward,
    ReleaseId,
    Send,
    SignalingRouter,
)
from ..proto.signaling import AGENT_ID_PATTERN, describe_validation_error

if TYPE_CHECKING:
    from .cluster import RedisLink

logger = logging.getLogger("mvpd.signaling.server")

#: Environment variables read by :func:`main` for the shared token and the Redis URL.
TOKEN_ENV = "MVPD_SIGNALING_SERVER__TOKEN"
REDIS_ENV = "MVPD_SIGNALING_SERVER__REDIS"


#: Seconds between two warnings about closing slow receivers (the count goes in each).
_SLOW_LOG_INTERVAL = 10.0


class _Outbox:
    """What waits to be written to one connection, and the task writing it."""

    __slots__ = ("queue", "queued_bytes", "writer")

    def __init__(self) -> None:
        self.queue: deque[Send[ServerConnection] | Close[ServerConnection]] = deque()
        self.queued_bytes = 0
        self.writer: asyncio.Task[None] | None = None


class SignalingServer:
    """A WebSocket signaling server built from :class:`SignalingServerSettings`.

    ``await start()`` binds (port 0 picks a free port, see :attr:`port`), ``await close()``
    closes every connection and the listening socket. ``liveness_timeout`` is how long the
    holder of an id has to answer a ping when another connection registers the same id;
    ``failures_per_minute`` is the per-address budget of failed registrations (see
    :mod:`mvpd.proto.router`).
    """

    def __init__(
        self,
        settings: SignalingServerSettings | None = None,
        *,
        ssl: ssl_module.SSLContext | None = None,
        flood_close_after: int | None = None,
        liveness_timeout: float = LIVENESS_TIMEOUT,
        failures_per_minute: int = 5,
    ) -> None:
        #: TLS for wss:// (usually a reverse proxy does this; tests and small setups need not).
        self.ssl = ssl
        self.settings = settings if settings is not None else SignalingServerSettings()
        token = self.settings.token.get_secret_value() if self.settings.token else None
        tokens = (
            load_tokens_file(self.settings.tokens_file, shared_token=token is not None)
            if self.settings.tokens_file is not None
            else None
        )
        self.router: SignalingRouter[ServerConnection] = SignalingRouter(
            token=token,
            tokens=tokens,
            max_message_size=self.settings.max_message_size,
            rate=self.settings.rate,
            burst=self.settings.burst,
            flood_close_after=flood_close_after,
            failures_per_minute=failures_per_minute,
            cluster=self.settings.redis is not None,
        )
        self.liveness_timeout = liveness_timeout
        #: The link to the other servers through Redis, when ``settings.redis`` is set.
        self.cluster: RedisLink[ServerConnection] | None = None
        if self.settings.redis is not None:
            try:
                from .cluster import RedisLink
            except ImportError:
                raise ConfigError(
                    "signaling_server.redis needs the redis package: "
                    "pip install 'mvp-agent[cluster]'"
                ) from None
            self.cluster = RedisLink(
                self.settings.redis.get_secret_value(),
                self.router,
                apply=self._apply_detached,
                ping=self._ping,
                liveness_timeout=liveness_timeout,
            )
        self._host, self._port = split_host_port(self.settings.listen)
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: A peer that does not read its messages is closed once this much is queued for it.
        self._slow_consumer_limit = max(1 << 20, 8 * self.settings.max_message_size)
        self._outboxes: dict[ServerConnection, _Outbox] = {}
        self.slow_consumers_dropped = 0
        self._slow_logged_at = float("-inf")
        #: Routed messages that could not be written (their senders were answered offline).
        self.undelivered = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting connections. Raises ``OSError`` if the address is taken."""
        if self._server is not None:
            return
        if self.cluster is not None:
            await self.cluster.start()
        ping = self.settings.ping_interval or None
        self._server = await ws_serve(
            self._handle,
            self._host,
            self._port,
            # Frames somewhat over the cap still reach the router, which explains the refusal
            # before closing; far larger ones are cut off by websockets itself (also 1009).
            max_size=2 * self.settings.max_message_size,
            # permessage-deflate keeps zlib state per connection: too costly for thousands of
            # idle agents, and signaling frames are small.
            compression=None,
            ping_interval=ping,
            ping_timeout=ping,
            close_timeout=5,
            ssl=self.ssl,
            logger=logging.getLogger("mvpd.signaling.server.ws"),
        )
        auth = "tokens required" if self.router.auth_required else "no token required"
        logger.info("signaling server listening on %s (%s)", self.url, auth)

    async def close(self) -> None:
        """Close every connection (1001 going away) and stop listening."""
        server, self._server = self._server, None
        held = self.router.registered_ids()
        if server is not None:
            server.close()
            await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.close(held)

    async def __aenter__(self) -> SignalingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The port listened on (the real one when the settings say 0)."""
        if self._server is None:
            raise RuntimeError("the signaling server is not started")
        for sock in self._server.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("the signaling server has no listening socket")

    @property
    def host(self) -> str:
        """The host listened on."""
        return self._host

    @property
    def url(self) -> str:
        """``ws://HOST:PORT`` (``wss://`` with TLS) for clients on this machine."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "wss" if self.ssl is not None else "ws"
        return f"{scheme}://{host}:{self.port}"

    def reload_tokens(self) -> None:
        """Read the tokens file again (SIGHUP to ``mvpd signal``). On a :class:`ConfigError`
        the old tokens stay.
        Agents already registered stay registered."""
        token = self.settings.token.get_secret_value() if self.settings.token else None
        tokens = (
            load_tokens_file(self.settings.tokens_file, shared_token=token is not None)
            if self.settings.tokens_file is not None
            else None
        )
        self.router.set_tokens(token, tokens)
        logger.info("tokens reloaded (%d per-agent)", len(tokens or {}))

    def stats(self) -> dict[str, Any]:
        """Counters and current numbers, as plain data."""
        data = self.router.stats.as_dict()
        data["connections"] = self.router.connection_count
        data["registered"] = len(self.router.registered_ids())
        data["slow_consumers_dropped"] = self.slow_consumers_dropped
        data["undelivered"] = self.undelivered
        if self.cluster is not None:
            data["cluster"] = self.cluster.stats()
        return data

    # --- connections --------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        address = ws.remote_address
        self.router.connect(ws, loop.time(), source=str(address[0]) if address else None)
        try:
            async for data in ws:
                actions = self.router.receive(ws, data, loop.time())
                if actions:
                    await self._apply(ws, actions)
        except ConnectionClosed:
            pass
        finally:
            # A claim waiting for this connection's id may be granted now.
            actions = self.router.disconnect(ws)
            # Its writer (if any) still holds the outbox and answers for what it cannot write.
            self._outboxes.pop(ws, None)
            if actions:
                await self._apply(None, actions)

    async def _ping(self, ws: ServerConnection) -> bool:
        """Whether ``ws`` answers a ping within the liveness deadline."""
        try:
            async with asyncio.timeout(self.liveness_timeout):
                pong = await ws.ping()
                await pong
            return True
        except (TimeoutError, ConnectionClosed):
            return False

    async def _check_liveness(self, ws: ServerConnection) -> None:
        """Ping ``ws`` and tell the router whether the pong came within the deadline."""
        alive = await self._ping(ws)
        actions = self.router.liveness_checked(ws, alive, asyncio.get_running_loop().time())
        if actions:
            await self._apply(None, actions)

    async def _apply_detached(self, actions: list[Action[ServerConnection]]) -> None:
        """:meth:`_apply` for actions that come from no connection's read loop."""
        if actions:
            await self._apply(None, actions)

    async def _apply(
        self, current: ServerConnection | None, actions: list[Action[ServerConnection]]
    ) -> None:
        """Carry out ``actions`` in order. Sends to the connection being read are awaited
        (its own backpressure); actions for others go to the target's outbox, written by a
        task per target, so one slow peer never stalls the sender. The router always puts a
        Close after the sends it follows."""
        mine: list[Action[ServerConnection]] = []
        claims: list[ClaimId[ServerConnection]] = []
        for action in actions:
            if isinstance(action, CheckLiveness):
                self._spawn(self._check_liveness(action.conn))
            elif isinstance(action, ClaimId):
                claims.append(action)
            elif isinstance(action, Forward):
                # May wait while the cluster's queue is full: this connection is then not
                # read, which slows its sender down (as its own socket would on one server).
                assert self.cluster is not None  # the router forwards only in cluster mode
                await self.cluster.forward(action)
            elif isinstance(action, ReleaseId):
                self._release(action)
            elif action.conn is current:
                mine.append(action)
            else:
                self._enqueue(action)
        sends = [a for a in mine if isinstance(a, Send)]
        closes = [a for a in mine if isinstance(a, Close)]
        await self._perform(sends)
        if closes:
            # Not awaited here: the read loop must keep draining frames (the router ignores
            # them now), or a flooder's backlog would hide its close reply from websockets.
            self._spawn(self._perform(closes))
        for claim in claims:
            await self._settle_claim(claim)

    def _enqueue(self, action: Send[ServerConnection] | Close[ServerConnection]) -> None:
        """Queue ``action`` for its connection. A connection with more than
        ``_slow_consumer_limit`` bytes waiting for it (queued here or in its socket buffer)
        does not read: it is closed (4008) instead, and the senders of what it would have
        got are answered ``offline``."""
        target = action.conn
        box = self._outboxes.get(target)
        if box is None:
            box = self._outboxes[target] = _Outbox()
        if isinstance(action, Send):
            transport = target.transport
            buffered = box.queued_bytes + (
                transport.get_write_buffer_size() if transport is not None else 0
            )
            if buffered + len(action.text) > self._slow_consumer_limit:
                self._undelivered(action)
                self._close_slow(target, box)
                return
            box.queued_bytes += len(action.text)
        box.queue.append(action)
        if box.writer is None:
            box.writer = asyncio.get_running_loop().create_task(self._write(target, box))
            self._tasks.add(box.writer)
            box.writer.add_done_callback(self._tasks.discard)

    async def _write(self, target: ServerConnection, box: _Outbox) -> None:
        """Write ``target``'s outbox in order until it is empty."""
        try:
            while box.queue:
                action = box.queue.popleft()
                try:
                    if isinstance(action, Send):
                        box.queued_bytes -= len(action.text)
                        await target.send(action.text)
                    else:
                        await target.close(action.code, action.reason)
                except ConnectionClosed:
                    if isinstance(action, Send):
                        self._undelivered(action)
                    self._fail_queued(box)
                    if self._outboxes.get(target) is box:
                        del self._outboxes[target]
                    return
        finally:
            box.writer = None

    def _close_slow(self, target: ServerConnection, box: _Outbox) -> None:
        """``target`` does not read: fail what is queued for it, unregister and close it."""
        self._fail_queued(box)
        agent_id = self.router.agent_id(target)
        actions = self.router.slow_receiver(target)
        if not actions:
            return  # already closing
        self.slow_consumers_dropped += 1
        now = asyncio.get_running_loop().time()
        if now - self._slow_logged_at >= _SLOW_LOG_INTERVAL:
            logger.warning(
                "closing %s (4008): it does not read its messages (%d such closes so far)",
                agent_id or "a client", self.slow_consumers_dropped,
            )
            self._slow_logged_at = now
        for action in actions:
            if isinstance(action, ReleaseId):
                self._release(action)
            elif isinstance(action, Close):
                # Not through the outbox, whose writer waits for this very reader.
                self._spawn(self._perform([action]))

    def _fail_queued(self, box: _Outbox) -> None:
        while box.queue:
            action = box.queue.popleft()
            if isinstance(action, Send):
                box.queued_bytes -= len(action.text)
                self._undelivered(action)

    def _undelivered(self, action: Send[ServerConnection]) -> None:
        """A routed message could not be written: its sender hears ``offline`` (through
        its own server when it is on another)."""
        self.undelivered += 1
        if action.via and self.cluster is not None:
            self.cluster.undelivered(action.via, action.sender, action.to, action.about)
            return
        if action.origin is None or not action.about:
            return  # a reply of ours: nobody to tell
        actions = self.router.undelivered(action.origin, action.to, action.about)
        for reply in actions:
            if isinstance(reply, Send | Close):
                self._enqueue(reply)

    async def _settle_claim(self, claim: ClaimId[ServerConnection]) -> None:
        """Claim an id across the cluster. Awaited in the claimant's read loop: what it sends
        after ``register`` is read only once the registration is decided, as on one server."""
        assert self.cluster is not None  # the router asks only in cluster mode
        outcome = await self.cluster.claim(claim.agent_id)
        now = asyncio.get_running_loop().time()
        actions = self.router.claim_settled(claim.conn, claim.agent_id, outcome, now)
        if actions:
            await self._apply(claim.conn, actions)

    def _release(self, action: ReleaseId) -> None:
        assert self.cluster is not None  # the router asks only in cluster mode
        self.cluster.release(action.agent_id)

    @staticmethod
    async def _perform(actions: Sequence[Action[ServerConnection]]) -> None:
        for action in actions:
            try:
                if isinstance(action, Send):
                    await action.conn.send(action.text)
                elif isinstance(action, Close):
                    await action.conn.close(action.code, action.reason)
            except ConnectionClosed:
                return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def serve(settings: SignalingServerSettings | None = None) -> SignalingServer:
    """Start a signaling server (inside the daemon, or a test) and return it, listening."""
    server = SignalingServer(settings)
    await server.start()
    return server


def load_tokens_file(path: Path, *, shared_token: bool = False) -> dict[str, str]:
    """Per-agent tokens: lines of ``agent-id token`` (``#`` comments) or a YAML mapping
    ``agent-id: token``. Raises :class:`ConfigError` naming the file and line; never shows
    a token."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"tokens file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"tokens file {path} is not UTF-8 text") from None
    lines = [
        (number, line.split())
        for number, raw in enumerate(text.splitlines(), 1)
        if (line := raw.strip()) and not line.startswith("#")
    ]
    tokens: dict[str, str] = {}
    if lines and all(len(parts) == 2 and not parts[0].endswith(":") for _, parts in lines):
        for number, (agent_id, token) in lines:
            _check_token_entry(path, number, agent_id, tokens)
            tokens[agent_id] = token
    elif lines:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(
                f"tokens file {path}{where}: neither 'agent-id token' lines nor a YAML mapping"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"tokens file {path}: neither 'agent-id token' lines nor a YAML mapping"
            )
        for agent_id, token in data.items():
            if not isinstance(token, (str, int)) or isinstance(token, bool) or token == "":
                raise ConfigError(f"tokens file {path}: the token for {agent_id!r} is not a string")
            _check_token_entry(path, None, str(agent_id), tokens)
            tokens[str(agent_id)] = str(token)
    if not tokens and not shared_token:
        # An empty file must not silently open the server to everyone.
        raise ConfigError(f"tokens file {path} holds no tokens")
    return tokens


def _check_token_entry(path: Path, line: int | None, agent_id: str, seen: dict[str, str]) -> None:
    where = f"{path}, line {line}" if line is not None else str(path)
    if not re.match(AGENT_ID_PATTERN, agent_id):
        raise ConfigError(f"tokens file {where}: {agent_id[:70]!r} is not a valid agent id")
    if agent_id in seen:
        raise ConfigError(f"tokens file {where}: {agent_id!r} is listed twice")


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit (each client is a descriptor);
    return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mvpd.signaling.server",
        description="Run the mvp-agent reference signaling server until SIGTERM or SIGINT.",
    )
    parser.add_argument("--listen", default=None, help="HOST:PORT (default 127.0.0.1:8765)")
    parser.add_argument(
        "--token", default=None, help=f"shared token every agent must present (or ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--tokens-file", type=Path, default=None, help="file of 'agent-id token' lines"
    )
    parser.add_argument(
        "--redis",
        default=None,
        help=f"redis://HOST:PORT/DB shared with other servers (or ${REDIS_ENV}); "
        "agents on any of them reach each other",
    )
    parser.add_argument("--max-message-size", type=int, default=None, help="bytes per frame")
    parser.add_argument("--rate", type=float, default=None, help="messages/s per connection")
    parser.add_argument("--burst", type=int, default=None, help="burst above --rate")
    parser.add_argument("--ping-interval", type=float, default=None, help="seconds, 0 = off")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="same as --log-level debug"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> SignalingServerSettings:
    """Build the settings from parsed command-line arguments (and ``$TOKEN_ENV``)."""
    values: dict[str, Any] = {"enabled": True}
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None:
        values["token"] = SecretStr(token)
    redis_url = args.redis if args.redis is not None else os.environ.get(REDIS_ENV) or None
    if redis_url is not None:
        values["redis"] = SecretStr(redis_url)
    for name in ("listen", "tokens_file", "max_message_size", "rate", "burst", "ping_interval"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    try:
        return SignalingServerSettings(**values)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid signaling server settings: {describe_validation_error(exc, hide_input=True)}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mvpd.signaling.server`` (and ``mvpd signal``)."""
    args = _parser().parse_args(argv)
    if args.verbose:
        args.log_level = "debug"
    # The daemon's logging: the journal under systemd, stderr otherwise, with secrets masked
    # and whatever came from the network neutralised.
    setup_logging(args.log_level, verbose=args.log_level == "debug")
    try:
        settings = settings_from_args(args)
        server = SignalingServer(settings)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EX_CONFIG
    if args.log_level != "debug":
        # websockets reports every connection at info level: too much for thousands of agents.
        logging.getLogger("mvpd.signaling.server.ws").setLevel(logging.WARNING)
    raise_open_files_limit()
    try:
        return asyncio.run(_run(server))
    except KeyboardInterrupt:
        return 0


def _reload_tokens(server: SignalingServer) -> None:
    """SIGHUP: read the tokens file again; a broken file leaves the old tokens in force."""
    try:
        server.reload_tokens()
    except ConfigError as exc:
        logger.error("tokens not reloaded, the old ones stay in force: %s", exc.message)


async def _run(server: SignalingServer) -> int:
    try:
        await server.start()
    except OSError as exc:
        print(
            f"error: cannot listen on {server.settings.listen}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_tokens, server)
    print(f"listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        logger.info("stopping: %s", server.stats())
        await server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
