"""Two associations wired in memory with a virtual clock and a lossy, reordering,
duplicating link between them (for the association tests and the benchmark)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from mvpd.sctp import Association, Event, MessageReceived


class Endpoint:
    """One association and what it reported."""

    def __init__(self, name: str, association: Association) -> None:
        self.name = name
        self.association = association
        self.events: list[Event] = []
        #: Drain events after every step (an application that reads).
        self.reading = True
        self.packets_out = 0

    def drain(self) -> None:
        self.events.extend(self.association.events())

    def messages(self) -> list[MessageReceived]:
        return [e for e in self.events if isinstance(e, MessageReceived)]

    def of_type(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


class Link:
    """Delay, loss, duplication and reordering, from a seeded random generator."""

    def __init__(self, *, delay: float = 0.01, loss: float = 0.0, duplicate: float = 0.0,
                 reorder: float = 0.0, seed: int = 1, rate: float | None = None,
                 drop: Callable[[bytes], bool] | None = None) -> None:
        self.delay = delay
        #: Bytes per second (``None``: unlimited); packets queue behind each other.
        self.rate = rate
        self._free_at = 0.0
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.random = random.Random(seed)
        self.drop = drop
        self.sent = 0
        self.lost = 0

    def schedule(self, now: float, packet: bytes) -> list[float]:
        """Arrival times of ``packet`` (empty when lost, two when duplicated)."""
        self.sent += 1
        if self.rate is not None:
            now = self._free_at = max(now, self._free_at) + len(packet) / self.rate
        if self.drop is not None and self.drop(packet):
            self.lost += 1
            return []
        if self.random.random() < self.loss:
            self.lost += 1
            return []
        times = [now + self.delay]
        if self.random.random() < self.reorder:
            times[0] += self.random.uniform(0, 3 * self.delay)
        if self.random.random() < self.duplicate:
            times.append(now + self.delay + self.random.uniform(0, 2 * self.delay))
        return times


class Pair:
    """Endpoints ``a`` and ``b`` and a link each way; time advances event by event."""

    def __init__(self, link_ab: Link | None = None, link_ba: Link | None = None,
                 **options: Any) -> None:
        self.a = Endpoint("a", Association(**options))
        self.b = Endpoint("b", Association(**options))
        self.link_ab = link_ab or Link()
        self.link_ba = link_ba or Link(seed=2)
        self.now = 0.0
        #: Drain each side's packets after every packet received (as a datagram I/O layer
        #: does) rather than after all packets due at the same instant.
        self.per_packet = True
        self._queue: list[tuple[float, int, Endpoint, bytes]] = []
        self._seq = 0

    def _flush(self) -> None:
        for src, dst, link in ((self.a, self.b, self.link_ab), (self.b, self.a, self.link_ba)):
            for packet in src.association.packets_to_send():
                src.packets_out += 1
                for when in link.schedule(self.now, packet):
                    self._seq += 1
                    heapq.heappush(self._queue, (when, self._seq, dst, packet))
            if src.reading:
                src.drain()

    def step(self) -> bool:
        """Advance to the next packet arrival or timer; False when nothing is left."""
        self._flush()
        deadlines = [d for d in (self.a.association.next_deadline(),
                                 self.b.association.next_deadline()) if d is not None]
        next_packet = self._queue[0][0] if self._queue else None
        candidates = deadlines + ([next_packet] if next_packet is not None else [])
        if not candidates:
            return False
        self.now = max(self.now, min(candidates))
        while self._queue and self._queue[0][0] <= self.now:
            _, _, dst, packet = heapq.heappop(self._queue)
            dst.association.receive_packet(packet, self.now)
            if self.per_packet:
                self._flush()
        for endpoint in (self.a, self.b):
            deadline = endpoint.association.next_deadline()
            if deadline is not None and deadline <= self.now:
                endpoint.association.handle_timeout(self.now)
        self._flush()
        return True

    def run(self, until: Callable[[], bool], *, timeout: float = 60.0,
            max_steps: int = 2_000_000) -> None:
        """Step until ``until()`` holds; fails after ``timeout`` virtual seconds."""
        start = self.now
        for _ in range(max_steps):
            if until():
                return
            if not self.step() or self.now - start > timeout:
                break
        if not until():
            raise AssertionError(f"condition not met by t={self.now:.3f}")

    def connect(self, both: bool = False) -> None:
        self.a.association.connect(self.now)
        if both:
            self.b.association.connect(self.now)
        self.run(lambda: self.a.association.established and self.b.association.established,
                 timeout=120)
