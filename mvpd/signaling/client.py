"""The agent's signaling client: one WebSocket session that outlives network trouble.

The seed's API::

    signaling = SignalingClient(settings)
    await signaling.connect()
    await signaling.send({"type": "offer", "to": "bob", "sdp": "..."})
    message = await signaling.recv()

After ``connect()`` a background task owns the connection: it registers, keeps the connection
alive with pings, and after any loss reconnects with exponential backoff and jitter and
registers again. It works with servers that only route and never answer: ``registered`` and
``error`` replies are optional extras, never waited for.

A refused registration is never final (one message from a server, whoever runs it, must not
take the agent off signaling for good): the client closes that connection, its state becomes
``rejected``, and it tries again later:

* ``replaced``, ``id-in-use`` or ``id-taken`` (close codes 4009, 4010): another connection
  holds our id. Possibly someone taking it over, or a second agent with the same id: logged
  as a WARNING naming the server, retried with the usual backoff;
* ``bad-token`` (close 4003), or ``rate-limited`` in answer to ``register``: retried with a
  slower backoff (``refused_backoff_initial`` doubling up to ``refused_backoff_max``), so a
  token fixed on the server is picked up without a restart.

Several servers of one cluster (``signaling_urls``, or ``signaling_url`` given as a list):
the client stays on the one that works; when it is down or its connection is lost, the next
URL is tried at once (with a little jitter, so the agents of a dead server do not all arrive
together), and the backoff applies only after every URL failed in a row.

Peer sessions do not depend on the signaling connection and are not touched by any of this.

States (see :attr:`SignalingClient.state` and ``on_state``) and what moves them are the
transition table of :mod:`mvpd.proto.signaling_states`: ``disconnected`` (not started),
``connecting``, ``connected``, ``backoff`` (waiting after a failure), ``rejected`` (refused;
waiting to try again), ``stopping`` (:meth:`SignalingClient.begin_stopping`: a connection that
is up stays usable, nothing connects again) and ``closed``. This module asks the table before
each step instead of keeping flags of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias, cast

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidHandshake, InvalidURI

from ..config import AgentSettings
from ..logs import RateLimitedLog
from ..proto.errors import (
    ConfigError,
    ConnectionClosed,
    MalformedMessage,
    SignalingError,
    SignalingUnavailable,
)
from ..proto.router import CLOSE_BAD_TOKEN, ID_CONFLICT_CLOSE_CODES, ID_CONFLICT_ERROR_CODES
from ..proto.signaling import (
    ROUTED_TYPES,
    Error,
    Message,
    Register,
    Registered,
    parse_message,
)
from ..proto.signaling_states import SignalingEvent, SignalingState, signaling_machine

logger = logging.getLogger("mvpd.signaling.client")

StateCallback: TypeAlias = Callable[[str], object]
#: Why a server refused our registration: our id is held elsewhere, our token is wrong, or
#: our address failed too often.
Refusal: TypeAlias = Literal["id-conflict", "bad-token", "throttled"]

#: Put in the inbox to wake readers when the client stops.
_STOP = object()


class SignalingClient:
    """A self-healing signaling session for ``settings.agent_id`` at
    ``settings.signaling_url`` (or any of ``settings.signaling_urls``).

    ``on_state`` is called with each new state (a plain function; a coroutine function is
    scheduled as a task). The timing keywords exist for tests and unusual deployments.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        on_state: StateCallback | None = None,
        connect_timeout: float = 10.0,
        send_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        refused_backoff_initial: float = 30.0,
        refused_backoff_max: float = 300.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        max_message_size: int = 1 << 20,
        inbox_size: int = 1024,
    ) -> None:
        self.settings = settings
        self.agent_id: str = settings.agent_id
        #: The servers to try, in order; :attr:`url` is the one in use or tried next.
        self.urls: list[str] = settings.signaling_url_list
        self._url_index = 0
        #: Other URLs still to try at once before backing off.
        self._failover_left = len(self.urls) - 1
        self._on_state = on_state
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.refused_backoff_initial = refused_backoff_initial
        self.refused_backoff_max = refused_backoff_max
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_message_size = max_message_size
        self._ssl = self._ssl_context()
        self._machine = signaling_machine()
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._inbox: asyncio.Queue[object] = asyncio.Queue(maxsize=inbox_size)
        self._supervisor: asyncio.Task[None] | None = None
        #: Set when the server refused the registration on the current connection.
        self._refusal: tuple[Refusal, str] | None = None
        self._last_error: str | None = None
        self._inbox_full_log = RateLimitedLog(logger)
        self._state_tasks: set[asyncio.Task[Any]] = set()
        #: Whether our server confirmed the registration on the current connection (only ours
        #: does; nothing depends on it).
        self.registered = False
        #: Connections made so far (1 after the first, 2 after the first reconnect, ...).
        self.connections = 0

    # --- public API ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The signaling server in use (or tried next)."""
        return self.urls[self._url_index]

    @property
    def state(self) -> str:
        """The :class:`~mvpd.proto.signaling_states.SignalingState`, as its value."""
        return self._machine.state.value

    @property
    def connected(self) -> bool:
        """Whether we are registered right now (and not stopping)."""
        return self._machine.state == SignalingState.CONNECTED

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the last connection was lost."""
        return self._last_error

    def start(self) -> None:
        """Start connecting in the background and return at once (the daemon's way: the
        server may come up later). Must be called from a running event loop."""
        if self._machine.state in (SignalingState.STOPPING, SignalingState.CLOSED):
            raise ConnectionClosed(f"the signaling client is {self.state}")
        if self._supervisor is None:
            self._apply(SignalingEvent.START)
            self._supervisor = asyncio.get_running_loop().create_task(
                self._run(), name=f"signaling-client-{self.agent_id}"
            )

    async def connect(self, timeout: float | None = None) -> None:
        """Connect and register, waiting up to ``timeout`` (default ``connect_timeout``)
        seconds for the first connection; from then on reconnection is automatic.

        Raises :class:`SignalingUnavailable` when the server cannot be reached in time (the
        client is then closed). A refusal from the server is retried (see the module
        documentation) and shows in :attr:`state` and :attr:`last_error`.
        """
        self.start()
        limit = self.connect_timeout if timeout is None else timeout
        try:
            await self.wait_connected(limit)
        except SignalingUnavailable:
            await self.close()
            raise SignalingUnavailable(
                f"cannot reach the signaling server at {self.url} within {limit:g} s"
                + (f": {self._last_error}" if self._last_error else "")
            ) from None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a connection is up. Raises :class:`SignalingUnavailable` on timeout and
        :class:`ConnectionClosed` when it never will be."""
        self._raise_if_stopped()
        if self._connected.is_set():
            return
        if self._machine.state == SignalingState.STOPPING:
            raise SignalingUnavailable("the signaling client is stopping; not connected")
        if self._supervisor is None:
            raise ConnectionClosed("the signaling client is not started; call connect()")
        waiter = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait(
                {waiter, self._supervisor}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if self._connected.is_set():
            return
        self._raise_if_stopped()
        raise SignalingUnavailable(
            f"no connection to the signaling server at {self.url}"
            + (f" ({self._last_error})" if self._last_error else "")
        )

    async def send(self, message: Message | Mapping[str, Any]) -> None:
        """Send one message: a model or a plain dict as in the seed.

        ``from`` is set to our id on offer/answer/candidate/bye (routing-only servers do not
        fill it in). While disconnected this waits up to ``send_timeout`` for the connection
        to come back, then raises :class:`SignalingUnavailable`. An invalid message raises
        :class:`MalformedMessage` and is not sent.
        """
        text = self._encode(message)
        deadline = time.monotonic() + self.send_timeout
        while True:
            self._raise_if_stopped()
            ws = self._ws
            if ws is not None and self._connected.is_set():
                try:
                    await ws.send(text)
                    return
                except WsConnectionClosed:
                    # Lost while sending: wait for the next connection and try again.
                    self._connected.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SignalingUnavailable(
                    f"not connected to the signaling server at {self.url}; message not sent"
                )
            await self.wait_connected(remaining)

    async def recv(self) -> Message:
        """The next message from the server (messages for us, and ``error`` notices).

        Raises :class:`ConnectionClosed` after :meth:`close`.
        """
        if self._inbox.empty():
            self._raise_if_stopped()
        item = await self._inbox.get()
        if item is _STOP:
            # Leave the marker for any other reader.
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(_STOP)
            self._raise_if_stopped()
            raise ConnectionClosed("the signaling client is closed")
        return cast(Message, item)

    def __aiter__(self) -> SignalingClient:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    def begin_stopping(self) -> None:
        """The agent is shutting down: never connect again, but keep a connection that is up
        (peers are told ``bye`` through it) until :meth:`close`. Idempotent."""
        if self._machine.accepts(SignalingEvent.STOP):
            self._apply(SignalingEvent.STOP)

    async def close(self) -> None:
        """Stop reconnecting and close the connection. Idempotent."""
        self.begin_stopping()
        supervisor, self._supervisor = self._supervisor, None
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), timeout=2)
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await supervisor
        self._ws = None
        self._connected.clear()
        self._apply(SignalingEvent.CLOSE)
        self._wake_readers()

    async def __aenter__(self) -> SignalingClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- the connection loop -----------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        refused_attempt = 0
        try:
            while self._machine.state == SignalingState.CONNECTING:
                self._refusal = None
                try:
                    ws = await self._open()
                    if ws is None:
                        self._apply(SignalingEvent.OPEN_FAILED)
                    else:
                        started = time.monotonic()
                        await self._session(ws)
                        self._apply(SignalingEvent.REFUSED if self._refusal is not None
                                    else SignalingEvent.LOST)
                        # A connection that lasted a while resets the backoff; one dropped at
                        # once (a server that accepts and closes) keeps it growing.
                        if time.monotonic() - started > max(10.0, self.backoff_initial * 4):
                            attempt = 0
                except Exception as exc:  # a bug must not end reconnection for good
                    logger.exception("signaling connection failed unexpectedly")
                    self._last_error = _describe(exc)
                    self._apply(SignalingEvent.OPEN_FAILED
                                if self._machine.accepts(SignalingEvent.OPEN_FAILED)
                                else SignalingEvent.LOST)
                if not self._machine.accepts(SignalingEvent.RETRY):
                    return  # stopping or closed: nothing connects again
                if self._refusal is not None and self._refusal[0] != "id-conflict":
                    delay = self._backoff(
                        refused_attempt, self.refused_backoff_initial, self.refused_backoff_max
                    )
                    refused_attempt += 1
                elif self._refusal is None and self._failover_left > 0:
                    # Another server of the cluster may be up: try it almost at once.
                    self._failover_left -= 1
                    delay = random.uniform(0, self.backoff_initial)
                else:
                    if self._refusal is None:
                        self._failover_left = len(self.urls) - 1
                    delay = self._backoff(attempt)
                    attempt += 1
                if self._refusal is not None:
                    self._log_refusal(*self._refusal, delay)
                else:
                    refused_attempt = 0
                    logger.info(
                        "signaling server %s unreachable (%s); retrying in %.1f s",
                        self.url,
                        self._last_error,
                        delay,
                    )
                    self._url_index = (self._url_index + 1) % len(self.urls)
                await asyncio.sleep(delay)
                if not self._machine.accepts(SignalingEvent.RETRY):
                    return  # the agent began stopping during the wait
                self._apply(SignalingEvent.RETRY)
        finally:
            self._connected.clear()
            self._ws = None

    def _backoff(
        self, attempt: int, initial: float | None = None, maximum: float | None = None
    ) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random."""
        initial = self.backoff_initial if initial is None else initial
        maximum = self.backoff_max if maximum is None else maximum
        ceiling = min(maximum, initial * (2.0 ** min(attempt, 30)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _log_refusal(self, kind: Refusal, why: str, delay: float) -> None:
        if kind == "id-conflict":
            logger.warning(
                "the signaling server %s gave our id %r to another connection or keeps it for "
                "one (%s): someone may be taking over our id, or a second agent runs with the "
                "same agent_id; connected peers are not affected; registering again in %.1f s",
                self.url, self.agent_id, why, delay,
            )
        elif kind == "bad-token":
            logger.error(
                "the signaling server %s refused our token for %r (%s): check signaling_token "
                "here and the server's tokens; trying again in %.0f s (a token fixed on the "
                "server is picked up then, without a restart)",
                self.url, self.agent_id, why, delay,
            )
        else:
            logger.warning(
                "the signaling server %s refused to register %r (%s); trying again in %.0f s",
                self.url, self.agent_id, why, delay,
            )

    async def _open(self) -> ClientConnection | None:
        try:
            ws = await ws_connect(
                self.url,
                ssl=self._ssl if self.url.startswith("wss://") else None,
                open_timeout=self.connect_timeout,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                close_timeout=5,
                max_size=self.max_message_size,
                logger=logging.getLogger("mvpd.signaling.client.ws"),
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self._last_error = _describe(exc)
            return None
        token = self.settings.signaling_token
        register = Register(id=self.agent_id, token=token.get_secret_value() if token else None)
        try:
            await ws.send(register.to_json())
        except WsConnectionClosed as exc:
            self._last_error = _describe(exc)
            return None
        self._ws = ws
        self.registered = False
        self._failover_left = len(self.urls) - 1
        self.connections += 1
        self._last_error = None
        self._connected.set()
        self._apply(SignalingEvent.OPENED)
        logger.info("connected to %s as %s", self.url, self.agent_id)
        return ws

    async def _session(self, ws: ClientConnection) -> None:
        """Read until the connection ends; queue what is for us."""
        try:
            async for raw in ws:
                self._handle_frame(raw)
                if self._refusal is not None:
                    await ws.close()
                    break
        except WsConnectionClosed:
            pass
        finally:
            self._connected.clear()
            self._ws = None
        rcvd = ws.protocol.close_rcvd
        if self._refusal is None and rcvd is not None:
            why = f"closed with {rcvd.code} {rcvd.reason}".rstrip()
            if rcvd.code in ID_CONFLICT_CLOSE_CODES:
                self._refusal = ("id-conflict", why)
            elif rcvd.code == CLOSE_BAD_TOKEN:
                self._refusal = ("bad-token", why)
        if self._refusal is not None:
            self._last_error = f"registration refused: {self._refusal[1]}"
        elif self._machine.state == SignalingState.CONNECTED:
            self._last_error = (
                f"connection lost ({rcvd.code} {rcvd.reason})".rstrip()
                if rcvd is not None
                else "connection lost"
            )
            logger.warning("lost the signaling connection to %s: %s", self.url, self._last_error)

    def _handle_frame(self, raw: str | bytes) -> None:
        try:
            message = parse_message(raw)
        except SignalingError as exc:
            logger.warning("ignoring a message from the signaling server: %s", exc.message)
            return
        if isinstance(message, Registered):
            self.registered = True
            logger.debug("registration confirmed as %s", message.id)
            return
        if isinstance(message, Error):
            why = f"{message.code}: {message.message}".rstrip(": ")
            if message.code in ID_CONFLICT_ERROR_CODES:
                self._refusal = ("id-conflict", why)
                return
            if message.code == "bad-token":
                self._refusal = ("bad-token", why)
                return
            if message.code == "rate-limited" and message.about == "register":
                self._refusal = ("throttled", why)
                return
            logger.info("signaling server error %s: %s", message.code, message.message)
        elif isinstance(message, Register):
            logger.warning("ignoring a 'register' message from the signaling server")
            return
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            self._inbox_full_log.warning(
                "inbox full (%d messages unread); dropping a %s message",
                self._inbox.qsize(),
                message.type,
            )

    # --- helpers ------------------------------------------------------------------------------

    def _encode(self, message: Message | Mapping[str, Any]) -> str:
        if isinstance(message, Mapping):
            data = dict(message)
            if data.get("type") in ROUTED_TYPES:
                data["from"] = self.agent_id
            parsed = parse_message(data)
        else:
            parsed = message
            if parsed.type in ROUTED_TYPES:
                parsed = parsed.model_copy(update={"sender": self.agent_id})
        try:
            text = parsed.to_json()
        except ValueError as exc:
            raise MalformedMessage(f"cannot serialise the message: {exc}") from None
        if len(text.encode("utf-8")) > self.max_message_size:
            raise MalformedMessage(
                f"the {parsed.type!r} message is over {self.max_message_size} bytes"
            )
        return text

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not any(url.startswith("wss://") for url in self.urls):
            return None
        ca_file = self.settings.signaling_ca_file
        try:
            return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the signaling CA file {ca_file}: {exc}") from None

    def _raise_if_stopped(self) -> None:
        if self._machine.state == SignalingState.CLOSED:
            raise ConnectionClosed("the signaling client is closed")

    def _wake_readers(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(_STOP)

    def _apply(self, event: SignalingEvent) -> None:
        """Move the machine (an illegal event is a bug here: it raises) and report a change."""
        before = self._machine.state
        state = self._machine.handle(event)
        if state == before:
            return
        logger.debug("signaling state %s (%s)", state.value, event.value)
        if self._on_state is None:
            return
        try:
            result = self._on_state(state.value)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._state_tasks.add(task)
                task.add_done_callback(self._state_tasks.discard)
        except Exception:
            logger.exception("the signaling state callback failed")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
