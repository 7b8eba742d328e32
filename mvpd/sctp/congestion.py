"""Congestion control and retransmission timeout of the single path (RFC 9260 6.3, 7.2).

Plain numbers, updated by the retransmission queue as SACKs and timeouts arrive.
"""

from __future__ import annotations


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
    """cwnd, ssthresh and partial_bytes_acked of RFC 9260 section 7.2, in bytes.

    ``loss_backoff`` (the window kept after a loss, RFC 9260: 0.5) and
    ``avoidance_step`` (MTUs added per window acknowledged in congestion avoidance,
    RFC 9260: 1) may be raised for paths whose losses are mostly not congestion (radio
    links, impaired test paths): 0.7 and 4 stay within ~3x of Reno's share.
    """

    __slots__ = ("avoidance_step", "cwnd", "fast_recovery_exit", "loss_backoff", "mtu",
                 "partial_bytes_acked", "ssthresh")

    def __init__(self, mtu: int, peer_rwnd: int, *, loss_backoff: float = 0.5,
                 avoidance_step: int = 1) -> None:
        self.mtu = mtu
        self.loss_backoff = loss_backoff
        self.avoidance_step = avoidance_step
        self.cwnd = min(4 * mtu, max(2 * mtu, 4380))
        self.ssthresh = peer_rwnd
        self.partial_bytes_acked = 0
        #: Highest TSN outstanding when fast recovery began; ``None``: not recovering.
        self.fast_recovery_exit: int | None = None

    def on_cumulative_ack(self, bytes_acked: int, flight_before: int) -> None:
        """The cumulative TSN advanced, newly acknowledging ``bytes_acked`` bytes."""
        if self.fast_recovery_exit is not None or bytes_acked <= 0:
            return
        cwnd = self.cwnd
        # Grow only when the window was in use (RFC 9260 7.2.1, 7.2.2).
        if flight_before + self.mtu < cwnd:
            return
        if cwnd <= self.ssthresh:
            self.cwnd = cwnd + min(bytes_acked, self.mtu)
        else:
            pba = self.partial_bytes_acked + bytes_acked
            if pba >= cwnd:
                pba -= cwnd
                self.cwnd = cwnd + self.avoidance_step * self.mtu
            self.partial_bytes_acked = pba

    def on_fast_retransmit(self, highest_outstanding_tsn: int) -> None:
        """Losses were detected by gap reports: enter fast recovery (RFC 9260 7.2.4)."""
        if self.fast_recovery_exit is not None:
            return
        self.ssthresh = max(int(self.cwnd * self.loss_backoff), 4 * self.mtu)
        self.cwnd = self.ssthresh
        self.partial_bytes_acked = 0
        self.fast_recovery_exit = highest_outstanding_tsn

    def on_retransmission_timeout(self) -> None:
        """The T3-rtx timer expired (RFC 9260 7.2.3)."""
        self.ssthresh = max(int(self.cwnd * self.loss_backoff), 4 * self.mtu)
        self.cwnd = self.mtu
        self.partial_bytes_acked = 0
        self.fast_recovery_exit = None
