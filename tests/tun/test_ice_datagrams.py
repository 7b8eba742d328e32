"""The datagram path on real aiortc peer connections over loopback: keys from the DTLS exporter,
the hello exchange, packets both ways beside a working data channel, a peer without the
feature, replay and tamper on the wire, unhooking."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from mvpd.tun import ice_datagrams
from mvpd.tun.datagram import EXPORTER_LABEL, EXPORTER_LENGTH, OVERHEAD, PACKET_TYPE
from mvpd.tun.ice_datagrams import IceDatagramSocket
from mvpd.tun.link import DatagramLink
from tests.e2e.harness import TurnServer
from tests.peerlink import run

PACKET = bytes([0x45]) + os.urandom(99)


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def channel_pair(
    config: RTCConfiguration | None = None,
) -> AsyncIterator[tuple[Any, Any]]:
    """Two real peer connections on loopback with an open unordered channel each way."""
    config = config or RTCConfiguration(iceServers=[])
    a, b = RTCPeerConnection(config), RTCPeerConnection(config)
    try:
        ch_a = a.createDataChannel("tun", ordered=False, maxRetransmits=0, protocol="tun")
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        b.on("datachannel", lambda ch: got.set_result(ch))
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        ch_b = await asyncio.wait_for(got, 20)
        await wait_for(lambda: ch_a.readyState == "open" and ch_b.readyState == "open", 20)
        yield ch_a, ch_b
    finally:
        await a.close()
        await b.close()


async def channel_works(sender: Any, receiver: Any) -> None:
    """A message on the data channel still arrives (DTLS and SCTP are untouched)."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_message(message: bytes) -> None:
        if not got.done():
            got.set_result(message)

    receiver.on("message", on_message)
    for _ in range(20):  # unordered, maxRetransmits=0: may need a resend
        sender.send(b"over sctp")
        try:
            assert await asyncio.wait_for(asyncio.shield(got), 0.5) == b"over sctp"
            return
        except asyncio.TimeoutError:
            continue
    raise AssertionError("the data channel stopped carrying messages")


def test_exporter_material_equal_on_both_ends_and_roles_opposite() -> None:
    async def body() -> None:
        async with channel_pair() as (ch_a, ch_b):
            sa = IceDatagramSocket.for_channel(ch_a, lambda d: None)
            sb = IceDatagramSocket.for_channel(ch_b, lambda d: None)
            ma = sa.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH)
            mb = sb.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH)
            assert ma == mb and len(ma) == EXPORTER_LENGTH
            assert sa.dtls_client != sb.dtls_client
            assert sa.max_datagram_size() == 1500 - 20 - 8  # IPv4 host pair on loopback
            assert sa.local_type() == "host"
            sa.close()
            sb.close()

    run(body())


def test_links_confirm_each_other_and_carry_packets_both_ways() -> None:
    async def body() -> None:
        async with channel_pair() as (ch_a, ch_b):
            got_a: list[bytes] = []
            got_b: list[bytes] = []
            la = DatagramLink.open(ch_a, got_a.append)
            lb = DatagramLink.open(ch_b, got_b.append)
            await wait_for(lambda: la.active and lb.active)
            assert la.protection.session_id == lb.protection.session_id
            big = bytes([0x45]) + bytes(la.max_packet_size)  # one byte too many
            assert la.send_packets([PACKET, big]) == [big]
            assert lb.send_packets([PACKET] * 50) == []
            await wait_for(lambda: len(got_b) == 1 and len(got_a) == 50)
            assert got_b == [PACKET]
            # A host pair: straight on the UDP socket, the 50 in one segmented send.
            [sender] = lb.sock.batch_senders()
            assert sender.gso and sender.sent >= 50 and sender.calls < sender.sent
            assert la.status()["packets_out"] == 1 and lb.status()["packets_in"] == 1
            await channel_works(ch_a, ch_b)
            la.close()
            lb.close()

    run(body())


def test_a_peer_without_the_feature_never_confirms_and_the_channel_keeps_working() -> None:
    async def body() -> None:
        async with channel_pair() as (ch_a, ch_b):
            la = DatagramLink.open(ch_a, lambda p: None)
            await asyncio.sleep(1.2)  # several hellos went to b's DTLS demux, which ignores them
            assert not la.active
            assert la.protection.stats.packets_in == 0
            await channel_works(ch_a, ch_b)
            await channel_works(ch_b, ch_a)
            la.close()

    run(body())


def test_replayed_and_tampered_datagrams_on_the_wire_are_dropped_and_counted() -> None:
    async def body() -> None:
        async with channel_pair() as (ch_a, ch_b):
            got_b: list[bytes] = []
            la = DatagramLink.open(ch_a, lambda p: None)
            lb = DatagramLink.open(ch_b, got_b.append)
            await wait_for(lambda: la.active and lb.active)
            wire: list[bytes] = []
            send = la.sock.send

            def recording(datagrams: Any) -> int:
                wire.extend(datagrams)
                return send(datagrams)

            la.sock.send = recording  # type: ignore[method-assign]
            la.send_packets([PACKET])
            await wait_for(lambda: len(got_b) == 1)
            (datagram,) = wire
            assert datagram[0] == PACKET_TYPE and len(datagram) == len(PACKET) + OVERHEAD
            send([datagram])  # replayed
            tampered = bytearray(la.protection.seal(PACKET))  # a fresh counter, then altered
            tampered[-1] ^= 0x80
            send([bytes(tampered)])
            stats = lb.protection.stats
            await wait_for(lambda: stats.replayed + stats.undecryptable >= 2, 3)
            assert (stats.replayed, stats.undecryptable) == (1, 1), stats
            assert got_b == [PACKET]
            la.close()
            lb.close()

    run(body())


def test_close_restores_aioice_and_refuses_a_second_hook() -> None:
    async def body() -> None:
        async with channel_pair() as (ch_a, ch_b):
            protocols = ch_a.transport.transport.transport._connection._protocols
            assert protocols
            sock = IceDatagramSocket.for_channel(ch_a, lambda d: None)
            assert all("datagram_received" in vars(p) for p in protocols)
            with pytest.raises(LookupError, match="already hooked"):
                IceDatagramSocket.for_channel(ch_a, lambda d: None)
            assert sock.send([bytes([PACKET_TYPE]) * 40]) == 0
            [sender] = sock.batch_senders()
            sock.close()
            assert sender._sock.fileno() == -1  # its duplicate of aioice's socket is closed
            assert not any("datagram_received" in vars(p) for p in protocols)
            assert sock.send([b"x"]) == 1  # closed: nothing is sent
            await channel_works(ch_a, ch_b)

    run(body())


@pytest.mark.parametrize("unsupported", [("aioice", "0.14.1"), ("aiortc", "1.17.0")])
def test_the_peer_connections_version_gate_refuses_the_datagram_path_too(
    unsupported: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One gate: with an aioice or aiortc installed whose insides mvpd does not know, the
    tunnel's datagram path is refused with aiortc_internals' reason and fix, as a new peer
    connection is, and nothing is hooked; with the supported one back, it opens."""
    from mvpd.rtc import aiortc_internals as internals
    from mvpd.rtc.errors import UnsupportedLibrary
    from tests.rtc.stackpair import close_all, open_pair, our_peer

    name, installed = unsupported
    real_version = importlib.metadata.version

    def version(distribution: str) -> str:
        return installed if distribution == name else real_version(distribution)

    async def body() -> None:
        a, b = our_peer(), our_peer()
        try:
            ch_a, _, _, _ = await open_pair(a, b)
            protocols = a.ice_transport._connection._protocols
            receivers = [vars(p).get("datagram_received") for p in protocols]
            with monkeypatch.context() as patched:
                patched.setattr(internals, "_checked", False)  # it checks once per process
                patched.setattr(importlib.metadata, "version", version)
                refused = rf"{name} {installed} is installed.*pip install '{name}>="
                with pytest.raises(LookupError, match=refused):
                    DatagramLink.open(ch_a, lambda p: None)
                with pytest.raises(UnsupportedLibrary, match=refused):
                    our_peer()
            assert [vars(p).get("datagram_received") for p in protocols] == receivers
            la = DatagramLink.open(ch_a, lambda p: None)
            la.close()
        finally:
            await close_all(a, b)

    run(body())


def test_the_datagram_path_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ice_datagrams.unavailable_reason() is None
    monkeypatch.setattr(ice_datagrams, "ENABLED", False)
    assert ice_datagrams.unavailable_reason() == "turned off"

    async def body() -> None:
        async with channel_pair() as (ch_a, _):
            with pytest.raises(LookupError, match="turned off"):
                DatagramLink.open(ch_a, lambda p: None)

    run(body())


def test_through_a_turn_relay(turn_server: TurnServer) -> None:
    """Relayed pairs: aioice wraps our datagrams in ChannelData and unwraps them for the hook;
    the size limit leaves room for the 4-byte ChannelData header."""

    async def body() -> None:
        relay = RTCConfiguration(
            iceServers=[RTCIceServer(urls=[turn_server.url], username=TurnServer.USER,
                                     credential=TurnServer.PASSWORD)],
            iceTransportPolicy=RTCIceTransportPolicy.RELAY,
        )
        async with channel_pair(relay) as (ch_a, ch_b):
            got_b: list[bytes] = []
            la = DatagramLink.open(ch_a, lambda p: None)
            lb = DatagramLink.open(ch_b, got_b.append)
            await wait_for(lambda: la.active and lb.active, 20)
            assert la.sock.local_type() == "relay"
            assert la.sock.max_datagram_size() == 1500 - 20 - 8 - 4
            assert la.max_packet_size == 1500 - 20 - 8 - 4 - OVERHEAD >= 1420
            la.send_packets([PACKET] * 5)
            await wait_for(lambda: len(got_b) == 5)
            assert la.sock.batch_senders() == []  # aioice's TURN transport: one at a time
            assert "relay" in la.status()["ice_pair"]
            await channel_works(ch_b, ch_a)
            la.close()
            lb.close()

    run(body())


def test_sctp_keeps_its_synchronous_receive_path_when_the_datagram_socket_closes() -> None:
    """On mvpd's own stack the SCTP driver decrypts records in the selected pair's
    ``datagram_received``; the tunnel's hook goes over it. Unhooking the tunnel puts that
    receiver back (not aioice's method, which would send every SCTP packet through aioice's
    queue and aiortc's coroutines for the rest of the session), and stopping SCTP's
    receiver first leaves the tunnel's hook working."""
    from mvpd.rtc import aiortc_internals as internals
    from tests.rtc.stackpair import close_all, open_pair, our_peer

    async def body() -> None:
        a, b = our_peer(), our_peer()
        try:
            ch_a, ch_b, _, inbox_b = await open_pair(a, b)
            sctp_b = b.sctp
            assert sctp_b is not None
            slow: list[bytes] = []
            ours = bytes([PACKET_TYPE]) + os.urandom(40)
            original = sctp_b._handle_data

            async def counting(data: bytes) -> None:
                slow.append(data)
                await original(data)

            sctp_b._handle_data = counting  # type: ignore[method-assign]
            got: list[bytes] = []
            sock_b = IceDatagramSocket.for_channel(ch_b, got.append)
            sock_a = IceDatagramSocket.for_channel(ch_a, lambda d: None)
            assert sock_a.send([ours]) == 0
            await wait_for(lambda: got == [ours])
            ch_a.send(b"with the tunnel hooked")
            assert await inbox_b.get() == b"with the tunnel hooked"
            sock_b.close()
            for n in range(20):
                ch_a.send(b"after the tunnel closed %d" % n)
            for n in range(20):
                assert await inbox_b.get() == b"after the tunnel closed %d" % n
            assert slow == [], "SCTP fell back to aioice's queue and aiortc's coroutines"
            # The other order: SCTP stops its receiver while the tunnel's hook is on top.
            sock_b = IceDatagramSocket.for_channel(ch_b, got.append)
            internals.stop_receiving_now(sctp_b.transport)
            assert sock_a.send([ours]) == 0
            await wait_for(lambda: got == [ours, ours])
            sock_a.close()
            sock_b.close()
        finally:
            await close_all(a, b)

    run(body())
