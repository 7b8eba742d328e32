"""Candidates inside networks ICE must not use (the host's tunnels) are left out: ours are
never offered and their sockets closed, the peer's are ignored, and checks from such
addresses get no answer (no peer-reflexive candidate is learnt from them)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

import pytest
from aioice import stun
from aioice.ice import get_host_addresses

from mvpd.proto.ippacket import IPNetwork
from mvpd.rtc.connection import IceConfiguration, PeerConnection
from mvpd.rtc.excluded_networks import ExcludedNetworks
from tests.rtc.stackpair import close_all, open_pair


def run(body: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def host_network(address: str) -> IPNetwork:
    return ipaddress.ip_network(address)  # the address alone: /32 or /128


def test_excluded_networks_are_asked_for_once_and_answer_by_address() -> None:
    calls = []

    def source() -> list[IPNetwork]:
        calls.append(1)
        return [ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("fd77::/64")]

    excluded = ExcludedNetworks(source)
    assert calls == []  # not before it is needed
    assert excluded.holding("10.77.0.9") == ipaddress.ip_network("10.77.0.0/24")
    assert excluded.holding("fd77::2%mvp-tun0") == ipaddress.ip_network("fd77::/64")
    for outside in ("10.77.1.1", "192.0.2.1", "fd78::1", "abc.local", "", None, "::ffff"):
        assert excluded.holding(outside) is None
    assert calls == [1]


def test_an_excluded_address_is_never_offered_and_the_peers_is_ignored() -> None:
    """One host address is "a tunnel's": ours (A) is not offered, the peer's (B) candidate
    there is ignored, and the connection uses another address."""
    addresses = get_host_addresses(use_ipv4=True, use_ipv6=True)
    if len(addresses) < 2:
        pytest.skip(f"needs two interface addresses besides loopback, has {addresses}")
    tunnel = addresses[0]

    async def body() -> None:
        a = PeerConnection(IceConfiguration(),
                           excluded_networks=lambda: [host_network(tunnel)])
        b = PeerConnection(IceConfiguration())
        try:
            await open_pair(a, b)
            offered = {c.ip for c in a.local_candidates()}
            assert tunnel not in offered and offered
            assert a.local_candidates_excluded == 1
            # B offered the address too (same host); A never took it.
            assert tunnel in {c.ip for c in b.local_candidates()}
            assert tunnel not in {c.ip for c in a.remote_candidates()}
            assert a.remote_candidates_excluded >= 1
            # B never heard of A's: its candidates on that address are B's own.
            assert tunnel not in {c.ip for c in b.remote_candidates()}
            pair = a.selected_pair()
            assert pair is not None
            assert tunnel not in (pair.local.address, pair.remote.address)
            assert a.stats()["local_candidates_excluded"] == 1
        finally:
            await close_all(a, b)

    run(body)


def binding_request(ufrag: str, password: str) -> bytes:
    """An authenticated ICE connectivity check for the agent with ``ufrag`` and
    ``password`` (as its SDP gives them)."""
    request = stun.Message(message_method=stun.Method.BINDING,
                           message_class=stun.Class.REQUEST)
    request.attributes["USERNAME"] = f"{ufrag}:peer"
    request.attributes["PRIORITY"] = 1853824767
    request.attributes["ICE-CONTROLLING"] = 1
    request.add_message_integrity(password.encode())
    request.add_fingerprint()
    return bytes(request)


def answered(source: str, target: tuple[str, int], request: bytes) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(1.0)
        sock.sendto(request, target)
        try:
            sock.recvfrom(2048)
        except TimeoutError:
            return False
        return True


def test_a_check_from_an_excluded_address_gets_no_answer() -> None:
    """A valid check from 127.0.0.1 (excluded here) goes unanswered and is counted; the
    same check from an address that is not excluded is answered."""
    ipv4 = get_host_addresses(use_ipv4=True, use_ipv6=False)
    if not ipv4:
        pytest.skip("needs an IPv4 interface address besides loopback")

    async def body() -> None:
        a = PeerConnection(IceConfiguration(),
                           excluded_networks=lambda: [ipaddress.ip_network("127.0.0.0/8")])
        try:
            offer = await a.createOffer()
            lines = offer.sdp.splitlines()
            ufrag = next(x.split(":", 1)[1] for x in lines if x.startswith("a=ice-ufrag:"))
            pwd = next(x.split(":", 1)[1] for x in lines if x.startswith("a=ice-pwd:"))
            [target] = [(c.ip, c.port) for c in a.local_candidates() if c.ip == ipv4[0]]
            request = binding_request(ufrag, pwd)
            loop = asyncio.get_running_loop()
            assert not await loop.run_in_executor(None, answered, "127.0.0.1", target, request)
            assert a.remote_candidates_excluded == 1
            assert await loop.run_in_executor(None, answered, ipv4[0], target, request)
            assert a.remote_candidates_excluded == 1
        finally:
            await a.close()

    run(body)
