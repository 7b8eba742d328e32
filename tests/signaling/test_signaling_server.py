"""The reference signaling server over real WebSockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from mvpd.config import SignalingServerSettings
from mvpd.proto.errors import ConfigError
from mvpd.signaling.server import SignalingServer, load_tokens_file, main

REPO = Path(__file__).resolve().parents[2]


def run(make: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(make(), timeout)

    asyncio.run(bounded())


def settings(**kw: Any) -> SignalingServerSettings:
    return SignalingServerSettings(listen="127.0.0.1:0", **kw)


async def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    obj = json.loads(data)
    assert isinstance(obj, dict)
    return obj


async def register(server: SignalingServer, agent_id: str, token: str | None = None) -> Any:
    ws = await connect(server.url)
    msg: dict[str, Any] = {"type": "register", "id": agent_id}
    if token is not None:
        msg["token"] = token
    await ws.send(json.dumps(msg))
    return ws


async def registered(server: SignalingServer, agent_id: str, token: str | None = None) -> Any:
    ws = await register(server, agent_id, token)
    assert await recv_json(ws) == {"type": "registered", "id": agent_id}
    return ws


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return ws.close_code, ws.close_reason


def test_routes_by_to_and_rewrites_spoofed_from() -> None:
    async def main_() -> None:
        async with SignalingServer(settings()) as server:
            alice = await registered(server, "alice")
            bob = await registered(server, "bob")
            await alice.send(json.dumps({"type": "offer", "to": "bob", "sdp": "v=0"}))
            assert await recv_json(bob) == {
                "type": "offer",
                "from": "alice",
                "to": "bob",
                "sdp": "v=0",
            }
            spoof = {"type": "answer", "from": "carol", "to": "alice", "sdp": "v=1", "x": [1]}
            await bob.send(json.dumps(spoof))
            assert await recv_json(alice) == {**spoof, "from": "bob"}
            assert server.stats()["messages_routed"] == 2
            assert server.stats()["registered"] == 2
            await alice.close()
            await bob.close()

    run(main_)


def test_bad_token_is_refused_and_closed_with_a_reason() -> None:
    async def main_() -> None:
        async with SignalingServer(settings(token=SecretStr("s3cret"))) as server:
            ws = await register(server, "alice", "nope")
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] == "bad-token"
            code, reason = await closed_with(ws)
            assert code == 4003
            assert reason is not None and "bad token" in reason and "s3cret" not in reason
            ok = await registered(server, "alice", "s3cret")
            await ok.close()

    run(main_)


def test_per_agent_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# id token\nalice a-tok\nbob b-tok\n")

    async def main_() -> None:
        async with SignalingServer(settings(tokens_file=tokens)) as server:
            alice = await registered(server, "alice", "a-tok")
            bob = await register(server, "bob", "a-tok")
            assert (await recv_json(bob))["code"] == "bad-token"
            await alice.close()

    run(main_)


def test_a_live_holder_keeps_its_id_against_a_second_register() -> None:
    async def main_() -> None:
        async with SignalingServer(settings()) as server:
            real = await registered(server, "alice")
            attacker = await register(server, "alice")
            err = await recv_json(attacker)
            assert (err["code"], err["peer"]) == ("id-in-use", "alice")
            code, reason = await closed_with(attacker)
            assert code == 4010 and reason is not None and "in use" in reason
            # alice's traffic still reaches the real holder, which heard nothing.
            bob = await registered(server, "bob")
            await bob.send('{"type":"offer","to":"alice","sdp":"v=0"}')
            assert await recv_json(real) == {
                "type": "offer", "from": "bob", "to": "alice", "sdp": "v=0"
            }
            assert server.stats()["id_in_use"] == 1 and server.stats()["replaced"] == 0
            await real.close()
            await bob.close()

    run(main_)


def test_a_holder_that_stops_answering_is_replaced_after_the_ping_deadline() -> None:
    """A restarted daemon whose old TCP connection is half dead gets its id back."""

    async def main_() -> None:
        async with SignalingServer(settings(), liveness_timeout=0.5) as server:
            old = await registered(server, "alice")
            assert old.transport is not None
            old.transport.pause_reading()  # no pong: as if the old host had vanished
            loop = asyncio.get_running_loop()
            started = loop.time()
            new = await registered(server, "alice")
            assert 0.4 < loop.time() - started < 3
            old.transport.resume_reading()
            err = await recv_json(old)
            assert (err["code"], err["peer"]) == ("replaced", "alice")
            code, reason = await closed_with(old)
            assert code == 4009 and reason is not None and "replaced" in reason
            bob = await registered(server, "bob")
            await bob.send('{"type":"bye","to":"alice"}')
            assert (await recv_json(new))["from"] == "bob"
            assert server.stats()["replaced"] == 1
            await new.close()
            await bob.close()

    run(main_)


def test_a_claim_is_granted_when_the_holder_goes_away_during_the_check() -> None:
    async def main_() -> None:
        async with SignalingServer(settings(), liveness_timeout=5) as server:
            old = await registered(server, "alice")
            assert old.transport is not None
            old.transport.pause_reading()
            new = await register(server, "alice")
            await asyncio.sleep(0.2)
            old.transport.abort()
            assert await recv_json(new, timeout=2) == {"type": "registered", "id": "alice"}
            await new.close()

    run(main_)


def test_the_shared_token_cannot_register_an_id_with_its_own_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice a-tok\n")

    async def main_() -> None:
        s = settings(token=SecretStr("shared"), tokens_file=tokens)
        async with SignalingServer(s) as server:
            mallory = await register(server, "alice", "shared")
            assert (await recv_json(mallory))["code"] == "bad-token"
            assert (await closed_with(mallory))[0] == 4003
            alice = await registered(server, "alice", "a-tok")
            carol = await registered(server, "carol", "shared")
            await alice.close()
            await carol.close()

    run(main_)


def test_bad_tokens_are_throttled_per_address() -> None:
    async def main_() -> None:
        async with SignalingServer(settings(token=SecretStr("right"))) as server:
            verdicts: list[str] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.0
            while loop.time() < deadline:  # as many guesses as a second allows
                ws = await register(server, "alice", f"guess{len(verdicts)}")
                verdicts.append((await recv_json(ws))["code"])
                await closed_with(ws)
            assert verdicts[:5] == ["bad-token"] * 5
            assert set(verdicts[5:]) == {"rate-limited"} and len(verdicts) > 5
            # Throttled: even the right token is not looked at.
            ws = await register(server, "alice", "right")
            err = await recv_json(ws)
            assert (err["code"], err["about"]) == ("rate-limited", "register")
            assert (await closed_with(ws))[0] == 1008
            assert server.stats()["bad_tokens"] == 5

    run(main_)


def test_offline_target_and_unregistered_sender() -> None:
    async def main_() -> None:
        async with SignalingServer(settings()) as server:
            anon = await connect(server.url)
            await anon.send('{"type":"offer","to":"bob","sdp":"x"}')
            assert (await recv_json(anon))["code"] == "not-registered"
            await anon.send('{"type":"register","id":"anon"}')
            assert (await recv_json(anon))["type"] == "registered"
            await anon.send('{"type":"offer","to":"bob","sdp":"x"}')
            err = await recv_json(anon)
            assert (err["code"], err["peer"]) == ("offline", "bob")
            await anon.send("garbage")
            assert (await recv_json(anon))["code"] == "bad-message"
            await anon.send(b'{"type":"nope"}')
            assert (await recv_json(anon))["code"] == "unknown-type"
            await anon.close()

    run(main_)


@pytest.mark.parametrize("size", [2000, 100_000])
def test_oversize_frame_closes_with_1009(size: int) -> None:
    async def main_() -> None:
        async with SignalingServer(settings(max_message_size=1024)) as server:
            ws = await registered(server, "alice")
            await ws.send(json.dumps({"type": "offer", "to": "alice", "sdp": "a" * size}))
            if size < 2048:  # a little over: the router explains before closing
                assert (await recv_json(ws))["code"] == "too-large"
            code, _ = await closed_with(ws)
            assert code == 1009

    run(main_)


def test_flooding_client_is_limited_and_closed_while_others_flow() -> None:
    async def main_() -> None:
        s = settings(rate=5.0, burst=5)
        async with SignalingServer(s, flood_close_after=20) as server:
            flooder = await registered(server, "flooder")
            good = await registered(server, "good")
            bob = await registered(server, "bob")
            for _ in range(200):
                try:
                    await flooder.send('{"type":"bye","to":"bob"}')
                except ConnectionClosed:
                    break
            seen: list[dict[str, Any]] = []
            with pytest.raises(ConnectionClosed):
                while True:
                    seen.append(await recv_json(flooder))
            assert any(m.get("code") == "rate-limited" for m in seen)
            assert flooder.close_code == 1008
            # Bob got at most the burst from the flooder; good's messages still arrive.
            await good.send('{"type":"bye","to":"bob","reason":"hi"}')
            got = [await recv_json(bob)]
            while got[-1]["from"] != "good":
                got.append(await recv_json(bob))
            assert len(got) <= 6
            assert server.stats()["closed_for_flooding"] == 1
            await good.close()
            await bob.close()

    run(main_)


def test_port_zero_and_url() -> None:
    async def main_() -> None:
        server = SignalingServer(settings())
        with pytest.raises(RuntimeError):
            _ = server.port
        await server.start()
        assert server.port > 0
        assert server.url == f"ws://127.0.0.1:{server.port}"
        await server.close()

    run(main_)


# --- tokens file -------------------------------------------------------------------------------


def test_tokens_file_formats(tmp_path: Path) -> None:
    lines = tmp_path / "lines"
    lines.write_text("alice  tok-a\n\n# comment\nbob\ttok-b\n")
    assert load_tokens_file(lines) == {"alice": "tok-a", "bob": "tok-b"}
    mapping = tmp_path / "tokens.yaml"
    mapping.write_text("alice: tok-a\nbob: 1234\n")
    assert load_tokens_file(mapping) == {"alice": "tok-a", "bob": "1234"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot be read"),
        ("", "holds no tokens"),
        ("alice tok extra\n", "neither"),
        ("bad id here: [\n", "neither"),
        ("al ice: tok\n", "not a valid agent id"),
        ("alice a\nalice b\n", "listed twice"),
        ("alice: [1]\n", "not a string"),
    ],
)
def test_tokens_file_errors_are_clear(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_tokens_file(path)
    assert expected in info.value.message
    assert str(path) in info.value.message


def test_bad_tokens_file_makes_the_server_refuse_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SignalingServer(settings(tokens_file=tmp_path / "missing"))
    assert main(["--listen", "127.0.0.1:0", "--tokens-file", str(tmp_path / "missing")]) == 78
    assert main(["--listen", "nonsense"]) == 78


# --- standalone --------------------------------------------------------------------------------


def test_standalone_prints_url_serves_and_exits_0_on_sigterm() -> None:
    env = {**os.environ, "MVPD_SIGNALING_SERVER__TOKEN": "env-token"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvpd.signaling.server", "--listen", "127.0.0.1:0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"listening on (ws://127\.0\.0\.1:(\d+))\n", line)
        assert match, line

        async def main_() -> None:
            async with connect(match[1]) as ws:
                await ws.send('{"type":"register","id":"alice","token":"bad"}')
                assert (await recv_json(ws))["code"] == "bad-token"
            async with connect(match[1]) as ws:
                await ws.send('{"type":"register","id":"alice","token":"env-token"}')
                assert (await recv_json(ws))["type"] == "registered"

        run(main_)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        assert "env-token" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reload_tokens_keeps_old_ones_on_error(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice old\n")

    async def main_() -> None:
        async with SignalingServer(settings(tokens_file=tokens)) as server:
            tokens.write_text("alice new\n")
            server.reload_tokens()
            ws = await registered(server, "alice", "new")
            tokens.write_text("broken line with four\n")
            with pytest.raises(ConfigError):
                server.reload_tokens()
            await ws.close()
            again = await registered(server, "alice", "new")
            await again.close()

    run(main_)


def test_standalone_rereads_its_tokens_file_on_sighup(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice old-tok-1\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvpd.signaling.server", "--listen", "127.0.0.1:0",
         "--tokens-file", str(tokens)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]

        async def answer(token: str) -> str:
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "register", "id": "alice", "token": token}))
                reply = await recv_json(ws)
                return str(reply.get("code") or reply["type"])

        async def main_() -> None:
            assert await answer("old-tok-1") == "registered"
            tokens.write_text("alice new-tok-2\n")
            assert await answer("new-tok-2") == "bad-token"  # not read again by itself
            proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                if await answer("new-tok-2") == "registered":
                    break
                await asyncio.sleep(0.1)
            assert await answer("old-tok-1") == "bad-token"
            # A broken file leaves the tokens in force and the server up.
            tokens.write_text("broken line with four\n")
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert await answer("new-tok-2") == "registered"

        run(main_)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "tokens reloaded" in err and "old ones stay in force" in err, err
        assert "old-tok-1" not in err and "new-tok-2" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_receiver_that_does_not_read_is_closed_4008_and_nothing_vanishes() -> None:
    """A target that stops reading is closed with 4008 once about 1 MiB waits for it; every
    message sent to it is either delivered (before the close) or answered ``offline``."""

    async def main_() -> None:
        s = settings(rate=10_000.0, burst=10_000)
        async with SignalingServer(s) as server:
            sender = await registered(server, "sender")
            # max_queue=1: the client stops reading the socket while nobody calls recv().
            sleeper = await connect(server.url, max_queue=1)
            await sleeper.send(json.dumps({"type": "register", "id": "sleeper"}))
            assert await recv_json(sleeper) == {"type": "registered", "id": "sleeper"}
            refused: list[dict[str, Any]] = []

            async def read_sender() -> None:
                with pytest.raises(ConnectionClosed):
                    while True:
                        refused.append(json.loads(await sender.recv()))

            reader = asyncio.get_running_loop().create_task(read_sender())
            payload = "x" * 40_000
            sent = 600  # 24 MB: more than loopback socket buffers hold
            for n in range(sent):
                await sender.send(
                    json.dumps({"type": "offer", "to": "sleeper", "sdp": f"{n}:{payload}"})
                )
            # Now read everything the sleeper was given, up to its close.
            delivered = 0
            with pytest.raises(ConnectionClosed):
                while True:
                    try:
                        await asyncio.wait_for(sleeper.recv(), 10)
                    except TimeoutError:
                        raise AssertionError((delivered, len(refused), server.stats())) from None
                    delivered += 1
            assert sleeper.close_code == 4008
            await asyncio.sleep(0.5)
            offline = [m for m in refused if m.get("code") == "offline"]
            assert all(m["peer"] == "sleeper" and m["about"] == "offer" for m in offline)
            assert delivered + len(offline) == sent, (delivered, len(offline))
            assert 0 < delivered < sent
            assert server.stats()["closed_slow_receivers"] == 1
            await sender.close()
            await reader

    run(main_, timeout=60)
