"""TUN mode end to end: real daemons in network namespaces joined by veth pairs, a real
signaling server, real TUN devices, ping and TCP through the tunnel.

Each test builds its own namespaces and removes them (and every process in them). Root is
needed; without /dev/net/tun or network namespaces the tests skip and say why.
"""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e_tun.harness import Lab, dump_logs, ping, status_json, tun_lab, wait_until
from tests.impair import ping_stats
from tests.netns import require_tun

pytestmark = pytest.mark.root

#: 50 MiB, as the issue asks, for the clean-link transfer.
BIG_TRANSFER = 50 * 1024 * 1024
#: Under 20 ms delay and 5 % loss each way TCP through the tunnel moves only ~0.5-0.7 Mbit/s
#: (a 4000-byte tunnel packet is 4 SCTP packets, so ~19 % of them are lost, plus the lost
#: ACKs): 50 MiB would take ~12 minutes, 4 MiB ~50 s. 2 MiB (~30 s) still loses and recovers
#: hundreds of packets.
LOSSY_TRANSFER = 2 * 1024 * 1024
LOSSY_DELAY_MS = 20
LOSSY_LOSS_PERCENT = 5



def tun_config(address: str, **peers: str) -> str:
    """A config with ``tun.address`` and, for each peer, mode tun and its allowed IPs."""
    lines = [f"tun:\n  address: {address}\npeers:"]
    lines += [f"  {peer}: {{mode: tun, allowed_ips: [{ips}]}}" for peer, ips in peers.items()]
    return "\n".join(lines) + "\n"


TWO = {
    "alice": tun_config("10.77.0.1/24", bob="10.77.0.2/32"),
    "bob": tun_config("10.77.0.2/24", alice="10.77.0.1/32"),
}

# A TCP sender and receiver with sha256, run with this project's Python inside namespaces.
RECEIVER = """
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5201)); srv.listen(1); srv.settimeout(60)
print("listening", flush=True)
conn, _ = srv.accept(); conn.settimeout(120)
h = hashlib.sha256(); n = 0
while chunk := conn.recv(1 << 16):
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""
SENDER = """
import hashlib, os, socket, sys
size = int(sys.argv[2]); rnd = __import__("random").Random(7)
h = hashlib.sha256(); s = socket.create_connection((sys.argv[1], 5201), timeout=60)
s.settimeout(120); left = size
while left:
    chunk = rnd.randbytes(min(left, 1 << 16)); s.sendall(chunk); h.update(chunk)
    left -= len(chunk)
s.shutdown(socket.SHUT_WR); s.recv(1); print(size, h.hexdigest(), flush=True)
"""


def transfer(lab: Lab, sender: str, receiver: str, address: str, size: int,
             timeout: float) -> None:
    """Send ``size`` random bytes over TCP through the tunnel; both ends' sha256 agree."""
    rx = lab[receiver].ns.popen(sys.executable, "-c", RECEIVER, address)
    try:
        assert rx.stdout is not None
        assert rx.stdout.readline().strip() == "listening"
        tx = lab[sender].ns.run(sys.executable, "-c", SENDER, address, str(size),
                                timeout=timeout)
        out, err = rx.communicate(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait(5)
    assert out.split() == tx.stdout.split(), f"{out} {err}\n{dump_logs(lab)}"
    assert int(out.split()[0]) == size


def test_ping_both_ways_status_and_disconnect_removes_the_device(tmp_path: Path) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice, bob = lab["alice"], lab["bob"]
        assert alice.tun_links() == [] and bob.tun_links() == []
        lab.connect("alice", "bob")
        ping(alice.ns, "10.77.0.2")
        ping(bob.ns, "10.77.0.1")
        [device] = alice.tun_links()
        status = status_json(alice)
        [peer] = status["peers"]
        tun = peer["tun"]
        assert tun["device"] == device
        assert tun["addresses"] == ["10.77.0.1/24"]
        assert tun["allowed_ips"] == ["10.77.0.2/32"]  # as configured; never a default
        assert tun["packets_in"] >= 6 and tun["packets_out"] >= 6
        assert tun["bytes_in"] > 0 and tun["bytes_out"] > 0
        text = alice.ctl("status")
        assert text.returncode == 0 and f"tun {device} (10.77.0.1/24" in text.stdout
        # Device routes: the tunnel subnet (the kernel's, from the address) and bob's.
        routes = {r["dst"] for r in alice.ns.ip_json("route", "show", "dev", device)}
        assert {"10.77.0.0/24", "10.77.0.2"} <= routes, routes

        alice.call("disconnect", peer="bob")
        wait_until(lambda: alice.tun_links() == [] and bob.tun_links() == [], 15,
                   what="both devices to go after disconnect")


def test_sigkill_leaves_no_device_and_a_restart_works(tmp_path: Path) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice = lab["alice"]
        lab.connect("alice", "bob")
        assert len(alice.tun_links()) == 1
        alice.signal(signal.SIGKILL)
        assert alice.tun_links() == []  # not persistent: the kernel removed it with the fd
        alice.start(lab.url)
        assert alice.tun_links() == []
        lab.connect("alice", "bob")
        ping(alice.ns, "10.77.0.2")
        alice.stop()
        assert alice.tun_links() == []  # and on a clean stop


def test_spoofed_sources_and_malformed_packets_are_dropped_and_counted(tmp_path: Path) -> None:
    """bob's daemon gets crafted packets into its TUN device (as if its kernel routed them to
    alice): the spoofed ones reach alice's filter, which drops and counts them."""
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice, bob = lab["alice"], lab["bob"]
        lab.connect("alice", "bob")
        ping(bob.ns, "10.77.0.1", count=1)
        # A raw socket in bob's namespace sends packets with a forged source into the tunnel
        # (IP_HDRINCL): 10.99.0.5 is outside bob's allowed IPs (10.77.0.2/32) and 10.77.0.1
        # is alice's own tunnel address.
        code = textwrap.dedent("""
            import socket
            from tests.tun.test_device import PRELUDE
            exec(PRELUDE)
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            for src in ["10.99.0.5"] * 4 + ["10.77.0.1"] * 3:
                s.sendto(echo_request(src, "10.77.0.1"), ("10.77.0.1", 0))
        """)
        bob.ns.python(code)

        def drops() -> dict[str, int]:
            peer = alice.peer("bob") or {}
            return dict((peer.get("tun") or {}).get("drops") or {})

        wait_until(lambda: drops().get("source-not-allowed", 0) >= 7, 10,
                   what="7 spoofed packets counted")
        assert drops()["source-not-allowed"] == 7
        peer = alice.peer("bob")
        assert peer is not None and peer["dropped"].get("source-not-allowed") == 7
        ping(bob.ns, "10.77.0.1", count=1)  # real traffic still flows


def test_two_tun_peers_share_one_device(tmp_path: Path) -> None:
    require_tun()
    configs = {
        "hub": textwrap.dedent("""
            tun:
              address: 10.77.0.1/24
            peers:
              bob: {allowed_ips: [10.77.0.2/32]}
              carol: {allowed_ips: [10.77.0.3/32, 10.88.0.0/24]}
        """),
        "bob": tun_config("10.77.0.2/24", hub="10.77.0.1/32"),
        "carol": tun_config("10.77.0.3/24", hub="10.77.0.1/32"),
    }
    with tun_lab(tmp_path, ["hub", "bob", "carol"], configs) as lab:
        hub = lab["hub"]
        lab.connect("hub", "bob")
        lab.connect("carol", "hub")
        [device] = hub.tun_links()
        ping(hub.ns, "10.77.0.2")
        ping(hub.ns, "10.77.0.3")
        ping(lab["bob"].ns, "10.77.0.1")
        ping(lab["carol"].ns, "10.77.0.1")
        routes = {r["dst"] for r in hub.ns.ip_json("route", "show", "dev", device)}
        assert {"10.77.0.2", "10.77.0.3", "10.88.0.0/24"} <= routes, routes
        bob_status = (hub.peer("bob") or {})["tun"]
        carol_status = (hub.peer("carol") or {})["tun"]
        assert bob_status["device"] == carol_status["device"] == device
        assert sorted(carol_status["allowed_ips"]) == ["10.77.0.3/32", "10.88.0.0/24"]
        # carol goes: her routes go, the device stays for bob.
        lab["carol"].call("disconnect", peer="hub")
        wait_until(lambda: hub.peer("carol") is None, 15, what="carol to leave")
        wait_until(lambda: "10.88.0.0/24" not in {
            r["dst"] for r in hub.ns.ip_json("route", "show", "dev", device)}, 10,
            what="carol's routes to go")
        assert hub.tun_links() == [device]
        ping(hub.ns, "10.77.0.2", count=1)
        hub.call("disconnect", peer="bob")
        wait_until(lambda: hub.tun_links() == [], 15, what="the device to go with bob")


def test_a_peer_without_tun_support_fails_clearly_and_the_daemon_carries_on(
    tmp_path: Path,
) -> None:
    """bob's daemon runs where /dev/net/tun does not exist (an empty /dev/net in a mount
    namespace of its own, as on a machine without the tun module): the tun session fails
    with bob's reason; both daemons keep serving and still connect in chat mode."""
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        alice, bob = lab["alice"], lab["bob"]
        bob.stop()
        bob.start(lab.url, hide_tun=True)
        # bob's refusal comes as a bye right after the channel opens (the mode travels in
        # the channel, so bob learns it only then): the connect fails, or the session ends
        # at once with bob's reason (also between the connect and its status reply: then
        # the connect says the session is gone).
        done = alice.ctl("connect", "bob", "--mode", "tun", "--timeout", "20")
        if done.returncode != 0:
            assert ("TUN mode is unavailable on bob" in done.stderr
                    or "not connected to bob" in done.stderr), done.stderr
        wait_until(lambda: alice.peer("bob") is None, 15, what="alice's session to end")
        # bob says why in its log; alice gets it in the bye (unless the closing channel
        # outruns the bye through the signaling server).
        wait_until(lambda: "TUN mode is unavailable on bob" in bob.log_tail(20000), 5,
                   what="the reason in bob's log")
        assert "/dev/net/tun does not exist" in bob.log_tail(20000)
        # Connecting *from* bob fails at once, before any offer.
        done = bob.ctl("connect", "alice", "--mode", "tun")
        assert done.returncode != 0 and "does not exist" in done.stderr, done.stderr
        assert alice.tun_links() == []
        status = alice.call("connect", peer="bob", mode="chat", wait=True)
        assert status["state"] == "connected"


def test_50_mib_tcp_through_the_tunnel(tmp_path: Path) -> None:
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO) as lab:
        lab.connect("alice", "bob")
        ping(lab["alice"].ns, "10.77.0.2", count=1)
        transfer(lab, "alice", "bob", "10.77.0.2", BIG_TRANSFER, timeout=120)


def test_tcp_through_the_tunnel_over_a_lossy_link(tmp_path: Path) -> None:
    """The link under the tunnel gets 20 ms delay and 5 % loss each way: netem where the
    kernel has it, else the forwarder of tests/impair.py in a router namespace."""
    require_tun()
    with tun_lab(tmp_path, ["alice", "bob"], TWO, impairable=True) as lab:
        lab.connect("alice", "bob")
        lab.impair(f"delay {LOSSY_DELAY_MS}ms loss {LOSSY_LOSS_PERCENT}%")
        # The impairment really applies: over the bare link (bob to the hub's veth address,
        # outside the tunnel) no round trip is shorter than twice the one-way delay, and some
        # of 200 pings are lost (each survives with 0.95 ** 2: none lost has p ~ 1e-9).
        raw = ping_stats(lab["bob"].ns, "10.201.1.1", count=200)
        assert raw.received > 0 and raw.rtt_min_ms >= 2 * LOSSY_DELAY_MS * 0.95, raw
        assert raw.lost > 0, raw
        ping(lab["bob"].ns, "10.77.0.1", count=3)
        transfer(lab, "bob", "alice", "10.77.0.1", LOSSY_TRANSFER, timeout=240)


def test_an_unconfigured_peer_offering_tun_is_refused(tmp_path: Path) -> None:
    """mallory, in no config of alice's, offers a tun channel (alice answers everyone,
    allowed_peers "*"): alice refuses the mode, says why in the bye, counts it, and gives
    mallory no device, no route and no ping reply, whether or not bob is connected. A
    reload that would give a tun peer no allowed_ips is refused."""
    require_tun()
    configs = {
        **TWO,
        # mallory claims bob's tunnel address and grants alice tun mode on her side.
        "mallory": tun_config("10.77.0.2/24", alice="10.77.0.1/32"),
    }
    # bob is the lab's hub and routes between alice and mallory, so they are not neighbours
    # (alice's kernel would answer a ping for 10.77.0.1 from her own link).
    with tun_lab(tmp_path, ["bob", "alice", "mallory"], configs) as lab:
        alice, mallory = lab["alice"], lab["mallory"]
        lab["bob"].ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        alice_config = tmp_path / "alice.yaml"

        def mallory_tries() -> None:
            # The refusal comes as a bye once the channel is open (the mode travels in the
            # channel), so the connect itself may or may not see the session connected.
            mallory.ctl("connect", "alice", "--mode", "tun", "--timeout", "20")
            wait_until(lambda: mallory.peer("alice") is None and alice.peer("mallory") is None,
                       15, what="mallory's session to end on both sides")
            assert mallory.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "1", "10.77.0.1",
                                  check=False).returncode != 0

        mallory_tries()  # bob offline: his address is not free for the taking
        assert alice.tun_links() == []
        wait_until(lambda: "alice said bye: tun mode refused" in mallory.log_tail(20000), 10,
                   what="alice's reason in mallory's log (from the bye)")
        log = alice.log_tail(20000)
        assert "peer mallory: refusing tun mode" in log, log
        assert log.count("event=offer-refused") == 1, log
        assert alice.call("status")["refused_offers"] == {"mode-not-granted": 1}

        lab.connect("alice", "bob")
        mallory_tries()  # bob online: the device exists, mallory still gets no part of it
        [device] = alice.tun_links()
        routes = {r["dst"] for r in alice.ns.ip_json("route", "show", "dev", device)}
        assert routes == {"10.77.0.0/24", "10.77.0.2"}, routes
        assert alice.call("status")["refused_offers"] == {"mode-not-granted": 2}
        ping(lab["bob"].ns, "10.77.0.1", count=1)  # bob is unaffected

        alice_config.write_text(alice_config.read_text() + "  carol: {mode: tun}\n")
        result = alice.call("reload")
        assert any("peers.carol is in tun mode without allowed_ips" in item
                   for item in result["not_applied"]), result


def test_prefix_overlap_with_a_joined_peer_is_refused(tmp_path: Path) -> None:
    """bob has joined with 10.77.0.2/32; a reload moves bob to 10.77.0.4/32 and gives carol
    10.77.0.2/31, which is a valid config but overlaps what bob still holds: carol's tun
    connection is refused with the reason, and bob keeps his address. A later reload that
    drops bob's entry takes his place on the device away."""
    require_tun()
    configs = {
        "alice": tun_config("10.77.0.1/24", bob="10.77.0.2/32"),
        "bob": tun_config("10.77.0.2/24", alice="10.77.0.1/32"),
        "carol": tun_config("10.77.0.3/24", alice="10.77.0.1/32"),
    }
    with tun_lab(tmp_path, ["alice", "bob", "carol"], configs) as lab:
        alice, carol = lab["alice"], lab["carol"]
        lab.connect("alice", "bob")
        (tmp_path / "alice.yaml").write_text(
            tun_config("10.77.0.1/24", bob="10.77.0.4/32", carol="10.77.0.2/31"))
        assert alice.call("reload")["applied"] == ["peers"]
        # The refusal comes once the channel is open: the connect may or may not see it open.
        carol.ctl("connect", "alice", "--mode", "tun", "--timeout", "20")
        wait_until(lambda: alice.peer("carol") is None, 15, what="carol's session to end")
        assert "overlaps the allowed IPs of tun peer bob" in alice.log_tail(20000)
        assert (alice.peer("bob") or {})["tun"]["allowed_ips"] == ["10.77.0.2/32"]
        ping(alice.ns, "10.77.0.2", count=1)
        # A reload that takes bob's tun access away: his next packet (or one for him) ends it.
        (tmp_path / "alice.yaml").write_text(tun_config("10.77.0.1/24", carol="10.77.0.3/32"))
        assert alice.call("reload")["applied"] == ["peers"]
        done = alice.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "1", "10.77.0.2", check=False)
        assert done.returncode != 0, done.stdout
        wait_until(lambda: alice.peer("bob") is None, 15, what="bob's session to end")
        assert "TUN mode was withdrawn from this peer" in alice.log_tail(20000)
        assert alice.tun_links() == []


def test_a_peer_reaches_only_the_tunnel_address_of_the_host(tmp_path: Path) -> None:
    """bob's config routes another address of alice's host (10.203.0.1 on alice's loopback)
    into the tunnel, and bob pings it from his tunnel address, a source he is allowed:
    alice's kernel would answer (Linux accepts packets for any local address on any
    interface), so alice drops such packets and counts them; bob still reaches 10.77.0.1."""
    require_tun()
    configs = {**TWO, "bob": tun_config("10.77.0.2/24", alice="10.77.0.1/32, 10.203.0.1/32")}
    with tun_lab(tmp_path, ["alice", "bob"], configs) as lab:
        alice, bob = lab["alice"], lab["bob"]
        lab.connect("alice", "bob")
        ping(bob.ns, "10.77.0.1", count=1)
        # Only now: as an ICE candidate it could carry the tunnel itself.
        alice.ns.run("ip", "addr", "add", "10.203.0.1/32", "dev", "lo")
        done = bob.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "1", "10.203.0.1", check=False)
        assert done.returncode != 0, done.stdout

        def drops() -> dict[str, int]:
            return dict(((alice.peer("bob") or {}).get("tun") or {}).get("drops") or {})

        wait_until(lambda: drops().get("destination-not-allowed", 0) >= 3, 10,
                   what="3 packets for another host address counted")
        ping(bob.ns, "10.77.0.1", count=1)
