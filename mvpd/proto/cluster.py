"""Several signaling servers sharing one Redis: the cluster's wire format, sans I/O.

Each server has a random id (:func:`new_server_id`) and a Redis pub/sub channel of its own
(:meth:`ClusterKeys.server_channel`). Redis holds, for every registered agent id, which
server holds it (:meth:`ClusterKeys.id_key`), and for every server whether it is alive
(:meth:`ClusterKeys.alive_key`).

A holder counts as present while its server is alive, which Redis can tell without the
server having to keep up with anything per agent:

* a server whose process is gone has no subscriber on its channel any more (Redis drops a
  closed connection's subscriptions at once);
* a server that is unreachable without having closed its connections (its host vanished)
  stops renewing its liveness key, which expires :data:`PRESENCE_TTL` s after its last
  beat. The beat comes from a thread of the server's own (:mod:`mvpd.signaling.cluster`),
  so a server whose event loop is slow under load (each turn of the loop taking seconds)
  does not lose its agents: their presence no longer depends on the loop being on time.

Id keys carry a long TTL (:data:`ID_TTL`, renewed by each heartbeat of the holding server)
only so that a dead server's ids are eventually removed; routing and claims treat them as
gone as soon as their server is.

Everything that must be atomic runs as a Lua script (the ``*_SCRIPT`` constants):

* :data:`CLAIM_SCRIPT`: take a free id, keep one we hold, or take one whose server is gone
  (nobody listens on its channel, or its liveness key expired); otherwise name its holder;
* :data:`TAKEOVER_SCRIPT`: take an id from a holder that was found dead (compare-and-set,
  so two claimants cannot both win);
* :data:`RELEASE_SCRIPT`: free an id, only if we still hold it;
* :data:`REFRESH_SCRIPT`: the heartbeat: extend (or, after a Redis restart, re-create) our
  ids, and name those another server holds now;
* :data:`ROUTE_SCRIPT`: look up the target's server and publish to its channel in one round
  trip; the answer says whether it arrived or why not (:data:`ROUTE_NO_HOLDER` and
  :data:`ROUTE_SERVER_GONE`: ``offline`` at once; :data:`ROUTE_NOT_LISTENING`: the server
  is alive but between two subscriptions, try again shortly).

What servers say to each other on their channels is a JSON object with an ``op``
(:func:`encode` / :func:`decode`): :class:`Deliver` (a routed signaling message for an agent
held there), :class:`Undeliverable` (the target left meanwhile: tell the sender ``offline``),
:class:`CheckHolder` (another server wants an id we hold: ping our holder) and
:class:`HolderChecked` (the answer). Redis is trusted no more than a peer: anything that does
not decode raises :class:`ClusterMessageError` and is dropped by the I/O layer.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, TypeAlias

from .errors import ProtocolError
from .signaling import AGENT_ID_PATTERN, MAX_MESSAGE_SIZE

#: Key and channel names start with this (several clusters may share one Redis).
DEFAULT_PREFIX = "mvp:sig:"
#: Seconds between heartbeats, and the TTL of a server's liveness key: three beats may be
#: missed before a server counts as gone.
HEARTBEAT_INTERVAL = 5.0
PRESENCE_TTL = 15
#: TTL of an id key, renewed by every heartbeat of its server: only how long a dead server's
#: ids stay in Redis (they count as gone with their server already).
ID_TTL = 300
#: A server id: letters and digits only, so it never needs escaping in a key or channel.
SERVER_ID_PATTERN = r"^[A-Za-z0-9]{1,64}$"
#: Largest cluster message: a routed frame plus its envelope.
MAX_CLUSTER_MESSAGE = 2 * MAX_MESSAGE_SIZE + 1024

_AGENT_ID = re.compile(AGENT_ID_PATTERN)
_SERVER_ID = re.compile(SERVER_ID_PATTERN)


class ClusterMessageError(ProtocolError):
    """A message on a server channel that is not one of ours."""

    code = "bad-cluster-message"


def new_server_id() -> str:
    """A fresh random server id (a restarted server is a new server)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class ClusterKeys:
    """Names of the Redis keys and channels, under ``prefix``."""

    prefix: str = DEFAULT_PREFIX

    def id_key(self, agent_id: str) -> str:
        """The key holding the id of the server that holds ``agent_id``."""
        return f"{self.prefix}id:{agent_id}"

    def agent_of(self, key: str) -> str:
        """The agent id in an :meth:`id_key`."""
        return key[len(self.prefix) + 3 :]

    @property
    def channel_prefix(self) -> str:
        """What :meth:`server_channel` puts before the server id."""
        return f"{self.prefix}srv:"

    def server_channel(self, server_id: str) -> str:
        """The pub/sub channel that server ``server_id`` listens on."""
        return self.channel_prefix + server_id

    @property
    def alive_prefix(self) -> str:
        """What :meth:`alive_key` puts before the server id."""
        return f"{self.prefix}alive:"

    def alive_key(self, server_id: str) -> str:
        """The key that exists while server ``server_id`` is alive (it renews its TTL)."""
        return self.alive_prefix + server_id


# --- scripts (run by Redis) --------------------------------------------------------------------

#: KEYS[1] id key; ARGV server id, id ttl, channel prefix, alive prefix. Returns "" when the
#: id is ours now (it was free, ours, or held by a dead server: nobody listens on its channel
#: or its liveness key expired), else the live holder's server id. One round trip for
#: everything but a real conflict, which matters when a dead server's thousands of agents
#: register elsewhere at once. (The liveness key is not among KEYS: one Redis, not a Redis
#: Cluster.)
CLAIM_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1]
    or redis.call('PUBSUB', 'NUMSUB', ARGV[3] .. v)[2] == 0
    or redis.call('EXISTS', ARGV[4] .. v) == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ''
end
return v
"""

#: KEYS[1] id key; ARGV dead holder, server id, ttl. Returns 1 when the id is ours now.
TAKEOVER_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] or v == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""

#: KEYS[1] id key; ARGV server id. Deletes the key only while it names us.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: KEYS id keys; ARGV server id, ttl. Returns the keys another server holds.
REFRESH_SCRIPT = """
local lost = {}
for _, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if (not v) or v == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
  else
    lost[#lost + 1] = key
  end
end
return lost
"""

#: What :data:`ROUTE_SCRIPT` answers when it did not deliver: no server holds the id...
ROUTE_NO_HOLDER = -1
#: ... the holder's server is gone (its liveness key expired) ...
ROUTE_SERVER_GONE = 0
#: ... or the holder's server is alive but has no subscriber on its channel right now: it
#: lost its subscription (Redis closed it, or a network blip) and is subscribing again, or it
#: died within the last :data:`PRESENCE_TTL` s.
ROUTE_NOT_LISTENING = -2

#: KEYS[1] the target's id key; ARGV channel prefix, message, alive prefix. Returns the
#: receivers (1) or one of the ``ROUTE_*`` answers above.
ROUTE_SCRIPT = """
local s = redis.call('GET', KEYS[1])
if not s then
  return -1
end
if redis.call('EXISTS', ARGV[3] .. s) == 0 then
  return 0
end
local n = redis.call('PUBLISH', ARGV[1] .. s, ARGV[2])
if n == 0 then
  return -2
end
return n
"""

#: Ids refreshed per script call: long scripts block Redis for everyone else.
REFRESH_BATCH = 500


# --- messages between servers -----------------------------------------------------------------


@dataclass(frozen=True)
class Deliver:
    """``text`` (a routed signaling frame, ``from`` already set) for our agent ``to``.
    ``sender`` on ``origin`` is told ``offline`` if ``to`` is gone meanwhile."""

    to: str
    text: str
    origin: str
    sender: str
    about: str


@dataclass(frozen=True)
class Undeliverable:
    """Tell our agent ``to`` that ``peer`` is offline (its ``about`` message was lost)."""

    to: str
    peer: str
    about: str


@dataclass(frozen=True)
class CheckHolder:
    """Server ``origin`` has a claim for ``id``, which we hold: check our holder and answer
    with :class:`HolderChecked` and the same ``nonce``."""

    id: str
    origin: str
    nonce: str


@dataclass(frozen=True)
class HolderChecked:
    """The answer to :class:`CheckHolder`: ``alive`` when our holder answered its ping (it
    keeps the id); otherwise it was dropped and the claimant may take the id over."""

    id: str
    nonce: str
    alive: bool


ClusterMessage: TypeAlias = Deliver | Undeliverable | CheckHolder | HolderChecked

_OPS: dict[type[Any], str] = {
    Deliver: "deliver",
    Undeliverable: "offline",
    CheckHolder: "check",
    HolderChecked: "checked",
}


def encode(message: ClusterMessage) -> str:
    """One cluster message as compact JSON."""
    data: dict[str, Any] = {"op": _OPS[type(message)], **message.__dict__}
    return json.dumps(data, separators=(",", ":"))


def decode(data: str | bytes) -> ClusterMessage:
    """Parse a message from a server channel; :class:`ClusterMessageError` when it is not a
    well-formed one of ours."""
    if len(data) > MAX_CLUSTER_MESSAGE:
        raise ClusterMessageError(f"cluster message over {MAX_CLUSTER_MESSAGE} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ClusterMessageError("cluster message is not JSON") from None
    if not isinstance(obj, dict):
        raise ClusterMessageError("cluster message is not an object")
    op = obj.get("op")
    if op == "deliver":
        return Deliver(
            to=_agent(obj, "to"),
            text=_text(obj, "text", MAX_CLUSTER_MESSAGE),
            origin=_server(obj, "origin"),
            sender=_agent(obj, "sender"),
            about=_text(obj, "about", 16),
        )
    if op == "offline":
        return Undeliverable(
            to=_agent(obj, "to"), peer=_agent(obj, "peer"), about=_text(obj, "about", 16)
        )
    if op == "check":
        return CheckHolder(
            id=_agent(obj, "id"), origin=_server(obj, "origin"), nonce=_text(obj, "nonce", 64)
        )
    if op == "checked":
        alive = obj.get("alive")
        if not isinstance(alive, bool):
            raise ClusterMessageError("'alive' must be true or false")
        return HolderChecked(id=_agent(obj, "id"), nonce=_text(obj, "nonce", 64), alive=alive)
    raise ClusterMessageError(f"unknown cluster op {str(op)[:32]!r}")


def _text(obj: dict[str, Any], name: str, limit: int) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise ClusterMessageError(f"{name!r} must be a string of at most {limit} characters")
    return value


def _agent(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not _AGENT_ID.fullmatch(value):
        raise ClusterMessageError(f"{name!r} must be an agent id")
    return value


def _server(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not _SERVER_ID.fullmatch(value):
        raise ClusterMessageError(f"{name!r} must be a server id")
    return value
