"""Timers of a sans-I/O association: deadlines on a clock the caller passes in.

A :class:`Timer` only remembers when it expires and how often it has expired in a row; the
association asks each armed timer whether its deadline passed in ``handle_timeout(now)``.
"""

from __future__ import annotations


class Timer:
    """One restartable timer with exponential backoff of its duration."""

    __slots__ = ("deadline", "duration", "expirations", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.deadline: float | None = None
        self.duration = 0.0
        #: Consecutive expirations since the last (re)start by the caller.
        self.expirations = 0

    @property
    def running(self) -> bool:
        return self.deadline is not None

    def start(self, now: float, duration: float) -> None:
        """Arm the timer to expire ``duration`` seconds from ``now``; resets the count."""
        self.duration = duration
        self.deadline = now + duration
        self.expirations = 0

    def restart_backed_off(self, now: float, duration: float) -> None:
        """Re-arm after an expiration with ``duration`` (already backed off), keeping the count."""
        self.duration = duration
        self.deadline = now + duration

    def stop(self) -> None:
        self.deadline = None
        self.expirations = 0

    def expired(self, now: float) -> bool:
        """Whether the timer is armed and its deadline passed; if so it is disarmed and its
        expiration counted."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return False
        self.deadline = None
        self.expirations += 1
        return True
