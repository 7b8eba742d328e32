"""AgentCore: many peer sessions, fed by the signaling client, observed through events.

The core reads every signaling message (one task iterating the client), routes it to the
session for its sender, answers offers only from allowed peers (others get a ``bye`` with a
reason), holds trickled candidates that arrive before their offer (for the session the
offer creates; :mod:`mvpd.proto.early_candidates`), and publishes what happens (peer state
changes, transport errors) to subscribers: one bounded queue each, with a drop counter, so a
slow subscriber never slows the data plane. Established sessions do not need signaling:
losing the signaling server leaves them running.

Received chat/json/bytes messages do not pass through events: each transport puts them
straight into its peer's inbox (:mod:`mvpd.inbox`), which :meth:`AgentCore.recv`,
:meth:`AgentCore.messages` and ``mvpctl recv`` read. Sending goes through
:meth:`AgentCore.send`, which fits a message to the connection's mode.

Seed API::

    core = AgentCore(settings, signaling)
    await core.start()
    await core.connect_to("peer-123")
    channel = core.get_channel("peer-123")
    await core.send("peer-123", "text", "hello")
    message = await core.recv("peer-123")       # InboxMessage(kind, value, size)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .admission import MODE_NOT_GRANTED, NOT_ALLOWED, PENDING, OfferAdmission
from .config import AgentSettings
from .inbox import Inbox, Inboxes, InboxMessage
from .known_peers import PeerVerifier
from .logs import RateLimitedLog, fields
from .peer import PeerSession, PeerState, StateChange
from .proto.early_candidates import EarlyCandidates
from .proto.errors import ConnectionClosed, MvpError, PeerError, SignalingRejected
from .proto.modes import MESSAGE_MODES, MessageKind, encode_message
from .proto.signaling import (
    AGENT_ID_PATTERN,
    Answer,
    Bye,
    Candidate,
    Error,
    Message,
    Offer,
    Registered,
    RoutedMessage,
    parse_message,
)
from .proto.trust import TrustDecision
from .transports import PipeTransport, Transport, TransportErrorEvent, transport_class

log = logging.getLogger(__name__)

#: Default capacity of one subscriber's event queue.
DEFAULT_SUBSCRIBER_QUEUE = 1024
#: Seconds between two summaries of refused offers in the log.
REFUSAL_LOG_INTERVAL = 60.0
#: Pause before iterating the signaling client again after its iterator ended or failed.
SIGNALING_RETRY = 1.0


#: See :meth:`AgentCore.add_transport_hook` and :meth:`AgentCore.add_connect_check`.
TransportHook = Callable[[PeerSession, Transport[Any]], None]
ConnectCheck = Callable[[str, str], None]


class SignalingLike(Protocol):
    """What the core needs from :class:`mvpd.signaling.client.SignalingClient`."""

    async def send(self, message: Message | Mapping[str, Any]) -> None: ...

    def __aiter__(self) -> AsyncIterator[Message]: ...


@dataclass(frozen=True)
class CoreEvent:
    """One thing that happened. ``kind`` is one of:

    * ``peer-state``: ``data`` = ``{"state", "reason", "mode", "role"}``;
    * ``transport-error``: ``{"label", "reason", "detail"}``;
    * ``channel``: a channel was attached, ``{"label", "mode"}`` (e.g. a pipe opened);
    * ``offer-refused``: ``{"reason"}`` (and ``"mode"`` when a channel's mode was refused);
    * ``signaling-error``: the server reported an error, ``{"code", "message"}``;
    * ``identity-refused``: the peer's DTLS fingerprint is not trusted,
      ``{"reason", "expected", "offered"}``.
    """

    kind: str
    peer: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


class EventSubscription:
    """A bounded event queue for one subscriber. When full, the oldest event is dropped
    and counted in :attr:`dropped`. Iterate it, or ``await get()``; ``close()`` when done."""

    def __init__(self, core: AgentCore, maxsize: int, kinds: frozenset[str] | None) -> None:
        self._core = core
        self._events: collections.deque[CoreEvent] = collections.deque(maxlen=max(maxsize, 1))
        self._ready = asyncio.Event()
        self.kinds = kinds
        self.dropped = 0
        self.closed = False

    def put(self, event: CoreEvent) -> None:
        if self.closed or (self.kinds is not None and event.kind not in self.kinds):
            return
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)
        self._ready.set()

    async def get(self) -> CoreEvent:
        """The next event; :class:`ConnectionClosed` after :meth:`close` (or core stop)."""
        while not self._events:
            if self.closed:
                raise ConnectionClosed("the subscription is closed")
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def get_nowait(self) -> CoreEvent | None:
        return self._events.popleft() if self._events else None

    def __aiter__(self) -> AsyncIterator[CoreEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[CoreEvent]:
        while True:
            try:
                yield await self.get()
            except ConnectionClosed:
                return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ready.set()
            self._core._unsubscribe(self)


class AgentCore:
    """All peer sessions of this agent, driven by one signaling client."""

    def __init__(
        self,
        settings: AgentSettings,
        signaling: SignalingLike,
        *,
        verifier: PeerVerifier | None = None,
    ) -> None:
        """``verifier`` holds this agent's identity and its trust in peers; by default it
        is loaded from ``settings.state_dir`` (:class:`ConfigError` if unsafe)."""
        self.settings = settings
        self.verifier = verifier if verifier is not None else PeerVerifier.load(settings)
        self.verifier.add_refusal_listener(self._on_identity_refused)
        self.agent_id = settings.agent_id
        self.signaling = signaling
        self._sessions: dict[str, PeerSession] = {}
        self._subscribers: list[EventSubscription] = []
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._stopping = False
        self.refused_offers = 0
        self.ignored_messages = 0
        self.admission = OfferAdmission(settings.max_pending_sessions, settings.offers_per_minute)
        #: Refused offers: the first is logged, then one summary a minute.
        self._refusals = RateLimitedLog(log, REFUSAL_LOG_INTERVAL)
        #: Trickled candidates that came before their offer, held until it comes.
        self.early_candidates = EarlyCandidates(ttl=settings.connect_timeout)
        self._transport_hooks: list[TransportHook] = []
        self._connect_checks: list[ConnectCheck] = []
        self._connect_checks.append(self.verifier.check_connect)
        #: Every peer's received messages (the only receive buffer).
        self.inboxes = Inboxes()

    def add_transport_hook(self, hook: TransportHook) -> None:
        """Call ``hook(session, transport)`` for every new transport, before anything else
        hears of it (the TUN tunnel binds tun transports this way)."""
        self._transport_hooks.append(hook)

    def add_connect_check(self, check: ConnectCheck) -> None:
        """Call ``check(peer, mode)`` before connecting; an :class:`MvpError` it raises
        fails the connect with its message, before any session exists."""
        self._connect_checks.append(check)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start consuming signaling messages (the signaling client connects by itself)."""
        if self._reader is None:
            self._stopping = False
            self.inboxes.closed = False
            self._reader = asyncio.ensure_future(self._read_signaling())
            for warning in self.settings.ice_warnings():
                log.warning("ICE servers: %s", warning)

    async def stop(self) -> None:
        """Say bye to every peer, close every session, stop reading signaling."""
        self._stopping = True
        sessions = list(self._sessions.values())
        await asyncio.gather(
            *(s.close("agent stopping", send_bye=True) for s in sessions),
            return_exceptions=True,
        )
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        for task in list(self._tasks):
            task.cancel()
        for sub in list(self._subscribers):
            sub.close()
        self._refusals.flush()
        self.inboxes.close()

    # --- sessions --------------------------------------------------------------------------

    @property
    def sessions(self) -> dict[str, PeerSession]:
        """Live sessions by peer id (closed and failed ones are removed)."""
        return dict(self._sessions)

    def get_session(self, peer: str) -> PeerSession | None:
        return self._sessions.get(peer)

    def get_transport(self, peer: str) -> Transport[Any] | None:
        """The main transport to ``peer`` (whatever its mode), if one exists."""
        session = self._sessions.get(peer)
        return session.transport if session is not None else None

    def get_channel(self, peer: str) -> Any:
        """The main data channel to ``peer`` (an aiortc ``RTCDataChannel``), or ``None``."""
        transport = self.get_transport(peer)
        return transport.channel if transport is not None else None

    def status(self) -> dict[str, Any]:
        """Plain-data snapshot for ``mvpctl status``."""
        return {
            "agent_id": self.agent_id,
            "signaling": getattr(self.signaling, "state", "unknown"),
            "peers": {peer: s.snapshot() for peer, s in self._sessions.items()},
            "refused_offers": self.refused_offers,
            "refused_offers_by_reason": dict(self.admission.refused),
            "ignored_messages": self.ignored_messages,
            "subscribers": [
                {"kinds": sorted(s.kinds) if s.kinds else None, "dropped": s.dropped}
                for s in self._subscribers
            ],
            "inboxes": self.inboxes.stats(),
            "dropped": self.dropped(),
        }

    def dropped(self) -> dict[str, int]:
        """Drops that belong to no connected peer, by reason: unread messages of peers that
        left (``inbox-expired``, and their earlier ``inbox-full``), events no subscriber
        read in time (``event-queue-full``), and candidates that came before an offer that
        never did, or over the caps (``early-candidates``)."""
        drops = collections.Counter(self.inboxes.dropped)
        drops["event-queue-full"] += sum(s.dropped for s in self._subscribers)
        drops["early-candidates"] += self.early_candidates.dropped
        return {reason: count for reason, count in drops.items() if count}

    # --- messages --------------------------------------------------------------------------

    async def send(self, peer: str, kind: MessageKind, value: Any) -> int:
        """Send one message of ``kind`` (``text``: a str, ``json``: any JSON value,
        ``bytes``) to ``peer``, fitted to the connection's mode (see
        :func:`mvpd.proto.modes.encode_message`), waiting for buffer room. Returns the
        bytes that went on the channel. :class:`PeerError` if not connected or the mode
        cannot carry it; :class:`MessageTooLarge` over the size limit."""
        session = self._sessions.get(peer)
        transport = session.transport if session is not None else None
        if session is None or session.state.is_final:
            raise PeerError(f"not connected to {peer}; run `mvpctl connect {peer}` first")
        if transport is None or not transport.is_open:
            raise PeerError(f"the connection to {peer} is {session.state.value}, not open yet")
        try:
            payload = encode_message(transport.mode, kind, value)
        except PeerError as exc:
            raise PeerError(f"{peer}: {exc.message}") from None
        if isinstance(payload, str):
            await transport.send_text_async(payload)
            return len(payload.encode("utf-8"))
        await transport.send_bytes_async(payload)
        return len(payload)

    async def recv(self, peer: str) -> InboxMessage:
        """The next message from ``peer`` (waiting for one, and for the peer to connect);
        :class:`ConnectionClosed` once the core stops."""
        async for message in self.inboxes.read(peer, limit=1):
            return message
        raise ConnectionClosed("the agent stopped")

    def messages(self, peer: str) -> AsyncIterator[InboxMessage]:
        """``peer``'s messages as they come, until the core stops."""
        return self.inboxes.read(peer)

    async def connect_to(self, peer: str, mode: str | None = None) -> Transport[Any]:
        """Connect to ``peer`` and return the open main transport.

        ``mode`` defaults to the peer's configured mode. An existing session is reused
        (waited for while it connects). Raises :class:`PeerError` when the peer id is
        invalid, the mode unknown, or no channel opens within ``connect_timeout``.
        """
        if not re.match(AGENT_ID_PATTERN, peer):
            raise PeerError(f"{peer!r} is not a valid agent id")
        if peer == self.agent_id:
            raise PeerError("cannot connect to ourselves")
        if self._stopping:
            raise PeerError("the agent is stopping")
        wanted = mode or self.settings.mode_for(peer)
        try:
            transport_class(wanted)
            for check in self._connect_checks:
                check(peer, wanted)
        except MvpError as exc:
            raise PeerError(exc.message) from None
        session = self._sessions.get(peer)
        if session is not None and not session.state.is_final:
            if session.state == PeerState.CONNECTED and mode and session.mode != mode:
                raise PeerError(
                    f"already connected to {peer} in {session.mode} mode; disconnect first"
                )
            return await session.wait_open()
        session = self._new_session(peer, wanted)
        await session.start_offer()
        return await session.wait_open()

    async def disconnect(self, peer: str, reason: str = "disconnected") -> bool:
        """Say bye to ``peer`` and close its session; ``False`` if there was none."""
        session = self._sessions.get(peer)
        if session is None:
            return False
        await session.close(reason, send_bye=True)
        return True

    async def open_pipe(self, peer: str) -> PipeTransport:
        """Open a new pipe channel to a connected peer: our sending direction (the peer
        reads it with its own :meth:`wait_pipe`)."""
        session = self._sessions.get(peer)
        if session is None:
            raise PeerError(f"not connected to {peer}")
        return await session.open_pipe()

    async def wait_pipe(self, peer: str, timeout: float | None = None) -> PipeTransport:
        """The oldest pipe ``peer`` opened to us that nobody took yet: our receiving
        direction (its data is buffered until read, within the pipe's window)."""
        session = self._sessions.get(peer)
        if session is None:
            raise PeerError(f"not connected to {peer}")
        return await session.wait_pipe(timeout)

    def _new_session(self, peer: str, mode: str | None) -> PeerSession:
        session = PeerSession(
            self.settings,
            peer,
            send_signal=self._send_signal,
            mode=mode,
            on_state=self._on_session_state,
            on_transport=self._on_session_transport,
            verifier=self.verifier,
        )
        session.add_state_listener(self._note_connected)
        self._sessions[peer] = session
        return session

    async def _send_signal(self, message: RoutedMessage) -> None:
        await self.signaling.send(message)

    # --- events ----------------------------------------------------------------------------

    def subscribe(
        self, maxsize: int = DEFAULT_SUBSCRIBER_QUEUE, kinds: set[str] | None = None
    ) -> EventSubscription:
        """A new event queue (all kinds, or only ``kinds``)."""
        sub = EventSubscription(self, maxsize, frozenset(kinds) if kinds is not None else None)
        self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: EventSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(sub)

    def emit(self, kind: str, peer: str, **data: Any) -> None:
        event = CoreEvent(kind, peer, data)
        for sub in list(self._subscribers):
            sub.put(event)

    def _on_session_state(self, session: PeerSession, change: StateChange) -> None:
        self.emit(
            "peer-state",
            session.peer_id,
            state=change.state.value,
            reason=change.reason,
            mode=session.mode,
            role=session.role,
        )
        if change.state.is_final and session.refused_mode is not None:
            self.refused_offers += 1
            self.admission.count(MODE_NOT_GRANTED)
            self.emit("offer-refused", session.peer_id,
                      reason=f"{session.refused_mode} mode not granted", mode=session.refused_mode)
        if change.state.is_final and self._sessions.get(session.peer_id) is session:
            del self._sessions[session.peer_id]
            self.inboxes.peer_left(session.peer_id)

    def _on_identity_refused(self, peer: str, decision: TrustDecision) -> None:
        self.emit("identity-refused", peer, reason=decision.reason,
                  expected=list(decision.expected), offered=decision.offered)

    def _on_session_transport(self, session: PeerSession, transport: Transport[Any]) -> None:
        for hook in self._transport_hooks:
            try:
                hook(session, transport)
            except Exception:
                log.exception("transport hook for peer %s failed", session.peer_id)
        peer = session.peer_id
        label = transport.label
        self.emit("channel", peer, label=label, mode=transport.mode)
        if transport.mode in MESSAGE_MODES:
            inboxes = self.inboxes

            def peer_inbox() -> Inbox | None:
                # Only a live session's transport may (re)create the inbox: a late message
                # or reader of a closed one must not bring back an inbox already freed.
                if transport.is_closed or session.state.is_final:
                    return inboxes.get(peer)
                return inboxes.open(peer)

            transport.use_inbox(peer_inbox)
            inboxes.open(peer)  # followers of a connected peer wait on its inbox

        def on_error(event: TransportErrorEvent) -> None:
            self.emit("transport-error", peer, label=label, reason=event.reason,
                      detail=event.detail)

        transport.add_error_listener(on_error)

    # --- signaling in ----------------------------------------------------------------------

    async def _read_signaling(self) -> None:
        while not self._stopping:
            try:
                async for raw in self.signaling:
                    self.dispatch(raw)
            except asyncio.CancelledError:
                raise
            except SignalingRejected as exc:
                # Never final: a server (or whoever runs it) must not be able to take us off
                # signaling for good with one message. Sessions keep running; read again.
                log.warning("the signaling server refused us: %s; sessions keep running", exc)
            except Exception as exc:
                log.warning("reading signaling failed: %s", exc)
            if self._stopping:
                return
            # The iterator ended (client closed or between connections): sessions keep
            # running; look again later.
            await asyncio.sleep(SIGNALING_RETRY)

    def dispatch(self, raw: Message | Mapping[str, Any] | str | bytes) -> None:
        """Route one signaling message. Never raises: bad input is logged and dropped."""
        try:
            message = raw if not isinstance(raw, (Mapping, str, bytes)) else parse_message(
                raw if not isinstance(raw, Mapping) else dict(raw)
            )
        except MvpError as exc:
            self.ignored_messages += 1
            log.warning("ignored a signaling message: %s", exc)
            return
        try:
            self._route(message)
        except Exception:
            self.ignored_messages += 1
            log.exception("failed to handle a %s message", getattr(message, "type", "?"))

    def _route(self, message: Message) -> None:
        if isinstance(message, Registered):
            log.debug("registered with the signaling server as %s", message.id)
            return
        if isinstance(message, Error):
            self._on_server_error(message)
            return
        if not isinstance(message, (Offer, Answer, Candidate, Bye)):
            log.debug("ignored a %s message", message.type)
            return
        peer = message.sender
        if peer is None:
            self.ignored_messages += 1
            log.warning("ignored a %s message without a sender", message.type)
            return
        if message.to != self.agent_id:
            self.ignored_messages += 1
            log.warning("ignored a %s message from %s for %s", message.type, peer, message.to)
            return
        session = self._sessions.get(peer)
        if isinstance(message, Offer):
            self._on_offer(peer, message, session)
            return
        if isinstance(message, Candidate) and session is not None and (
            session.is_for_another_ice_session(message)
        ):
            # The peer started over and trickles for the offer that will replace this session.
            self._hold_early_candidate(peer, message)
            return
        if session is None or session.state.is_final:
            if isinstance(message, Candidate):
                self._hold_early_candidate(peer, message)
            elif isinstance(message, Bye):
                self.early_candidates.discard(peer)
            else:
                self.ignored_messages += 1
                log.debug("ignored a %s from %s: no session", message.type, peer)
            return
        session.deliver(message)

    def _hold_early_candidate(self, peer: str, candidate: Candidate) -> None:
        """Keep a candidate that came before its offer (browsers trickle at once, and the
        offer may be behind it): the offer's session gets it right after the offer."""
        if self._stopping or not self.settings.allows(peer):
            self.ignored_messages += 1
            return
        if not self.early_candidates.hold(peer, candidate, time.monotonic()):
            self.ignored_messages += 1
            log.debug("ignored an early candidate from %s: too many held", peer)

    def _on_offer(self, peer: str, offer: Offer, session: PeerSession | None) -> None:
        if not self.settings.allows(peer):
            self.admission.count(NOT_ALLOWED)
            self._refuse_offer(peer, "this agent does not accept connections "
                               "from you", "not in allowed_peers")
            return
        if self._stopping:
            return
        restart = session is not None and not session.state.is_final and session.negotiated
        if session is None or session.state.is_final or restart:
            # This offer would make a new peer connection (sockets): admitted first, so
            # that a flood of offers cannot exhaust the daemon's descriptors.
            refusal = self.admission.refusal(
                peer, pending=self._pending_answers(), exempt=restart or self._named(peer)
            )
            if refusal == PENDING:
                self._refuse_offer(peer, "too many connections are being set up "
                                   "here; try again later",
                                   f"{self.admission.max_pending} sessions pending")
                return
            if refusal is not None:
                self._refuse_offer(peer, "too many offers from you; try again in a "
                                   "minute", "over offers_per_minute")
                return
        if restart:
            # A fresh offer on a negotiated session: the peer restarted. aiortc cannot
            # renegotiate, so the old session goes and a new one answers.
            assert session is not None
            log.info("peer %s sent a new offer; replacing its session", peer)
            del self._sessions[peer]
            self._spawn(session.close("the peer reconnected"))
            session = None
        if session is None or session.state.is_final:
            session = self._new_session(peer, None)
        session.deliver(offer)
        for candidate in self.early_candidates.take(peer, time.monotonic()):
            session.deliver(candidate)

    def _pending_answers(self) -> int:
        """Sessions answering an offer that are not connected yet (our own offers are
        local decisions and do not count)."""
        return sum(
            1 for s in self._sessions.values()
            if s.state in (PeerState.NEW, PeerState.CONNECTING) and s.role != "offerer"
        )

    def _note_connected(self, session: PeerSession, change: StateChange) -> None:
        if change.state == PeerState.CONNECTED:
            self.admission.note_connected(session.peer_id)

    def _named(self, peer: str) -> bool:
        """Whether the configuration names ``peer`` (such peers are not held back by the
        pending-session cap)."""
        settings = self.settings
        return peer in settings.peers or peer in settings.auto_connect or (
            peer in settings.allowed_peers
        )

    def _refuse_offer(self, peer: str, told: str, logged: str) -> None:
        """Say bye with ``told``, count, emit and log (rate-limited) a refused offer."""
        self.early_candidates.discard(peer)
        self.refused_offers += 1
        self._refusals.warning("refused an offer from %s: %s", peer, logged,
                               extra=fields(peer=peer, event="offer-refused"))
        self.emit("offer-refused", peer, reason=logged)
        bye = Bye(sender=self.agent_id, to=peer, reason=f"offer refused: {told}")
        self._spawn(self._send_quietly(bye))

    def _on_server_error(self, error: Error) -> None:
        log.warning("signaling server error %s: %s", error.code, error.message)
        peer = error.peer or ""
        self.emit("signaling-error", peer, code=error.code, message=error.message)
        session = self._sessions.get(peer) if peer else None
        if (
            error.code == "offline"
            and session is not None
            and session.state == PeerState.CONNECTING
        ):
            self._spawn(session.close(f"{peer} is not connected to the signaling server",
                                      failed=True))

    async def _send_quietly(self, message: RoutedMessage) -> None:
        try:
            await self.signaling.send(message)
        except Exception as exc:
            log.debug("could not send %s to %s: %s", message.type, message.to, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
