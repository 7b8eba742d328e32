"""The TUN datagram path end to end: real daemons in namespaces, packets as protected datagrams
on the ICE pair; a replayed and a tampered datagram on the wire; a peer without the feature;
keys per connection; many rekeys under TCP load."""

from __future__ import annotations

import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_tun.harness import Host, Lab, ping, status_json, tun_lab, wait_until
from tests.e2e_tun.test_tun_e2e import TWO, transfer
from tests.netns import require_tun

pytestmark = pytest.mark.root

#: 200 MiB as the issue asks; through the datagram path it takes 10-40 s on this busy 2-core
#: machine (not marked slow: under 60 s).
DATAGRAM_TRANSFER = 200 * 1024 * 1024
#: ``mvpd`` with the datagram path turned off: an mvpd without the feature.
MVPD_WITHOUT_DATAGRAMS = (
    sys.executable, "-c",
    "import mvpd.tun.ice_datagrams as d; d.ENABLED = False\nfrom mvpd.cli import main; main()",
)
#: A new datagram key every this many packets instead of every 2^23, in both daemons of
#: :func:`test_many_rekeys_under_tcp_load` (``mvpd.tun.datagram.REKEY_AFTER``).
FAST_REKEY_PACKETS = 128
MVPD_FAST_REKEY = (
    sys.executable, "-c",
    f"import mvpd.tun.datagram as d; d.REKEY_AFTER = {FAST_REKEY_PACKETS}\n"
    "from mvpd.cli import main; main()",
)
#: ~49,000 full-size packets one way (~380 epochs: the header's epoch byte wraps), and the
#: ACKs the other way (2,500-4,000: TCP acknowledges many segments at once here; 20-30).
REKEY_TRANSFER = 64 * 1024 * 1024
#: Replayed or undecryptable datagrams tolerated per end while epochs change: none should be
#: (a veth does not reorder), but a stray one must not fail the test.
REKEY_DROPS_BOUND = 2


def datagram_status(host: Host, peer: str) -> dict[str, Any]:
    tun = (host.peer(peer) or {}).get("tun") or {}
    return {"path": tun.get("path"), **(tun.get("datagram") or {})}


def wait_for_datagrams(lab: Lab, a: str, b: str) -> None:
    """Both ends use the datagram path (the hello exchange is done)."""
    for host, peer in ((lab[a], b), (lab[b], a)):
        wait_until(lambda h=host, p=peer: datagram_status(h, p)["path"] == "datagram", 15,
                   what=f"{host.agent_id} to use datagrams")


# Captures one outgoing datagram of ours (first byte 12) on a device: prints dst, port, hex.
SNIFFER = textwrap.dedent("""
    import socket, struct, sys
    # ETH_P_ALL: outgoing packets only reach packet sockets of every protocol.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
    s.bind((sys.argv[1], 3)); s.settimeout(20)
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(65535)
        if addr[1] != 0x0800 or addr[2] != socket.PACKET_OUTGOING or data[9] != 17:
            continue
        ihl = (data[0] & 15) * 4
        payload = data[ihl + 8:]
        if payload[:1] == b"\\x0c" and len(payload) > 60:
            dst = socket.inet_ntoa(data[16:20])
            port = struct.unpack("!H", data[ihl + 2:ihl + 4])[0]
            print(dst, port, payload.hex(), flush=True)
            break
""")
INJECT = textwrap.dedent("""
    import socket, sys
    dst, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(payload, (dst, port))  # replayed as is
    counter = int.from_bytes(payload[4:12], "big") + 1_000_000
    s.sendto(payload[:4] + counter.to_bytes(8, "big") + payload[12:], (dst, port))  # tampered
""")


def test_200_mib_tcp_through_the_datagram_path(tmp_path: Path) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice, bob = lab["alice"], lab["bob"]
        lab.connect("alice", "bob")
        wait_for_datagrams(lab, "alice", "bob")
        transfer(lab, "alice", "bob", "10.77.0.2", DATAGRAM_TRANSFER, timeout=240)
        sent = datagram_status(alice, "bob")
        got = datagram_status(bob, "alice")
        # Nearly every packet went as a datagram (the inner MTU 1420 fits one).
        assert got["packets_in"] > DATAGRAM_TRANSFER // 1500
        assert sent["packets_out"] >= got["packets_in"]
        assert got["replayed"] == 0 and got["undecryptable"] == 0
        text = alice.ctl("status")
        assert text.returncode == 0 and "path datagrams on host" in text.stdout, text.stdout
        assert status_json(alice)["peers"][0]["tun"]["path"] == "datagram"


def test_replayed_and_tampered_datagrams_are_dropped_and_counted(tmp_path: Path) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice, bob = lab["alice"], lab["bob"]
        lab.connect("alice", "bob")
        wait_for_datagrams(lab, "alice", "bob")
        dev = lab.links[0].dev_a  # type: ignore[union-attr]
        sniffer = alice.ns.popen(sys.executable, "-c", SNIFFER, dev)
        assert sniffer.stdout is not None
        assert sniffer.stdout.readline().strip() == "ready"
        pinger = threading.Thread(target=ping, args=(alice.ns, "10.77.0.2", 5))
        pinger.start()
        try:
            dst, port, payload = sniffer.stdout.readline().split()
        finally:
            pinger.join()
            sniffer.kill()
            sniffer.wait(5)
        before = datagram_status(bob, "alice")
        alice.ns.run(sys.executable, "-c", INJECT, dst, port, payload)
        wait_until(lambda: datagram_status(bob, "alice")["undecryptable"]
                   > before["undecryptable"], 10, what="the tampered datagram counted")
        after = datagram_status(bob, "alice")
        assert after["replayed"] == before["replayed"] + 1
        assert after["undecryptable"] == before["undecryptable"] + 1
        assert after["packets_in"] == before["packets_in"]  # neither reached the device
        ping(alice.ns, "10.77.0.2", count=1)  # and the path still works


def test_a_peer_without_the_feature_falls_back_to_the_channel_and_pings(
    tmp_path: Path,
) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice, bob = lab["alice"], lab["bob"]
        bob.stop()
        bob.start(lab.url, mvpd=MVPD_WITHOUT_DATAGRAMS)
        lab.connect("alice", "bob")
        ping(alice.ns, "10.77.0.2")
        ping(bob.ns, "10.77.0.1")
        ours = datagram_status(alice, "bob")
        assert ours["path"] == "channel"
        assert "has not answered" in ours["unavailable"]
        assert ours["packets_in"] == ours["packets_out"] == 0
        assert datagram_status(bob, "alice") == {"path": "channel", "unavailable": "turned off"}
        text = alice.ctl("status")
        assert "path data channel (the peer has not answered" in text.stdout, text.stdout


def test_each_connection_has_its_own_keys(tmp_path: Path) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice, bob = lab["alice"], lab["bob"]
        sessions = []
        for _ in range(2):
            lab.connect("alice", "bob")
            wait_for_datagrams(lab, "alice", "bob")
            ping(alice.ns, "10.77.0.2", count=1)
            ours, theirs = datagram_status(alice, "bob"), datagram_status(bob, "alice")
            assert ours["session_id"] == theirs["session_id"]
            sessions.append(ours["session_id"])
            alice.call("disconnect", peer="bob")
            wait_until(lambda: alice.peer("bob") is None and bob.peer("alice") is None, 15,
                       what="both sessions to end")
        assert sessions[0] != sessions[1]


def test_many_rekeys_under_tcp_load(tmp_path: Path) -> None:
    """Both ends change datagram keys every 128 packets while 64 MiB of TCP run through the
    tunnel: the data goes through intact, each receiver follows its sender's epochs, and
    nothing is dropped as replayed or undecryptable."""
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO, mvpd=MVPD_FAST_REKEY) as lab:
        alice, bob = lab["alice"], lab["bob"]
        lab.connect("alice", "bob")
        wait_for_datagrams(lab, "alice", "bob")
        transfer(lab, "alice", "bob", "10.77.0.2", REKEY_TRANSFER, timeout=240)
        ours, theirs = datagram_status(alice, "bob"), datagram_status(bob, "alice")
        assert theirs["packets_in"] > REKEY_TRANSFER // 1500  # as datagrams, not the channel
        assert ours["send_epoch"] > 256  # past the epoch byte's wrap
        for sender, receiver in ((ours, theirs), (theirs, ours)):
            # The data one way, the ACKs the other: several epochs each.
            assert sender["send_epoch"] >= 10, sender
            assert sender["send_epoch"] >= sender["packets_out"] // FAST_REKEY_PACKETS - 1
            assert sender["rekeys"] == sender["send_epoch"]
            assert receiver["receive_epoch"] == sender["send_epoch"], (sender, receiver)
            assert receiver["replayed"] + receiver["undecryptable"] <= REKEY_DROPS_BOUND, receiver
        ping(alice.ns, "10.77.0.2", count=1)  # and the path still works in the last epoch
