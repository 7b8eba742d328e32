"""mvpd.stats: the traffic sampler's rates, candidate parsing, and the live numbers of real
sessions (timed liveness checks, the SCTP association's counters)."""

from __future__ import annotations

from typing import Any

from mvpd.stats import (
    TrafficSampler,
    parse_candidate_sdp,
    peer_connection,
    peer_stats,
    rtt_summary,
    sctp_association,
    sctp_counters,
)
from mvpd.transports import TransportCounters
from tests.peerlink import Forwarder, intercept_received, run, wait_for


class FakeTransport:
    def __init__(self) -> None:
        self.counters = TransportCounters()


class FakeSession:
    """Just what the sampler reads: transports with counters, and closed pipes."""

    def __init__(self) -> None:
        self.main = FakeTransport()
        self.transports = {"mvp": self.main}
        self.closed_pipes = TransportCounters()


def test_rates_over_the_window_and_history_per_session() -> None:
    now = [1000.0]
    session: Any = FakeSession()
    sessions: dict[str, Any] = {"bob": session}
    sampler = TrafficSampler(lambda: sessions, history=10, clock=lambda: now[0])
    assert sampler.rates("bob")["bytes_in_per_s"] == 0.0  # nothing sampled yet
    for _ in range(8):
        sampler.sample()
        session.main.counters.bytes_in += 1000
        session.main.counters.messages_out += 2
        session.closed_pipes.bytes_out += 500
        now[0] += 1.0
    rates = sampler.rates("bob", window=5)
    assert rates["window_s"] == 5.0
    assert rates["bytes_in_per_s"] == 1000.0
    assert rates["messages_out_per_s"] == 2.0
    assert rates["bytes_out_per_s"] == 500.0  # closed pipes count too
    assert len(sampler.history("bob")) == 8
    for _ in range(5):
        sampler.sample()
        now[0] += 1.0
    assert len(sampler.history("bob")) == 10  # a bounded ring
    # A new session for the same peer starts a new ring; a gone peer is forgotten.
    sessions["bob"] = FakeSession()
    sampler.sample()
    assert len(sampler.history("bob")) == 1
    del sessions["bob"]
    sampler.sample()
    assert sampler.history("bob") == []


def test_candidate_lines_are_split_into_their_parts() -> None:
    host = "1 1 UDP 2130706431 127.0.0.1 50123 typ host"
    assert parse_candidate_sdp(host) == {"address": "127.0.0.1", "port": 50123,
                                         "type": "host", "protocol": "udp"}
    relay = "3 1 udp 16777215 10.0.0.1 40001 typ relay raddr 10.0.0.1 rport 5000"
    assert parse_candidate_sdp(relay)["type"] == "relay"  # type: ignore[index]
    for junk in (None, "", "1 1 udp", "1 1 udp 1 1.2.3.4 port typ host", "a b c d e 1 x y"):
        assert parse_candidate_sdp(junk) is None
    assert rtt_summary([]) is None
    assert rtt_summary([0.001, 0.003]) == {"last_ms": 3.0, "min_ms": 1.0, "avg_ms": 2.0,
                                           "max_ms": 3.0, "samples": 2}


def test_real_sessions_report_their_pair_ice_rtt_and_sctp_counters() -> None:
    async def body() -> None:
        fwd = Forwarder()
        # peer_timeout 1 s: a liveness check every 0.2 s.
        sa, sb = fwd.pair("alice", "bob", peer_timeout=1.0)
        await sa.start_offer()
        ta = await sa.wait_open()
        await sb.wait_open()
        for i in range(20):
            await ta.send_text_async(f"message {i}")
        await wait_for(lambda: len(sa.liveness_rtts) >= 2, 10)
        stats = peer_stats(sa, None)
        pair = stats["pair"]
        assert pair["path"] == "direct"
        assert pair["local"]["type"] == "host" and pair["local"]["protocol"] == "udp"
        other = peer_stats(sb, None)["pair"]
        assert (pair["remote"]["address"], pair["remote"]["port"]) == (
            other["local"]["address"], other["local"]["port"])
        rtt = stats["ice_rtt"]
        assert rtt["samples"] >= 2 and 0 < rtt["min_ms"] < 1000
        assert stats["channels"]["mvp"]["messages_out"] == 20
        sctp = sctp_counters(sa)
        assert sctp is not None
        assert sctp == sctp_association(sa).stats()  # type: ignore[union-attr]
        assert sctp["state"] == "established"
        assert sctp["cwnd"] > 0 and sctp["retransmissions"] == 0 and sctp["abandoned"] == 0
        # The 20 messages (and the channel's DCEP) went out and were acknowledged.
        assert sctp["packets_sent"] >= 2 and sctp["sacks_received"] >= 1
        other = sctp_counters(sb)
        assert other is not None and other["retransmissions"] == 0
        assert other["data_packets_received"] >= 2 and other["sacks_sent"] >= 1
        await sa.close()
        await sb.close()

    run(body())


def test_a_lost_packet_shows_as_a_retransmission() -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = fwd.pair("alice", "bob")
        await sa.start_offer()
        ta = await sa.wait_open()
        tb = await sb.wait_open()
        received: list[Any] = []
        tb.add_message_listener(received.append)
        # Lose the next packet bob receives (it carries the first message's DATA chunk).
        receiver = peer_connection(sb).sctp
        lost = []

        def lossy_receive(data: bytes) -> bool:
            if not lost:
                lost.append(data)
                return False
            return True

        intercept_received(receiver, lossy_receive)
        for i in range(10):
            await ta.send_text_async(f"message {i}")
        await wait_for(lambda: len(received) == 10, 20)
        assert received == [f"message {i}" for i in range(10)]
        counters = sctp_counters(sa)
        assert lost and counters is not None and counters["retransmissions"] >= 1
        assert counters["fast_retransmits"] + counters["t3_expirations"] >= 1
        await sa.close()
        await sb.close()

    run(body())
