"""What each control RPC does: the daemon's side of :class:`mvpd.control.ControlHandler`.

The control server has already authorised the caller and validated the parameters; these
methods turn a call into work on the :class:`~mvpd.core.AgentCore` and shape the answer.
``recv`` reads the core's inbox of the peer (:mod:`mvpd.inbox`), the one place received
messages wait; ``send`` hands the message to :meth:`AgentCore.send`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from . import __version__
from .config import AgentSettings
from .control import Caller, PipeStream
from .core import AgentCore
from .peer import PeerSession, PeerState
from .ping import PingService
from .proto.errors import (
    ConnectionClosed,
    InvalidParams,
    MvpError,
    NotFound,
    PeerError,
    RpcTimeout,
)
from .proto.rpc import (
    ConnectParams,
    ForgetParams,
    IdentityInfo,
    IdResult,
    InboxStatus,
    KnownPeerEntry,
    NoParams,
    PeerMessage,
    PeerParams,
    PeerStatus,
    PingParams,
    PingResult,
    RecvParams,
    ReloadResult,
    RotateParams,
    SendParams,
    SendResult,
    SignalingStatus,
    StatsResult,
    StatusResult,
    TrustParams,
    TrustResult,
)
from .proto.trust import normalize_fingerprint, short_fingerprint
from .stats import TrafficSampler, peer_stats
from .transports import PipeTransport, Transport, TunTransport

log = logging.getLogger("mvpd.rpc")

#: How long a new connect waits for a signaling reconnect in progress before failing.
SIGNALING_GRACE = 3.0
#: Most bytes handed to the client in one pipe ``data`` event.
PIPE_READ_CHUNK = 64 * 1024


class CorePipe:
    """A :class:`PipeStream` to one peer: what the client writes goes out on a pipe channel
    we open; what it reads comes from the next pipe channel the peer opens (its own
    ``mvpctl pipe``). One channel per direction, so both sides may start at any moment.

    Whatever stops a direction early (the peer's ``mvpctl pipe`` quit, the peer disconnected,
    the connection was lost) becomes a :class:`PeerError` saying which, never a clean end."""

    def __init__(self, session: PeerSession, outgoing: PipeTransport) -> None:
        self.session = session
        self.outgoing = outgoing
        self.incoming: PipeTransport | None = None

    async def _broken(self) -> PeerError:
        return PeerError(await self.session.pipe_end_reason())

    async def read(self) -> AsyncIterator[bytes]:
        self.incoming = await self.session.wait_pipe()
        try:
            while chunk := await self.incoming.read(PIPE_READ_CHUNK):
                yield chunk
        except ConnectionClosed:
            raise await self._broken() from None
        # Read to the end (the peer has our EOF-ACK): the sending side's channel is done.
        self.incoming.close()

    async def write(self, data: bytes) -> None:
        try:
            await self.outgoing.write(data)
        except ConnectionClosed:
            raise await self._broken() from None

    async def write_eof(self) -> None:
        """Send EOF and return once the peer's reader has taken the whole stream."""
        try:
            await self.outgoing.write_eof()
            await self.outgoing.wait_eof_acknowledged()
        except ConnectionClosed:
            raise await self._broken() from None
        self.outgoing.close()

    async def wait_broken(self) -> MvpError:
        await self.outgoing.wait_closed()
        if self.outgoing.eof_acknowledged:
            await asyncio.Event().wait()  # a complete stream: nothing to report, ever
        return await self._broken()

    async def close(self) -> None:
        # The outgoing stream is complete or abandoned by now (the client went away): either
        # way it ends here, and the peer sees a truncated stream unless it had our EOF.
        self.outgoing.close()
        if self.incoming is not None and not self.incoming.at_eof:
            self.incoming.close()


class RpcMethods:
    """The control handler of a running daemon."""

    def __init__(
        self,
        settings: AgentSettings,
        core: AgentCore,
        *,
        signaling_state: Callable[[], str],
        reload: Callable[[], ReloadResult] | None = None,
        sampler: TrafficSampler | None = None,
    ) -> None:
        self.settings = settings
        self.core = core
        self.started = time.time()
        self._signaling_state = signaling_state
        self._reload = reload
        self.sampler = sampler
        self.pings = PingService()

    async def close(self) -> None:
        """End every ``recv --follow`` (the daemon stops) and every ping."""
        self.pings.close()
        self.core.inboxes.close()

    # --- read methods ----------------------------------------------------------------------

    async def rpc_status(self, params: NoParams, caller: Caller) -> StatusResult:
        return StatusResult(
            agent_id=self.settings.agent_id,
            version=__version__,
            uptime=time.time() - self.started,
            signaling=SignalingStatus(
                # The server in use, when several are configured (signaling_urls).
                url=str(getattr(self.core.signaling, "url", self.settings.signaling_url)),
                state=self._signaling_state(),
            ),
            peers=self._peer_list(),
            refused_offers=dict(self.core.admission.refused),
            dropped=self.core.dropped(),
            inboxes=InboxStatus(**self.core.inboxes.stats()),
        )

    async def rpc_peers(self, params: NoParams, caller: Caller) -> list[PeerStatus]:
        return self._peer_list()

    def _peer_list(self) -> list[PeerStatus]:
        return [self.peer_status(s) for _, s in sorted(self.core.sessions.items())]

    def peer_status(self, session: PeerSession) -> PeerStatus:
        """One peer as ``mvpctl status`` shows it."""
        snap = session.snapshot()
        totals = collections.Counter[str]()
        dropped = collections.Counter[str]()
        for counters in snap["transports"].values():
            for key in ("bytes_in", "bytes_out", "messages_in", "messages_out"):
                totals[key] += counters[key]
            dropped.update(counters["errors"])
        if snap["signaling_dropped"]:
            dropped["signaling-backlog"] += snap["signaling_dropped"]
        inbox = self.core.inboxes.get(session.peer_id)
        if inbox is not None:
            dropped.update(inbox.dropped)
        tun = _tun_status(session.transport)
        if tun is not None:
            dropped.update(tun["drops"])
        ice = snap["ice"]
        return PeerStatus(
            peer=session.peer_id,
            state=snap["state"],
            mode=snap["mode"],
            since=snap["since"] if session.state == PeerState.CONNECTED else None,
            path=ice["path"] or "unknown",
            local_candidate=ice["local_candidate"],
            remote_candidate=ice["remote_candidate"],
            dropped=dict(dropped),
            error=snap["failure"],
            tun=tun,
            inbox=(
                {"queued": len(inbox), "queued_bytes": inbox.bytes} if inbox is not None else None
            ),
            fingerprint=snap["fingerprint"],
            identity=snap["identity"],
            **totals,
        )

    async def rpc_stats(self, params: PeerParams, caller: Caller) -> StatsResult:
        session = self._session(params.peer)
        return StatsResult(status=self.peer_status(session),
                           **peer_stats(session, self.sampler))

    async def rpc_ping(self, params: PingParams, caller: Caller) -> PingResult:
        session = self._session(params.peer)
        if session.state != PeerState.CONNECTED:
            raise PeerError(f"the connection to {params.peer} is {session.state.value}, "
                            "not open yet")
        pinger = self.pings.pinger(session)
        sequence, rtt = await pinger.ping(params.timeout, params.padding)
        ice = session.ice_path()
        return PingResult(peer=params.peer, sequence=sequence,
                          rtt_ms=None if rtt is None else rtt * 1000,
                          path=ice["path"] or "unknown",
                          local_candidate=ice["local_candidate"],
                          remote_candidate=ice["remote_candidate"])

    # --- write methods ---------------------------------------------------------------------

    async def rpc_connect(self, params: ConnectParams, caller: Caller) -> PeerStatus:
        log.info("connect to %s requested by %s", params.peer, caller)
        session = self.core.get_session(params.peer)
        if session is None or session.state.is_final:
            await self._require_signaling()
        if not params.wait:
            task = asyncio.ensure_future(self.core.connect_to(params.peer, params.mode))
            task.add_done_callback(_log_background_failure(params.peer))
            await asyncio.sleep(0)  # let the session come into being
            session = self.core.get_session(params.peer)
            if session is None:  # failed at once (bad mode, ourselves, ...)
                await task
                raise PeerError(f"could not start a connection to {params.peer}")
            return self.peer_status(session)
        timeout = params.timeout or self.settings.connect_timeout
        try:
            await asyncio.wait_for(self.core.connect_to(params.peer, params.mode), timeout)
        except TimeoutError:
            await self.core.disconnect(params.peer, "connect timed out")
            raise RpcTimeout(
                f"no data channel to {params.peer} opened within {timeout:g} s; is the peer "
                "running and registered with the same signaling server?"
            ) from None
        return self.peer_status(self._session(params.peer))

    async def _require_signaling(self) -> None:
        """A new connection needs the signaling server: say so at once when it is away
        (after a short grace period for a reconnect in progress) rather than time out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SIGNALING_GRACE
        while (state := self._signaling_state()) != "connected":
            if loop.time() >= deadline:
                raise PeerError(
                    f"the signaling server {self.settings.signaling_url} is not reachable "
                    f"(signaling {state}), so no new connection can be set up; connected "
                    "peers keep working. `mvpctl status` shows the signaling state."
                )
            await asyncio.sleep(0.1)

    async def rpc_disconnect(self, params: PeerParams, caller: Caller) -> None:
        log.info("disconnect from %s requested by %s", params.peer, caller)
        if not await self.core.disconnect(params.peer, f"disconnected by uid {caller.uid}"):
            raise NotFound(f"not connected to {params.peer}")

    async def rpc_send(self, params: SendParams, caller: Caller) -> SendResult:
        self._session(params.peer)  # not connected: NotFound, as for the other methods
        value = {"text": params.text, "json": params.json_value, "bytes": params.data}
        size = await self.core.send(params.peer, params.kind, value[params.kind])
        return SendResult(bytes=size)

    async def rpc_recv(self, params: RecvParams, caller: Caller) -> AsyncIterator[PeerMessage]:
        inbox = self.core.inboxes.get(params.peer)
        if not params.follow and not inbox and self.core.get_session(params.peer) is None:
            raise NotFound(f"not connected to {params.peer} and no messages from it")
        return self._read(params)

    async def _read(self, params: RecvParams) -> AsyncIterator[PeerMessage]:
        """Queued messages, then (following) new ones until the daemon stops. A follower
        may wait for a peer that is not connected yet: ``chat`` starts that way."""
        async for message in self.core.inboxes.read(
            params.peer, follow=params.follow, limit=params.limit
        ):
            yield PeerMessage(peer=params.peer, kind=message.kind, data=message.value)

    async def rpc_pipe_open(self, params: PeerParams, caller: Caller) -> PipeStream:
        session = self._session(params.peer)
        log.info("pipe to %s opened by %s", params.peer, caller)
        return CorePipe(session, await session.open_pipe())

    async def rpc_reload(self, params: NoParams, caller: Caller) -> ReloadResult:
        log.info("reload requested by %s", caller)
        if self._reload is None:
            return ReloadResult(not_applied=["reload is not supported here"])
        return self._reload()

    # --- identity --------------------------------------------------------------------------

    async def rpc_id(self, params: NoParams, caller: Caller) -> IdResult:
        verifier = self.core.verifier
        pending = verifier.store.pending()
        return IdResult(
            agent_id=self.settings.agent_id,
            current=_identity_info(verifier.identity.fingerprint),
            next=_identity_info(pending.fingerprint) if pending is not None else None,
            state_dir=str(verifier.store.state_dir),
        )

    async def rpc_id_rotate(self, params: RotateParams, caller: Caller) -> IdResult:
        verifier = self.core.verifier
        if params.finish:
            old = verifier.identity.fingerprint
            verifier.identity = verifier.store.finish_rotation()
            log.warning("identity rotated by %s: new connections use %s (was %s)", caller,
                        verifier.identity.fingerprint, old)
        else:
            pending = verifier.store.begin_rotation()
            log.info("identity rotation started by %s: next identity %s", caller,
                     pending.fingerprint)
        return await self.rpc_id(NoParams(), caller)

    async def rpc_trust(self, params: TrustParams, caller: Caller) -> TrustResult:
        fingerprint = _fingerprint_param(params.fingerprint)
        changed = self.core.verifier.known.add(params.peer, fingerprint, "trusted")
        log.info("%s trusted for %s by %s", fingerprint, params.peer, caller)
        return self._known(params.peer, int(changed))

    async def rpc_forget(self, params: ForgetParams, caller: Caller) -> TrustResult:
        fingerprint = None
        if params.fingerprint is not None:
            fingerprint = _fingerprint_param(params.fingerprint)
        removed = self.core.verifier.known.forget(params.peer, fingerprint)
        if not removed:
            raise NotFound(f"known_peers holds no {'such ' if fingerprint else ''}fingerprint "
                           f"for {params.peer}")
        log.info("%s forgotten (%d fingerprint(s)) by %s", params.peer, removed, caller)
        return self._known(params.peer, removed)

    def _known(self, peer: str, changed: int) -> TrustResult:
        entries = [
            KnownPeerEntry(fingerprint=e.fingerprint, how=e.how, added=e.added)
            for e in self.core.verifier.known.get(peer)
        ]
        return TrustResult(peer=peer, changed=changed, entries=entries)

    # --- helpers ---------------------------------------------------------------------------

    def _session(self, peer: str) -> PeerSession:
        session = self.core.get_session(peer)
        if session is None or session.state.is_final:
            raise NotFound(f"not connected to {peer}; run `mvpctl connect {peer}` first")
        return session


def _tun_status(transport: Transport[Any] | None) -> dict[str, Any] | None:
    """The TUN part of a peer's status (device, addresses, packets, drops), if tun mode."""
    return transport.tun_status() if isinstance(transport, TunTransport) else None


def _identity_info(fingerprint: str) -> IdentityInfo:
    return IdentityInfo(fingerprint=fingerprint, short=short_fingerprint(fingerprint))


def _fingerprint_param(text: str) -> str:
    try:
        return normalize_fingerprint(text)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None


def _log_background_failure(peer: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, MvpError):
            log.warning("connect to %s failed: %s", peer, exc)
        elif exc is not None:
            log.error("connect to %s failed", peer, exc_info=exc)

    return done
