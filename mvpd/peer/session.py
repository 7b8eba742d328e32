"""One peer connection per remote agent: negotiation, glare, channels, state, status.

It runs on :class:`mvpd.rtc.PeerConnection` (aiortc's ICE and DTLS, our SCTP). What shapes it:

* Half-trickle: the connection gathers every local candidate before it describes itself,
  so our offer/answer SDP is complete. Browsers trickle theirs, and those may arrive before
  the offer or answer: they are queued here until the remote description is set and never
  dropped (those that come before the offer, when no session exists yet, the core holds: see
  :mod:`mvpd.proto.early_candidates`). An empty or null candidate means end-of-candidates.
* States and what moves them are the table of :mod:`mvpd.proto.session_states`; every
  change goes through ``_set_state`` with an event, which asks it.
* The ICE server list is always explicit (empty when none are configured): see
  :func:`mvpd.peer.candidates.ice_configuration`. No candidate, ours or the peer's, may lie
  in a network our TUN tunnels carry (:mod:`mvpd.tun.tunnel_networks`).
* No rollback and no ICE restart: on glare the agent with the lower id throws its own peer
  connection away and answers; recovery from failure is a new session.
* The mode travels in-band: the offerer opens the main channel with ``label`` =
  ``data_channel_label`` and ``protocol`` = mode, which the answerer reads from the
  channel-open message to build the matching transport.
* Closing is graceful: the channels are closed with stream resets and the association shut
  down (SHUTDOWN, not ABORT), so the peer (a browser too) sees a clean close.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCIceCandidate, RTCSessionDescription

from ..config import AgentSettings
from ..known_peers import PeerVerifier
from ..logs import FieldsAdapter, RateLimitedLog, fields
from ..ping import answer_pings
from ..proto.errors import (
    ConnectionClosed,
    IllegalTransition,
    MvpError,
    PeerError,
    TransportError,
)
from ..proto.ping import PING_LABEL
from ..proto.session_states import SessionEvent, session_machine
from ..proto.signaling import Answer, Bye, Candidate, IceCandidate, Offer, RoutedMessage
from ..proto.trust import TrustDecision
from ..rtc import DataChannel, PeerConnection
from ..transports import (
    MAX_MESSAGE_SIZE,
    PIPE_LABEL,
    PipeTransport,
    Transport,
    TransportCounters,
    create_transport,
    transport_class,
)
from ..tun.tunnel_networks import tunnel_networks
from .candidates import (
    count_candidate_lines,
    ice_configuration,
    ice_ufrag,
    keep_candidate_lines,
    parse_candidate,
)
from .liveness import LIVENESS_RTTS, watch_liveness
from .state import PeerState, StateChange

#: The logger of the whole package (``journalctl`` and tests filter on ``mvpd.peer``).
log = logging.getLogger("mvpd.peer")

#: Candidate messages (end-of-candidates included) kept while waiting for the remote
#: description; the candidates among them are bounded by ``max_remote_candidates`` anyway.
MAX_PENDING_CANDIDATES = 512
#: Signaling messages waiting for this session's worker.
MAX_INBOX = 256
#: How long a Bye may take to leave before closing goes on without it.
BYE_TIMEOUT = 2.0
#: How long a refused session keeps its peer connection after its bye left (see _refuse).
REFUSAL_LINGER = 0.5
#: How long closing waits for the peer connection to shut down (channels reset, SCTP
#: SHUTDOWN, DTLS close, ICE stopped). Past that the rest goes on in the background: with an
#: unreachable TURN server aiortc waits ~63 s for the allocation's deletion to be confirmed,
#: and a disconnect or a stop must not wait for that.
PC_CLOSE_TIMEOUT = 3.0
#: How long a pipe that closed under its user waits for the whole session to end too before
#: it is taken for the peer closing just that pipe: a peer that disconnects or stops closes
#: its channels a moment before the connection (or its bye) ends the session here.
PIPE_END_GRACE = 1.0

SendSignal = Callable[[RoutedMessage], Awaitable[None]]
#: Whether an event the session table refuses raises (the test suite sets this) or is logged
#: and ignored (production: a bug there must not take the session down).
strict_transitions = False
#: Peer connections still closing in the background (referenced so they are not collected).
_CLOSING_PCS: set[asyncio.Future[None]] = set()


StateListener = Callable[["PeerSession", StateChange], None]
TransportListener = Callable[["PeerSession", Transport[Any]], None]


class PeerSession:
    """The connection to one remote agent: one :class:`~mvpd.rtc.PeerConnection`, its data
    channels and their transports.

    Signaling messages for this peer go to :meth:`deliver` (queued, handled in order by the
    session's own task, so a slow gather never blocks other peers) or directly to
    :meth:`handle`. Outgoing signaling goes through ``send_signal``. ``certificate``, when
    given, provides the DTLS certificate of each peer connection the session makes.
    """

    def __init__(
        self,
        settings: AgentSettings,
        peer_id: str,
        *,
        send_signal: SendSignal,
        mode: str | None = None,
        on_state: StateListener | None = None,
        on_transport: TransportListener | None = None,
        verifier: PeerVerifier | None = None,
    ) -> None:
        self.settings = settings
        #: This agent's certificate and the trust check; None: a fresh certificate per
        #: connection and no check (a bare session, as in aiortc's own examples).
        self.verifier = verifier
        #: The verdict on the peer's identity, once its offer or answer came.
        self.identity: TrustDecision | None = None
        self.peer_id = peer_id
        #: Every line about this peer carries PEER_ID (``journalctl -u mvpd PEER_ID=bob``).
        self._log = FieldsAdapter(log, peer=peer_id)
        self.local_id = settings.agent_id
        self.mode = mode or settings.mode_for(peer_id)
        self.role: str | None = None  # "offerer" or "answerer"
        self._send_signal = send_signal
        self._state_listeners: list[StateListener] = [on_state] if on_state else []
        self._transport_listeners: list[TransportListener] = [on_transport] if on_transport else []
        self.history: list[StateChange] = [StateChange(PeerState.NEW, time.time())]
        self.transports: dict[str, Transport[Any]] = {}
        self._pc: PeerConnection | None = None
        self._remote_description_set = False
        self._remote_ufrag: str | None = None
        self._pending_candidates: list[IceCandidate | None] = []
        self._inbox: asyncio.Queue[RoutedMessage] = asyncio.Queue(MAX_INBOX)
        self._worker: asyncio.Task[None] | None = None
        self._timeout_task: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self._main_open: asyncio.Future[Transport[Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pipe_waiters: list[asyncio.Future[PipeTransport]] = []
        #: Pipes the peer opened that nobody has taken yet (oldest first).
        self._pipes_in: collections.deque[PipeTransport] = collections.deque()
        self._pipe_serial = 0
        #: Traffic of pipes that are gone, so status keeps counting it.
        self.closed_pipes = TransportCounters()
        self._closing = False
        self._ended = asyncio.Event()
        self._close_task: asyncio.Future[None] | None = None
        self.failure: str | None = None
        #: The mode of a channel this side refused (not granted to the peer), if any.
        self.refused_mode: str | None = None
        self.inbox_dropped = 0
        self._inbox_drop_log = RateLimitedLog(self._log)
        self.candidates_ignored = 0
        #: Remote candidates taken so far (SDP and trickled), at most max_remote_candidates.
        self.remote_candidates = 0
        self._warned: set[str] = set()
        #: Round trips (s) of the last liveness checks on the selected pair (mvpd.stats).
        self.liveness_rtts: collections.deque[float] = collections.deque(maxlen=LIVENESS_RTTS)
        for warning in settings.ice_warnings():
            self._log.debug("ICE servers: %s", warning)  # AgentCore.start logs them once

    # --- state -----------------------------------------------------------------------------

    @property
    def state(self) -> PeerState:
        return self.history[-1].state

    @property
    def since(self) -> float:
        """When the current state was entered (UNIX time)."""
        return self.history[-1].at

    @property
    def transport(self) -> Transport[Any] | None:
        """The main transport (chat/json/bytes/...), once its channel exists."""
        return self.transports.get(self.settings.data_channel_label)

    @property
    def negotiated(self) -> bool:
        """Offer and answer have both been applied."""
        return self._remote_description_set and self._pc is not None

    def is_for_another_ice_session(self, message: Candidate) -> bool:
        """Whether a trickled candidate names an ICE username fragment other than the one
        this session negotiated: the peer has started over (a new offer is on its way)."""
        init = message.candidate
        return bool(
            self.negotiated and init is not None and init.usernameFragment
            and self._remote_ufrag and init.usernameFragment != self._remote_ufrag
        )

    def add_state_listener(self, listener: StateListener) -> None:
        self._state_listeners.append(listener)

    def _set_state(self, event: SessionEvent, reason: str = "") -> bool:
        """Apply ``event`` as :mod:`mvpd.proto.session_states` says; record and announce a
        change of state. False if the table refused the event."""
        machine = session_machine(self.state)
        try:
            state = machine.handle(event)
        except IllegalTransition as exc:
            if strict_transitions:
                raise
            self._log.warning("peer %s: %s; ignored", self.peer_id, exc)
            return False
        if state == self.history[-1].state:
            return True
        change = StateChange(state, time.time(), reason)
        self.history.append(change)
        self._log.log(
            logging.WARNING if state == PeerState.FAILED else logging.INFO,
            "peer %s: %s%s", self.peer_id, state.value, f" ({reason})" if reason else "",
            extra=fields(event=f"peer-{state.value}", mode=self.mode, role=self.role),
        )
        for listener in list(self._state_listeners):
            try:
                listener(self, change)
            except Exception:
                self._log.exception("state listener for peer %s failed", self.peer_id)
        return True

    # --- starting --------------------------------------------------------------------------

    def _new_pc(self) -> PeerConnection:
        certificate = (self.verifier.identity.rtc_certificate()
                       if self.verifier is not None else None)
        settings = self.settings
        pc = PeerConnection(ice_configuration(settings), certificate=certificate,
                            excluded_networks=lambda: tunnel_networks(settings))

        def on_datachannel(channel: DataChannel) -> None:
            if pc is self._pc:
                self._on_remote_channel(channel)

        def on_connection_state() -> None:
            if pc is not self._pc or self._closing:
                return
            state = pc.connectionState
            self._log.debug("peer %s: connection state %s", self.peer_id, state)
            if state == "failed":
                self._spawn_close(pc.failure or "ICE or DTLS failed",
                                  event=SessionEvent.TRANSPORT_FAILED)
            elif state == "closed":
                self._spawn_close("the peer connection closed", event=SessionEvent.CHANNEL_CLOSED)

        pc.on("datachannel", on_datachannel)
        pc.on("connectionstatechange", on_connection_state)
        self._pc = pc
        self._remote_description_set = False
        self._remote_ufrag = None
        return pc

    def _is_current(self, pc: PeerConnection) -> bool:
        return pc is self._pc

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = asyncio.ensure_future(self._run_inbox())
        if self._timeout_task is None:
            self._timeout_task = asyncio.ensure_future(self._connect_watchdog())

    async def start_offer(self) -> None:
        """Create the peer connection and the main channel, send the offer."""
        if self.state != PeerState.NEW or self._pc is not None:
            raise PeerError(f"session with {self.peer_id} was already started")
        factory = transport_class(self.mode)  # fails early for unknown modes
        self.role = "offerer"
        self._set_state(SessionEvent.OFFER_SENT, "offering")
        self._start_worker()
        pc = self._new_pc()
        transport = factory()
        options = transport.channel_options
        channel = pc.createDataChannel(
            self.settings.data_channel_label,
            ordered=options.ordered,
            maxRetransmits=options.max_retransmits,
            maxPacketLifeTime=options.max_packet_lifetime,
            protocol=self.mode,
        )
        self._attach(transport, channel)
        try:
            await pc.setLocalDescription(await pc.createOffer())
        except Exception as exc:
            if not self._is_current(pc):
                return  # an incoming offer won the glare while we were gathering
            await self.close(f"cannot create an offer: {exc}", failed=True)
            raise PeerError(f"cannot create an offer for {self.peer_id}: {exc}") from exc
        if not self._is_current(pc) or pc.localDescription is None:
            return  # an incoming offer won the glare while we were gathering
        sdp = pc.localDescription.sdp
        await self._signal(Offer(sender=self.local_id, to=self.peer_id, sdp=sdp))

    async def wait_open(self, timeout: float | None = None) -> Transport[Any]:
        """Wait for the main channel to open; :class:`PeerError` on failure or timeout."""
        limit = self.settings.connect_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(self._main_open), limit)
        except TimeoutError:
            reason = self._timeout_reason(limit)
            await self.close(reason, send_bye=True, event=SessionEvent.TIMEOUT)
            raise PeerError(reason, code="timeout") from None

    def _timeout_reason(self, limit: float) -> str:
        ice = self._pc.iceConnectionState if self._pc is not None else "none"
        signaling = self._pc.signalingState if self._pc is not None else "none"
        return (
            f"no open data channel to {self.peer_id} after {limit:g} s "
            f"(signaling {signaling}, ICE {ice}); is the peer online and reachable?"
        )

    async def _connect_watchdog(self) -> None:
        limit = self.settings.connect_timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._main_open), limit)
        except TimeoutError:
            await self.close(self._timeout_reason(limit), send_bye=True,
                             event=SessionEvent.TIMEOUT)
        except (MvpError, asyncio.CancelledError):
            pass

    # --- signaling in ----------------------------------------------------------------------

    def deliver(self, message: RoutedMessage) -> None:
        """Queue a signaling message from the peer for the session's worker."""
        if self.state.is_final:
            self._log.debug("peer %s: %s after close ignored", self.peer_id, message.type)
            return
        self._start_worker()
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            self.inbox_dropped += 1
            self._inbox_drop_log.warning("peer %s: too many signaling messages; dropped a %s",
                                         self.peer_id, message.type)

    async def _run_inbox(self) -> None:
        while not self._closing:
            message = await self._inbox.get()
            try:
                await self.handle(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bad SDP or candidate from the peer must not kill the worker.
                self._log.warning("peer %s: cannot handle %s: %s", self.peer_id, message.type, exc)
                if message.type in ("offer", "answer"):
                    await self.close(f"bad {message.type} from the peer: {exc}", failed=True,
                                     send_bye=True)

    async def handle(self, message: RoutedMessage) -> None:
        """Apply one signaling message from the peer."""
        if self.state.is_final:
            return
        if isinstance(message, Offer):
            await self.handle_offer(message)
        elif isinstance(message, Answer):
            await self.handle_answer(message)
        elif isinstance(message, Candidate):
            await self.handle_candidate(message)
        elif isinstance(message, Bye):
            reason = f"{self.peer_id} said bye{': ' + message.reason if message.reason else ''}"
            await self.close(reason, event=SessionEvent.BYE)

    async def handle_offer(self, offer: Offer) -> None:
        """Answer an offer (resolving glare: the lower agent id yields)."""
        if self._pc is not None:
            # Our offer is out, or still gathering (signaling state "stable" until the
            # gather ends and it is set): both count as offering.
            if self.role == "offerer" and not self._remote_description_set:
                if self.local_id < self.peer_id:
                    self._log.info("peer %s: both sides offered; %s < %s, so we answer",
                             self.peer_id, self.local_id, self.peer_id)
                    await self._discard_pc()
                    self._set_state(SessionEvent.GLARE_YIELD, "both sides offered")
                else:
                    self._log.info("peer %s: both sides offered; %s > %s, so we keep our offer",
                             self.peer_id, self.local_id, self.peer_id)
                    return
            else:
                self._log.log(self._first_time("offer"),
                              "peer %s: unexpected offer in signaling state %s ignored",
                              self.peer_id, self._pc.signalingState)
                return
        self.role = "answerer"
        self._set_state(SessionEvent.OFFER_RECEIVED, "answering")
        if "m=application" not in offer.sdp:
            # aiortc would happily answer an SDP without sections; nothing could ever open.
            raise PeerError("the offer has no data channel (m=application) section")
        if not await self._identity_accepted(offer.sdp):
            return
        self._start_worker()
        pc = self._new_pc()
        sdp = self._limit_candidates(offer.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await self._remote_description_applied(sdp)
        await pc.setLocalDescription(await pc.createAnswer())
        if pc is self._pc and not self.state.is_final and pc.localDescription is not None:
            await self._signal(
                Answer(sender=self.local_id, to=self.peer_id, sdp=pc.localDescription.sdp)
            )

    async def handle_answer(self, answer: Answer) -> None:
        pc = self._pc
        if pc is None or pc.signalingState != "have-local-offer":
            state = pc.signalingState if pc is not None else "no offer"
            self._log.log(self._first_time("answer"),
                          "peer %s: unexpected answer (%s) ignored", self.peer_id, state)
            return
        if not await self._identity_accepted(answer.sdp):
            return
        self._set_state(SessionEvent.ANSWER_RECEIVED)
        sdp = self._limit_candidates(answer.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        await self._remote_description_applied(sdp)

    async def handle_candidate(self, message: Candidate) -> None:
        """Add a trickled remote candidate, or queue it until the remote description."""
        init = message.candidate
        if init is not None and init.candidate.strip() and not self._take_candidates(1):
            return
        if not self._remote_description_set:
            if len(self._pending_candidates) >= MAX_PENDING_CANDIDATES:
                self.candidates_ignored += 1
                self._log.warning("peer %s: over %d early candidates; ignoring more",
                            self.peer_id, MAX_PENDING_CANDIDATES)
                return
            self._pending_candidates.append(message.candidate)
            return
        await self._add_candidate(message.candidate)

    async def _identity_accepted(self, sdp: str) -> bool:
        """Check the DTLS fingerprint the peer's SDP commits it to before the SDP is used
        (DTLS then fails unless the peer proves it holds that certificate's key). On refusal
        the session fails with a bye saying why, before any data can flow."""
        if self.verifier is None:
            return True
        self.identity = self.verifier.check(self.peer_id, sdp, self.mode)
        if self.identity.accepted:
            return True
        await self.close(f"identity refused: {self.identity.reason}", failed=True,
                         send_bye=True)
        return False

    def _first_time(self, what: str) -> int:
        """WARNING the first time ``what`` happens in this session, then DEBUG: a peer that
        repeats itself must not flood the log."""
        if what in self._warned:
            return logging.DEBUG
        self._warned.add(what)
        return logging.WARNING

    def _take_candidates(self, offered: int) -> int:
        """How many of ``offered`` more remote candidates may be used: every candidate costs
        connectivity checks to an address of the peer's choosing (RFC 8445 section 19.5.1),
        so a session uses at most ``max_remote_candidates``; the rest are counted and
        ignored. What remains: aioice forms a pair with each local candidate, paces new
        checks 20 ms apart (its Ta) and retransmits each unanswered one up to 6 times until
        ``connect_timeout`` ends the session; with the pending-session cap that bounds what
        hostile offers can make us send."""
        room = max(self.settings.max_remote_candidates - self.remote_candidates, 0)
        taken = min(offered, room)
        self.remote_candidates += taken
        if taken < offered:
            self._log.log(self._first_time("candidates"),
                          "peer %s: more than %d ICE candidates; ignoring the rest",
                          self.peer_id, self.settings.max_remote_candidates,
                          extra=fields(event="candidates-ignored"))
            self.candidates_ignored += offered - taken
        return taken

    def _limit_candidates(self, sdp: str) -> str:
        """``sdp`` with only the candidate lines :meth:`_take_candidates` allows (the first
        ones: browsers list their best candidates first)."""
        offered = count_candidate_lines(sdp)
        allowed = self._take_candidates(offered)
        return sdp if allowed == offered else keep_candidate_lines(sdp, allowed)

    async def _remote_description_applied(self, sdp: str) -> None:
        self._remote_description_set = True
        self._remote_ufrag = ice_ufrag(sdp)
        pending, self._pending_candidates = self._pending_candidates, []
        for init in pending:
            await self._add_candidate(init)

    async def _add_candidate(self, init: IceCandidate | None) -> None:
        pc = self._pc
        if pc is None:
            return
        if init is not None and init.usernameFragment and self._remote_ufrag and (
            init.usernameFragment != self._remote_ufrag
        ):
            # A candidate for a peer connection the remote has replaced (glare, restart).
            self.candidates_ignored += 1
            self._log.debug("peer %s: candidate for another ICE session ignored", self.peer_id)
            return
        try:
            if init is None or not init.candidate.strip():
                await pc.addIceCandidate(None)
            else:
                await pc.addIceCandidate(parse_candidate(init))
        except (ValueError, AssertionError) as exc:
            self.candidates_ignored += 1
            self._log.warning("peer %s: remote candidate ignored: %s", self.peer_id, exc)

    # --- channels --------------------------------------------------------------------------

    def _attach(self, transport: Transport[Any], channel: DataChannel) -> None:
        label = channel.label
        if isinstance(transport, PipeTransport):
            # Pipes are one-way streams, one channel per direction and per `mvpctl pipe`,
            # so two sides that start a pipe at the same moment never compete for one slot.
            self._pipe_serial += 1
            key = f"{PIPE_LABEL}#{self._pipe_serial}"
            transport.add_close_listener(lambda: self._pipe_closed(key, transport))
        else:
            key = label
            old = self.transports.get(key)
            if old is not None and not old.is_closed:
                self._log.warning(
                    "peer %s: second channel %r replaces the first", self.peer_id, key
                )
                old.close()
        self.transports[key] = transport
        transport.attach_channel(channel)
        channel.on("messagerefused", lambda received: transport.report_error(
            "message-too-large",
            f"refused a message of over {received} bytes: over the advertised "
            f"max-message-size of {MAX_MESSAGE_SIZE} bytes",
        ))
        if label == self.settings.data_channel_label:
            channel.on("open", lambda: self._main_channel_opened(transport))
            if channel.readyState == "open":
                self._main_channel_opened(transport)
            transport.add_close_listener(lambda: self._main_channel_closed(transport))
        for listener in list(self._transport_listeners):
            try:
                listener(self, transport)
            except Exception:
                self._log.exception("transport listener for peer %s failed", self.peer_id)

    def _on_remote_channel(self, channel: DataChannel) -> None:
        label = channel.label
        if label == self.settings.data_channel_label:
            mode = channel.protocol or self.settings.mode_for(self.peer_id)
            if not self.settings.grants_mode(self.peer_id, mode):
                # The offerer names the mode; this side decides whether to grant it.
                self.refused_mode = mode
                self._log.warning("peer %s: refusing %s mode: not configured for this peer",
                                  self.peer_id, mode, extra=fields(event="offer-refused",
                                                                   mode=mode))
                if not self._closing and self._close_task is None:
                    self._close_task = asyncio.ensure_future(self._refuse(
                        f"{mode} mode refused: {self.local_id} does not grant it to you "
                        "(see peers.<id> in its config)"
                    ))
                return
            if self.verifier is not None and not self.verifier.admits_mode(
                self.peer_id, mode, self.identity
            ):
                # The mode comes only now, and tun mode may want more than the offer got.
                policy = self.verifier.policy_for(self.peer_id, mode)
                status = self.identity.status if self.identity is not None else "unknown"
                reason = (f"identity refused: {mode} mode takes {policy} identities here, and "
                          f"{self.peer_id}'s is {status}")
                self._log.warning("peer %s: %s", self.peer_id, reason,
                                  extra=fields(event="identity-refused", mode=mode))
                if not self._closing and self._close_task is None:
                    self._close_task = asyncio.ensure_future(self._refuse(reason))
                return
            try:
                transport = create_transport(mode)
            except TransportError as exc:
                self._log.warning("peer %s: refusing channel %r: %s", self.peer_id, label, exc)
                channel.close()
                self._spawn_close(f"the peer asked for mode {mode!r}: {exc}", failed=True)
                return
            if mode != self.mode:
                self._log.info("peer %s: the peer chose mode %s", self.peer_id, mode)
            self.mode = mode
            self._attach(transport, channel)
        elif label == PIPE_LABEL:
            transport = PipeTransport()
            self._attach(transport, channel)
            self._offer_incoming_pipe(transport)
        elif label == PING_LABEL:
            answer_pings(channel)  # mvpctl ping on the peer's side (mvpd.ping)
        else:
            self._log.warning("peer %s: unknown channel %r closed", self.peer_id, label)
            channel.close()

    def _main_channel_opened(self, transport: Transport[Any]) -> None:
        if self.transport is not transport or self.state.is_final:
            return
        pc = self._pc
        if self._liveness_task is None and self.settings.peer_timeout > 0 and pc is not None:
            self._liveness_task = asyncio.ensure_future(self._watch_liveness(pc))
        self._set_state(SessionEvent.CHANNEL_OPEN, f"{self.mode} channel open")
        if not self._main_open.done():
            self._main_open.set_result(transport)

    def _main_channel_closed(self, transport: Transport[Any]) -> None:
        if self.transport is transport and not self._closing:
            self._spawn_close("the data channel closed", event=SessionEvent.CHANNEL_CLOSED)

    async def open_pipe(self) -> PipeTransport:
        """Open a new pipe channel to the peer (our sending direction) and wait until open."""
        pc = self._pc
        if pc is None or self.state != PeerState.CONNECTED:
            raise PeerError(f"not connected to {self.peer_id}")
        transport = PipeTransport()
        channel = pc.createDataChannel(PIPE_LABEL, ordered=True, protocol="pipe")
        self._attach(transport, channel)
        try:
            await asyncio.wait_for(transport.wait_open(), self.settings.connect_timeout)
        except (TimeoutError, ConnectionClosed) as exc:
            transport.close()
            raise PeerError(f"the pipe to {self.peer_id} did not open: {exc}") from None
        return transport

    async def wait_pipe(self, timeout: float | None = None) -> PipeTransport:
        """Take the oldest pipe the peer opened and nobody took yet (waiting for one)."""
        while self._pipes_in:
            pipe = self._pipes_in.popleft()
            if not pipe.is_closed:
                return pipe
        if self._closing:
            raise PeerError(f"the connection to {self.peer_id} is closed")
        waiter: asyncio.Future[PipeTransport] = asyncio.get_running_loop().create_future()
        self._pipe_waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise PeerError(f"{self.peer_id} opened no pipe", code="timeout") from None
        finally:
            with contextlib.suppress(ValueError):
                self._pipe_waiters.remove(waiter)

    def _offer_incoming_pipe(self, transport: PipeTransport) -> None:
        while self._pipe_waiters:
            waiter = self._pipe_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(transport)
                return
        self._pipes_in.append(transport)

    def _pipe_closed(self, key: str, transport: PipeTransport) -> None:
        if self.transports.get(key) is transport:
            del self.transports[key]
        self.closed_pipes.add(transport.counters)
        with contextlib.suppress(ValueError):
            self._pipes_in.remove(transport)

    async def pipe_end_reason(self, grace: float = PIPE_END_GRACE) -> str:
        """Why a pipe to or from this peer stopped before its stream was complete: the
        connection ended (``connection to bob lost: ...``), or the peer closed just that
        pipe (its ``mvpctl pipe`` quit). Waits up to ``grace`` seconds to tell them apart."""
        if not self._ended.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ended.wait(), grace)
        if not self.state.is_final:
            return f"{self.peer_id} closed the pipe before the end of the stream"
        change = self.history[-1]
        how = "lost" if change.state == PeerState.FAILED else "closed"
        return f"connection to {self.peer_id} {how}: {change.reason}"

    # --- liveness --------------------------------------------------------------------------

    async def _watch_liveness(self, pc: PeerConnection) -> None:
        """Fail the session once the peer stops answering liveness checks for
        ``peer_timeout`` seconds (see :mod:`mvpd.peer.liveness`)."""
        silent = await watch_liveness(
            pc,
            peer_timeout=lambda: self.settings.peer_timeout,
            active=lambda: pc is self._pc and not self._closing,
            log=self._log,
            on_rtt=self.liveness_rtts.append,
        )
        if silent is not None and pc is self._pc and not self._closing:
            await self.close(f"{self.peer_id} stopped answering: {silent}", send_bye=True,
                             event=SessionEvent.TIMEOUT)

    # --- signaling out ---------------------------------------------------------------------

    async def _signal(self, message: RoutedMessage) -> None:
        try:
            await self._send_signal(message)
        except Exception as exc:
            reason = f"cannot send {message.type} to {self.peer_id} via signaling: {exc}"
            await self.close(reason, failed=True)
            raise PeerError(reason) from exc

    # --- closing ---------------------------------------------------------------------------

    def _spawn_close(
        self, reason: str, *, failed: bool = False, event: SessionEvent | None = None
    ) -> None:
        if not self._closing and self._close_task is None:
            self._close_task = asyncio.ensure_future(
                self.close(reason, failed=failed, event=event)
            )

    async def _refuse(self, reason: str) -> None:
        """Say bye with ``reason``, then end the session. The bye goes first and the peer
        connection stays a moment: closing it at once reaches the peer before the bye
        (which travels through the signaling server), and the peer would only learn that
        the channel closed. The refused channel has no transport: what comes on it is
        ignored meanwhile."""
        bye = Bye(sender=self.local_id, to=self.peer_id, reason=reason[:256])
        try:
            await asyncio.wait_for(self._send_signal(bye), BYE_TIMEOUT)
        except Exception as exc:
            self._log.debug("peer %s: bye not sent: %s", self.peer_id, exc)
        await asyncio.sleep(REFUSAL_LINGER)
        await self.close(reason, failed=True)

    async def _discard_pc(self) -> None:
        """Throw the current peer connection away without ending the session (glare)."""
        pc, self._pc = self._pc, None
        # Forget the transports before closing them, so their close does not end the session.
        transports = list(self.transports.values())
        self.transports.clear()
        for transport in transports:
            transport.close()
        if pc is not None:
            await pc.close()

    async def close(
        self,
        reason: str = "closed",
        *,
        failed: bool = False,
        send_bye: bool = False,
        event: SessionEvent | None = None,
    ) -> None:
        """End the session and release everything (idempotent). ``event`` says why, for the
        state table (default: ``error`` if ``failed``, else ``close-requested``); whether the
        session ends ``failed`` follows from it."""
        if self._closing:
            return
        self._closing = True
        failure_events = (SessionEvent.ERROR, SessionEvent.TIMEOUT, SessionEvent.TRANSPORT_FAILED)
        fallback = (SessionEvent.ERROR if failed or event in failure_events
                    else SessionEvent.CLOSE_REQUESTED)
        # Whatever the table said about ``event``, a closing session ends in a final state
        # (the fallbacks are legal in every live state).
        if not self._set_state(event or fallback, reason):
            self._set_state(fallback, reason)
        self.failure = reason if self.state == PeerState.FAILED else None
        self._ended.set()
        if not self._main_open.done():
            self._main_open.set_exception(PeerError(reason))
            self._main_open.exception()  # retrieved: nobody may be waiting
        for waiter in self._pipe_waiters:
            if not waiter.done():
                waiter.set_exception(PeerError(reason))
                waiter.exception()
        current = asyncio.current_task()
        for task in (self._worker, self._timeout_task, self._liveness_task):
            if task is not None and task is not current:
                task.cancel()
        for transport in list(self.transports.values()):
            transport.close()
        pc, self._pc = self._pc, None
        if pc is not None:
            # The data path says goodbye first (stream resets, SCTP SHUTDOWN), so the peer
            # sees a clean close however fast the bye below makes it drop the connection.
            with contextlib.suppress(Exception):
                await pc.shutdown()
        if send_bye:
            bye = Bye(sender=self.local_id, to=self.peer_id, reason=reason[:256])
            try:
                await asyncio.wait_for(self._send_signal(bye), BYE_TIMEOUT)
            except Exception as exc:
                self._log.debug("peer %s: bye not sent: %s", self.peer_id, exc)
        if pc is not None:
            closing = asyncio.ensure_future(pc.close())
            _CLOSING_PCS.add(closing)
            closing.add_done_callback(self._pc_closed)
            try:
                await asyncio.wait_for(asyncio.shield(closing), PC_CLOSE_TIMEOUT)
            except TimeoutError:
                self._log.info("peer %s: the peer connection is still closing (TURN server "
                         "unreachable?); finishing in the background", self.peer_id)
            except Exception:
                pass  # logged by _pc_closed

    def _pc_closed(self, closing: asyncio.Future[None]) -> None:
        _CLOSING_PCS.discard(closing)
        if not closing.cancelled() and closing.exception() is not None:
            self._log.debug("peer %s: closing the peer connection: %s", self.peer_id,
                      closing.exception())

    # --- status ----------------------------------------------------------------------------

    def ice_path(self) -> dict[str, Any]:
        """The selected candidate pair: ``path`` is ``direct``, ``relayed`` or ``None``."""
        pair = self._pc.selected_pair() if self._pc is not None else None
        if pair is None:
            return {"path": None, "local_candidate": None, "remote_candidate": None}
        return {
            "path": pair.path,
            "local_candidate": pair.local.sdp,
            "remote_candidate": pair.remote.sdp,
        }

    def candidates(self) -> dict[str, Any]:
        """Our candidates as offered and the peer's as ICE took them (``{address, port,
        type, protocol}`` each), and how many of each were left out for lying in a network
        our tunnels carry."""
        pc = self._pc
        if pc is None:
            return {"local": [], "remote": [], "local_excluded": 0, "remote_excluded": 0}
        return {
            "local": [_candidate(c) for c in pc.local_candidates()],
            "remote": [_candidate(c) for c in pc.remote_candidates()],
            "local_excluded": pc.local_candidates_excluded,
            "remote_excluded": pc.remote_candidates_excluded,
        }

    def snapshot(self) -> dict[str, Any]:
        """Plain-data status of the session (for ``mvpctl status``)."""
        pc = self._pc
        return {
            "peer": self.peer_id,
            "state": self.state.value,
            "since": self.since,
            "role": self.role,
            "mode": self.mode,
            "failure": self.failure,
            "history": [
                {"state": c.state.value, "at": c.at, "reason": c.reason} for c in self.history
            ],
            "connection_state": pc.connectionState if pc is not None else None,
            "ice_state": pc.iceConnectionState if pc is not None else None,
            "ice": self.ice_path(),
            "transports": {
                **{
                    label: {"mode": t.mode, "open": t.is_open, **t.counters.as_dict()}
                    for label, t in self.transports.items()
                },
                "closed pipes": {"mode": "pipe", "open": False, **self.closed_pipes.as_dict()},
            },
            "candidates_ignored": self.candidates_ignored,
            "remote_candidates": self.remote_candidates,
            "signaling_dropped": self.inbox_dropped,
            "pending_candidates": len(self._pending_candidates),
            "sctp": pc.sctp.stats() if pc is not None and pc.sctp is not None else None,
            "fingerprint": self.identity.offered if self.identity is not None else None,
            "identity": self.identity.status if self.identity is not None else None,
        }


def _candidate(candidate: RTCIceCandidate) -> dict[str, Any]:
    return {"address": candidate.ip, "port": candidate.port, "type": candidate.type,
            "protocol": candidate.protocol.lower()}
