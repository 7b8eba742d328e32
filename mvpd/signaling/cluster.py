"""Several signaling servers sharing routing through Redis: the I/O around
:mod:`mvpd.proto.cluster`.

A :class:`RedisLink` belongs to one :class:`~mvpd.signaling.server.SignalingServer` with a
``redis`` URL. It carries out the cluster actions of the router (:class:`ClaimId`,
:class:`ReleaseId`, :class:`Forward`), listens on the server's own pub/sub channel for what
other servers send, and keeps the server's ids alive in Redis with a heartbeat.

Why pub/sub and not streams: a signaling message is worth delivering only to a server that
holds its target right now. Pub/sub is exactly that (PUBLISH answers how many servers got
it, so ``offline`` is known at once; nothing piles up for a dead server), while a stream
would keep messages for a server that will never read them and needs trimming and consumer
bookkeeping on every message (BENCHMARKS.md, "Several signaling servers", measures both).

Forwarded messages are batched: whatever the router handed over while the previous batch was
in flight goes to Redis as one pipeline, so one round trip carries many messages under load
and one message costs one round trip when idle. At most :data:`_MAX_QUEUED` wait: a sender
beyond that waits (its connection is not read meanwhile), as on one server a sender waits
for its own socket, instead of the queue growing without bound and every turn of the loop
getting longer.

The server counts as alive in Redis through a thread of its own (:class:`LivenessBeat`): a
heartbeat on the event loop is late when the loop is busy, and its agents would look gone
(:mod:`mvpd.proto.cluster` says how presence works). The loop's own heartbeat renews the
ids, whose TTL is long, and finds ids another server took meanwhile.

When Redis is unreachable, registrations that need it are refused with ``unavailable``
(close 1013, the client tries again, possibly on another server), messages for other servers
get ``unavailable`` (after a few quick retries), and messages between agents of the same
server still flow. When Redis is back (restarted, even empty) the link subscribes again and
re-asserts all its ids at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from ..proto.cluster import (
    CLAIM_SCRIPT,
    DEFAULT_PREFIX,
    HEARTBEAT_INTERVAL,
    ID_TTL,
    PRESENCE_TTL,
    REFRESH_BATCH,
    REFRESH_SCRIPT,
    RELEASE_SCRIPT,
    ROUTE_NO_HOLDER,
    ROUTE_NOT_LISTENING,
    ROUTE_SCRIPT,
    ROUTE_SERVER_GONE,
    TAKEOVER_SCRIPT,
    CheckHolder,
    ClusterKeys,
    ClusterMessageError,
    Deliver,
    HolderChecked,
    Undeliverable,
    decode,
    encode,
    new_server_id,
)
from ..proto.router import Action, ClaimOutcome, Forward, SignalingRouter

logger = logging.getLogger("mvpd.signaling.cluster")

ConnT = TypeVar("ConnT", bound=Hashable)

#: Connections to Redis at most for claims and the heartbeat (forwards, the subscription and
#: the liveness beat have one each besides).
_MAX_CONNECTIONS = 32
#: Forwarded messages sent to Redis in one pipeline at most, and waiting at most (more
#: senders wait for room).
_MAX_BATCH = 256
_MAX_QUEUED = 4 * _MAX_BATCH
#: A batch of forwards whose pipeline failed (Redis busy or reconnecting) is tried this many
#: times, :data:`_FORWARD_RETRY` s apart, before its senders are told ``unavailable``.
_FORWARD_ATTEMPTS = 3
_FORWARD_RETRY = 0.2
#: Claims of ids held elsewhere tried this many times (a race with a third server).
_CLAIM_ATTEMPTS = 3
#: Seconds after subscribing again during which a target missing from Redis is looked up again
#: (every :data:`_REASSERT_RETRY` s) rather than reported offline: after a Redis restart
#: the other servers need a moment to re-assert their ids.
_REASSERT_GRACE = 2.0
_REASSERT_RETRY = 0.25
#: How long a message for a server that is alive but not subscribed at the moment (it lost
#: its subscription and is subscribing again) is tried again, every :data:`_REASSERT_RETRY`
#: s, before its sender hears ``offline``.
_RESUBSCRIBE_GRACE = 2.0
#: The liveness key is no longer renewed once the event loop has not run for this long: a
#: hung server must stop counting as alive. Generous: a loop turn under a flood on a busy
#: machine was measured at up to 5 s.
_LOOP_STALL_LIMIT = 2.0 * PRESENCE_TTL


_UNDELIVERABLE_CAUSE = {
    ROUTE_NO_HOLDER: "no-holder",
    ROUTE_SERVER_GONE: "server-gone",
    ROUTE_NOT_LISTENING: "no-subscriber",
}


def redact_url(url: str) -> str:
    """``url`` without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


class LivenessBeat:
    """Renews ``key`` (with a ``ttl`` s expiry) every ``interval`` s from a thread of its
    own, as long as the event loop it watches keeps running.

    A thread, because the OS wakes it on time whatever the event loop is doing: under a
    flood one turn of a busy server's loop took seconds, a heartbeat task on that loop ran
    13 s late and then needed a turn per Redis round trip, the 15 s presence TTL ran out
    while the agents were connected, and the other servers answered ``offline`` for them.
    Watching the loop, because a server whose loop no longer runs at all (hung) must stop
    counting as alive: each beat first schedules a callback on the loop, and the key is not
    renewed once no such callback has run for ``stall_limit`` s."""

    def __init__(
        self, url: str, key: str, *, interval: float, ttl: float, stall_limit: float
    ) -> None:
        self.url = url
        self.key = key
        self.interval = interval
        self.ttl = ttl
        self.stall_limit = stall_limit
        #: Beats that did not renew the key because the loop had stalled.
        self.skipped = 0
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_seen = time.monotonic()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Beat from now on, watching ``loop``."""
        self._loop = loop
        self._loop_seen = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mvpd-cluster-beat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating (blocks until the thread is done, at most a Redis timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop_ran(self) -> None:
        self._loop_seen = time.monotonic()

    def _run(self) -> None:
        assert self._loop is not None
        client = redis.Redis.from_url(self.url, socket_timeout=3, socket_connect_timeout=3)
        failing = stalled = False
        try:
            while not self._stop.is_set():
                try:
                    self._loop.call_soon_threadsafe(self._loop_ran)
                except RuntimeError:
                    return  # the loop is closed
                if time.monotonic() - self._loop_seen > self.stall_limit:
                    self.skipped += 1
                    if not stalled:
                        logger.error("the event loop has not run for %.0f s: no longer telling "
                                     "Redis that this server is alive", self.stall_limit)
                    stalled = True
                else:
                    stalled = False
                    try:
                        client.set(self.key, "1", px=int(self.ttl * 1000))
                        failing = False
                    except (RedisError, OSError) as exc:
                        if not failing:  # the event loop's side logs losing Redis
                            logger.debug("liveness beat failed: %s", exc)
                        failing = True
                self._stop.wait(self.interval)
        finally:
            client.close()


@dataclass
class _Pending(Generic[ConnT]):
    """A forward waiting for its pipeline; ``retry_until`` is set once it was tried while
    its target's server was between subscriptions."""

    forward: Forward[ConnT]
    retry_until: float | None = None


class RedisLink(Generic[ConnT]):
    """This server's part in a cluster of signaling servers sharing the Redis at ``url``.

    ``apply`` carries out router actions the server's way; ``ping`` tells whether one
    connection answers within the liveness deadline."""

    def __init__(
        self,
        url: str,
        router: SignalingRouter[ConnT],
        *,
        apply: Callable[[list[Action[ConnT]]], Awaitable[None]],
        ping: Callable[[ConnT], Awaitable[bool]],
        liveness_timeout: float,
        heartbeat: float = HEARTBEAT_INTERVAL,
        ttl: float = PRESENCE_TTL,
        id_ttl: int = ID_TTL,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.url = url
        self.router = router
        self.server_id = new_server_id()
        self.keys = ClusterKeys(prefix)
        #: Seconds between beats (liveness and ids), the liveness key's TTL, the id keys'.
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.id_ttl = id_ttl
        self.liveness_timeout = liveness_timeout
        self._apply = apply
        self._ping = ping
        # A bounded pool: thousands of agents registering at once (a server died) wait for
        # one of a few connections instead of opening thousands. A pooled connection Redis
        # closed (a restart) is replaced at once; a Redis that is down fails fast (the caller
        # answers unavailable/offline) instead of hanging.
        options: dict[str, Any] = {
            "decode_responses": True,
            # Generous: a busy server's event loop reads late.
            "socket_timeout": 10,
            "socket_connect_timeout": 3,
            "health_check_interval": 10,
            "retry": Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), 2),
        }
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=_MAX_CONNECTIONS, timeout=10, **options
        )
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # Forwards have a connection of their own: under a flood of registrations (a server
        # died) the claims queue for the shared pool, and a forward that waited its turn
        # there for too long could only be answered with an error although its target is
        # connected. The forward loop sends one pipeline at a time: one connection.
        self._forwarder: aioredis.Redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=1, timeout=None, **options
            )
        )
        # The subscription has a connection of its own without redis-py's silent retries: when
        # Redis drops it (a restart, or the pubsub output-buffer limit) we must know, to say
        # so and to subscribe again at once.
        self._subscriber: aioredis.Redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=1, timeout=None, **{**options, "retry": Retry(NoBackoff(), 0)}
            )
        )
        self._claim = self._redis.register_script(CLAIM_SCRIPT)
        self._takeover = self._redis.register_script(TAKEOVER_SCRIPT)
        self._release = self._redis.register_script(RELEASE_SCRIPT)
        self._refresh = self._redis.register_script(REFRESH_SCRIPT)
        self._route = self._redis.register_script(ROUTE_SCRIPT)
        #: Forwards waiting for a pipeline (None: only wakes the loop up).
        self._forward_queue: asyncio.Queue[_Pending[ConnT] | None] = asyncio.Queue()
        #: Per target, forwards waiting to be tried again (in order), and those due now.
        self._held: dict[str, list[_Pending[ConnT]]] = {}
        self._released: deque[_Pending[ConnT]] = deque()
        self._retrying = 0  # held or released: they count against _MAX_QUEUED too
        self._forward_room = asyncio.Event()
        self._forward_room.set()
        self._beat: LivenessBeat | None = None
        #: nonce -> the future a claim waits on for another server's :class:`HolderChecked`.
        self._checks: dict[str, tuple[str, asyncio.Future[bool]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribed = asyncio.Event()
        self._subscribed_at: float | None = None
        self._resubscribed_at = float("-inf")
        self._refresh_now = asyncio.Event()
        #: Whether the last exchange with Redis worked (for status and logs).
        self.connected = False
        #: Why forwards were not delivered: no server holds the id, its server is gone, its
        #: server had no subscriber (even after retrying), Redis failed, or the target had
        #: left the receiving server.
        self.undeliverable: Counter[str] = Counter()
        #: How often Redis dropped our subscription while we had it.
        self.subscriptions_lost = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening, forwarding and the heartbeat. Waits briefly for the subscription;
        an unreachable Redis is logged and retried, not fatal."""
        self._beat = LivenessBeat(
            self.url, self.keys.alive_key(self.server_id), interval=self.heartbeat,
            ttl=self.ttl, stall_limit=_LOOP_STALL_LIMIT,
        )
        self._beat.start(asyncio.get_running_loop())
        for coro in (self._listen(), self._forward_loop(), self._heartbeat_loop()):
            self._spawn(coro)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5)
        if not self._subscribed.is_set():
            logger.error(
                "cannot reach Redis at %s yet; registrations are refused until it answers",
                redact_url(self.url),
            )

    async def close(self, ids: list[str]) -> None:
        """Give back ``ids`` (ours until now; best effort) and stop."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._beat is not None:
            await asyncio.to_thread(self._beat.stop)
        if self.connected:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    pipe = self._redis.pipeline(transaction=False)
                    for agent_id in ids:
                        await self._release(
                            keys=[self.keys.id_key(agent_id)], args=[self.server_id], client=pipe
                        )
                    pipe.delete(self.keys.alive_key(self.server_id))
                    await pipe.execute()
        for client in (self._redis, self._forwarder, self._subscriber):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
                await client.connection_pool.disconnect()

    def stats(self) -> dict[str, Any]:
        """The cluster part of the server's status."""
        return {"server_id": self.server_id, "redis_connected": self.connected,
                "undeliverable": dict(self.undeliverable),
                "subscriptions_lost": self.subscriptions_lost,
                "liveness_beats_skipped": self._beat.skipped if self._beat is not None else 0}

    # --- router actions -----------------------------------------------------------------------

    def release(self, agent_id: str) -> None:
        """Carry out a :class:`ReleaseId`."""
        self._spawn(self._release_id(agent_id))

    async def forward(self, action: Forward[ConnT]) -> None:
        """Carry out a :class:`Forward` (batched with others); waits while
        :data:`_MAX_QUEUED` forwards wait already (for a pipeline or a retry)."""
        while self._forward_queue.qsize() + self._retrying >= _MAX_QUEUED:
            self._forward_room.clear()
            await self._forward_room.wait()
        self._forward_queue.put_nowait(_Pending(action))

    # --- claims -------------------------------------------------------------------------------

    async def claim(self, agent_id: str) -> ClaimOutcome:
        """Carry out a :class:`ClaimId`: claim ``agent_id`` across the cluster (checking its
        holder on another server, if any). The server awaits this before reading the
        claimant's next frame, so frames sent right after ``register`` keep their order."""
        try:
            return await self._claim_id(agent_id)
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return "unavailable"

    async def _claim_id(self, agent_id: str) -> ClaimOutcome:
        if not self._subscribed.is_set():
            # Without our channel, no other server could reach this agent.
            return "unavailable"
        key = self.keys.id_key(agent_id)
        for _ in range(_CLAIM_ATTEMPTS):
            holder = await self._claim(
                keys=[key],
                args=[self.server_id, self.id_ttl, self.keys.channel_prefix,
                      self.keys.alive_prefix],
            )
            self.connected = True
            if not holder:
                return "granted"
            if await self._holder_alive(str(holder), agent_id):
                return "in-use"
            if await self._takeover(keys=[key], args=[holder, self.server_id, self.id_ttl]):
                logger.info("%s taken over from server %s, whose holder did not answer",
                            agent_id, holder)
                return "granted"
        return "in-use"

    async def _holder_alive(self, server: str, agent_id: str) -> bool:
        """Ask ``server`` to ping its holder of ``agent_id``; False when that server is gone
        or does not answer in time."""
        nonce = secrets.token_hex(8)
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._checks[nonce] = (agent_id, answer)
        try:
            message = encode(CheckHolder(id=agent_id, origin=self.server_id, nonce=nonce))
            receivers = await self._redis.publish(self.keys.server_channel(server), message)
            if not receivers:
                return False  # that server is gone: nobody listens on its channel
            try:
                return await asyncio.wait_for(answer, self.liveness_timeout + 1.0)
            except TimeoutError:
                return False
        finally:
            self._checks.pop(nonce, None)

    async def _answer_check(self, check: CheckHolder) -> None:
        holder = self.router.holder(check.id)
        alive = holder is not None and await self._ping(holder)
        if holder is not None and not alive:
            await self._apply(self.router.evict(check.id, asyncio.get_running_loop().time()))
        reply = HolderChecked(id=check.id, nonce=check.nonce, alive=alive)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.publish(self.keys.server_channel(check.origin), encode(reply))

    async def _release_id(self, agent_id: str) -> None:
        try:
            await self._release(keys=[self.keys.id_key(agent_id)], args=[self.server_id])
        except (RedisError, OSError) as exc:
            # The key expires by itself; a claim for it finds no holder here meanwhile.
            logger.debug("could not release %s: %s", agent_id, exc)

    # --- forwarding ---------------------------------------------------------------------------

    async def _forward_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._next_batch(await self._forward_queue.get())
            self._forward_room.set()
            if not batch:
                continue
            results = await self._forward_batch([pending.forward for pending in batch])
            actions: list[Action[ConnT]] = []
            now = loop.time()
            regrouping = now < self._resubscribed_at + _REASSERT_GRACE
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, int) and result > 0:
                    continue  # delivered to its server
                item = pending.forward
                if not isinstance(result, int):
                    self.undeliverable["redis-failed"] += 1
                    # Redis did not say where the target is: not "offline", it may well be
                    # connected; the sender may try again.
                    actions += self.router.forward_failed(
                        item.sender, item.to, item.about, unavailable=True
                    )
                    continue
                if result == ROUTE_NOT_LISTENING:
                    # Its server lives but is subscribing again: it will hear us shortly.
                    if pending.retry_until is None:
                        pending.retry_until = now + _RESUBSCRIBE_GRACE
                    if now < pending.retry_until:
                        self._hold(pending)
                        continue
                elif regrouping:
                    # After a Redis restart the others need a moment to re-assert their ids.
                    self._hold(pending)
                    continue
                self.undeliverable[_UNDELIVERABLE_CAUSE.get(result, "no-holder")] += 1
                actions += self.router.forward_failed(item.sender, item.to, item.about)
            if actions:
                await self._apply(actions)

    def _next_batch(self, first: _Pending[ConnT] | None) -> list[_Pending[ConnT]]:
        """What to send in the next pipeline: forwards held for a retry and now due first,
        then what waits in the queue; a forward for a target whose earlier messages are held
        joins them instead (messages to one agent keep their order)."""
        taken = list(self._released)
        self._released.clear()
        self._retrying -= len(taken)
        if first is not None:
            taken.append(first)
        while len(taken) < _MAX_BATCH and not self._forward_queue.empty():
            pending = self._forward_queue.get_nowait()
            if pending is not None:
                taken.append(pending)
        batch: list[_Pending[ConnT]] = []
        for pending in taken:
            held = self._held.get(pending.forward.to)
            if held is not None:
                held.append(pending)
                self._retrying += 1
            else:
                batch.append(pending)
        return batch

    def _hold(self, pending: _Pending[ConnT]) -> None:
        """Try ``pending`` again in :data:`_REASSERT_RETRY` s, with whatever follows it for
        the same target meanwhile."""
        target = pending.forward.to
        held = self._held.get(target)
        self._retrying += 1
        if held is not None:
            held.append(pending)
            return
        self._held[target] = [pending]
        asyncio.get_running_loop().call_later(_REASSERT_RETRY, self._release_held, target)

    def _release_held(self, target: str) -> None:
        self._released.extend(self._held.pop(target, ()))
        self._forward_queue.put_nowait(None)  # wakes the forward loop

    async def _forward_batch(self, batch: list[Forward[ConnT]]) -> list[Any]:
        """Route ``batch`` through Redis in one pipeline: per message, what
        :data:`ROUTE_SCRIPT` answered (the receivers, or why none), or an exception.
        A pipeline that fails as a whole is tried again a few times first."""
        for attempt in range(_FORWARD_ATTEMPTS):
            try:
                pipe = self._forwarder.pipeline(transaction=False)
                for item in batch:
                    deliver = Deliver(to=item.to, text=item.text, origin=self.server_id,
                                      sender=item.sender, about=item.about)
                    await self._route(
                        keys=[self.keys.id_key(item.to)],
                        args=[self.keys.channel_prefix, encode(deliver), self.keys.alive_prefix],
                        client=pipe,
                    )
                results: list[Any] = await pipe.execute(raise_on_error=False)
                self.connected = True
                return results
            except (RedisError, OSError) as exc:
                self._lost(exc)
                if attempt + 1 < _FORWARD_ATTEMPTS:
                    await asyncio.sleep(_FORWARD_RETRY)
                else:
                    return [exc] * len(batch)
        raise AssertionError("unreachable")

    # --- our channel --------------------------------------------------------------------------

    async def _listen(self) -> None:
        channel = self.keys.server_channel(self.server_id)
        loop = asyncio.get_running_loop()
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            dropped = False
            try:
                # Alive first: whoever routes to us in between is told to try again shortly
                # (not listening yet) rather than that our agents are gone.
                await self._redis.set(self.keys.alive_key(self.server_id), "1",
                                      px=int(self.ttl * 1000))
                await pubsub.subscribe(channel)
                if self._subscribed_at is not None:
                    # Again: Redis restarted, dropped our subscription, or was out of reach.
                    self._resubscribed_at = loop.time()
                self._subscribed_at = loop.time()
                self._subscribed.set()
                self.connected = True
                self._refresh_now.set()  # Redis may have restarted empty: re-assert our ids
                logger.info("cluster server %s listening on Redis %s", self.server_id,
                            redact_url(self.url))
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._on_message(message["data"])
            except (RedisError, OSError) as exc:
                dropped = self._subscribed.is_set()
                self._subscribed.clear()
                if dropped:
                    self.subscriptions_lost += 1
                    logger.warning(
                        "Redis dropped our subscription (%s); subscribing again. Messages it "
                        "held for us are lost: if its log says 'output buffer limits', raise "
                        "client-output-buffer-limit pubsub (README, 'Running several "
                        "signaling servers')", exc)
                else:
                    self._lost(exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not dropped:
                await asyncio.sleep(0.5)  # at once after a drop; then not faster than this

    async def _on_message(self, data: str) -> None:
        try:
            message = decode(data)
        except ClusterMessageError as exc:
            logger.warning("ignoring a message on our cluster channel: %s", exc.message)
            return
        if isinstance(message, Deliver):
            actions = self.router.deliver(
                message.to, message.text, sender=message.sender, via=message.origin,
                about=message.about,
            )
            if actions:
                await self._apply(actions)
                return
            # Gone meanwhile: the sender should hear ``offline`` as on one server.
            self.undelivered(message.origin, message.sender, message.to, message.about)
        elif isinstance(message, Undeliverable):
            await self._apply(self.router.forward_failed(message.to, message.peer, message.about))
        elif isinstance(message, CheckHolder):
            self._spawn(self._answer_check(message))
        else:
            waiting = self._checks.get(message.nonce)
            if waiting is not None and waiting[0] == message.id and not waiting[1].done():
                waiting[1].set_result(message.alive)

    def undelivered(self, server: str, sender: str, peer: str, about: str) -> None:
        """A message from ``sender`` on ``server`` could not be written to our ``peer``
        (it closed meanwhile): that server answers its sender ``offline``."""
        self.undeliverable["left"] += 1
        notice = Undeliverable(to=sender, peer=peer, about=about)
        self._spawn(self._publish(server, encode(notice)))

    async def _publish(self, server: str, text: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._redis.publish(self.keys.server_channel(server), text)

    # --- heartbeat ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        wait = self.heartbeat
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_now.wait(), wait)
            self._refresh_now.clear()
            try:
                await self._refresh_ids()
                wait = self.heartbeat
            except (RedisError, OSError) as exc:
                # Soon again: after a Redis restart our ids are missing until this works.
                self._lost(exc)
                wait = 0.5

    async def _refresh_ids(self) -> None:
        """Extend our ids' TTL (re-creating them after a Redis restart); drop our holders of
        ids another server holds now."""
        ids = self.router.registered_ids()
        if not ids:
            return
        # One round trip whatever the number of ids (a busy loop takes a while per trip);
        # several scripts, each short, so that Redis serves others in between.
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(ids), REFRESH_BATCH):
            keys = [self.keys.id_key(i) for i in ids[start : start + REFRESH_BATCH]]
            await self._refresh(keys=keys, args=[self.server_id, self.id_ttl], client=pipe)
        lost = [key for batch in await pipe.execute() for key in batch]
        self.connected = True
        for key in lost:
            agent_id = self.keys.agent_of(key)
            logger.warning("%s is held by another server now; dropping our connection", agent_id)
            await self._apply(self.router.evict(agent_id, asyncio.get_running_loop().time()))

    # --- helpers ------------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self.connected:
            logger.warning("lost Redis at %s: %s; retrying", redact_url(self.url), exc)
        self.connected = False

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
