"""Which offers from remote peers get a session: the daemon's guard against offer floods.

Every answered offer costs a peer connection (UDP sockets, timers, an SCTP association)
until it connects or ``connect_timeout`` runs out. Ids are cheap on a signaling server, so
without a bound any agent on it could make mvpd hold sockets until it runs out of
descriptors (and then even ``mvpctl status`` fails). :class:`OfferAdmission` decides before
anything is created:

* per peer id, a token bucket: ``offers_per_minute`` offers, refilled evenly over a minute
  (a peer that restarts, or answers a glare, needs one or two);
* overall, at most ``max_pending_sessions`` answered sessions that are not connected yet.
  A connected session never counts and is never displaced; an offer from a peer that has
  a session (it restarted), that was connected within the last hour (it reconnects) or that
  is named in the configuration is not held back by the cap, so a flood from other ids
  cannot keep the agent's real peers out.

Refusals are counted by reason; the core logs them through
:class:`mvpd.logs.RateLimitedLog`: the first one, then one summary a minute.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

#: Per-id buckets remembered at once; the least recently used is forgotten first (only a
#: flood of fresh ids gets there, and the overall cap is what bounds those).
MAX_TRACKED_IDS = 4096
#: Seconds a peer that was connected counts as known (exempt from the pending cap).
RECENT_PEER_WINDOW = 3600.0

#: Refusal reasons, as counted in the status.
RATE = "rate"
PENDING = "pending-cap"
NOT_ALLOWED = "not-allowed"
#: The offerer's channel asked for a mode this agent does not grant it (TUN without
#: allowed IPs); refused by the session once the channel arrives.
MODE_NOT_GRANTED = "mode-not-granted"


class TokenBuckets:
    """One token bucket per key: ``capacity`` tokens, refilled at ``per_second``."""

    def __init__(
        self,
        capacity: float,
        per_second: float,
        *,
        max_keys: int = MAX_TRACKED_IDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict()
        )

    def take(self, key: str) -> bool:
        """Take one token from ``key``'s bucket; False when it is empty."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


class OfferAdmission:
    """Decides whether an offer may create a session (see the module docstring)."""

    def __init__(
        self,
        max_pending: int,
        offers_per_minute: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pending = max_pending
        self.buckets = TokenBuckets(max(offers_per_minute, 1.0), offers_per_minute / 60.0,
                                    clock=clock)
        self.refused: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._connected: collections.OrderedDict[str, float] = collections.OrderedDict()

    def note_connected(self, peer: str) -> None:
        """``peer`` has just connected: for an hour it counts as known."""
        self._connected.pop(peer, None)
        self._connected[peer] = self._clock()
        while len(self._connected) > MAX_TRACKED_IDS:
            self._connected.popitem(last=False)

    def recently_connected(self, peer: str) -> bool:
        """Whether ``peer`` was connected within :data:`RECENT_PEER_WINDOW`."""
        at = self._connected.get(peer)
        return at is not None and self._clock() - at < RECENT_PEER_WINDOW

    def refusal(self, peer: str, *, pending: int, exempt: bool) -> str | None:
        """``None`` to admit an offer from ``peer``, else why it is refused: :data:`RATE`
        or :data:`PENDING`. ``pending`` counts answered sessions not connected yet;
        ``exempt`` peers (restarting, configured) and recently connected ones are not held
        back by that cap."""
        if not self.buckets.take(peer):
            reason = RATE
        elif pending >= self.max_pending and not (exempt or self.recently_connected(peer)):
            reason = PENDING
        else:
            return None
        self.refused[reason] += 1
        return reason

    def count(self, reason: str) -> None:
        """Count a refusal decided elsewhere (e.g. :data:`NOT_ALLOWED`)."""
        self.refused[reason] += 1
