"""The signaling client against real servers on 127.0.0.1: ours (in process and as a
subprocess killed with SIGKILL), a routing-only server that never replies, and wss://."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr
from websockets.asyncio.server import ServerConnection, serve

from mvpd.config import AgentSettings, SignalingServerSettings
from mvpd.proto.errors import (
    ConfigError,
    ConnectionClosed,
    MalformedMessage,
    SignalingUnavailable,
)
from mvpd.proto.signaling import Bye, Error, Offer
from mvpd.signaling.client import SignalingClient
from mvpd.signaling.server import SignalingServer

REPO = Path(__file__).resolve().parents[2]
FAST: dict[str, Any] = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 5.0}


def run(make: Callable[[], Awaitable[None]], timeout: float = 40) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(make(), timeout)

    asyncio.run(bounded())


def agent(agent_id: str, url: str, **kw: Any) -> AgentSettings:
    return AgentSettings(agent_id=agent_id, signaling_url=url, _env_file=None, **kw)


def client(agent_id: str, url: str, token: str | None = None, **kw: Any) -> SignalingClient:
    extra: dict[str, Any] = {}
    if token is not None:
        extra["signaling_token"] = SecretStr(token)
    if "ca" in kw:
        extra["signaling_ca_file"] = kw.pop("ca")
    return SignalingClient(agent(agent_id, url, **extra), **{**FAST, **kw})


async def recv(c: SignalingClient, timeout: float = 5) -> Any:
    return await asyncio.wait_for(c.recv(), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def local_server(
    liveness_timeout: float = 3.0, failures_per_minute: int = 5, **kw: Any
) -> SignalingServer:
    server = SignalingServer(
        SignalingServerSettings(listen="127.0.0.1:0", **kw),
        liveness_timeout=liveness_timeout,
        failures_per_minute=failures_per_minute,
    )
    await server.start()
    return server


async def until(predicate: Callable[[], object], timeout: float = 10, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


# --- against our server ------------------------------------------------------------------------


def test_two_clients_exchange_messages_with_from_filled() -> None:
    async def main_() -> None:
        server = await local_server()
        states: list[str] = []
        alice = client("alice", server.url, on_state=states.append)
        bob = client("bob", server.url)
        await alice.connect()
        await bob.connect()
        assert alice.state == "connected"
        await alice.send({"type": "offer", "to": "bob", "sdp": "v=0"})
        got = await recv(bob)
        assert isinstance(got, Offer)
        assert (got.sender, got.sdp) == ("alice", "v=0")
        await bob.send(Bye(to="alice", sender="someone-else"))
        got = await recv(alice)
        assert isinstance(got, Bye) and got.sender == "bob"
        # error notices from our server reach the reader too
        await alice.send({"type": "bye", "to": "nobody"})
        err = await recv(alice)
        assert isinstance(err, Error) and (err.code, err.peer) == ("offline", "nobody")
        assert alice.registered
        with pytest.raises(MalformedMessage):
            await alice.send({"type": "offer", "to": "bad id", "sdp": "x"})
        await alice.close()
        assert alice.state == "closed"
        assert states[:2] == ["connecting", "connected"] and states[-1] == "closed"
        with pytest.raises(ConnectionClosed):
            await alice.recv()
        await bob.close()
        await server.close()

    run(main_)


def test_async_iteration_ends_on_close() -> None:
    async def main_() -> None:
        server = await local_server()
        async with client("alice", server.url) as alice, client("bob", server.url) as bob:
            for i in range(3):
                await bob.send({"type": "bye", "to": "alice", "reason": str(i)})
            got: list[str | None] = []

            async def read() -> None:
                async for msg in alice:
                    assert isinstance(msg, Bye)
                    got.append(msg.reason)
                    if len(got) == 3:
                        await alice.close()

            await read()
            assert got == ["0", "1", "2"]
        await server.close()

    run(main_)


def test_unreachable_server_raises_signaling_unavailable() -> None:
    async def main_() -> None:
        c = client("alice", f"ws://127.0.0.1:{free_port()}")
        with pytest.raises(SignalingUnavailable) as info:
            await c.connect(timeout=0.5)
        assert "cannot reach the signaling server" in info.value.message
        assert c.state == "closed"

    run(main_)


def test_bad_token_is_retried_slowly_and_a_fixed_token_is_picked_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main_() -> None:
        server = await local_server(token=SecretStr("right"), failures_per_minute=1000)
        c = client("alice", server.url, token="wrong",
                   refused_backoff_initial=0.4, refused_backoff_max=0.8)
        await c.connect()  # the client does not wait for a reply it may never get
        await until(lambda: c.state == "rejected", what="the refusal")
        assert c.last_error is not None and "bad-token" in c.last_error
        await asyncio.sleep(1.0)
        # Slower than the ordinary backoff (0.05 s here): a few tries in a second, not 20.
        assert 2 <= c.connections <= 4
        server.router.set_tokens("wrong", None)  # the server's side is fixed
        await until(lambda: c.registered, what="registration with the fixed token")
        assert c.state == "connected"
        bob = client("bob", server.url, token="wrong")
        await bob.connect()
        await bob.send({"type": "bye", "to": "alice"})
        assert isinstance(await recv(c), Bye)
        await c.close()
        await bob.close()
        await server.close()

    run(main_)
    refusals = [r for r in caplog.records if "refused our token" in r.getMessage()]
    assert refusals and "ws://127.0.0.1:" in refusals[0].getMessage()
    assert "trying again" in refusals[0].getMessage()


def test_replaced_client_keeps_trying_and_comes_back_when_the_other_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main_() -> None:
        server = await local_server(liveness_timeout=0.5)
        first = client("alice", server.url)
        await first.connect()
        await until(lambda: first.registered, what="the first registration")
        ws = first._ws
        assert ws is not None and ws.transport is not None
        ws.transport.pause_reading()  # the first one stops answering pings
        second = client("alice", server.url)
        await second.connect()
        await until(lambda: second.registered, what="the takeover after the ping deadline")
        ws.transport.resume_reading()
        # Told "replaced", then "id-in-use" while the second one lives: never final.
        await until(lambda: first.state == "rejected", what="the first to be refused")
        await asyncio.sleep(0.5)
        assert first.state in ("rejected", "connecting", "connected")
        assert not (first.state == "connected" and first.registered)
        assert first.connections >= 2
        await second.close()
        await until(lambda: first.registered and first.state == "connected",
                    what="the first to register again")
        bob = client("bob", server.url)
        await bob.connect()
        await bob.send({"type": "bye", "to": "alice"})
        assert isinstance(await recv(first), Bye)
        for c in (first, bob):
            await c.close()
        await server.close()

    run(main_)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "mvpd.signaling.client"]
    assert any("taking over our id" in m and "ws://127.0.0.1:" in m for m in warnings)


@pytest.mark.parametrize("how", ["error", "close-code"])
def test_a_refusal_from_any_server_is_not_final(how: str) -> None:
    """One message from a server, ours or not, on any path, never stops the client."""

    async def main_() -> None:
        attempts: list[str] = []

        async def handler(ws: ServerConnection) -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") != "register":
                    continue
                attempts.append(ws.request.path if ws.request else "")
                if len(attempts) < 3:
                    if how == "error":
                        await ws.send('{"type":"error","code":"replaced","message":"x"}')
                    await ws.close(4009, "replaced")
                    return
                await ws.send('{"type":"bye","from":"bob","to":"alice","reason":"welcome"}')

        async with serve(handler, "127.0.0.1", 0) as raw_server:
            port = raw_server.sockets[0].getsockname()[1]
            c = client("alice", f"ws://127.0.0.1:{port}/some/path")
            await c.connect()
            got = await recv(c, timeout=10)
            assert isinstance(got, Bye) and got.reason == "welcome"
            assert len(attempts) == 3 and attempts[0] == "/some/path"
            await c.close()

    run(main_)


def test_inbox_overflow_is_logged_once_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    async def main_() -> None:
        server = await local_server(rate=10_000.0, burst=10_000)
        alice = client("alice", server.url, inbox_size=4)
        bob = client("bob", server.url)
        await alice.connect()
        await bob.connect()
        await until(lambda: alice.registered, what="alice's registration")
        for i in range(50):
            await bob.send({"type": "bye", "to": "alice", "reason": str(i)})
        await until(lambda: alice._inbox_full_log.suppressed >= 40, what="the drops")
        await alice.close()
        await bob.close()
        await server.close()

    run(main_)
    drops = [r for r in caplog.records if "inbox full" in r.getMessage()]
    assert len(drops) == 1


def test_send_while_disconnected_waits_then_raises() -> None:
    async def main_() -> None:
        server = await local_server()
        c = client("alice", server.url, send_timeout=0.5)
        await c.connect()
        await server.close()
        with pytest.raises(SignalingUnavailable):
            await c.send({"type": "bye", "to": "bob"})
        assert c.state in ("connecting", "backoff")
        await c.close()

    run(main_)


# --- a server that only routes -----------------------------------------------------------------


def test_routing_only_server_that_never_replies() -> None:
    """Many signaling servers only relay by ``to``; some also send things we do not know."""

    async def main_() -> None:
        peers: dict[str, ServerConnection] = {}

        async def handler(ws: ServerConnection) -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "register":
                    peers[msg["id"]] = ws
                    # noise a client must survive
                    await ws.send("this is not json")
                    await ws.send('{"type":"presence","online":["x"]}')
                    await ws.send(b"\x00\x01")
                elif msg.get("to") in peers:
                    await peers[msg["to"]].send(raw)

        async with serve(handler, "127.0.0.1", 0) as raw_server:
            port = raw_server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}"
            alice = client("alice", url)
            bob = client("bob", url)
            await alice.connect()
            await bob.connect()
            # Registration is fire-and-forget: wait until the server has seen both.
            for _ in range(100):
                if len(peers) == 2:
                    break
                await asyncio.sleep(0.02)
            await alice.send({"type": "offer", "to": "bob", "sdp": "v=0"})
            got = await recv(bob)
            assert isinstance(got, Offer)
            assert got.sender == "alice"  # filled in by the client, not the server
            assert not alice.registered
            await alice.close()
            await bob.close()

    run(main_)


# --- reconnect after the server is killed ------------------------------------------------------


def start_server_process(port: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvpd.signaling.server", "--listen", f"127.0.0.1:{port}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.fullmatch(r"listening on (ws://127\.0\.0\.1:\d+)\n", line)
    if not match:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not start: {line!r}")
    return proc, match[1]


def test_reconnects_after_sigkill_and_restart_on_the_same_port() -> None:
    procs: list[subprocess.Popen[str]] = []

    async def main_() -> None:
        proc, url = await asyncio.to_thread(start_server_process, 0)
        procs.append(proc)
        port = int(url.rsplit(":", 1)[1])
        states: list[str] = []
        alice = client("alice", url, on_state=states.append)
        bob = client("bob", url)
        await alice.connect()
        await bob.connect()
        await alice.send({"type": "bye", "to": "bob", "reason": "before"})
        assert (await recv(bob)).reason == "before"

        proc.kill()
        await asyncio.to_thread(proc.wait)
        for _ in range(200):
            if alice.state != "connected" and bob.state != "connected":
                break
            await asyncio.sleep(0.02)
        assert "backoff" in states or alice.state == "connecting"

        proc2, _ = await asyncio.to_thread(start_server_process, port)
        procs.append(proc2)
        await alice.wait_connected(10)
        await bob.wait_connected(10)
        # bob may not be registered yet when alice's first message arrives: retry until it is
        for _ in range(50):
            await alice.send({"type": "bye", "to": "bob", "reason": "after"})
            try:
                got = await asyncio.wait_for(bob.recv(), 0.2)
            except TimeoutError:
                continue
            assert isinstance(got, Bye) and got.reason == "after"
            break
        else:
            raise AssertionError("no message flowed after the restart")
        assert alice.connections == 2 and bob.connections == 2
        await alice.close()
        await bob.close()

    try:
        run(main_)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


# --- wss ---------------------------------------------------------------------------------------


def make_self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mvp-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_wss_with_a_self_signed_certificate_and_ca_file(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    async def main_() -> None:
        server = SignalingServer(SignalingServerSettings(listen="127.0.0.1:0"), ssl=tls)
        await server.start()
        assert server.url.startswith("wss://")
        # Without the CA file the system store does not trust it.
        untrusted = client("alice", server.url)
        with pytest.raises(SignalingUnavailable) as info:
            await untrusted.connect(timeout=1)
        assert "certificate" in info.value.message.lower()
        alice = client("alice", server.url, ca=cert)
        bob = client("bob", server.url, ca=cert)
        await alice.connect()
        await bob.connect()
        await alice.send({"type": "offer", "to": "bob", "sdp": "v=0"})
        assert isinstance(await recv(bob), Offer)
        await alice.close()
        await bob.close()
        await server.close()

    run(main_)


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        client("alice", "wss://127.0.0.1:1", ca=tmp_path / "missing.pem")


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    c = client("alice", "ws://127.0.0.1:1", backoff_initial=1.0, backoff_max=30.0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 30.0), (100, 30.0)]:
        delays = {c._backoff(attempt) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1
