"""The version gate around aiortc's and aioice's private attributes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport

from mvpd.rtc import aiortc_internals as internals
from mvpd.rtc.errors import RtcError, UnsupportedLibrary
from mvpd.udp_batch import TransportBatchSenders


def test_installed_versions_are_supported() -> None:
    internals.check_versions()


@pytest.mark.parametrize(
    "installed",
    [
        {"aiortc": "1.17.0", "aioice": "0.13.0"},
        {"aiortc": "1.15.2", "aioice": "0.13.0"},
        {"aiortc": "1.16.0", "aioice": "0.14.1"},
        {"aiortc": "2.16.0", "aioice": "0.13.0"},
    ],
)
def test_other_versions_are_refused_with_a_fix(installed: dict[str, str]) -> None:
    with pytest.raises(UnsupportedLibrary, match=r"install that \(pip install"):
        internals.check_versions(installed)


def test_a_missing_distribution_is_refused_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real_version = importlib.metadata.version

    def version(distribution: str) -> str:
        if distribution == "aioice":
            raise importlib.metadata.PackageNotFoundError(distribution)
        return real_version(distribution)

    monkeypatch.setattr(internals, "_checked", False)
    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(UnsupportedLibrary, match=r"aioice is not installed \(pip install"):
        internals.check_versions()


def test_version_parsing() -> None:
    assert internals.parse_version("1.16.0") == (1, 16)
    assert internals.parse_version("0.13.0rc1") == (0, 13)
    assert internals.parse_version("1.16") == (1, 16)
    for bad in ("1", "x.y", ""):
        with pytest.raises(UnsupportedLibrary, match="cannot read"):
            internals.parse_version(bad)


def test_pyproject_pins_the_supported_minor_versions() -> None:
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"]
    for name, (major, minor) in internals.SUPPORTED.items():
        assert f"{name}>={major}.{minor},<{major}.{minor + 1}" in deps
    major, minor = internals.RAW_RECORDS_PYOPENSSL
    assert f"pyOpenSSL>={major}.{minor},<{major}.{minor + 1}" in deps
    # typer: mvpctl/plain_params.py reads its private attributes.
    typer = importlib.metadata.version("typer")
    major, minor = internals.parse_version(typer)
    assert f"typer>={major}.{minor},<{major}.{minor + 1}" in deps


def test_private_attributes_are_where_they_are_expected() -> None:
    async def main() -> None:
        gatherer = RTCIceGatherer(iceServers=[])
        ice = RTCIceTransport(gatherer)
        dtls = RTCDtlsTransport(ice, [RTCCertificate.generateCertificate()])
        internals.check_objects(gatherer, ice, dtls)
        internals.set_ice_controlling(ice, True)
        assert ice.role == "controlling"
        internals.set_dtls_role(dtls, "server")
        assert internals.dtls_role(dtls) == "server"
        with pytest.raises(ValueError, match="'client' or 'server'"):
            internals.set_dtls_role(dtls, "auto")
        assert internals.selected_pair(ice) is None
        with pytest.raises(RtcError, match="connected DTLS"):
            internals.export_keying_material(dtls, b"EXPORTER-test", 32)
        await ice.stop()

    async def missing() -> None:
        gatherer = RTCIceGatherer(iceServers=[])
        ice = RTCIceTransport(gatherer)
        dtls = RTCDtlsTransport(ice, [RTCCertificate.generateCertificate()])
        del ice._role_set
        with pytest.raises(UnsupportedLibrary, match=r"RTCIceTransport\._role_set"):
            internals.check_objects(gatherer, ice, dtls)

    asyncio.run(main())
    asyncio.run(missing())


class Collector:
    """A DTLS data receiver that keeps what arrives."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def _handle_data(self, data: bytes) -> None:
        self.received.put_nowait(data)


@pytest.mark.parametrize("records", ["raw", "public"])
def test_dtls_application_data_both_ways_and_shared_keying_material(
    records: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiortc's ICE and DTLS objects composed through the internals, no SCTP: datagrams of
    SCTP size cross in both directions and both ends export the same RFC 5705 keys. The
    synchronous paths seal and open records straight through OpenSSL (``raw``, the pinned
    pyOpenSSL) or through pyOpenSSL's public methods (any other version)."""
    if records == "raw":
        assert internals.raw_openssl is not None, "pyOpenSSL is not the pinned version"
    else:
        monkeypatch.setattr(internals, "raw_openssl", None)

    async def main() -> None:
        sides = []
        for controlling in (True, False):
            gatherer = RTCIceGatherer(iceServers=[])
            ice = RTCIceTransport(gatherer)
            dtls = RTCDtlsTransport(ice, [RTCCertificate.generateCertificate()])
            internals.set_ice_controlling(ice, controlling)
            internals.set_dtls_role(dtls, "client" if controlling else "server")
            receiver = Collector()
            internals.register_data_receiver(dtls, receiver)
            await gatherer.gather()
            sides.append((gatherer, ice, dtls, receiver))
        (ga, ia, da, ra), (gb, ib, db, rb) = sides
        for (g, _, _, _), (_, i, _, _) in ((sides[0], sides[1]), (sides[1], sides[0])):
            for candidate in g.getLocalCandidates():
                await i.addRemoteCandidate(candidate)
            await i.addRemoteCandidate(None)
        try:
            await asyncio.gather(ia.start(gb.getLocalParameters()),
                                 ib.start(ga.getLocalParameters()))
            await asyncio.gather(da.start(db.getLocalParameters()),
                                 db.start(da.getLocalParameters()))
            assert da.state == db.state == "connected"
            pair = internals.selected_pair(ia)
            assert pair is not None and pair.path == "direct"
            assert pair.local.type == "host" and pair.remote.port > 0
            # Host to host: the packet size follows the interface MTU (1500 or more here).
            assert internals.sctp_packet_size(ia) >= 1500 - 128
            big = bytes(range(256)) * 4 + b"x" * 176  # 1200 bytes, an SCTP packet's size
            await internals.send_data(da, big)
            await internals.send_data(db, b"back")
            assert await asyncio.wait_for(rb.received.get(), 5) == big
            assert await asyncio.wait_for(ra.received.get(), 5) == b"back"
            # The synchronous path: same record, same pair, no coroutine.
            assert internals.send_data_now(da, [big[::-1]])
            assert internals.send_data_now(da, [b"second"])
            assert await asyncio.wait_for(rb.received.get(), 5) == big[::-1]
            assert await asyncio.wait_for(rb.received.get(), 5) == b"second"
            if internals.raw_openssl is not None:  # the insides the raw record path uses
                for ssl in (da._ssl, db._ssl):
                    assert all(hasattr(ssl, name) for name in ("_ssl", "_from_ssl", "_into_ssl"))
            # A batch: records of one size leave in few sendmsg calls, one datagram each.
            senders = TransportBatchSenders()
            batch = [bytes([n]) * 1200 for n in range(40)] + [b"short last"]
            assert internals.send_data_now(da, batch, senders)
            for packet in batch:
                assert await asyncio.wait_for(rb.received.get(), 5) == packet
            [sender] = senders.senders()
            assert sender.sent == len(batch) and sender.calls == 1 and sender.gso
            senders.close()
            # And received synchronously: straight from the socket to the callback.
            direct: list[bytes] = []
            assert internals.receive_data_now(db, direct.append)
            internals.send_data_now(da, [b"direct"])
            await internals.send_data(da, b"also direct")
            for _ in range(100):
                if len(direct) == 2:
                    break
                await asyncio.sleep(0.01)
            assert direct == [b"direct", b"also direct"] and rb.received.empty()
            internals.stop_receiving_now(db)
            await internals.send_data(da, b"queued again")
            assert await asyncio.wait_for(rb.received.get(), 5) == b"queued again"
            key_a = internals.export_keying_material(da, b"EXPORTER-mvp-test", 32)
            assert key_a == internals.export_keying_material(db, b"EXPORTER-mvp-test", 32)
            assert key_a != internals.export_keying_material(da, b"EXPORTER-other", 32)
            internals.unregister_data_receiver(db, rb)
            await internals.send_data(da, b"dropped")
            await internals.send_data(db, b"after")
            assert await asyncio.wait_for(ra.received.get(), 5) == b"after"
            assert rb.received.empty()
            await db.stop()
            with pytest.raises(ConnectionError):
                internals.send_data_now(db, [b"after close"])
        finally:
            for _, ice, dtls, _ in sides:
                await dtls.stop()
                await ice.stop()
        with pytest.raises(ConnectionError):
            internals.send_data_now(da, [b"closed"])

    asyncio.run(asyncio.wait_for(main(), 30))


def test_socket_buffers_of_the_candidates() -> None:
    import socket

    async def main() -> None:
        gatherer = RTCIceGatherer(iceServers=[])
        ice = RTCIceTransport(gatherer)
        await gatherer.gather()
        try:
            sockets = [p.transport.get_extra_info("socket") for p in ice._connection._protocols]
            assert sockets
            before = {s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in sockets}
            assert internals.set_socket_buffers(ice, 1024 * 1024) == len(sockets)
            after = {s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in sockets}
            # Linux reports twice the size asked (bookkeeping overhead included).
            assert after == {2 * 1024 * 1024} and after != before
        finally:
            await ice.stop()

    asyncio.run(main())
