"""CUBIC congestion control (RFC 9438) on SCTP's slow start and fast recovery."""

from __future__ import annotations

import pytest

from mvpd.sctp import Association
from mvpd.sctp.congestion import CongestionControl

from .harness import Link, Pair

MTU = 1000


def grown(flows: int = 1, cwnd: int = 100 * MTU) -> CongestionControl:
    cc = CongestionControl(MTU, 1 << 30, emulated_flows=flows)
    cc.cwnd = cwnd
    cc.ssthresh = cwnd // 2  # in congestion avoidance
    return cc


@pytest.mark.parametrize(("flows", "kept"), [(1, 0.7), (2, 0.85), (3, 0.9)])
def test_a_loss_keeps_beta_of_the_window(flows: int, kept: float) -> None:
    cc = grown(flows)
    cc.on_fast_retransmit(1000)
    assert cc.cwnd == cc.ssthresh == int(100 * MTU * kept)
    assert cc.w_max == 100
    cc.on_fast_retransmit(2000)  # the same recovery: no second reduction
    assert cc.cwnd == int(100 * MTU * kept)


def test_window_floor_and_timeout() -> None:
    cc = grown(cwnd=5 * MTU)
    cc.on_fast_retransmit(10)
    assert cc.cwnd == 4 * MTU  # RFC 9260's floor of four packets
    cc = grown()
    cc.on_retransmission_timeout()
    assert cc.cwnd == MTU and cc.ssthresh == 70 * MTU and cc.fast_recovery_exit is None


def acked_window(cc: CongestionControl, now: float, rtt: float) -> None:
    """One round trip of acknowledgements, two packets per SACK, the window in use."""
    for _ in range(max(1, cc.cwnd // (2 * MTU))):
        cc.on_cumulative_ack(2 * MTU, cc.cwnd, now, rtt)


def test_cubic_regrows_to_the_plateau_in_k_seconds_then_probes_beyond() -> None:
    cc = grown()
    cc.on_fast_retransmit(1)
    cc.fast_recovery_exit = None  # recovery over
    rtt, now = 0.1, 0.0
    acked_window(cc, now, rtt)
    # cwnd = ssthresh is still slow start in SCTP (RFC 9260 7.2.1): one packet more, then
    # the epoch starts at 71 packets (RFC 9438 eq. 2: K ~ 4.2 s).
    k = cc.k
    assert k == pytest.approx(((100 - 71) / 0.4) ** (1 / 3))
    while now < k - rtt:
        now += rtt
        acked_window(cc, now, rtt)
    assert 95 * MTU <= cc.cwnd <= 101 * MTU  # concave: slowly close to W_max
    while now < k + 3:
        now += rtt
        acked_window(cc, now, rtt)
    assert cc.cwnd > 105 * MTU  # convex: probing beyond the old plateau


def test_short_round_trips_grow_at_least_as_fast_as_reno_friendly() -> None:
    """At a 1 ms RTT the cubic curve is slow in round trips: the Reno-friendly estimate
    (alpha = 3(1 - beta)/(1 + beta) ~ 0.53 packets per round trip) drives the window."""
    cc = grown(cwnd=20 * MTU)
    cc.on_fast_retransmit(1)
    cc.fast_recovery_exit = None
    start = cc.cwnd
    now = 0.0
    for _ in range(20):
        now += 0.001
        acked_window(cc, now, 0.001)
    assert cc.cwnd - start >= 20 * 0.5 * MTU


def test_window_not_in_use_does_not_grow() -> None:
    cc = grown()
    cc.on_cumulative_ack(2 * MTU, 10 * MTU, 0.0, 0.1)
    assert cc.cwnd == 100 * MTU


def transfer_rate(flows: int, seed: int) -> tuple[float, int]:
    pair = Pair(Link(delay=0.02, loss=0.05, seed=seed), Link(delay=0.02, loss=0.05,
                                                             seed=seed + 100),
                emulated_flows=flows)
    pair.connect()
    a = pair.a.association
    total, queued = 2 << 20, 0
    start = pair.now

    def done() -> bool:
        nonlocal queued
        while queued < total and a.buffered_amount(1) < 1 << 20:
            a.send(1, 53, b"z" * 65536, now=pair.now)
            queued += 65536
        return sum(len(m.data) for m in pair.b.messages()) >= total

    pair.run(done, timeout=600)
    assert a.retransmissions is not None
    return total / (pair.now - start), a.retransmissions.timeouts


def test_random_loss_is_recovered_without_timeouts_and_two_flows_go_faster() -> None:
    """5 % loss each way, 40 ms RTT: fast recovery repairs the losses (T3-rtx at most
    once, at the very start), and two emulated flows move about twice the data."""
    one = [transfer_rate(1, seed) for seed in (1, 2)]
    two = [transfer_rate(2, seed) for seed in (1, 2)]
    assert all(timeouts <= 1 for _, timeouts in one + two)
    assert sum(r for r, _ in two) > 1.6 * sum(r for r, _ in one)


def test_emulated_flows_is_checked() -> None:
    with pytest.raises(ValueError, match="emulated_flows"):
        Association(emulated_flows=0)
