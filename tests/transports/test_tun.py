"""TunTransport between a real TUN device (in a namespace the test makes) and a channel.

The channel is a small in-memory stand-in for an RTCDataChannel (the narrow part under test
is the packet path; aiortc itself is exercised by the peer tests). The child process speaks
for the remote peer: it puts ICMP echo requests on the channel and reads what comes back.
"""

from __future__ import annotations

import pytest

from mvpd.proto.ippacket import decode_message
from mvpd.transports.tun import TunTransport
from tests.netns import namespace, require_tun
from tests.test_netdev import run_child

pytestmark = pytest.mark.root


def test_channel_options_are_unreliable_and_unordered() -> None:
    options = TunTransport.channel_options
    assert options.ordered is False
    assert options.max_retransmits == 0
    assert decode_message(b"\x45" + bytes(19))  # the wire format is ippacket's


def test_packets_flow_both_ways_and_spoofed_sources_are_dropped() -> None:
    require_tun()
    body = r"""
from mvpd.proto.ippacket import decode_message, encode_batch
from mvpd.transports.tun import TunTransport


class Channel:
    label = "mvp-tun"
    protocol = ""
    readyState = "open"
    bufferedAmount = 0
    bufferedAmountLowThreshold = 0

    def __init__(self):
        self.handlers = {}
        self.sent = []
        self.got = asyncio.Event()

    def on(self, event, f):
        self.handlers.setdefault(event, []).append(f)

    def send(self, data):
        self.sent.append(data)
        self.got.set()

    def close(self):
        self.readyState = "closed"
        for f in self.handlers.get("close", []):
            f()

    def emit(self, event, *args):
        for f in self.handlers.get(event, []):
            f(*args)


async def main():
    transport = TunTransport(peer_id="bob", allowed_ips=["10.85.0.2/32"])
    channel = Channel()
    transport.attach_channel(channel)
    device = await transport.open_device("ttun%d", address="10.85.0.1/24", mtu=1400)
    name = device.name
    # Two echo requests from bob in one batch, plus one spoofed and one garbage message.
    channel.emit("message", encode_batch([echo_request("10.85.0.2", "10.85.0.1", seq=1),
                                          echo_request("10.85.0.2", "10.85.0.1", seq=2)]))
    channel.emit("message", echo_request("10.85.0.9", "10.85.0.1", seq=3))
    channel.emit("message", b"\x00\x00\x09oops")
    channel.emit("message", "text is not a packet")
    replies = []
    while len(replies) < 2:
        await asyncio.wait_for(channel.got.wait(), 10)
        channel.got.clear()
        replies = [p for m in channel.sent for p in decode_message(m) if is_echo_reply(p)]
    seqs = sorted(int.from_bytes(p[26:28], "big") for p in replies)
    dsts = sorted({str(parse_header(p).dst_address) for p in replies})
    status = transport.tun_status()
    channel.close()
    report({"seqs": seqs, "dsts": dsts, "status": status, "name": name,
            "links_after_close": link_names(), "reading": device.reading})

asyncio.run(main())
"""
    with namespace("ttun") as ns:
        r = run_child(ns, body)
    assert r["seqs"] == [1, 2]
    assert r["dsts"] == ["10.85.0.2"]
    drops = r["status"]["drops"]
    assert drops["source-not-allowed"] == 1
    assert drops["malformed"] == 2
    assert r["status"]["allowed_ips"] == ["10.85.0.2/32"]
    assert r["status"]["device"] == r["name"]
    assert r["status"]["device_stats"]["packets_written"] == 2
    assert r["name"] not in r["links_after_close"]
    assert r["reading"] is False
