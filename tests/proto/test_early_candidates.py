"""EarlyCandidates: candidates held per remote id until the offer, bounded and expiring."""

from __future__ import annotations

from mvpd.proto.early_candidates import EarlyCandidates
from mvpd.proto.signaling import Candidate, IceCandidate


def cand(peer: str, n: int) -> Candidate:
    line = f"candidate:{n} 1 udp 2122260223 10.0.0.{n % 250 + 1} {5000 + n} typ host"
    return Candidate(sender=peer, to="alice",
                     candidate=IceCandidate(candidate=line, sdpMid="0", sdpMLineIndex=0))


def test_candidates_come_back_in_arrival_order_once() -> None:
    early = EarlyCandidates(ttl=30)
    sent = [cand("web", n) for n in range(5)] + [Candidate(sender="web", to="alice")]
    for c in sent:
        assert early.hold("web", c, now=1.0)
    assert early.hold("other", cand("other", 9), now=1.0)
    assert len(early) == 7
    assert early.take("web", now=2.0) == sent
    assert early.take("web", now=2.0) == []
    assert early.peers() == ["other"]
    assert early.dropped == 0


def test_per_peer_cap_keeps_the_first_ones_and_counts_the_rest() -> None:
    early = EarlyCandidates(ttl=30, per_peer=3)
    results = [early.hold("web", cand("web", n), now=0) for n in range(5)]
    assert results == [True, True, True, False, False]
    assert [c.candidate.candidate.split()[0] for c in early.take("web", 0)] == [  # type: ignore[union-attr]
        "candidate:0", "candidate:1", "candidate:2"]
    assert early.dropped == 2


def test_too_many_ids_push_out_the_oldest() -> None:
    early = EarlyCandidates(ttl=30, max_peers=2)
    early.hold("a", cand("a", 1), now=0)
    early.hold("a", cand("a", 2), now=0)
    early.hold("b", cand("b", 1), now=1)
    early.hold("c", cand("c", 1), now=2)
    assert early.peers() == ["b", "c"]
    assert early.take("a", now=3) == []
    assert early.dropped == 2


def test_candidates_expire_after_ttl() -> None:
    early = EarlyCandidates(ttl=10)
    early.hold("old", cand("old", 1), now=0)
    early.hold("new", cand("new", 1), now=5)
    assert early.take("old", now=10) == []
    assert len(early.take("new", now=10)) == 1
    assert early.dropped == 1


def test_discard_forgets_and_counts() -> None:
    early = EarlyCandidates(ttl=10)
    early.hold("web", cand("web", 1), now=0)
    early.hold("web", cand("web", 2), now=0)
    assert early.discard("web") == 2
    assert early.discard("web") == 0
    assert early.take("web", now=1) == []
    assert early.dropped == 2
