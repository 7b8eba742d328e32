"""Several signaling servers on one real Redis (redis-server on a free port): routing across
servers, cluster-wide id ownership, a server killed with SIGKILL, Redis restarted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection, connect

from mvpd.config import AgentSettings, SignalingServerSettings
from mvpd.proto.cluster import ID_TTL
from mvpd.proto.signaling import Bye, Error
from mvpd.signaling.client import SignalingClient
from mvpd.signaling.server import SignalingServer
from tests.signaling.redis_server import RedisServer, need_redis, running_redis
from tests.signaling.starved_server import STARVE_FOR
from tests.signaling.test_signaling_server import closed_with, recv_json, registered, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@asynccontextmanager
async def servers(
    redis: RedisServer, count: int, liveness_timeout: float = 3.0, **kw: Any
) -> AsyncIterator[list[SignalingServer]]:
    started = [
        SignalingServer(
            SignalingServerSettings(listen="127.0.0.1:0", redis=SecretStr(redis.url), **kw),
            liveness_timeout=liveness_timeout,
        )
        for _ in range(count)
    ]
    for server in started:
        await server.start()
    try:
        yield started
    finally:
        for server in started:
            await server.close()


async def drain(ws: ClientConnection, seconds: float = 0.3) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    try:
        while True:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), seconds)))
    except TimeoutError:
        return got


def test_agents_on_three_servers_reach_each_other(redis_server: RedisServer) -> None:
    async def main_() -> None:
        async with servers(redis_server, 3) as (a, b, c):
            alice = await registered(a, "alice")
            bob = await registered(b, "bob")
            carol = await registered(c, "carol")
            await alice.send(json.dumps({"type": "offer", "to": "bob", "sdp": "v=0", "x": 1}))
            assert await recv_json(bob) == {
                "type": "offer", "from": "alice", "to": "bob", "sdp": "v=0", "x": 1
            }
            # ``from`` is what the sender registered, whatever it claims.
            await bob.send(json.dumps({"type": "answer", "from": "eve", "to": "carol",
                                       "sdp": "v=1"}))
            assert (await recv_json(carol))["from"] == "bob"
            await carol.send(json.dumps({"type": "candidate", "to": "alice", "candidate": None}))
            assert await recv_json(alice) == {
                "type": "candidate", "from": "carol", "to": "alice", "candidate": None
            }
            assert a.stats()["messages_forwarded"] == 1
            assert b.stats()["messages_delivered"] == 1
            for ws in (alice, bob, carol):
                await ws.close()

    run(main_)


def test_offline_is_immediate_when_no_server_holds_the_target(
    redis_server: RedisServer,
) -> None:
    async def main_() -> None:
        async with servers(redis_server, 2) as (a, b):
            alice = await registered(a, "alice")
            bob = await registered(b, "bob")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await alice.send(json.dumps({"type": "offer", "to": "nobody", "sdp": "v=0"}))
            err = await recv_json(alice, timeout=2)
            assert (err["code"], err["peer"], err["about"]) == ("offline", "nobody", "offer")
            assert loop.time() - started < 0.5
            # bob leaves: his id is given back at once, and he is offline for alice.
            await bob.close()
            await asyncio.sleep(0.3)
            await alice.send(json.dumps({"type": "bye", "to": "bob"}))
            err = await recv_json(alice, timeout=2)
            assert (err["code"], err["peer"]) == ("offline", "bob")
            await alice.close()

    run(main_)


def test_a_live_holder_on_another_server_keeps_its_id(redis_server: RedisServer) -> None:
    async def main_() -> None:
        async with servers(redis_server, 2) as (a, b):
            alice = await registered(a, "alice")
            thief = await connect(b.url)
            await thief.send(json.dumps({"type": "register", "id": "alice"}))
            err = await recv_json(thief, timeout=6)
            assert (err["code"], err["peer"]) == ("id-in-use", "alice")
            code, _ = await closed_with(thief)
            assert code == 4010
            # alice still gets her messages, on her server.
            bob = await registered(b, "bob")
            await bob.send(json.dumps({"type": "bye", "to": "alice"}))
            assert (await recv_json(alice))["from"] == "bob"
            assert b.stats()["id_in_use"] == 1
            await alice.close()
            await bob.close()

    run(main_)


def test_a_silent_holder_on_another_server_is_replaced(redis_server: RedisServer) -> None:
    async def main_() -> None:
        async with servers(redis_server, 2, liveness_timeout=0.5) as (a, b):
            old = await registered(a, "alice")
            assert old.transport is not None
            old.transport.pause_reading()  # no pong, as if its host had vanished
            new = await registered(b, "alice")
            old.transport.resume_reading()
            err = await recv_json(old)
            assert (err["code"], err["peer"]) == ("replaced", "alice")
            carol = await registered(a, "carol")
            await carol.send(json.dumps({"type": "bye", "to": "alice"}))
            assert (await recv_json(new))["from"] == "carol"
            assert a.stats()["replaced"] == 1
            await new.close()
            await carol.close()

    run(main_)


def test_a_message_racing_a_departure_gets_offline(redis_server: RedisServer) -> None:
    """The target's server got the message but the target had just left: the sender hears
    ``offline`` from that server."""

    async def main_() -> None:
        async with servers(redis_server, 2) as (a, b):
            alice = await registered(a, "alice")
            bob = await registered(b, "bob")
            assert b.cluster is not None
            # bob is gone from b's router, but the Redis key still names b (not released yet).
            b.router.disconnect(b.router.holder("bob"))  # type: ignore[arg-type]
            await alice.send(json.dumps({"type": "offer", "to": "bob", "sdp": "v=0"}))
            err = await recv_json(alice, timeout=2)
            assert (err["code"], err["peer"]) == ("offline", "bob")
            await alice.close()
            await bob.close()

    run(main_)


def test_routing_resumes_by_itself_after_redis_restarts(redis_server: RedisServer) -> None:
    async def main_() -> None:
        async with servers(redis_server, 2) as (a, b):
            alice = await registered(a, "alice")
            bob = await registered(b, "bob")
            await asyncio.to_thread(redis_server.restart, 0.5)  # comes back empty
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                await alice.send(json.dumps({"type": "bye", "to": "bob", "reason": "hi"}))
                got = await drain(bob, 0.3)
                if any(m.get("from") == "alice" for m in got):
                    break
                assert loop.time() < deadline, "routing did not resume"
                await drain(alice, 0.05)
            resumed = loop.time() - (deadline - 10)
            # ids were re-asserted: a takeover is still refused, new agents still register
            thief = await connect(a.url)
            await thief.send(json.dumps({"type": "register", "id": "bob"}))
            assert (await recv_json(thief, timeout=6))["code"] == "id-in-use"
            carol = await registered(a, "carol")
            await bob.send(json.dumps({"type": "bye", "to": "carol"}))
            assert (await recv_json(carol))["from"] == "bob"
            print(f"routing resumed {resumed:.2f} s after Redis was back")
            for ws in (alice, bob, carol, thief):
                await ws.close()

    run(main_)


def test_registration_waits_for_redis_and_is_refused_with_try_again(tmp_path: Path) -> None:
    """Redis down: a registration is refused with 1013 (the client tries again later);
    agents of one server keep reaching each other."""
    need_redis()
    redis = RedisServer(tmp_path / "redis")  # not started yet: its port is closed

    async def main_() -> None:
        async with servers(redis, 1) as (a,):
            ws = await connect(a.url)
            await ws.send(json.dumps({"type": "register", "id": "alice"}))
            err = await recv_json(ws, timeout=10)
            assert err["code"] == "unavailable"
            code, _ = await closed_with(ws)
            assert code == 1013
            await asyncio.to_thread(redis.start)
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while True:
                    ws = await connect(a.url)
                    await ws.send(json.dumps({"type": "register", "id": "alice"}))
                    if (await recv_json(ws, timeout=10))["type"] == "registered":
                        break
                    assert loop.time() < deadline
                    await asyncio.sleep(0.3)
                await ws.close()
            finally:
                redis.stop()

    run(main_, timeout=60)


# --- a server killed, agents fail over -----------------------------------------------------------


def start_server_process(redis_url: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvpd.signaling.server", "--listen", "127.0.0.1:0",
         "--redis", redis_url],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.fullmatch(r"listening on (ws://127\.0\.0\.1:\d+)\n", line)
    if not match:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not start: {line!r}")
    return proc, match[1]


def fast_client(agent_id: str, urls: list[str]) -> SignalingClient:
    settings = AgentSettings(agent_id=agent_id, signaling_urls=urls)
    return SignalingClient(settings, backoff_initial=0.5, backoff_max=2.0, ping_interval=1.0,
                           ping_timeout=1.0, connect_timeout=3.0)


async def exchange(sender: SignalingClient, receiver: SignalingClient, reason: str) -> None:
    """Send until ``receiver`` gets it (its registration may be on its way)."""
    for _ in range(100):
        await sender.send({"type": "bye", "to": receiver.agent_id, "reason": reason})
        try:
            while True:
                got = await asyncio.wait_for(receiver.recv(), 0.1)
                if isinstance(got, Bye) and got.reason == reason:
                    return
        except TimeoutError:
            continue
    raise AssertionError(f"{reason!r} never reached {receiver.agent_id}")


def test_agents_of_a_killed_server_fail_over_and_others_are_untouched(
    redis_server: RedisServer,
) -> None:
    procs: list[subprocess.Popen[str]] = []

    async def main_() -> None:
        urls: list[str] = []
        for _ in range(3):
            proc, url = await asyncio.to_thread(start_server_process, redis_server.url)
            procs.append(proc)
            urls.append(url)
        # alice and bob start on server 0 (their lists begin there), carol on server 1,
        # dave on server 2.
        alice = fast_client("alice", urls)
        bob = fast_client("bob", urls)
        carol = fast_client("carol", urls[1:] + urls[:1])
        dave = fast_client("dave", urls[2:] + urls[:2])
        everyone = [alice, bob, carol, dave]
        for c in everyone:
            await c.connect()
        assert alice.url == urls[0] and carol.url == urls[1]
        await exchange(alice, carol, "before")
        await exchange(carol, dave, "before")
        carol_connections, dave_connections = carol.connections, dave.connections

        procs[0].kill()
        await asyncio.to_thread(procs[0].wait)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        await exchange(carol, alice, "after")
        await exchange(carol, bob, "after")
        routable = loop.time() - killed
        assert alice.url != urls[0] and bob.url != urls[0]
        assert routable < 5 + 2.0, f"routable again only after {routable:.1f} s"
        await exchange(alice, bob, "after")
        await exchange(dave, carol, "after")
        # carol's and dave's sessions were not touched.
        assert (carol.connections, dave.connections) == (carol_connections, dave_connections)
        print(f"the killed server's agents were routable again {routable:.2f} s later")
        for c in everyone:
            await c.close()

    try:
        run(main_, timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


def test_error_messages_reach_the_client_as_errors(redis_server: RedisServer) -> None:
    async def main_() -> None:
        async with servers(redis_server, 2) as (a, _b):
            alice = fast_client("alice", [a.url])
            await alice.connect()
            await alice.send({"type": "offer", "to": "nobody", "sdp": "v=0"})
            err = await asyncio.wait_for(alice.recv(), 3)
            assert isinstance(err, Error) and err.code == "offline" and err.peer == "nobody"
            await alice.close()

    run(main_)


def test_a_heartbeat_that_finds_its_id_held_elsewhere_drops_its_holder(
    redis_server: RedisServer,
) -> None:
    """After a partition longer than the TTL another server may have granted our id: the
    cluster's word wins, our holder is told ``replaced``."""
    import redis.asyncio as aioredis

    async def main_() -> None:
        async with servers(redis_server, 1) as (a,):
            alice = await registered(a, "alice")
            assert a.cluster is not None
            client = aioredis.Redis.from_url(redis_server.url)
            key = a.cluster.keys.id_key("alice")
            assert (await client.get(key)).decode() == a.cluster.server_id
            assert 15 < await client.ttl(key) <= ID_TTL  # only for a dead server's ids
            assert 0 < await client.pttl(a.cluster.keys.alive_key(a.cluster.server_id)) <= 15_000
            await client.set(key, "otherserver")
            a.cluster._refresh_now.set()
            err = await recv_json(alice)
            assert (err["code"], err["peer"]) == ("replaced", "alice")
            assert a.router.holder("alice") is None
            assert (await client.get(key)).decode() == "otherserver"  # not released by us
            await client.aclose()

    run(main_)


# --- the agent's list of servers ---------------------------------------------------------------


def test_signaling_urls_from_the_environment_and_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mvpd.config import load_settings
    from mvpd.proto.errors import ConfigError

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    monkeypatch.setenv("SIGNALING_URLS", "ws://a:1, wss://b:2")
    assert load_settings(agent_id="x", config_file=empty).signaling_url_list == [
        "ws://a:1", "wss://b:2"
    ]
    monkeypatch.delenv("SIGNALING_URLS")
    config = tmp_path / "c.yaml"
    config.write_text("signaling_url: [ws://a:1, ws://b:2]\n")
    settings = load_settings(agent_id="x", config_file=config)
    assert settings.signaling_url_list == ["ws://a:1", "ws://b:2"]
    assert settings.signaling_url == "ws://a:1"
    assert load_settings(agent_id="x", config_file=empty).signaling_url_list == [
        "ws://127.0.0.1:8765"
    ]
    config.write_text("signaling_urls: [ws://a:1, 'http://b']\n")
    with pytest.raises(ConfigError, match="ws://"):
        load_settings(agent_id="x", config_file=config)


def test_the_redis_url_setting_is_secret_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mvpd.config import load_settings
    from mvpd.proto.errors import ConfigError

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    monkeypatch.setenv("MVPD_SIGNALING_SERVER__REDIS", "redis://:hunter2@10.0.0.5:6379/0")
    settings = load_settings(agent_id="x", config_file=empty)
    assert settings.signaling_server.redis is not None
    assert settings.signaling_server.redis.get_secret_value().endswith("@10.0.0.5:6379/0")
    assert "hunter2" not in json.dumps(settings.redacted())
    monkeypatch.setenv("MVPD_SIGNALING_SERVER__REDIS", "http://10.0.0.5")
    with pytest.raises(ConfigError, match="redis://") as refused:
        load_settings(agent_id="x", config_file=empty)
    assert "10.0.0.5" not in str(refused.value)


def test_the_client_skips_a_dead_url_at_once() -> None:
    from tests.signaling.redis_server import free_port

    async def main_() -> None:
        async with SignalingServer(SignalingServerSettings(listen="127.0.0.1:0")) as server:
            dead = f"ws://127.0.0.1:{free_port()}"
            settings = AgentSettings(agent_id="alice", signaling_urls=[dead, server.url])
            client = SignalingClient(settings, backoff_initial=0.2, backoff_max=30.0)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await client.connect(timeout=5)
            assert client.url == server.url
            assert loop.time() - started < 1.0
            await client.close()

    run(main_)


def test_a_flood_across_servers_is_delivered_without_spurious_offline(
    redis_server: RedisServer,
) -> None:
    """Hundreds of agents on two servers flood each other: every message arrives, none is
    answered ``offline`` (all targets are connected) and nothing is lost."""
    agents, per_agent = 150, 40

    async def main_() -> None:
        async with servers(redis_server, 2, rate=10_000.0, burst=10_000) as (a, b):
            left = [await registered(a, f"l{n}") for n in range(agents)]
            right = [await registered(b, f"r{n}") for n in range(agents)]
            received = 0
            errors: list[dict[str, Any]] = []
            done = asyncio.Event()
            total = 2 * agents * per_agent

            async def read(ws: ClientConnection) -> None:
                nonlocal received
                async for raw in ws:
                    message = json.loads(raw)
                    if message["type"] == "candidate":
                        received += 1
                    else:
                        errors.append(message)
                    if received + len(errors) == total:
                        done.set()

            readers = [asyncio.ensure_future(read(ws)) for ws in left + right]

            async def flood(ws: ClientConnection, n: int, peers: str) -> None:
                for k in range(per_agent):
                    target = f"{peers}{(n + k) % agents}"
                    await ws.send(json.dumps({"type": "candidate", "to": target,
                                              "candidate": {"n": k}}))

            await asyncio.gather(
                *(flood(ws, n, "r") for n, ws in enumerate(left)),
                *(flood(ws, n, "l") for n, ws in enumerate(right)),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 60)
            assert errors == []
            assert received == total
            for ws in left + right:
                await ws.close()
            await asyncio.gather(*readers, return_exceptions=True)

    run(main_, timeout=120)


def test_forwards_do_not_wait_behind_a_busy_redis_pool(redis_server: RedisServer) -> None:
    """Every shared Redis connection of server A is busy (as under a storm of registrations
    after a server died): a message from A to B is still delivered, not answered
    ``offline`` (its target is connected)."""

    async def main_() -> None:
        async with servers(redis_server, 2) as (a, b):
            alice = await registered(a, "alice")
            bob = await registered(b, "bob")
            assert a.cluster is not None
            shared = a.cluster._redis
            shared.connection_pool.timeout = 0.3  # type: ignore[attr-defined]
            busy = [
                asyncio.ensure_future(shared.blpop([f"busy{n}"], timeout=3))
                for n in range(40)  # more than the pool holds
            ]
            await asyncio.sleep(0.5)
            await alice.send(json.dumps({"type": "offer", "to": "bob", "sdp": "v=0"}))
            assert await recv_json(bob, timeout=5) == {
                "type": "offer", "from": "alice", "to": "bob", "sdp": "v=0"
            }
            assert await drain(alice) == []
            await asyncio.gather(*busy, return_exceptions=True)
            await alice.close()
            await bob.close()

    run(main_, timeout=60)


def test_a_slow_receiver_on_another_server_is_closed_and_its_senders_hear_offline(
    redis_server: RedisServer,
) -> None:
    """The sender is on server A, the receiver that stops reading on B: B closes it with
    4008 and every message is delivered or answered ``offline`` on A."""

    async def main_() -> None:
        async with servers(redis_server, 2, rate=10_000.0, burst=10_000) as (a, b):
            sender = await registered(a, "sender")
            sleeper = await connect(b.url, max_queue=1)
            await sleeper.send(json.dumps({"type": "register", "id": "sleeper"}))
            assert await recv_json(sleeper) == {"type": "registered", "id": "sleeper"}
            refused: list[dict[str, Any]] = []

            async def read_sender() -> None:
                with contextlib.suppress(Exception):
                    while True:
                        refused.append(json.loads(await sender.recv()))

            reader = asyncio.ensure_future(read_sender())
            payload = "x" * 40_000
            sent = 600
            for n in range(sent):
                await sender.send(
                    json.dumps({"type": "offer", "to": "sleeper", "sdp": f"{n}:{payload}"})
                )
            delivered = 0
            with contextlib.suppress(Exception):
                while True:
                    await asyncio.wait_for(sleeper.recv(), 10)
                    delivered += 1
            assert sleeper.close_code == 4008
            for _ in range(50):
                if delivered + len(refused) >= sent:
                    break
                await asyncio.sleep(0.2)
            assert {m.get("code") for m in refused} <= {"offline"}
            assert delivered + len(refused) == sent, (delivered, len(refused))
            assert 0 < delivered < sent
            await sender.close()
            await reader

    run(main_, timeout=90)


@contextlib.contextmanager
def starvable_server(redis: RedisServer) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A cluster server in a process of its own (tests/signaling/starved_server.py): fast
    heartbeat, 1 s presence TTL, SIGUSR1 starves its event loop."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.signaling.starved_server", redis.url],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"listening on (ws://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        yield proc, match[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        proc.wait(timeout=10)


def test_a_starved_holder_server_keeps_its_agents_routable(redis_server: RedisServer) -> None:
    """The holder's server is alive but its event loop is CPU-bound, each turn taking longer
    than the presence TTL (as a server reading a flood from thousands of connections on a
    busy machine): every message routed to its agent meanwhile arrives, late, and none is
    answered ``offline``. Under the bench's flood the presence keys, refreshed by the
    starved loop, expired and 2-5 % of the messages were answered ``offline``."""
    async def main_(proc: subprocess.Popen[str], url: str) -> None:
        async with servers(redis_server, 1) as (b,):
            alice = await connect(url, ping_interval=None)
            await alice.send(json.dumps({"type": "register", "id": "alice"}))
            assert await recv_json(alice) == {"type": "registered", "id": "alice"}
            bob = await registered(b, "bob")
            await asyncio.sleep(0.5)  # a few heartbeats at their usual pace
            proc.send_signal(signal.SIGUSR1)
            sent = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + STARVE_FOR + 0.5
            while loop.time() < end:
                await bob.send(json.dumps({"type": "offer", "to": "alice", "sdp": str(sent)}))
                sent += 1
                await asyncio.sleep(0.1)
            got = [m["sdp"] for m in await drain(alice, 5.0) if m.get("type") == "offer"]
            refused = await drain(bob, 0.5)
            assert refused == []
            assert got == [str(n) for n in range(sent)]
            await alice.close()
            await bob.close()

    with starvable_server(redis_server) as (proc, url):
        run(lambda: main_(proc, url), timeout=60)


def test_the_agents_of_a_server_that_stopped_answering_are_offline_and_free(
    redis_server: RedisServer,
) -> None:
    """A server frozen whole (SIGSTOP: its connections stay open, as when its host vanished
    without a word) stops renewing its liveness key; once that expired its agents are
    ``offline`` at once and their ids free at once for another server."""

    async def main_(proc: subprocess.Popen[str], url: str) -> None:
        async with servers(redis_server, 1) as (b,):
            frozen = await connect(url, ping_interval=None)
            await frozen.send(json.dumps({"type": "register", "id": "alice"}))
            assert await recv_json(frozen) == {"type": "registered", "id": "alice"}
            bob = await registered(b, "bob")
            proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(1.5)  # the frozen server's presence TTL is 1 s
            loop = asyncio.get_running_loop()
            started = loop.time()
            await bob.send(json.dumps({"type": "offer", "to": "alice", "sdp": "v=0"}))
            err = await recv_json(bob, timeout=2)
            assert (err["code"], err["peer"]) == ("offline", "alice")
            assert loop.time() - started < 0.5
            assert b.stats()["cluster"]["undeliverable"] == {"server-gone": 1}
            started = loop.time()
            alice = await registered(b, "alice")  # no liveness check of the old holder
            assert loop.time() - started < 0.5
            proc.send_signal(signal.SIGCONT)
            # Awake again, the old server finds its id taken and drops its holder.
            err = await recv_json(frozen, timeout=5)
            assert (err["code"], err["peer"]) == ("replaced", "alice")
            await bob.send(json.dumps({"type": "offer", "to": "alice", "sdp": "v=1"}))
            assert (await recv_json(alice))["sdp"] == "v=1"
            for ws in (alice, bob):
                await ws.close()

    with starvable_server(redis_server) as (proc, url):
        run(lambda: main_(proc, url), timeout=60)


def test_the_agents_of_a_killed_server_are_offline_within_moments(
    redis_server: RedisServer,
) -> None:
    """A killed server's subscription is gone at once but its liveness key lives on for up
    to 15 s: a message for one of its agents that did not come back is tried again for up to
    2 s (it may be registering elsewhere) and then answered ``offline``."""
    proc, url = start_server_process(redis_server.url)

    async def main_() -> None:
        async with servers(redis_server, 1) as (b,):
            gone = await connect(url, ping_interval=None)
            await gone.send(json.dumps({"type": "register", "id": "alice"}))
            assert await recv_json(gone) == {"type": "registered", "id": "alice"}
            bob = await registered(b, "bob")
            proc.kill()
            await asyncio.to_thread(proc.wait)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await bob.send(json.dumps({"type": "offer", "to": "alice", "sdp": "v=0"}))
            err = await recv_json(bob, timeout=5)
            assert (err["code"], err["peer"]) == ("offline", "alice")
            assert loop.time() - started < 3.0
            assert b.stats()["cluster"]["undeliverable"] == {"no-subscriber": 1}
            await bob.close()

    try:
        run(main_)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_what_is_routed_while_a_server_subscribes_again_arrives_in_order(
    redis_server: RedisServer,
) -> None:
    """Redis closes the servers' subscriptions (as it does to one whose backlog exceeds
    ``client-output-buffer-limit pubsub``): what is routed to an agent while its server
    subscribes again arrives, in order, and nobody is told ``offline``."""
    import redis.asyncio as aioredis

    async def main_() -> None:
        async with servers(redis_server, 2) as (a, b):
            alice = await registered(a, "alice")
            bob = await registered(b, "bob")
            await bob.send(json.dumps({"type": "offer", "to": "alice", "sdp": "first"}))
            assert (await recv_json(alice))["sdp"] == "first"
            admin = aioredis.Redis.from_url(redis_server.url)
            assert await admin.client_kill_filter(_type="pubsub") == 2
            sent = [str(n) for n in range(40)]
            for sdp in sent:
                await bob.send(json.dumps({"type": "offer", "to": "alice", "sdp": sdp}))
                await asyncio.sleep(0.005)
            got = [m.get("sdp") for m in await drain(alice, 3.0)]
            assert await drain(bob, 0.3) == []
            assert got == sent
            assert a.stats()["cluster"]["subscriptions_lost"] == 1
            await admin.aclose()
            for ws in (alice, bob):
                await ws.close()

    run(main_)


def test_forwards_wait_for_room_while_redis_is_slow(redis_server: RedisServer) -> None:
    """Redis holds every write for a while: a sender's flood for another server waits (its
    connection is not read) instead of piling up in memory, and afterwards all of it
    arrives, in order. Unbounded, the queue grew to 10^5 forwards under the bench's flood and
    every turn of the event loop took seconds."""
    import redis.asyncio as aioredis

    from mvpd.signaling.cluster import _MAX_QUEUED

    async def main_() -> None:
        async with servers(redis_server, 2, rate=10_000.0, burst=10_000) as (a, b):
            flooder = await registered(a, "flooder")
            bob = await registered(b, "bob")
            assert a.cluster is not None
            admin = aioredis.Redis.from_url(redis_server.url)
            await admin.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
            count = 4 * _MAX_QUEUED
            queued = 0

            async def flood() -> None:
                for n in range(count):
                    await flooder.send(json.dumps({"type": "candidate", "to": "bob",
                                                   "candidate": {"n": n}}))

            async def watch() -> None:
                nonlocal queued
                assert a.cluster is not None
                while True:
                    queued = max(queued, a.cluster._forward_queue.qsize())
                    await asyncio.sleep(0.005)

            watching = asyncio.ensure_future(watch())
            await flood()
            got: list[int] = []
            while len(got) < count:
                message = json.loads(await asyncio.wait_for(bob.recv(), 10))
                got.append(message["candidate"]["n"])
            watching.cancel()
            assert got == list(range(count))
            assert await drain(flooder, 0.3) == []
            assert 0 < queued <= _MAX_QUEUED
            await admin.aclose()
            for ws in (flooder, bob):
                await ws.close()

    run(main_, timeout=60)
