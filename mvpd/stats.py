"""Live statistics of peer sessions: candidate pair, ICE round trip, traffic rates, SCTP.

What ``mvpctl stats``, the metrics endpoint and ``mvpctl web`` show beyond ``status``:

* the selected candidate pair, split into address, port, type (host/srflx/prflx/relay) and
  protocol, from the session's own :meth:`~mvpd.peer.PeerSession.ice_path`;
* the ICE round trip: the liveness checks the session sends on the selected pair (STUN
  binding requests, see ``PeerSession._watch_liveness``) are timed, the last few kept;
* rates: :class:`TrafficSampler` reads every session's byte and message totals once a second
  into a short ring, so rates over the last seconds and a minute of history for plots cost
  nothing per packet;
* SCTP counters of the association under the session, which counts them itself
  (:meth:`mvpd.sctp.Association.stats`: packets and SACKs, retransmitted and abandoned
  chunks, T3-rtx timeouts, congestion window, flight size, receive windows, smoothed RTT).

Everything that reaches into the WebRTC stack goes through :func:`peer_connection` and
:func:`sctp_association` (the session runs on :class:`mvpd.rtc.PeerConnection` and its
SCTP on :mod:`mvpd.sctp`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .transports import TransportCounters

if TYPE_CHECKING:
    from .peer import PeerSession
    from .sctp import Association

log = logging.getLogger(__name__)

#: Seconds between two samples of the traffic totals.
SAMPLE_INTERVAL = 1.0
#: Samples kept per peer: a minute of history for plots.
HISTORY = 60
#: Default window of the rates, in seconds.
RATE_WINDOW = 5.0
_TOTALS = ("bytes_in", "bytes_out", "messages_in", "messages_out")


# --- the WebRTC stack under a session ------------------------------------------------------


def peer_connection(session: PeerSession) -> Any:
    """The session's current peer connection (:class:`mvpd.rtc.PeerConnection`), or
    ``None``."""
    return getattr(session, "_pc", None)


def sctp_association(session: PeerSession) -> Association | None:
    """The SCTP association carrying the session's channels, or ``None`` before it exists."""
    pc = peer_connection(session)
    transport = getattr(pc, "sctp", None) if pc is not None else None
    association: Association | None = getattr(transport, "association", None)
    return association


def sctp_counters(session: PeerSession) -> dict[str, Any] | None:
    """The SCTP association's state and counters, or ``None`` when there is none yet."""
    association = sctp_association(session)
    return association.stats() if association is not None else None


# --- candidates and the ICE round trip ------------------------------------------------------


def parse_candidate_sdp(sdp: str | None) -> dict[str, Any] | None:
    """``{address, port, type, protocol}`` of an SDP candidate attribute value (``foundation
    component protocol priority address port typ TYPE ...``), or ``None``."""
    if not sdp:
        return None
    parts = sdp.split()
    if len(parts) < 8 or parts[6] != "typ":
        return None
    try:
        port = int(parts[5])
    except ValueError:
        return None
    return {"address": parts[4], "port": port, "type": parts[7], "protocol": parts[2].lower()}


def candidate_pair(session: PeerSession) -> dict[str, Any] | None:
    """The selected candidate pair as ``{path, local, remote}``, or ``None`` before one."""
    ice = session.ice_path()
    if ice["path"] is None:
        return None
    return {
        "path": ice["path"],
        "local": parse_candidate_sdp(ice["local_candidate"]),
        "remote": parse_candidate_sdp(ice["remote_candidate"]),
    }


def rtt_summary(samples: Iterable[float]) -> dict[str, Any] | None:
    """``{last_ms, min_ms, avg_ms, max_ms, samples}`` of round trips in seconds, or None."""
    values = list(samples)
    if not values:
        return None
    return {
        "last_ms": values[-1] * 1000,
        "min_ms": min(values) * 1000,
        "avg_ms": sum(values) / len(values) * 1000,
        "max_ms": max(values) * 1000,
        "samples": len(values),
    }


def ice_rtts(session: PeerSession) -> list[float]:
    """The timed liveness checks of the session (seconds, oldest first)."""
    return list(getattr(session, "liveness_rtts", ()))


# --- traffic ---------------------------------------------------------------------------------


def traffic_totals(session: PeerSession) -> TransportCounters:
    """Bytes and messages of every channel of the session, closed pipes included."""
    total = TransportCounters()
    for transport in session.transports.values():
        total.add(transport.counters)
    total.add(session.closed_pipes)
    return total


@dataclass(frozen=True)
class Sample:
    """The totals of one peer at one moment."""

    at: float
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int


class TrafficSampler:
    """Once a second, every session's totals into a ring of :data:`HISTORY` samples each.

    ``sessions`` returns the live sessions by peer id (``AgentCore.sessions``). A peer's ring
    starts again when its session is replaced (a new connection counts from zero)."""

    def __init__(
        self,
        sessions: Callable[[], dict[str, PeerSession]],
        *,
        interval: float = SAMPLE_INTERVAL,
        history: int = HISTORY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sessions = sessions
        self.interval = interval
        self._history = history
        self._clock = clock
        self._rings: dict[str, tuple[PeerSession, collections.deque[Sample]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a bug here must not stop the sampling for good
                log.exception("sampling the peers' traffic failed")
            await asyncio.sleep(self.interval)

    def sample(self) -> None:
        """Take one sample of every live session; forget peers that are gone."""
        now = self._clock()
        sessions = self._sessions()
        for peer in list(self._rings):
            if peer not in sessions:
                del self._rings[peer]
        for peer, session in sessions.items():
            entry = self._rings.get(peer)
            if entry is None or entry[0] is not session:
                entry = self._rings[peer] = (session, collections.deque(maxlen=self._history))
            total = traffic_totals(session)
            entry[1].append(Sample(now, *(getattr(total, key) for key in _TOTALS)))

    def history(self, peer: str) -> list[Sample]:
        entry = self._rings.get(peer)
        return list(entry[1]) if entry is not None else []

    def rates(self, peer: str, window: float = RATE_WINDOW) -> dict[str, float]:
        """Per-second rates of each total over about the last ``window`` seconds (zeros
        until two samples exist)."""
        samples = self.history(peer)
        rates = {f"{key}_per_s": 0.0 for key in _TOTALS}
        if len(samples) < 2:
            return {"window_s": 0.0, **rates}
        last = samples[-1]
        first = next((s for s in samples if last.at - s.at <= window + 1e-6), samples[-2])
        if first is last:
            first = samples[-2]
        span = last.at - first.at
        if span <= 0:
            return {"window_s": 0.0, **rates}
        for key in _TOTALS:
            rates[f"{key}_per_s"] = max(getattr(last, key) - getattr(first, key), 0) / span
        return {"window_s": span, **rates}


def peer_stats(session: PeerSession, sampler: TrafficSampler | None) -> dict[str, Any]:
    """Everything :mod:`mvpd.stats` knows about one session, as plain data."""
    channels = {
        label: {"mode": t.mode, "open": t.is_open, **_traffic(t.counters)}
        for label, t in session.transports.items()
    }
    if any(session.closed_pipes.as_dict()[key] for key in _TOTALS):
        channels["closed pipes"] = {"mode": "pipe", "open": False,
                                    **_traffic(session.closed_pipes)}
    history = sampler.history(session.peer_id) if sampler is not None else []
    return {
        "pair": candidate_pair(session),
        "candidates": session.candidates(),
        "ice_rtt": rtt_summary(ice_rtts(session)),
        "channels": channels,
        "rates": sampler.rates(session.peer_id) if sampler is not None else None,
        "history": [
            [round(s.at, 3), s.bytes_in, s.bytes_out, s.messages_in, s.messages_out]
            for s in history
        ],
        "sctp": sctp_counters(session),
    }


def _traffic(counters: TransportCounters) -> dict[str, int]:
    return {key: getattr(counters, key) for key in _TOTALS}


__all__ = [
    "HISTORY",
    "RATE_WINDOW",
    "Sample",
    "TrafficSampler",
    "candidate_pair",
    "ice_rtts",
    "parse_candidate_sdp",
    "peer_connection",
    "peer_stats",
    "rtt_summary",
    "sctp_association",
    "sctp_counters",
    "traffic_totals",
]
