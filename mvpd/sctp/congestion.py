"""Congestion control and retransmission timeout of the single path (RFC 9260 6.3, 7.2;
RFC 9438 CUBIC).

Plain numbers, updated by the retransmission queue as SACKs and timeouts arrive.

Why CUBIC: RFC 9260's congestion control is Reno (halve the window on a loss, grow it by one
packet per round trip).  Modern TCP stacks (Linux, Windows, macOS) and QUIC stacks run
CUBIC instead (RFC 9438, standards track): the window shrinks to 0.7 of itself on a loss
and grows back along a cubic curve, no slower than Reno would (its "Reno-friendly" region).
It is as fair to Reno flows on short, clean paths (the Reno-friendly region dominates there)
and recovers much faster on long ones.  Here it is adapted to SCTP as RFC 9438 describes
for TCP: the window is counted in bytes with the path's packet payload as the segment,
"acknowledged" means the cumulative TSN ack advancing (RFC 9260 7.2.1/7.2.2, growth only
while the window is in use), a congestion event is the start of SCTP's fast recovery (at
most one per window of data, RFC 9260 7.2.4) or a T3-rtx timeout (RFC 9438 4.8: the
window goes back to one packet, the threshold to 0.7 of it).  Slow start, its threshold
floor of four packets and fast recovery stay RFC 9260's.

``emulated_flows`` (N) makes the association respond as N CUBIC flows would in aggregate,
as Chromium's QUIC sender does for its connections (N = 2 there): the window kept after a
loss is ``(N - 1 + 0.7) / N`` and the Reno-friendly growth ``3 N^2 (1 - beta) / (1 + beta)``
packets per round trip.  One association multiplexes every data channel of a peer (what
would be several TCP connections); on a path with random loss (radio links; the impaired
test link's 5 %) each flow's share of the window is what limits throughput, and N flows get
about N times one flow's.  N = 1 is RFC 9438 exactly.
"""

from __future__ import annotations

#: CUBIC's multiplicative decrease factor and its cubic constant C (RFC 9438 4.1).
BETA_CUBIC = 0.7
C_CUBIC = 0.4


class RtoEstimator:
    """Smoothed RTT and retransmission timeout (RFC 9260 section 6.3.1)."""

    __slots__ = ("rto", "rto_initial", "rto_max", "rto_min", "rttvar", "srtt")

    def __init__(self, rto_initial: float, rto_min: float, rto_max: float) -> None:
        self.rto_initial = rto_initial
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.rto = rto_initial
        self.srtt: float | None = None
        self.rttvar = 0.0

    def observe(self, rtt: float) -> None:
        """Take one round-trip measurement (of a chunk sent once: Karn's rule)."""
        if rtt < 0:
            return
        srtt = self.srtt
        if srtt is None:
            self.srtt = srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(srtt - rtt)
            self.srtt = srtt = 0.875 * srtt + 0.125 * rtt
        # The 4*RTTVAR term is kept at least a clock granularity of 1 ms.
        self.rto = min(max(srtt + max(4 * self.rttvar, 0.001), self.rto_min), self.rto_max)

    def back_off(self) -> None:
        """Double the RTO after a timeout (RFC 9260 6.3.3 E2)."""
        self.rto = min(self.rto * 2, self.rto_max)


class CongestionControl:
    """cwnd and ssthresh in bytes: RFC 9260 slow start and fast recovery, CUBIC (RFC 9438)
    congestion avoidance and loss response (see the module docstring)."""

    __slots__ = ("alpha", "beta", "cwnd", "emulated_flows", "epoch_start", "fast_recovery_exit",
                 "k", "mtu", "ssthresh", "w_est", "w_max")

    def __init__(self, mtu: int, peer_rwnd: int, *, emulated_flows: int = 1) -> None:
        if emulated_flows < 1:
            raise ValueError("emulated_flows must be at least 1")
        self.mtu = mtu
        self.emulated_flows = n = emulated_flows
        #: The window kept after a loss, and the Reno-friendly growth in packets per round
        #: trip (RFC 9438 4.3, 4.6), for ``n`` flows together.
        self.beta = (n - 1 + BETA_CUBIC) / n
        self.alpha = 3 * n * n * (1 - self.beta) / (1 + self.beta)
        self.cwnd = min(4 * mtu, max(2 * mtu, 4380))
        self.ssthresh = peer_rwnd
        #: The window (in packets) before the last reduction: the cubic curve's plateau.
        self.w_max = 0.0
        #: Seconds from the epoch start until the curve reaches ``w_max``.
        self.k = 0.0
        #: When the current congestion-avoidance epoch began (negative: none yet).
        self.epoch_start = -1.0
        #: The Reno-friendly window estimate in bytes (RFC 9438 4.3).
        self.w_est = 0.0
        #: Highest TSN outstanding when fast recovery began; ``None``: not recovering.
        self.fast_recovery_exit: int | None = None

    def on_cumulative_ack(self, bytes_acked: int, flight_before: int, now: float,
                          rtt: float) -> None:
        """The cumulative TSN advanced, newly acknowledging ``bytes_acked`` bytes; ``rtt``
        is the smoothed round-trip time."""
        if self.fast_recovery_exit is not None or bytes_acked <= 0:
            return
        cwnd = self.cwnd
        mtu = self.mtu
        # Grow only when the window was in use (RFC 9260 7.2.1, 7.2.2).
        if flight_before + mtu < cwnd:
            return
        if cwnd <= self.ssthresh:
            self.cwnd = cwnd + min(bytes_acked, mtu)  # slow start
            return
        if self.epoch_start < 0:
            # A new epoch (RFC 9438 4.2): from the window now towards the plateau, or, with
            # no reduction before it (or past it), from the window now as the plateau.
            self.epoch_start = now
            segments = cwnd / mtu
            if self.w_max > segments:
                self.k = ((self.w_max - segments) / C_CUBIC) ** (1 / 3)
            else:
                self.w_max = segments
                self.k = 0.0
            self.w_est = float(cwnd)
        t = now - self.epoch_start
        w_max = self.w_max
        # The Reno-friendly estimate: alpha packets per round trip until it reaches the
        # plateau, then Reno's rate (one packet per flow per round trip; RFC 9438 4.3).
        alpha = self.alpha if self.w_est < w_max * mtu else float(self.emulated_flows)
        self.w_est += alpha * mtu * bytes_acked / cwnd
        cubic = (C_CUBIC * (t - self.k) ** 3 + w_max) * mtu
        if cubic < self.w_est:
            self.cwnd = max(cwnd, int(self.w_est))  # the Reno-friendly region
            return
        # Concave or convex region: towards the curve one round trip ahead, growing by at
        # most half the window per round trip (RFC 9438 4.4, 4.5).
        target = (C_CUBIC * (t + rtt - self.k) ** 3 + w_max) * mtu
        target = min(max(target, cwnd), 1.5 * cwnd)
        self.cwnd = cwnd + int((target - cwnd) * bytes_acked / cwnd)

    def _reduce(self) -> None:
        """A congestion event: the new plateau and threshold (RFC 9438 4.6, 4.7)."""
        segments = self.cwnd / self.mtu
        # Fast convergence: a flow losing again below its last plateau yields bandwidth.
        self.w_max = segments * (1 + self.beta) / 2 if segments < self.w_max else segments
        self.ssthresh = max(int(self.cwnd * self.beta), 4 * self.mtu)
        self.epoch_start = -1.0

    def on_fast_retransmit(self, highest_outstanding_tsn: int) -> None:
        """Losses were detected by gap reports: enter fast recovery (RFC 9260 7.2.4)."""
        if self.fast_recovery_exit is not None:
            return
        self._reduce()
        self.cwnd = self.ssthresh
        self.fast_recovery_exit = highest_outstanding_tsn

    def on_retransmission_timeout(self) -> None:
        """The T3-rtx timer expired (RFC 9260 7.2.3, RFC 9438 4.8)."""
        self._reduce()
        self.cwnd = self.mtu
        self.fast_recovery_exit = None
