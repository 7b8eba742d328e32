"""The long-term identity: its files, our peer connection using it, DTLS holding peers to it,
and the fingerprint check in the peer session (real peers on loopback)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCSessionDescription

from mvpd.identity import AgentIdentity, IdentityStore
from mvpd.known_peers import KnownPeers, PeerVerifier
from mvpd.peer import PeerSession, PeerState
from mvpd.proto.errors import ConfigError
from mvpd.proto.signaling import Bye, Offer, RoutedMessage
from mvpd.proto.trust import KnownEntry, offered_fingerprint
from mvpd.rtc import IceConfiguration, PeerConnection
from tests.peerlink import Forwarder, make_settings, run, wait_for


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files ---------------------------------------------------------------------------------


def test_identity_is_made_once_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = IdentityStore(state).load()
    assert mode_of(state) == 0o700
    assert mode_of(state / "identity.key") == 0o600
    assert mode_of(state / "identity.crt") == 0o600
    again = IdentityStore(state).load()
    assert again.fingerprint == first.fingerprint
    assert first.fingerprint.startswith("sha-256 ") and len(first.short) == 23
    # Long-lived: WebRTC peers check the fingerprint, never the dates.
    assert first.rtc_certificate().expires.year >= 2040


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    IdentityStore(tmp_path).load()
    key = tmp_path / "identity.key"
    key.chmod(mode)
    with pytest.raises(ConfigError, match=f"{key}.*mode {mode:04o}"):
        IdentityStore(tmp_path).load()


def test_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    IdentityStore(tmp_path).load()
    os.chown(tmp_path / "identity.key", 12345, -1)
    with pytest.raises(ConfigError, match=r"identity\.key.*owner uid 12345"):
        IdentityStore(tmp_path).load()


def test_state_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    with pytest.raises(ConfigError, match="state directory"):
        IdentityStore(state).load()


def test_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    IdentityStore(tmp_path).load()
    other = AgentIdentity.generate()
    (tmp_path / "identity.crt").write_bytes(other.certificate_pem())
    with pytest.raises(ConfigError, match="does not belong to the key"):
        IdentityStore(tmp_path).load()


def test_lone_key_or_damaged_file_is_refused(tmp_path: Path) -> None:
    IdentityStore(tmp_path).load()
    (tmp_path / "identity.crt").unlink()
    with pytest.raises(ConfigError, match=r"identity\.crt is missing"):
        IdentityStore(tmp_path).load()
    (tmp_path / "identity.crt").write_bytes(b"not a certificate")
    (tmp_path / "identity.crt").chmod(0o600)
    with pytest.raises(ConfigError, match="damaged"):
        IdentityStore(tmp_path).load()


def test_rotation_keeps_the_current_identity_until_finished(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    current = store.load()
    with pytest.raises(ConfigError, match="no identity rotation"):
        store.finish_rotation()
    pending = store.begin_rotation()
    assert pending.fingerprint != current.fingerprint
    assert store.begin_rotation().fingerprint == pending.fingerprint  # idempotent
    assert IdentityStore(tmp_path).load().fingerprint == current.fingerprint
    assert store.finish_rotation().fingerprint == pending.fingerprint
    assert IdentityStore(tmp_path).load().fingerprint == pending.fingerprint
    assert store.pending() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.crt", "identity.key"]


def test_known_peers_file_is_private_and_survives(tmp_path: Path) -> None:
    known = KnownPeers(tmp_path / "known_peers")
    a, b = AgentIdentity.generate().fingerprint, AgentIdentity.generate().fingerprint
    assert known.add("bob", a, "remembered")
    assert not known.add("bob", a, "remembered")
    assert known.add("bob", a, "trusted")  # upgraded by the operator
    assert known.add("bob", b, "trusted")
    assert mode_of(tmp_path / "known_peers") == 0o600
    again = KnownPeers(tmp_path / "known_peers")
    assert [(e.fingerprint, e.how) for e in again.get("bob")] == [(a, "trusted"), (b, "trusted")]
    assert again.forget("bob", b) == 1 and again.forget("bob") == 1 and again.forget("bob") == 0
    assert KnownPeers(tmp_path / "known_peers").get("bob") == []
    (tmp_path / "known_peers").chmod(0o666)
    with pytest.raises(ConfigError, match="known peers file"):
        KnownPeers(tmp_path / "known_peers")


# --- the peer connection --------------------------------------------------------------------


async def _offer_answer(
    offerer: PeerConnection, answerer: PeerConnection, tamper: Any = None
) -> Any:
    channel = offerer.createDataChannel("mvp")
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    answer = answerer.localDescription.sdp
    if tamper is not None:
        answer = tamper(answer)
    await offerer.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return opened


def test_the_peer_connection_puts_the_identity_in_every_sdp() -> None:
    """Our peer connection takes the certificate as a parameter (no private attribute):
    every connection made with the identity describes itself with its fingerprint."""

    async def body() -> None:
        identity = AgentIdentity.generate()
        for _ in range(2):
            pc = PeerConnection(IceConfiguration(), certificate=identity.rtc_certificate())
            try:
                assert f"sha-256 {pc.local_fingerprint}" == identity.fingerprint
                pc.createDataChannel("mvp")
                await pc.setLocalDescription(await pc.createOffer())
                assert offered_fingerprint(pc.localDescription.sdp) == identity.fingerprint
            finally:
                await pc.close()

    run(body())


def test_dtls_fails_unless_the_certificate_matches_the_sdp_fingerprint() -> None:
    """What makes the SDP check sufficient: aiortc's DTLS transport (under our peer
    connection) compares the certificate the peer shows in the DTLS handshake with the SDP's
    fingerprint and fails the connection otherwise, before SCTP (any data) starts."""

    async def attempt(tamper: Any) -> tuple[bool, str]:
        alice = PeerConnection(IceConfiguration(),
                               certificate=AgentIdentity.generate().rtc_certificate())
        bob = PeerConnection(IceConfiguration(),
                             certificate=AgentIdentity.generate().rtc_certificate())
        try:
            opened = await _offer_answer(alice, bob, tamper)
            for _ in range(300):
                if opened.is_set() or alice.connectionState == "failed":
                    break
                await asyncio.sleep(0.05)
            return opened.is_set(), alice.connectionState
        finally:
            await alice.close()
            await bob.close()

    async def body() -> None:
        assert await attempt(None) == (True, "connected")
        claimed = AgentIdentity.generate().fingerprint  # someone else's identity

        def swap(sdp: str) -> str:
            original = offered_fingerprint(sdp)
            return sdp.replace(original.split()[1], claimed.split()[1])

        assert await attempt(swap) == (False, "failed")

    run(body())


# --- the session's check -------------------------------------------------------------------


def verifier_for(state: Path, agent_id: str, **settings: Any) -> PeerVerifier:
    return PeerVerifier.load(make_settings(agent_id, state_dir=state, **settings))


def session_pair(
    tmp_path: Path, fwd: Forwarder, alice: Any = None, bob: Any = None
) -> tuple[PeerSession, PeerSession]:
    va = verifier_for(tmp_path / "alice", "alice", **(alice or {}))
    vb = verifier_for(tmp_path / "bob", "bob", **(bob or {}))
    sa = PeerSession(va.settings, "bob", send_signal=fwd.sender("alice"), verifier=va)
    sb = PeerSession(vb.settings, "alice", send_signal=fwd.sender("bob"), verifier=vb)
    fwd.sessions.update(alice=sa, bob=sb)
    return sa, sb


def test_sessions_remember_each_other_on_first_contact(tmp_path: Path) -> None:
    async def body() -> None:
        fwd = Forwarder()
        sa, sb = session_pair(tmp_path, fwd)
        await sa.start_offer()
        await sa.wait_open()
        await sb.wait_open()
        assert sa.snapshot()["identity"] == sb.snapshot()["identity"] == "new"
        assert sa.snapshot()["fingerprint"] == sb.verifier.identity.fingerprint  # type: ignore[union-attr]
        known = KnownPeers(tmp_path / "alice" / "known_peers").get("bob")
        assert [e.fingerprint for e in known] == [sb.verifier.identity.fingerprint]  # type: ignore[union-attr]
        await sa.close("done", send_bye=True)

    run(body())


def test_session_refuses_an_unpinned_offer_before_applying_it(tmp_path: Path) -> None:
    async def body() -> None:
        pinned = AgentIdentity.generate().fingerprint  # not alice's
        fwd = Forwarder()
        byes: list[RoutedMessage] = []

        async def watch(message: RoutedMessage) -> list[RoutedMessage]:
            if isinstance(message, Bye):
                byes.append(message)
            return [message]

        fwd.filter = watch
        sa, sb = session_pair(tmp_path, fwd, bob={"peers": {"alice": {"fingerprints": [pinned]}}})
        await sa.start_offer()
        await wait_for(lambda: sb.state == PeerState.FAILED)
        assert sb._pc is None  # never applied: no peer connection, no sockets
        assert sb.history[-1].reason.startswith("identity refused")
        assert sb.snapshot()["identity"] == "refused"
        assert any(b.sender == "bob" and (b.reason or "").startswith("identity refused")
                   for b in byes)
        await wait_for(lambda: sa.state.is_final)
        assert not sa.transport or not sa.transport.is_open
        assert KnownPeers(tmp_path / "bob" / "known_peers").get("alice") == []

    run(body())


def test_offerer_refuses_an_answer_from_someone_else(tmp_path: Path) -> None:
    """Bob's side remembers alice first; then a stranger's answer in bob's name."""

    async def body() -> None:
        fwd = Forwarder()
        sa, sb = session_pair(tmp_path, fwd)
        sa.verifier.known.add(  # type: ignore[union-attr]
            "bob", AgentIdentity.generate().fingerprint, "remembered"
        )
        await sa.start_offer()
        await wait_for(lambda: sa.state == PeerState.FAILED)
        assert "identity refused" in sa.history[-1].reason
        assert sa.transport is None or not sa.transport.is_open
        await sb.close("done")

    run(body())


def test_tofu_session_cannot_turn_into_a_tunnel(tmp_path: Path) -> None:
    """The answerer learns the mode when the channel opens: a peer accepted on first use
    (chat's default policy) cannot then ask for tun mode, whose default is pinned, even
    where tun mode is granted to it."""

    async def body() -> None:
        fwd = Forwarder()
        sa, sb = session_pair(tmp_path, fwd, alice={"trust": "tofu"},
                              bob={"peers": {"alice": {"allowed_ips": ["10.9.0.1/32"]}}})
        sa.mode = "tun"
        await sa.start_offer()
        await wait_for(lambda: sb.state == PeerState.FAILED)
        assert "tun mode takes pinned identities here" in sb.history[-1].reason
        assert sb.transport is None
        await sa.close("done")

    run(body())


def test_remembered_entries_are_checked_per_peer(tmp_path: Path) -> None:
    verifier = verifier_for(tmp_path, "alice")
    a = AgentIdentity.generate()
    offer = Offer(sender="bob", to="alice", sdp=f"v=0\r\na=fingerprint:{a.fingerprint}\r\n")
    assert verifier.check("bob", offer.sdp, "chat").status == "new"
    assert verifier.check("bob", offer.sdp, "chat").status == "remembered"
    assert verifier.known.get("bob") == [KnownEntry(a.fingerprint, "remembered",
                                                    verifier.known.get("bob")[0].added)]
    assert verifier.check("carol", offer.sdp, "chat").status == "new"
    assert verifier.check("bob", offer.sdp, "tun").status == "refused"  # tun: pinned
