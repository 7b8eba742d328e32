"""The reference signaling server's routing core, sans I/O.

:class:`SignalingRouter` holds the registrations and per-connection state and decides what
happens to every frame; the WebSocket layer (:mod:`mvpd.signaling.server`) only feeds it
events and carries out the :class:`Send` and :class:`Close` actions it returns, in order::

    router = SignalingRouter(token="s3cret")
    actions = router.connect(conn)
    actions = router.receive(conn, '{"type": "register", "id": "alice", ...}', now)
    actions = router.disconnect(conn)

``conn`` is any hashable object that names one connection. The clock is passed in (``now``,
seconds, monotonic), so tests drive rate limits without sleeping.

Policy, in the order it is applied to each frame:

1. size cap: a frame over ``max_message_size`` bytes gets ``error too-large`` and the
   connection is closed with 1009;
2. rate limit: a token bucket per connection (``rate`` per second, ``burst``); a frame over the
   limit is dropped, the first drop of a run is answered with ``error rate-limited``, and a
   connection that keeps sending through ``flood_close_after`` drops in a row is closed;
3. parsing: malformed frames get ``error bad-message``, unknown types ``error unknown-type``;
   the connection stays open;
4. ``register``: tokens are checked in constant time; a bad token gets ``error bad-token`` and a
   close; a second registration of an id replaces the first, whose connection is told
   (``error replaced``) and closed; success is answered with ``registered``;
5. ``offer``/``answer``/``candidate``/``bye``: refused before ``register``
   (``error not-registered``); ``from`` is overwritten with the sender's registered id; a
   target that is not connected gets ``error offline`` with ``peer`` set.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

from .errors import SignalingError, UnknownMessageType
from .signaling import (
    MAX_MESSAGE_SIZE,
    Answer,
    Bye,
    Candidate,
    Error,
    Offer,
    Register,
    Registered,
    RoutedMessage,
    parse_message,
)

logger = logging.getLogger("mvpd.signaling.server")

ConnT = TypeVar("ConnT", bound=Hashable)

#: WebSocket close codes the router uses. 4003 and 4009 are ours (like HTTP 403 and 409):
#: a client that sees them must not reconnect with the same credentials.
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_BAD_TOKEN = 4003
CLOSE_REPLACED = 4009
#: Close codes after which reconnecting is pointless.
PERMANENT_CLOSE_CODES = frozenset({CLOSE_BAD_TOKEN, CLOSE_REPLACED})
#: Error codes after which reconnecting is pointless.
PERMANENT_ERROR_CODES = frozenset({"bad-token", "replaced", "id-taken"})

#: A close reason must fit in a control frame (123 bytes of UTF-8).
_MAX_REASON_BYTES = 123


@dataclass(frozen=True)
class Send(Generic[ConnT]):
    """Send ``text`` as one text frame on ``conn``."""

    conn: ConnT
    text: str


@dataclass(frozen=True)
class Close(Generic[ConnT]):
    """Close ``conn`` with a WebSocket close ``code`` and a human-readable ``reason``."""

    conn: ConnT
    code: int
    reason: str


Action: TypeAlias = Send[ConnT] | Close[ConnT]


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one token per message."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        """Spend one token if there is one; refill first from the time elapsed."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class _Connection:
    bucket: TokenBucket
    agent_id: str | None = None
    #: Frames dropped by the rate limit since the last accepted one.
    dropped_in_row: int = 0
    #: A Close was issued: ignore whatever else arrives.
    closing: bool = False


@dataclass
class RouterStats:
    """Counters for status output and tests."""

    connections_total: int = 0
    registrations: int = 0
    replaced: int = 0
    messages_in: int = 0
    messages_routed: int = 0
    routed_by_type: Counter[str] = field(default_factory=Counter)
    errors_by_code: Counter[str] = field(default_factory=Counter)
    rate_limited_dropped: int = 0
    closed_for_flooding: int = 0

    def as_dict(self) -> dict[str, object]:
        """Plain data (for JSON or msgpack)."""
        return {
            "connections_total": self.connections_total,
            "registrations": self.registrations,
            "replaced": self.replaced,
            "messages_in": self.messages_in,
            "messages_routed": self.messages_routed,
            "routed_by_type": dict(self.routed_by_type),
            "errors_by_code": dict(self.errors_by_code),
            "rate_limited_dropped": self.rate_limited_dropped,
            "closed_for_flooding": self.closed_for_flooding,
        }


class SignalingRouter(Generic[ConnT]):
    """Registrations, routing and limits for one signaling server (no I/O).

    ``token`` is one token every agent may present; ``tokens`` maps agent ids to their own
    tokens. With neither, registration is open. With either, a ``register`` is accepted when
    its token equals the agent's own token or the shared one; ids missing from ``tokens`` need
    the shared token.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        tokens: Mapping[str, str] | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        rate: float = 50.0,
        burst: int = 200,
        flood_close_after: int | None = None,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._token = token.encode("utf-8") if token else None
        self._tokens = {k: v.encode("utf-8") for k, v in (tokens or {}).items()}
        self.max_message_size = max_message_size
        self.rate = rate
        self.burst = burst
        #: Dropped frames in a row after which a flooding connection is closed.
        self.flood_close_after = (
            flood_close_after if flood_close_after is not None else max(20, burst)
        )
        self._conns: dict[ConnT, _Connection] = {}
        self._by_id: dict[str, ConnT] = {}
        self.stats = RouterStats()

    # --- queries ------------------------------------------------------------------------------

    @property
    def auth_required(self) -> bool:
        """Whether a token is needed to register."""
        return self._token is not None or bool(self._tokens)

    @property
    def connection_count(self) -> int:
        """Open connections, registered or not."""
        return len(self._conns)

    def registered_ids(self) -> list[str]:
        """Ids registered right now, sorted."""
        return sorted(self._by_id)

    def agent_id(self, conn: ConnT) -> str | None:
        """The id ``conn`` registered, if any."""
        state = self._conns.get(conn)
        return state.agent_id if state is not None else None

    def set_tokens(self, token: str | None, tokens: Mapping[str, str] | None) -> None:
        """Replace the token configuration (reload); existing registrations stay."""
        self._token = token.encode("utf-8") if token else None
        self._tokens = {k: v.encode("utf-8") for k, v in (tokens or {}).items()}

    # --- events -------------------------------------------------------------------------------

    def connect(self, conn: ConnT, now: float = 0.0) -> list[Action[ConnT]]:
        """A connection was opened."""
        self._conns[conn] = _Connection(
            bucket=TokenBucket(rate=self.rate, burst=self.burst, tokens=self.burst, updated=now)
        )
        self.stats.connections_total += 1
        return []

    def disconnect(self, conn: ConnT) -> list[Action[ConnT]]:
        """A connection is gone (for whatever reason); forget it and its registration."""
        state = self._conns.pop(conn, None)
        if (
            state is not None
            and state.agent_id is not None
            and self._by_id.get(state.agent_id) == conn
        ):
            del self._by_id[state.agent_id]
            logger.info("unregistered %s", state.agent_id)
        return []

    def receive(self, conn: ConnT, data: str | bytes, now: float) -> list[Action[ConnT]]:
        """One frame arrived on ``conn`` at time ``now``; return what to do about it.

        Never raises for anything a peer can send.
        """
        state = self._conns.get(conn)
        if state is None:
            # A frame from a connection we were not told about: treat it as just opened.
            self.connect(conn, now)
            state = self._conns[conn]
        if state.closing:
            return []
        self.stats.messages_in += 1

        if _too_large(data, self.max_message_size):
            state.closing = True
            return [
                self._error(
                    conn, "too-large", f"frames are limited to {self.max_message_size} bytes"
                ),
                Close(conn, CLOSE_TOO_BIG, "message too big"),
            ]

        if not state.bucket.take(now):
            state.dropped_in_row += 1
            self.stats.rate_limited_dropped += 1
            if state.dropped_in_row >= self.flood_close_after:
                state.closing = True
                self.stats.closed_for_flooding += 1
                logger.warning(
                    "closing %s: kept flooding past the rate limit", state.agent_id or "a client"
                )
                return [Close(conn, CLOSE_POLICY, "rate limit exceeded, closing")]
            if state.dropped_in_row == 1:
                # Only the first drop of a run is answered: replying to each would amplify.
                return [
                    self._error(
                        conn,
                        "rate-limited",
                        f"over {self.rate:g} messages/s (burst {self.burst}); message dropped",
                    )
                ]
            return []
        state.dropped_in_row = 0

        try:
            message = parse_message(data)
        except UnknownMessageType as exc:
            return [self._error(conn, "unknown-type", exc.message, about=exc.message_type)]
        except SignalingError as exc:
            return [self._error(conn, "bad-message", exc.message)]

        if isinstance(message, Register):
            return self._register(conn, state, message)
        if isinstance(message, Offer | Answer | Candidate | Bye):
            return self._route(conn, state, message, data)
        return [
            self._error(
                conn,
                "bad-message",
                f"{message.type!r} is sent by the server only",
                about=message.type,
            )
        ]

    # --- internals ----------------------------------------------------------------------------

    def _register(self, conn: ConnT, state: _Connection, message: Register) -> list[Action[ConnT]]:
        agent_id = message.id
        if not self._token_ok(agent_id, message.token):
            state.closing = True
            reason = "missing token" if not message.token else "bad token"
            logger.warning("refused registration of %s: %s", agent_id, reason)
            return [
                self._error(conn, "bad-token", f"{reason} for {agent_id!r}", about="register"),
                Close(conn, CLOSE_BAD_TOKEN, _reason(f"{reason} for {agent_id!r}")),
            ]
        actions: list[Action[ConnT]] = []
        old_id = state.agent_id
        if old_id is not None and old_id != agent_id and self._by_id.get(old_id) == conn:
            # The same connection changes its id: the old one is free again.
            del self._by_id[old_id]
            logger.info("unregistered %s (re-registered as %s)", old_id, agent_id)
        previous = self._by_id.get(agent_id)
        if previous is not None and previous != conn:
            old = self._conns.get(previous)
            if old is not None:
                old.closing = True
                old.agent_id = None
            self.stats.replaced += 1
            logger.info("%s registered again; closing its older connection", agent_id)
            actions.append(
                self._error(
                    previous,
                    "replaced",
                    f"a newer connection registered {agent_id!r}",
                    peer=agent_id,
                )
            )
            actions.append(
                Close(
                    previous,
                    CLOSE_REPLACED,
                    _reason(f"replaced by a newer connection for {agent_id!r}"),
                )
            )
        state.agent_id = agent_id
        self._by_id[agent_id] = conn
        self.stats.registrations += 1
        logger.info("registered %s", agent_id)
        actions.append(Send(conn, Registered(id=agent_id).to_json()))
        return actions

    def _route(
        self, conn: ConnT, state: _Connection, message: RoutedMessage, data: str | bytes
    ) -> list[Action[ConnT]]:
        if state.agent_id is None:
            return [
                self._error(
                    conn,
                    "not-registered",
                    "register before sending messages",
                    about=message.type,
                )
            ]
        target = self._by_id.get(message.to)
        if target is None:
            return [
                self._error(
                    conn,
                    "offline",
                    f"{message.to!r} is not connected",
                    peer=message.to,
                    about=message.type,
                )
            ]
        # Relay the sender's object as it came (a null candidate stays null, extra fields stay)
        # but overwrite ``from``: ids on this server are what registered. It parsed once
        # already, so it parses again.
        wire = json.loads(data)
        wire["from"] = state.agent_id
        self.stats.messages_routed += 1
        self.stats.routed_by_type[message.type] += 1
        logger.debug("routed %s from %s to %s", message.type, state.agent_id, message.to)
        return [Send(target, json.dumps(wire, separators=(",", ":")))]

    def _token_ok(self, agent_id: str, presented: str | None) -> bool:
        if not self.auth_required:
            return True
        given = (presented or "").encode("utf-8")
        own = self._tokens.get(agent_id)
        ok = False
        # Both comparisons always run: the timing says nothing about which one matched.
        if own is not None:
            ok |= hmac.compare_digest(given, own)
        if self._token is not None:
            ok |= hmac.compare_digest(given, self._token)
        return ok and bool(given)

    def _error(
        self,
        conn: ConnT,
        code: str,
        message: str,
        *,
        peer: str | None = None,
        about: str | None = None,
    ) -> Send[ConnT]:
        self.stats.errors_by_code[code] += 1
        error = Error(
            code=code, message=message[:1024], peer=peer, about=about[:64] if about else None
        )
        return Send(conn, error.to_json())


def _too_large(data: str | bytes, limit: int) -> bool:
    if len(data) > limit:
        return True
    if isinstance(data, str) and len(data) * 4 > limit:
        # Characters are 1-4 bytes in UTF-8: only count exactly near the limit.
        return len(data.encode("utf-8", "surrogatepass")) > limit
    return False


def _reason(text: str) -> str:
    """Trim ``text`` to what fits in a close frame."""
    encoded = text.encode("utf-8")
    if len(encoded) <= _MAX_REASON_BYTES:
        return text
    return encoded[: _MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."
