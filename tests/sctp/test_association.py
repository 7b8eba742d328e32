"""Two associations in memory: handshake, reliable data, SACK."""

from __future__ import annotations

from mvpd.sctp import AssociationEstablished, State

from .harness import Pair


def test_handshake_establishes_both_sides() -> None:
    pair = Pair()
    pair.connect()
    assert pair.a.association.state is State.ESTABLISHED
    assert pair.b.association.state is State.ESTABLISHED
    assert pair.a.of_type(AssociationEstablished) and pair.b.of_type(AssociationEstablished)


def test_simultaneous_open() -> None:
    pair = Pair()
    pair.connect(both=True)
    assert pair.a.association.peer_tag == pair.b.association.local_tag
    assert pair.b.association.peer_tag == pair.a.association.local_tag


def test_reliable_messages_arrive_in_order() -> None:
    pair = Pair()
    pair.connect()
    sent = [bytes([i % 251]) * (1 + i * 997 % 70000) for i in range(50)]
    for data in sent:
        pair.a.association.send(1, 53, data, now=pair.now)
    pair.run(lambda: len(pair.b.messages()) == len(sent))
    assert [m.data for m in pair.b.messages()] == sent
    assert all(m.stream_id == 1 and m.ppid == 53 for m in pair.b.messages())
    pair.run(lambda: pair.a.association.retransmissions is not None
             and pair.a.association.retransmissions.outstanding == 0)
