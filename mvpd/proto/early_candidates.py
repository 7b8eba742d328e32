"""ICE candidates that arrive before the offer they belong to (sans-I/O).

A browser trickles its candidates as soon as it has them, and the signaling server may hand
them over before the offer itself reaches the daemon (the page may even send them first).
Until the offer creates the session there is nobody to give them to, so the core holds them
here, per remote id and in arrival order, and hands them to the session right after the
offer. Dropping them would work on direct paths (the offerer's checks reveal its address
anyway) but fail behind a TURN relay with a relay-only policy: the relay only forwards from
addresses we gave it a permission for, and those come from the remote candidates.

A remote party can send candidates without ever offering, so everything here is bounded:

* at most ``per_peer`` candidates per remote id (the first ones: browsers send their best
  first); later ones are counted in :attr:`EarlyCandidates.dropped` and ignored;
* at most ``max_peers`` remote ids; a new id beyond that pushes out the one that has waited
  longest (a real offer follows its candidates within moments, so the oldest is the least
  likely to be used);
* a remote id's candidates expire ``ttl`` seconds after the first of them arrived (the
  daemon uses its ``connect_timeout``).

Time is passed in (``now``, any monotonic clock), so the rules are tested without waiting.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .signaling import Candidate

#: Candidates held per remote id.
DEFAULT_PER_PEER = 64
#: Remote ids with held candidates.
DEFAULT_MAX_PEERS = 64


@dataclass
class _Held:
    since: float
    candidates: list[Candidate] = field(default_factory=list)


class EarlyCandidates:
    """Candidates per remote id, waiting for that id's offer."""

    def __init__(
        self,
        *,
        ttl: float,
        per_peer: int = DEFAULT_PER_PEER,
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        self.ttl = ttl
        self.per_peer = per_peer
        self.max_peers = max_peers
        self._held: OrderedDict[str, _Held] = OrderedDict()
        #: Candidates let go without reaching a session (over a cap, expired, discarded).
        self.dropped = 0

    def __len__(self) -> int:
        """Candidates held now, for every remote id."""
        return sum(len(h.candidates) for h in self._held.values())

    def peers(self) -> list[str]:
        """Remote ids with candidates held, oldest first."""
        return list(self._held)

    def hold(self, peer: str, candidate: Candidate, now: float) -> bool:
        """Keep ``candidate`` from ``peer`` for its offer; False if a cap dropped it."""
        self.expire(now)
        held = self._held.get(peer)
        if held is None:
            if self.max_peers <= 0:
                self.dropped += 1
                return False
            while len(self._held) >= self.max_peers:
                _, oldest = self._held.popitem(last=False)
                self.dropped += len(oldest.candidates)
            held = self._held[peer] = _Held(now)
        if len(held.candidates) >= self.per_peer:
            self.dropped += 1
            return False
        held.candidates.append(candidate)
        return True

    def take(self, peer: str, now: float) -> list[Candidate]:
        """Every candidate held for ``peer``, in arrival order, and forget them."""
        self.expire(now)
        held = self._held.pop(peer, None)
        return held.candidates if held is not None else []

    def discard(self, peer: str) -> int:
        """Forget ``peer``'s candidates (its offer was refused, it said bye); how many."""
        held = self._held.pop(peer, None)
        count = len(held.candidates) if held is not None else 0
        self.dropped += count
        return count

    def expire(self, now: float) -> None:
        """Drop the candidates of every remote id that waited ``ttl`` seconds or more."""
        while self._held:
            peer, held = next(iter(self._held.items()))
            if now - held.since < self.ttl:
                return
            del self._held[peer]
            self.dropped += len(held.candidates)
