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
4. ``register``: see *Who may register an id* below; success is answered with
   ``registered``;
5. ``offer``/``answer``/``candidate``/``bye``: refused before ``register``
   (``error not-registered``); ``from`` is overwritten with the sender's registered id; a
   target that is not connected gets ``error offline`` with ``peer`` set.

Who may register an id:

* Tokens: an id listed in ``tokens`` registers only with its own token; any other id needs the
  shared ``token`` (when one is set). Both comparisons always run, in constant time. A bad
  token gets ``error bad-token`` and the connection is closed (4003): it has nothing else to do.
* Bad tokens are counted per source address (an IPv4 address, or an IPv6 /64) in a token
  bucket of ``failures_per_minute``; once it is empty, every ``register`` from that source is
  answered ``error rate-limited`` and closed (1008) without looking at the token, until the
  bucket refills. The table is bounded (``max_sources``; the least recently failed source is
  forgotten first). Refusals for an id in use are not counted: they reveal nothing, and a
  second agent misconfigured with the same id must not lock its neighbours out.
* An id held by a live connection is never taken over: a newcomer proves at most the same
  token as the holder. On such a conflict the router asks the I/O layer to check the holder
  (:class:`CheckLiveness`: a WebSocket ping with a short deadline) and parks the claim. When
  the I/O layer reports back (:meth:`SignalingRouter.liveness_checked`), a live holder keeps
  the id and the newcomer gets ``error id-in-use`` and a close (4010); a holder that did not
  answer is told ``error replaced``, closed (4009), and the newcomer is registered. That lets
  a restarted daemon come back while its old TCP connection is half dead. One claim per id is
  checked at a time; further claimants meanwhile get ``id-in-use`` at once.

Several servers (``cluster=True``; the I/O layer is :mod:`mvpd.signaling.cluster`, the wire
format :mod:`mvpd.proto.cluster`): the router still decides everything about its own
connections, and asks the I/O layer for what only the cluster knows:

* an id nobody holds here needs a cluster-wide claim first (:class:`ClaimId`; the answer
  comes back through :meth:`SignalingRouter.claim_settled`): the id may be held on another
  server, whose holder is then checked exactly like a local one;
* an id that leaves this server (disconnect, replaced, re-registered) is given back
  (:class:`ReleaseId`);
* a message for an id not registered here is handed on (:class:`Forward`); when no server
  holds the target, :meth:`SignalingRouter.forward_failed` answers the sender ``offline``;
* messages from other servers for our agents come in through
  :meth:`SignalingRouter.deliver`; another server that found our holder dead takes its id
  with :meth:`SignalingRouter.evict`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeAlias, TypeVar

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

#: WebSocket close codes the router uses. 4003, 4009 and 4010 are ours (like HTTP 403 and
#: 409): the registration was refused; a client retries later, slowly.
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_BAD_TOKEN = 4003
CLOSE_REPLACED = 4009
CLOSE_ID_IN_USE = 4010
#: The connection did not read the messages sent to it fast enough and was closed; what was
#: queued before is still written first, and senders meanwhile get ``offline``.
CLOSE_SLOW_RECEIVER = 4008
#: The registration could not be decided now (the cluster's Redis is unreachable).
CLOSE_TRY_AGAIN = 1013
#: Error codes that say our id is held by another connection (``id-taken`` is an older
#: spelling some servers use).
ID_CONFLICT_ERROR_CODES = frozenset({"replaced", "id-in-use", "id-taken"})
#: Close codes with the same meaning as :data:`ID_CONFLICT_ERROR_CODES`.
ID_CONFLICT_CLOSE_CODES = frozenset({CLOSE_REPLACED, CLOSE_ID_IN_USE})
#: Seconds a ``register`` waits for the holder of its id to answer a liveness check, by
#: default (the I/O layer owns the clock; this is its default).
LIVENESS_TIMEOUT = 3.0

#: A close reason must fit in a control frame (123 bytes of UTF-8).
_MAX_REASON_BYTES = 123


@dataclass(frozen=True)
class Send(Generic[ConnT]):
    """Send ``text`` as one text frame on ``conn``.

    A routed message names its sender, the target id and the message type (``to``,
    ``about``) so that the sender hears of it if it cannot be written after all: the sender
    is one of our connections (``origin``; the I/O layer calls
    :meth:`SignalingRouter.undelivered`), or an agent ``sender`` on the server ``via`` of a
    cluster (the I/O layer tells that server)."""

    conn: ConnT
    text: str
    origin: ConnT | None = field(default=None, compare=False)
    to: str = field(default="", compare=False)
    about: str = field(default="", compare=False)
    sender: str = field(default="", compare=False)
    via: str = field(default="", compare=False)


@dataclass(frozen=True)
class Close(Generic[ConnT]):
    """Close ``conn`` with a WebSocket close ``code`` and a human-readable ``reason``."""

    conn: ConnT
    code: int
    reason: str


@dataclass(frozen=True)
class CheckLiveness(Generic[ConnT]):
    """Find out whether ``conn`` still answers (a WebSocket ping with a short deadline), then
    call :meth:`SignalingRouter.liveness_checked` with the answer."""

    conn: ConnT


@dataclass(frozen=True)
class ClaimId(Generic[ConnT]):
    """Cluster mode: claim ``agent_id`` for ``conn`` across all servers, then call
    :meth:`SignalingRouter.claim_settled`."""

    conn: ConnT
    agent_id: str


@dataclass(frozen=True)
class ReleaseId:
    """Cluster mode: ``agent_id`` is no longer held here; give it back."""

    agent_id: str


@dataclass(frozen=True)
class Forward(Generic[ConnT]):
    """Cluster mode: ``text`` (``from`` already set to ``sender``) is for ``to``, which is not
    registered here: hand it to the server holding ``to``, or call
    :meth:`SignalingRouter.forward_failed` when there is none."""

    conn: ConnT
    sender: str
    to: str
    about: str
    text: str


#: How a cluster-wide claim ended: the id is ours, a live holder keeps it, or Redis could
#: not be asked.
ClaimOutcome: TypeAlias = Literal["granted", "in-use", "unavailable"]

Action: TypeAlias = (
    Send[ConnT] | Close[ConnT] | CheckLiveness[ConnT] | ClaimId[ConnT] | Forward[ConnT] | ReleaseId
)


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

    def available(self, now: float) -> bool:
        """Whether a token is there, without spending it."""
        return min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate) >= 1.0


@dataclass
class _Connection:
    bucket: TokenBucket
    #: Where it comes from (see :func:`source_key`), for throttling bad tokens.
    source: str
    agent_id: str | None = None
    #: An id this connection asked for while another live connection holds it.
    claiming: str | None = None
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
    #: Registrations refused because a live connection holds the id.
    id_in_use: int = 0
    bad_tokens: int = 0
    #: Registrations refused because their source sent too many bad tokens.
    throttled: int = 0
    messages_in: int = 0
    messages_routed: int = 0
    #: Cluster mode: messages handed to other servers, and received from them for ours.
    messages_forwarded: int = 0
    messages_delivered: int = 0
    routed_by_type: Counter[str] = field(default_factory=Counter)
    errors_by_code: Counter[str] = field(default_factory=Counter)
    rate_limited_dropped: int = 0
    closed_for_flooding: int = 0
    #: Connections closed because they did not read what was sent to them.
    closed_slow_receivers: int = 0

    def as_dict(self) -> dict[str, object]:
        """Plain data (for JSON or msgpack)."""
        return {
            "connections_total": self.connections_total,
            "registrations": self.registrations,
            "replaced": self.replaced,
            "id_in_use": self.id_in_use,
            "bad_tokens": self.bad_tokens,
            "throttled": self.throttled,
            "messages_in": self.messages_in,
            "messages_routed": self.messages_routed,
            "messages_forwarded": self.messages_forwarded,
            "messages_delivered": self.messages_delivered,
            "routed_by_type": dict(self.routed_by_type),
            "errors_by_code": dict(self.errors_by_code),
            "rate_limited_dropped": self.rate_limited_dropped,
            "closed_for_flooding": self.closed_for_flooding,
            "closed_slow_receivers": self.closed_slow_receivers,
        }


class SignalingRouter(Generic[ConnT]):
    """Registrations, routing and limits for one signaling server (no I/O).

    ``token`` is one token every agent may present; ``tokens`` maps agent ids to their own
    tokens. With neither, registration is open. An id listed in ``tokens`` needs exactly its
    own token (the shared one does not register it); other ids need the shared token.
    ``failures_per_minute`` and ``max_sources`` shape the per-source throttle of bad tokens
    (see the module documentation). ``cluster`` makes registrations and routing
    cluster-wide (see the module documentation).
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
        failures_per_minute: int = 5,
        max_sources: int = 10_000,
        cluster: bool = False,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if failures_per_minute < 1 or max_sources < 1:
            raise ValueError("failures_per_minute and max_sources must be >= 1")
        self._token = token.encode("utf-8") if token else None
        self._tokens = {k: v.encode("utf-8") for k, v in (tokens or {}).items()}
        self.max_message_size = max_message_size
        self.rate = rate
        self.burst = burst
        #: Dropped frames in a row after which a flooding connection is closed.
        self.flood_close_after = (
            flood_close_after if flood_close_after is not None else max(20, burst)
        )
        self.failures_per_minute = failures_per_minute
        self.max_sources = max_sources
        self.cluster = cluster
        self._conns: dict[ConnT, _Connection] = {}
        self._by_id: dict[str, ConnT] = {}
        #: id -> the connection whose claim on it waits for a liveness check of the holder.
        self._claims: dict[str, ConnT] = {}
        #: Bad tokens per source, least recently failed first.
        self._failures: OrderedDict[str, TokenBucket] = OrderedDict()
        #: When an ``id-in-use`` refusal was last logged at WARNING, per id (bounded like
        #: ``_failures``): a duplicate agent retrying must not flood the log.
        self._conflicts_logged: OrderedDict[str, float] = OrderedDict()
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

    def holder(self, agent_id: str) -> ConnT | None:
        """The connection that holds ``agent_id`` here, if any."""
        return self._by_id.get(agent_id)

    def set_tokens(self, token: str | None, tokens: Mapping[str, str] | None) -> None:
        """Replace the token configuration (reload); existing registrations stay."""
        self._token = token.encode("utf-8") if token else None
        self._tokens = {k: v.encode("utf-8") for k, v in (tokens or {}).items()}

    # --- events -------------------------------------------------------------------------------

    def connect(
        self, conn: ConnT, now: float = 0.0, source: str | None = None
    ) -> list[Action[ConnT]]:
        """A connection was opened, from ``source`` (its remote address, when known)."""
        self._conns[conn] = _Connection(
            bucket=TokenBucket(rate=self.rate, burst=self.burst, tokens=self.burst, updated=now),
            source=source_key(source),
        )
        self.stats.connections_total += 1
        return []

    def disconnect(self, conn: ConnT) -> list[Action[ConnT]]:
        """A connection is gone (for whatever reason); forget it and its registration. A claim
        waiting for this connection's id is granted at once."""
        state = self._conns.pop(conn, None)
        if state is None:
            return []
        if state.claiming is not None and self._claims.get(state.claiming) == conn:
            del self._claims[state.claiming]
        agent_id = state.agent_id
        if agent_id is None or self._by_id.get(agent_id) != conn:
            return []
        del self._by_id[agent_id]
        logger.info("unregistered %s", agent_id)
        claimant = self._claims.pop(agent_id, None)
        claim = self._conns.get(claimant) if claimant is not None else None
        if claimant is None or claim is None or claim.closing:
            return self._released(agent_id)
        claim.claiming = None
        return self._grant(claimant, claim, agent_id)

    def claim_settled(
        self, conn: ConnT, agent_id: str, outcome: ClaimOutcome, now: float
    ) -> list[Action[ConnT]]:
        """The answer to a :class:`ClaimId`. A grant for a connection that left meanwhile
        gives the id back."""
        state = self._conns.get(conn)
        if self._claims.get(agent_id) == conn:
            del self._claims[agent_id]
        if state is None or state.closing or state.claiming != agent_id:
            return self._released(agent_id) if outcome == "granted" else []
        state.claiming = None
        if outcome == "granted":
            return self._grant(conn, state, agent_id)
        if outcome == "in-use":
            return self._refuse_in_use(conn, state, agent_id, now)
        state.closing = True
        text = "the signaling servers cannot reach their shared store; try again shortly"
        return [
            self._error(conn, "unavailable", text, about="register"),
            Close(conn, CLOSE_TRY_AGAIN, text),
        ]

    def evict(self, agent_id: str, now: float) -> list[Action[ConnT]]:
        """Another server took ``agent_id`` over (our holder did not answer its check, or the
        cluster says another server holds it now): drop our holder, and refuse a local
        claim waiting for it (the other server's claimant came first)."""
        holder = self._by_id.get(agent_id)
        held = self._conns.get(holder) if holder is not None else None
        if holder is None or held is None:
            return []
        actions = self._replace(holder, held, agent_id)
        claimant = self._claims.pop(agent_id, None)
        claim = self._conns.get(claimant) if claimant is not None else None
        if claimant is not None and claim is not None and not claim.closing:
            claim.claiming = None
            actions += self._refuse_in_use(claimant, claim, agent_id, now)
        return actions + self._released(agent_id)

    def deliver(
        self, agent_id: str, text: str, *, sender: str = "", via: str = "", about: str = ""
    ) -> list[Action[ConnT]]:
        """A message from agent ``sender`` on server ``via`` for our ``agent_id``: a
        :class:`Send`, or nothing when ``agent_id`` is not (any longer) registered here."""
        target = self._by_id.get(agent_id)
        if target is None:
            return []
        self.stats.messages_delivered += 1
        return [Send(target, text, to=agent_id, about=about, sender=sender, via=via)]

    def slow_receiver(self, conn: ConnT) -> list[Action[ConnT]]:
        """The I/O layer cannot queue more for ``conn`` (it does not read): unregister it at
        once, so that later messages for its id are answered ``offline``, and close it
        (4008). Nothing for a connection already closing."""
        state = self._conns.get(conn)
        if state is None or state.closing:
            return []
        state.closing = True
        self.stats.closed_slow_receivers += 1
        actions: list[Action[ConnT]] = []
        agent_id = state.agent_id
        if agent_id is not None and self._by_id.get(agent_id) == conn:
            del self._by_id[agent_id]
            state.agent_id = None
            logger.info("unregistered %s (not reading its messages)", agent_id)
            actions += self._released(agent_id)
        return [
            *actions,
            Close(conn, CLOSE_SLOW_RECEIVER, "too slow: messages for it were not read"),
        ]

    def undelivered(self, sender: ConnT, peer: str, about: str) -> list[Action[ConnT]]:
        """A message ``sender`` routed to ``peer`` could not be written (the target closed
        meanwhile): answer ``offline`` as if it had been gone already."""
        state = self._conns.get(sender)
        if state is None or state.closing:
            return []
        return [
            self._error(
                sender, "offline", f"{peer!r} disconnected before the message reached it",
                peer=peer, about=about,
            )
        ]

    def forward_failed(
        self, sender: str, peer: str, about: str, *, unavailable: bool = False
    ) -> list[Action[ConnT]]:
        """No server holds ``peer``: tell our agent ``sender`` its ``about`` message was not
        delivered (``offline``). With ``unavailable`` the cluster could not find out where
        ``peer`` is (Redis failed): ``unavailable``, which says nothing about the peer."""
        conn = self._by_id.get(sender)
        state = self._conns.get(conn) if conn is not None else None
        if conn is None or state is None or state.closing:
            return []
        if unavailable:
            text = (f"message for {peer!r} not delivered: the signaling servers cannot reach "
                    "their shared store; try again shortly")
            return [self._error(conn, "unavailable", text, peer=peer, about=about)]
        return [
            self._error(conn, "offline", f"{peer!r} is not connected", peer=peer, about=about)
        ]

    def liveness_checked(self, conn: ConnT, alive: bool, now: float) -> list[Action[ConnT]]:
        """The answer to a :class:`CheckLiveness` of ``conn``: ``alive`` when it answered in
        time. Settles the claim waiting for ``conn``'s id."""
        state = self._conns.get(conn)
        agent_id = state.agent_id if state is not None else None
        if state is None or agent_id is None or self._by_id.get(agent_id) != conn:
            return []  # gone meanwhile: disconnect() settled the claim
        claimant = self._claims.pop(agent_id, None)
        claim = self._conns.get(claimant) if claimant is not None else None
        if claimant is None or claim is None or claim.closing:
            return []
        claim.claiming = None
        if alive:
            return self._refuse_in_use(claimant, claim, agent_id, now)
        actions = self._replace(conn, state, agent_id)
        return actions + self._grant(claimant, claim, agent_id)

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
            return self._register(conn, state, message, now)
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

    def _register(
        self, conn: ConnT, state: _Connection, message: Register, now: float
    ) -> list[Action[ConnT]]:
        agent_id = message.id
        if state.claiming is not None:
            return [self._error(conn, "bad-message", "a registration is already pending",
                                about="register")]
        if not self._source_may_try(state.source, now):
            state.closing = True
            self.stats.throttled += 1
            text = "too many bad tokens from your address; try again in a minute"
            return [
                self._error(conn, "rate-limited", text, about="register"),
                Close(conn, CLOSE_POLICY, text),
            ]
        if not self._token_ok(agent_id, message.token):
            state.closing = True
            self.stats.bad_tokens += 1
            reason = "missing token" if not message.token else "bad token"
            self._failed(state.source, now,
                         f"refused registration of {agent_id} from {state.source}: {reason}")
            return [
                self._error(conn, "bad-token", f"{reason} for {agent_id!r}", about="register"),
                Close(conn, CLOSE_BAD_TOKEN, _reason(f"{reason} for {agent_id!r}")),
            ]
        holder = self._by_id.get(agent_id)
        if holder == conn:
            return self._grant(conn, state, agent_id)
        if holder is None:
            if not self.cluster:
                return self._grant(conn, state, agent_id)
            if agent_id in self._claims:
                return self._refuse_in_use(conn, state, agent_id, now)
            self._claims[agent_id] = conn
            state.claiming = agent_id
            return [ClaimId(conn, agent_id)]
        held = self._conns.get(holder)
        if held is None or held.closing:
            # Already on its way out: nothing to check.
            if held is not None:
                held.agent_id = None
            del self._by_id[agent_id]
            return self._grant(conn, state, agent_id)
        if agent_id in self._claims:
            return self._refuse_in_use(conn, state, agent_id, now)
        self._claims[agent_id] = conn
        state.claiming = agent_id
        logger.info("%s asked for by another connection; checking that its holder is alive",
                    agent_id)
        return [CheckLiveness(holder)]

    def _grant(self, conn: ConnT, state: _Connection, agent_id: str) -> list[Action[ConnT]]:
        actions: list[Action[ConnT]] = []
        old_id = state.agent_id
        if old_id is not None and old_id != agent_id and self._by_id.get(old_id) == conn:
            # The same connection changes its id: the old one is free again.
            del self._by_id[old_id]
            logger.info("unregistered %s (re-registered as %s)", old_id, agent_id)
            actions += self._released(old_id)
        state.agent_id = agent_id
        self._by_id[agent_id] = conn
        self.stats.registrations += 1
        logger.info("registered %s", agent_id)
        return [*actions, Send(conn, Registered(id=agent_id).to_json())]

    def _released(self, agent_id: str) -> list[Action[ConnT]]:
        """In cluster mode, give ``agent_id`` back unless it is held or claimed here again."""
        if not self.cluster or agent_id in self._by_id or agent_id in self._claims:
            return []
        return [ReleaseId(agent_id)]

    def _replace(self, holder: ConnT, held: _Connection, agent_id: str) -> list[Action[ConnT]]:
        """``holder`` did not answer the liveness check: close it and free ``agent_id``."""
        held.closing = True
        held.agent_id = None
        del self._by_id[agent_id]
        self.stats.replaced += 1
        logger.warning("%s: its connection did not answer a ping; a new connection takes the id",
                       agent_id)
        return [
            self._error(
                holder,
                "replaced",
                f"this connection did not answer a ping; a newer connection registered "
                f"{agent_id!r}",
                peer=agent_id,
            ),
            Close(holder, CLOSE_REPLACED, _reason(f"replaced: {agent_id!r} registered again")),
        ]

    def _refuse_in_use(
        self, conn: ConnT, state: _Connection, agent_id: str, now: float
    ) -> list[Action[ConnT]]:
        state.closing = True
        self.stats.id_in_use += 1
        last = self._conflicts_logged.get(agent_id)
        loud = last is None or now - last >= 60.0
        if loud:
            self._conflicts_logged.pop(agent_id, None)
            self._conflicts_logged[agent_id] = now
            if len(self._conflicts_logged) > self.max_sources:
                self._conflicts_logged.popitem(last=False)
        logger.log(
            logging.WARNING if loud else logging.DEBUG,
            "refused registration of %s from %s: a live connection holds it "
            "(%d such refusals so far)",
            agent_id, state.source, self.stats.id_in_use,
        )
        text = (
            f"{agent_id!r} is registered by another connection that is alive; stop the other "
            "agent using this id, or choose another agent_id"
        )
        return [
            self._error(conn, "id-in-use", text, peer=agent_id, about="register"),
            Close(conn, CLOSE_ID_IN_USE, _reason(f"{agent_id!r} is in use")),
        ]

    def _source_may_try(self, source: str, now: float) -> bool:
        bucket = self._failures.get(source)
        return bucket is None or bucket.available(now)

    def _failed(self, source: str, now: float, what: str) -> None:
        """Count a bad token from ``source`` and log it (once throttled, a source's attempts
        are refused before this and only counted)."""
        bucket = self._failures.pop(source, None)
        if bucket is None:
            if len(self._failures) >= self.max_sources:
                self._failures.popitem(last=False)
            per_minute = float(self.failures_per_minute)
            bucket = TokenBucket(rate=per_minute / 60.0, burst=per_minute, tokens=per_minute,
                                 updated=now)
        self._failures[source] = bucket
        bucket.take(now)
        if bucket.available(now):
            logger.warning("%s", what)
        else:
            logger.warning("%s; throttling registrations from %s (over %d bad tokens a minute)",
                           what, source, self.failures_per_minute)

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
        if target is None and not self.cluster:
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
        text = json.dumps(wire, separators=(",", ":"))
        self.stats.routed_by_type[message.type] += 1
        if target is None:
            # Cluster mode: another server may hold it.
            self.stats.messages_forwarded += 1
            return [Forward(conn, state.agent_id, message.to, message.type, text)]
        self.stats.messages_routed += 1
        logger.debug("routed %s from %s to %s", message.type, state.agent_id, message.to)
        return [Send(target, text, origin=conn, to=message.to, about=message.type)]

    def _token_ok(self, agent_id: str, presented: str | None) -> bool:
        if not self.auth_required:
            return True
        given = (presented or "").encode("utf-8")
        own = self._tokens.get(agent_id)
        # Both comparisons always run, against a placeholder when a token is not configured:
        # the timing says nothing about which tokens exist. An id with its own token is
        # registered by that token only, never by the shared one.
        own_ok = hmac.compare_digest(given, own if own is not None else b"\0")
        shared_ok = hmac.compare_digest(
            given, self._token if self._token is not None else b"\0"
        )
        ok = own_ok if own is not None else shared_ok and self._token is not None
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


def source_key(address: str | None) -> str:
    """What bad tokens are counted under: an IPv4 address, the /64 of an IPv6
    address (one host usually has a whole /64), or the text as given."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


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
