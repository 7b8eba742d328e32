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
and one message costs one round trip when idle.

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
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from ..proto.cluster import (
    CLAIM_SCRIPT,
    DEFAULT_PREFIX,
    HEARTBEAT_INTERVAL,
    PRESENCE_TTL,
    REFRESH_BATCH,
    REFRESH_SCRIPT,
    RELEASE_SCRIPT,
    ROUTE_SCRIPT,
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

#: Connections to Redis at most (the subscription has one more of its own).
_MAX_CONNECTIONS = 32
#: Forwarded messages sent to Redis in one pipeline at most.
_MAX_BATCH = 256
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


def redact_url(url: str) -> str:
    """``url`` without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


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
        ttl: int = PRESENCE_TTL,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.url = url
        self.router = router
        self.server_id = new_server_id()
        self.keys = ClusterKeys(prefix)
        self.heartbeat = heartbeat
        self.ttl = ttl
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
        self._claim = self._redis.register_script(CLAIM_SCRIPT)
        self._takeover = self._redis.register_script(TAKEOVER_SCRIPT)
        self._release = self._redis.register_script(RELEASE_SCRIPT)
        self._refresh = self._redis.register_script(REFRESH_SCRIPT)
        self._route = self._redis.register_script(ROUTE_SCRIPT)
        self._forward_queue: asyncio.Queue[Forward[ConnT]] = asyncio.Queue()
        #: nonce -> the future a claim waits on for another server's :class:`HolderChecked`.
        self._checks: dict[str, tuple[str, asyncio.Future[bool]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribed = asyncio.Event()
        self._subscribed_at: float | None = None
        self._resubscribed_at = float("-inf")
        self._refresh_now = asyncio.Event()
        #: Whether the last exchange with Redis worked (for status and logs).
        self.connected = False
        #: Why forwards were not delivered: no server holds the id (-1), its server has no
        #: subscriber (0), Redis failed, or the target had left the receiving server.
        self.undeliverable: Counter[str] = Counter()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening, forwarding and the heartbeat. Waits briefly for the subscription;
        an unreachable Redis is logged and retried, not fatal."""
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
        if ids and self.connected:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    pipe = self._redis.pipeline(transaction=False)
                    for agent_id in ids:
                        await self._release(
                            keys=[self.keys.id_key(agent_id)], args=[self.server_id], client=pipe
                        )
                    await pipe.execute()
        for client in (self._redis, self._forwarder):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
                await client.connection_pool.disconnect()

    def stats(self) -> dict[str, Any]:
        """The cluster part of the server's status."""
        return {"server_id": self.server_id, "redis_connected": self.connected,
                "undeliverable": dict(self.undeliverable)}

    # --- router actions -----------------------------------------------------------------------

    def release(self, agent_id: str) -> None:
        """Carry out a :class:`ReleaseId`."""
        self._spawn(self._release_id(agent_id))

    def forward(self, action: Forward[ConnT]) -> None:
        """Carry out a :class:`Forward` (batched with others)."""
        self._forward_queue.put_nowait(action)

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
                keys=[key], args=[self.server_id, self.ttl, self.keys.channel_prefix]
            )
            self.connected = True
            if not holder:
                return "granted"
            if await self._holder_alive(str(holder), agent_id):
                return "in-use"
            if await self._takeover(keys=[key], args=[holder, self.server_id, self.ttl]):
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
        while True:
            batch = [await self._forward_queue.get()]
            while len(batch) < _MAX_BATCH and not self._forward_queue.empty():
                batch.append(self._forward_queue.get_nowait())
            results = await self._forward_batch(batch)
            actions: list[Action[ConnT]] = []
            loop = asyncio.get_running_loop()
            regrouping = loop.time() < self._resubscribed_at + _REASSERT_GRACE
            for item, result in zip(batch, results, strict=True):
                if result == -1 and regrouping:
                    loop.call_later(_REASSERT_RETRY, self._forward_queue.put_nowait, item)
                elif not isinstance(result, int):
                    self.undeliverable["redis-failed"] += 1
                    # Redis did not say where the target is: not "offline", it may well be
                    # connected; the sender may try again.
                    actions += self.router.forward_failed(
                        item.sender, item.to, item.about, unavailable=True
                    )
                elif result <= 0:
                    self.undeliverable["no-holder" if result == -1 else "no-subscriber"] += 1
                    actions += self.router.forward_failed(item.sender, item.to, item.about)
            if actions:
                await self._apply(actions)

    async def _forward_batch(self, batch: list[Forward[ConnT]]) -> list[Any]:
        """Route ``batch`` through Redis in one pipeline: per message, how many servers got
        it (0: its holder's server is gone; -1: nobody holds the target), or an exception.
        A pipeline that fails as a whole is tried again a few times first."""
        for attempt in range(_FORWARD_ATTEMPTS):
            try:
                pipe = self._forwarder.pipeline(transaction=False)
                for item in batch:
                    deliver = Deliver(to=item.to, text=item.text, origin=self.server_id,
                                      sender=item.sender, about=item.about)
                    await self._route(
                        keys=[self.keys.id_key(item.to)],
                        args=[self.keys.channel_prefix, encode(deliver)],
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
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                if self._subscribed_at is not None:
                    # Again: Redis restarted, or was out of reach for a while.
                    self._resubscribed_at = asyncio.get_running_loop().time()
                self._subscribed_at = asyncio.get_running_loop().time()
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
                self._subscribed.clear()
                self._lost(exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0.5)

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
        lost: list[str] = []
        for start in range(0, len(ids), REFRESH_BATCH):
            keys = [self.keys.id_key(i) for i in ids[start : start + REFRESH_BATCH]]
            lost += await self._refresh(keys=keys, args=[self.server_id, self.ttl])
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
