"""TunTransport and the shared tunnel: a real TUN device (in a namespace the test makes),
in-memory stand-ins for data channels and sessions.

The stand-ins are the narrow part here (aiortc itself runs in tests/e2e_tun): the child
process plays two remote peers, puts ICMP echo requests on their channels and reads what
comes back, so routing by destination and checking sources go through the kernel.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mvpd.config import AgentSettings, PeerSettings
from mvpd.proto.errors import TunError, TunUnavailable
from mvpd.proto.ippacket import decode_message
from mvpd.transports.tun import TunTransport
from mvpd.tun.device import TunDevice
from mvpd.tun.tunnel import LOCAL_OWNER, Tunnel
from tests.netns import namespace, require_tun
from tests.tun.test_device import run_child


def settings(**tun: object) -> AgentSettings:
    return AgentSettings.model_validate(
        {"agent_id": "hub", "tun": tun, "peers": {
            "bob": {"allowed_ips": ["10.85.0.2/32"]},
            "carol": {"allowed_ips": ["10.85.0.3/32", "10.86.0.0/24"]},
        }}
    )


def test_channel_options_are_unreliable_and_unordered() -> None:
    options = TunTransport.channel_options
    assert options.ordered is False
    assert options.max_retransmits == 0
    assert decode_message(b"\x45" + bytes(19))  # the wire format is ippacket's


def test_allowed_ips_only_from_the_config_and_never_overlapping() -> None:
    tunnel = Tunnel(settings(address="10.85.0.1/24"))
    assert [str(n) for n in tunnel.allowed_networks("bob")] == ["10.85.0.2/32"]
    # No entry: no TUN mode, and no default to the tunnel subnet.
    with pytest.raises(TunError, match=r"dave may not use TUN mode.*peers\.dave\.allowed_ips"):
        tunnel.allowed_networks("dave")
    with pytest.raises(TunError, match="dave may not use TUN mode"):
        tunnel.check("dave", "tun")
    tunnel.check("dave", "chat")
    # carol has joined; after a reload bob's new networks overlap hers by prefix (not equal).
    tunnel.table.replace_peer("carol", tunnel.allowed_networks("carol"))
    tunnel.settings.peers["bob"] = PeerSettings(allowed_ips=["10.86.0.128/25"])
    with pytest.raises(TunError, match=r"10\.86\.0\.128/25 overlaps the allowed IPs of tun peer"):
        tunnel.allowed_networks("bob")
    tunnel.settings.peers["bob"] = PeerSettings(allowed_ips=["10.86.0.0/16"])
    with pytest.raises(TunError, match="overlaps the allowed IPs of tun peer carol"):
        tunnel.allowed_networks("bob")
    assert tunnel.allowed_networks("carol")  # a peer never conflicts with itself
    # Our own tunnel address is never a peer's.
    tunnel.settings.peers["bob"] = PeerSettings(allowed_ips=["10.85.0.0/30"])
    with pytest.raises(TunError, match=r"own tunnel address 10\.85\.0\.1"):
        tunnel.allowed_networks("bob")
    assert LOCAL_OWNER not in tunnel.settings.peers


def test_a_wildcard_entry_gives_its_networks_to_one_peer_at_a_time() -> None:
    tunnel = Tunnel(AgentSettings.model_validate({
        "agent_id": "hub", "tun": {"address": "10.85.0.1/24"},
        "peers": {"*": {"mode": "tun", "allowed_ips": ["10.85.0.128/25"]}}}))
    tunnel.table.replace_peer("dave", tunnel.allowed_networks("dave"))
    with pytest.raises(TunError, match="overlaps the allowed IPs of tun peer dave"):
        tunnel.allowed_networks("erin")


def test_packets_from_a_peer_go_only_to_the_tunnel_address_or_forward_to() -> None:
    tunnel = Tunnel(settings(address="10.85.0.1/24", forward_to=["192.168.7.0/24"]))
    table = tunnel.destinations
    assert table.lookup("10.85.0.1") is not None
    assert table.lookup("192.168.7.9") is not None
    for elsewhere in ("10.85.0.3", "10.201.1.1", "127.0.0.1", "10.85.0.255"):
        assert table.lookup(elsewhere) is None, elsewhere
    assert Tunnel(settings()).destinations.networks() == []  # no address: nothing


def test_two_peers_share_one_device_routed_by_destination_and_checked_by_source() -> None:
    require_tun()
    body = r"""
from mvpd.config import AgentSettings
from mvpd.proto.ippacket import decode_message, encode_batch
from mvpd.transports.tun import TunTransport
from mvpd.tun.tunnel import Tunnel


class Channel:
    label = "mvp"
    protocol = "tun"
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


class Session:
    def __init__(self, peer_id):
        self.peer_id = peer_id
        self.closed = None

    async def close(self, reason="", *, failed=False, send_bye=False):
        self.closed = reason


def replies(channel):
    return [p for m in channel.sent for p in decode_message(m) if is_echo_reply(p)]


async def main():
    settings = AgentSettings.model_validate({
        "agent_id": "hub", "tun": {"name": "ttun%d", "address": "10.85.0.1/24", "mtu": 1400,
                                   "forward_to": ["10.99.8.1/32"]},
        "peers": {"bob": {"allowed_ips": ["10.85.0.2/32"]},
                  "carol": {"allowed_ips": ["10.85.0.3/32"]}}})
    tunnel = Tunnel(settings)
    ends = {}
    for peer in ("bob", "carol"):
        transport, channel = TunTransport(), Channel()
        transport.attach_channel(channel)
        tunnel.attach(Session(peer), transport)
        ends[peer] = (transport, channel)
    for _ in range(200):  # configuration and both peers' routes (netlink in a thread)
        if len(tunnel.device.routes) == 2:
            break
        await asyncio.sleep(0.05)
    name = tunnel.device.name
    links_both = link_names()
    bob, bob_ch = ends["bob"]
    carol, carol_ch = ends["carol"]
    # bob: two echo requests in one batch, one spoofed from carol's address, one from the
    # hub's own address, garbage and text.
    bob_ch.emit("message", encode_batch([echo_request("10.85.0.2", "10.85.0.1", seq=1),
                                         echo_request("10.85.0.2", "10.85.0.1", seq=2)]))
    bob_ch.emit("message", echo_request("10.85.0.3", "10.85.0.1", seq=3))
    bob_ch.emit("message", echo_request("10.85.0.1", "10.85.0.1", seq=4))
    bob_ch.emit("message", echo_request("10.85.0.2", "10.99.9.1", seq=6))  # host, not tunnel
    bob_ch.emit("message", echo_request("10.85.0.2", "10.99.8.1", seq=7))  # in forward_to
    bob_ch.emit("message", b"\x00\x00\x09oops")
    bob_ch.emit("message", "text is not a packet")
    carol_ch.emit("message", echo_request("10.85.0.3", "10.85.0.1", seq=5))
    for ch, want in ((bob_ch, 3), (carol_ch, 1)):
        while len(replies(ch)) < want:
            await asyncio.wait_for(ch.got.wait(), 10)
            ch.got.clear()
    await asyncio.sleep(0.3)  # time for a reply to seq 6, were the packet let through
    bob_seqs = sorted(int.from_bytes(p[26:28], "big") for p in replies(bob_ch))
    carol_seqs = sorted(int.from_bytes(p[26:28], "big") for p in replies(carol_ch))
    bob_dsts = sorted({str(parse_header(p).dst_address) for p in replies(bob_ch)})
    status = {"bob": bob.tun_status(), "carol": carol.tun_status()}
    carol_ch.close()
    await asyncio.sleep(0.3)
    links_after_carol = link_names()
    bob_ch.close()
    await asyncio.sleep(0.1)
    report({"bob_seqs": bob_seqs, "carol_seqs": carol_seqs, "bob_dsts": bob_dsts,
            "status": status, "name": name, "links_both": links_both,
            "links_after_carol": links_after_carol, "links_after_all": link_names(),
            "device_after": tunnel.device is None})
    await tunnel.close()

asyncio.run(main())
"""
    with namespace("ttun") as ns:
        for address in ("10.99.9.1/32", "10.99.8.1/32"):  # other addresses of the host
            ns.run("ip", "addr", "add", address, "dev", "lo")
        r = run_child(ns, body)
    assert r["bob_seqs"] == [1, 2, 7]
    assert r["carol_seqs"] == [5]
    assert r["bob_dsts"] == ["10.85.0.2"]
    bob, carol = r["status"]["bob"], r["status"]["carol"]
    assert bob["device"] == carol["device"] == r["name"]
    assert bob["addresses"] == ["10.85.0.1/24"] and bob["mtu"] == 1400
    assert bob["allowed_ips"] == ["10.85.0.2/32"]
    assert bob["drops"] == {"source-not-allowed": 2, "destination-not-allowed": 1,
                            "malformed": 2}
    assert carol["drops"] == {}
    assert bob["packets_in"] == 3 and bob["packets_out"] == 3
    assert carol["packets_in"] == 1 and carol["packets_out"] == 1
    assert r["name"] in r["links_both"]
    assert r["name"] in r["links_after_carol"]  # bob still uses it
    assert r["name"] not in r["links_after_all"]  # gone with the last peer
    assert r["device_after"] is True


def test_no_tun_device_fails_the_session_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without /dev/net/tun (a path that does not exist stands in) the connect check raises
    and an incoming tun channel fails its session with the reason, sent in the bye."""
    original = TunDevice.create
    missing = tmp_path / "no-tun"
    monkeypatch.setattr(TunDevice, "create", classmethod(
        lambda cls, name="mvp-tun%d", **kw: original(name, path=missing)))

    class Session:
        peer_id = "bob"
        closed: tuple[str, bool, bool] | None = None

        async def close(self, reason: str = "", *, failed: bool = False,
                        send_bye: bool = False) -> None:
            self.closed = (reason, failed, send_bye)

    async def body() -> Session:
        tunnel = Tunnel(settings(address="10.85.0.1/24"))
        with pytest.raises(TunUnavailable, match="does not exist"):
            tunnel.check("bob", "tun")
        tunnel.check("bob", "chat")  # other modes are not its business
        session = Session()
        tunnel.attach(session, TunTransport())
        await asyncio.sleep(0.05)
        assert tunnel.device is None and not tunnel.peers
        await tunnel.close()
        return session

    session = asyncio.run(body())
    assert session.closed is not None
    reason, failed, send_bye = session.closed
    assert reason.startswith("TUN mode is unavailable on hub:") and "does not exist" in reason
    assert failed and send_bye
