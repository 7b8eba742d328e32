"""The RPC methods that show the daemon: ``status``, ``peers``, ``stats`` and ``ping``.

What ``mvpctl status`` shows of the agent and of each peer (:meth:`ObserveMethods.peer_status`,
also the source of the Prometheus peer metrics), a connection's live statistics from
:mod:`mvpd.stats`, and data-path pings (:mod:`mvpd.ping`). A part of
:class:`mvpd.rpc_methods.RpcMethods`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from . import __version__
from .config import AgentSettings
from .control_handler import Caller
from .core import AgentCore
from .peer import PeerSession, PeerState
from .ping import PingService
from .proto.errors import NotFound, PeerError
from .proto.rpc import (
    InboxStatus,
    NoParams,
    PeerParams,
    PeerStatus,
    PingParams,
    PingResult,
    SignalingStatus,
    StatsResult,
    StatusResult,
)
from .stats import TrafficSampler, peer_stats
from .transports import Transport, TunTransport


class ObserveMethods:
    """``status``, ``peers``, ``stats`` and ``ping``, and the peer lookup every per-peer
    method shares."""

    settings: AgentSettings
    core: AgentCore
    started: float
    sampler: TrafficSampler | None
    pings: PingService
    _signaling_state: Callable[[], str]

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

    def _session(self, peer: str) -> PeerSession:
        """The session with ``peer`` unless there is none or it has ended (``NotFound``)."""
        session = self.core.get_session(peer)
        if session is None or session.state.is_final:
            raise NotFound(f"not connected to {peer}; run `mvpctl connect {peer}` first")
        return session


def _tun_status(transport: Transport[Any] | None) -> dict[str, Any] | None:
    """The TUN part of a peer's status (device, addresses, packets, drops), if tun mode."""
    return transport.tun_status() if isinstance(transport, TunTransport) else None

