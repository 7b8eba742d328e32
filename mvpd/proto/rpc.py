"""The control RPC between ``mvpctl`` and ``mvpd``: methods, parameters, results (sans-I/O).

The wire itself - framing, hellos, envelopes, error codes - is :mod:`mvpd.proto.rpcwire`,
plain Python so that ``mvpctl`` starts fast; this module re-exports all of it and adds the
daemon's side in pydantic: the checked client hello and request envelope, the method table
(:data:`METHODS`) with each method's parameter model and access level, and the result models.
See :mod:`mvpd.proto.rpcwire` for the conversation and the stream events.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import (
    BadRequest,
    Forbidden,
    FrameError,
    FrameTooLarge,
    InvalidParams,
    RpcError,
    UnknownMethod,
    VersionMismatch,
)
from .ids import AGENT_ID_PATTERN
from .modes import MessageKind, Mode
from .rpcwire import (
    ERROR_CLASSES,
    HEADER,
    MAX_FRAME,
    MAX_METHOD_NAME,
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    Access,
    ErrorCode,
    Event,
    FrameDecoder,
    Response,
    ServerHello,
    client_hello,
    decode_payload,
    encode_frame,
    error_from_wire,
    error_message,
    error_to_wire,
    event_message,
    parse_server_hello,
    parse_server_message,
    request,
    request_id_of,
    result_message,
    server_hello,
    short_repr,
)

PeerId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]


# --- hello and request envelope, checked on the daemon side --------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ClientHello(BaseModel):
    """First frame from a client. Unknown extra keys are allowed (newer clients)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    hello: int
    client: str = Field(default="", max_length=256)


class Request(_Wire):
    """``{id, method, params}``."""

    id: int = Field(ge=0, le=MAX_REQUEST_ID)
    method: str = Field(max_length=MAX_METHOD_NAME)
    params: dict[str, Any] = Field(default_factory=dict)


def parse_client_hello(message: dict[str, Any]) -> ClientHello:
    """Check a client's hello; :class:`VersionMismatch` or :class:`BadRequest` if unusable."""
    try:
        hello = ClientHello.model_validate(message)
    except ValidationError:
        raise BadRequest(
            f'the first frame must be a hello: {{"hello": {PROTOCOL_VERSION}, "client": "..."}}'
        ) from None
    if hello.hello != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"control protocol version {hello.hello} is not supported; this mvpd speaks "
            f"version {PROTOCOL_VERSION} (use the mvpctl that came with this mvpd)"
        )
    return hello


def parse_request(message: dict[str, Any]) -> Request:
    """Check a request's envelope (not its params); :class:`BadRequest` if malformed."""
    try:
        return Request.model_validate(message)
    except ValidationError as exc:
        raise BadRequest(
            "a request is {id: int, method: str, params: map}: " + _first_error(exc)
        ) from None


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(params)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


# --- results ---------------------------------------------------------------------------------


class PeerStatus(BaseModel):
    """One peer as ``status``, ``peers`` and ``connect`` report it."""

    model_config = ConfigDict(extra="allow")

    peer: str
    state: str
    mode: str | None = None
    #: Unix time the current state began (for ``connected``: connected-since).
    since: float | None = None
    path: Literal["direct", "relayed", "unknown"] = "unknown"
    local_candidate: str | None = None
    remote_candidate: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    #: Received messages and packets dropped, by reason, where they were dropped:
    #: ``message-too-large``, ``invalid-utf8``, ``invalid-json``, ``inbox-full``,
    #: ``memory-limit``, ``inbox-limit``, ``signaling-backlog``, TUN reasons ...
    #: (and failed sends: ``too-large``, ``send-failed``); never silently lost.
    dropped: dict[str, int] = Field(default_factory=dict)
    error: str | None = None
    #: chat/json/bytes: the peer's inbox, ``queued`` messages and ``queued_bytes`` (None
    #: when it has none).
    inbox: dict[str, int] | None = None
    #: TUN mode only: ``device``, ``addresses``, ``mtu``, ``allowed_ips``,
    #: ``packets_in/out``, ``bytes_in/out`` (IP packets), ``drops`` (this peer's, by reason)
    #: and ``device_drops`` (the shared device's, e.g. ``no-route``).
    tun: dict[str, Any] | None = None
    #: The peer's DTLS identity (``sha-256 AB:...``) once its offer or answer came.
    fingerprint: str | None = None
    #: How that identity is trusted: ``pinned``, ``trusted``, ``remembered``, ``new``
    #: (first contact, remembered now), ``unverified`` (policy any) or ``refused``.
    identity: str | None = None


class SignalingStatus(BaseModel):
    """The signaling session as ``status`` reports it (the URL never holds secrets)."""

    model_config = ConfigDict(extra="allow")

    url: str
    state: str


class InboxStatus(BaseModel):
    """All inboxes together, as ``status`` reports them."""

    model_config = ConfigDict(extra="allow")

    inboxes: int = 0
    queued: int = 0
    queued_bytes: int = 0
    #: ``recv --follow`` callers waiting for a peer that is not connected.
    waiting_followers: int = 0


class StatusResult(BaseModel):
    """The ``status`` result."""

    model_config = ConfigDict(extra="allow")

    agent_id: str
    version: str
    #: Seconds since the daemon started.
    uptime: float
    signaling: SignalingStatus
    peers: list[PeerStatus] = Field(default_factory=list)
    #: Drops of no listed peer, by reason: unread messages of peers that left
    #: (``inbox-expired``, ...), unread core events (``event-queue-full``).
    dropped: dict[str, int] = Field(default_factory=dict)
    inboxes: InboxStatus = Field(default_factory=InboxStatus)


class SendResult(BaseModel):
    """The ``send`` result: how many bytes went on the channel."""

    bytes: int


class ReloadResult(BaseModel):
    """The ``reload`` result: which changed settings took effect and which need a restart."""

    applied: list[str] = Field(default_factory=list)
    not_applied: list[str] = Field(default_factory=list)


class StatsResult(BaseModel):
    """The ``stats`` result: the peer's status plus what :mod:`mvpd.stats` measures.

    ``pair`` is ``{path, local, remote}`` with ``{address, port, type, protocol}`` each;
    ``candidates`` ``{local, remote}``: every candidate of ours and of the peer's, as those,
    and ``{local_excluded, remote_excluded}``: how many were left out for lying in a network
    a TUN tunnel of this host carries;
    ``ice_rtt`` ``{last_ms, min_ms, avg_ms, max_ms, samples}`` of the timed liveness checks;
    ``channels`` bytes and messages by channel label; ``rates`` per second over the last
    ``window_s`` seconds; ``history`` ``[unix time, bytes in, bytes out, messages in,
    messages out]`` once a second for the last minute; ``sctp`` the association's state and
    counters (``retransmissions``, ``abandoned``, ``t3_expirations``, ``cwnd``, ...)."""

    model_config = ConfigDict(extra="allow")

    status: PeerStatus
    pair: dict[str, Any] | None = None
    candidates: dict[str, Any] | None = None
    ice_rtt: dict[str, Any] | None = None
    channels: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rates: dict[str, float] | None = None
    history: list[list[float]] = Field(default_factory=list)
    sctp: dict[str, Any] | None = None


class PingResult(BaseModel):
    """The ``ping`` result: one probe over the data path. ``rtt_ms`` is None when no reply
    came within the timeout; ``path`` is the path at the time of the reply."""

    peer: str
    sequence: int
    rtt_ms: float | None
    path: Literal["direct", "relayed", "unknown"] = "unknown"
    local_candidate: str | None = None
    remote_candidate: str | None = None


class PeerMessage(BaseModel):
    """One message from a peer, as the ``recv`` stream's ``message`` events carry it.

    ``data`` is a str for ``text``, any msgpack-able value for ``json``, bytes for ``bytes``."""

    peer: str
    kind: MessageKind
    data: Any


class IdentityInfo(BaseModel):
    """One identity: its fingerprint and the short form to read aloud."""

    fingerprint: str
    short: str


class IdResult(BaseModel):
    """The ``id`` result: this agent's identity and, during a rotation, the next one."""

    agent_id: str
    current: IdentityInfo
    #: Made by ``id.rotate``, used for connections only after ``id.rotate`` with ``finish``.
    next: IdentityInfo | None = None
    state_dir: str


class KnownPeerEntry(BaseModel):
    """One fingerprint of a peer in ``known_peers``."""

    fingerprint: str
    how: Literal["remembered", "trusted"]
    added: int


class TrustResult(BaseModel):
    """The ``trust`` and ``forget`` results: the peer's entries afterwards."""

    peer: str
    changed: int
    entries: list[KnownPeerEntry] = Field(default_factory=list)


class Subscribed(BaseModel):
    """The result of a stream-opening call (``recv``, ``pipe.open``): the subscription."""

    sub: int


# --- methods and their parameters --------------------------------------------------------------


class NoParams(_Wire):
    """Methods without parameters."""


class ConnectParams(_Wire):
    """``connect``: open (or reuse) a connection to ``peer``."""

    peer: PeerId
    #: The data-channel mode; None means the peer's configured mode.
    mode: Mode | None = None
    #: Wait until the channel is open (or failed) before answering.
    wait: bool = True
    #: Seconds to wait; None means the daemon's ``connect_timeout``.
    timeout: float | None = Field(default=None, gt=0, le=3600)


class PeerParams(_Wire):
    """Methods that name one peer (``disconnect``, ``pipe.open``)."""

    peer: PeerId


class PipeOpenParams(PeerParams):
    """``pipe.open``: a byte pipe to ``peer``.

    With ``attach``, the request carries two descriptors (``SCM_RIGHTS``, sent with the
    request's bytes): the caller's input and output, in that order. The daemon then copies
    the input to the peer and the peer's bytes to the output itself; the stream has no
    ``data`` or ``eof`` events and takes no ``pipe.write`` or ``pipe.eof``, only ``error``
    and ``end``."""

    attach: bool = False


class SendParams(_Wire):
    """``send``: exactly one of ``text``, ``json`` (any value, null included) and ``data``."""

    peer: PeerId
    text: str | None = None
    json_value: Any = Field(default=None, alias="json")
    data: bytes | None = None

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> SendParams:
        given = [
            name
            for name in ("text", "json_value", "data")
            if name in self.model_fields_set
            and (name == "json_value" or getattr(self, name) is not None)
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of text, json and data")
        return self

    @property
    def kind(self) -> MessageKind:
        """Which payload was given."""
        if self.text is not None:
            return "text"
        if self.data is not None:
            return "bytes"
        return "json"


class RecvParams(_Wire):
    """``recv``: stream messages from ``peer``: those queued now, then (``follow``) new ones."""

    peer: PeerId
    follow: bool = False
    #: Stop after this many messages.
    limit: int | None = Field(default=None, ge=1)


class PingParams(_Wire):
    """``ping``: one probe over the data path (see :mod:`mvpd.proto.ping`)."""

    peer: PeerId
    #: Seconds to wait for the reply.
    timeout: float = Field(default=2.0, gt=0, le=30)
    #: Zero bytes added to the probe (up to 1024 bytes in all).
    padding: int = Field(default=0, ge=0, le=1008)


class RotateParams(_Wire):
    """``id.rotate``: make the next identity, or (``finish``) switch to it."""

    finish: bool = False


class TrustParams(_Wire):
    """``trust``: accept ``fingerprint`` (``sha-256 AB:CD:...``) for ``peer``."""

    peer: PeerId
    fingerprint: str = Field(max_length=120)


class ForgetParams(_Wire):
    """``forget``: drop what ``known_peers`` holds for ``peer`` (or just ``fingerprint``)."""

    peer: PeerId
    fingerprint: str | None = Field(default=None, max_length=120)


class SubParams(_Wire):
    """``pipe.eof`` and ``cancel``: name a subscription of this connection."""

    sub: int = Field(ge=0)


class PipeWriteParams(_Wire):
    """``pipe.write``: bytes for the peer. The reply comes once the daemon accepted them."""

    sub: int = Field(ge=0)
    data: bytes


class MethodSpec(NamedTuple):
    """One entry of :data:`METHODS`: everything the control server needs to serve a method.

    Adding a method takes an entry here and a coroutine on the daemon's handler (see
    :class:`mvpd.control_handler.ControlHandler`) named :attr:`handler_name`."""

    access: Access
    params: type[BaseModel]
    doc: str
    #: What the handler returns (documentation and clients; None: an empty map).
    result: type[BaseModel] | None = None
    #: Answers ``{sub}`` and then pushes events.
    stream: bool = False
    #: Served by the control server itself (the connection's own subscriptions), not by
    #: the daemon's handler.
    builtin: bool = False

    def handler_name(self, method: str) -> str:
        """The handler's coroutine for ``method``: ``rpc_`` + the name, dots as underscores."""
        return "rpc_" + method.replace(".", "_")


METHODS: dict[str, MethodSpec] = {
    "status": MethodSpec("read", NoParams, "agent id, version, uptime, signaling and peers",
                         StatusResult),
    "peers": MethodSpec("read", NoParams, "every known peer's status", PeerStatus),
    "connect": MethodSpec("write", ConnectParams, "connect to a peer (optionally wait)",
                          PeerStatus),
    "disconnect": MethodSpec("write", PeerParams, "close the connection to a peer"),
    "send": MethodSpec("write", SendParams, "send one text, JSON or bytes message", SendResult),
    "recv": MethodSpec(
        "write", RecvParams, "stream a peer's messages: events message, end", Subscribed,
        stream=True,
    ),
    "pipe.open": MethodSpec(
        "write", PipeOpenParams, "byte pipe to a peer: events data, eof, error, end", Subscribed,
        stream=True,
    ),
    "pipe.write": MethodSpec("write", PipeWriteParams, "write bytes to a pipe (backpressure)",
                             builtin=True),
    "pipe.eof": MethodSpec("write", SubParams, "end the writing side of a pipe", builtin=True),
    "cancel": MethodSpec("read", SubParams, "end one of this connection's subscriptions",
                         builtin=True),
    "reload": MethodSpec("write", NoParams, "re-read the configuration", ReloadResult),
    "stats": MethodSpec("read", PeerParams, "a peer's candidate pair, RTT, rates and SCTP",
                        StatsResult),
    "ping": MethodSpec("write", PingParams, "one round trip over a peer's data path",
                       PingResult),
    "id": MethodSpec("read", NoParams, "this agent's identity (DTLS certificate fingerprint)",
                     IdResult),
    "id.rotate": MethodSpec("write", RotateParams, "make the next identity; finish: use it",
                            IdResult),
    "trust": MethodSpec("write", TrustParams, "add a peer's fingerprint to known_peers",
                        TrustResult),
    "forget": MethodSpec("write", ForgetParams, "remove a peer from known_peers", TrustResult),
}


def method_spec(method: str) -> MethodSpec:
    """The spec of ``method``; :class:`UnknownMethod` if there is none."""
    spec = METHODS.get(method)
    if spec is None:
        raise UnknownMethod(
            f"unknown method {short_repr(method)}; known: {', '.join(sorted(METHODS))}"
        )
    return spec


def validate_params(method: str, params: dict[str, Any]) -> BaseModel:
    """The typed parameters of a call; :class:`UnknownMethod` or :class:`InvalidParams`."""
    spec = method_spec(method)
    try:
        return spec.params.model_validate(params)
    except ValidationError as exc:
        raise InvalidParams(f"{method}: {_first_error(exc)}") from None


def check_access(method: str, access: Access | None, hint: str = "") -> MethodSpec:
    """The spec of ``method`` if a caller with ``access`` may call it: the one access rule.
    :class:`UnknownMethod` if there is no such method, :class:`Forbidden` (with ``hint``, say
    who may) if the caller may not."""
    spec = method_spec(method)
    if access == "write" or (access == "read" and spec.access == "read"):
        return spec
    raise Forbidden(f"{method} needs write access" + (f": {hint}" if hint else ""))


def to_wire(value: Any) -> Any:
    """Plain msgpack-able data from results (pydantic models, lists, dicts of them)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python", by_alias=True)
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    return value


__all__ = [
    "ERROR_CLASSES",
    "HEADER",
    "MAX_FRAME",
    "MAX_METHOD_NAME",
    "MAX_REQUEST_ID",
    "METHODS",
    "PROTOCOL_VERSION",
    "Access",
    "BadRequest",
    "ClientHello",
    "ConnectParams",
    "ErrorCode",
    "Event",
    "Forbidden",
    "ForgetParams",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "IdResult",
    "IdentityInfo",
    "InboxStatus",
    "InvalidParams",
    "KnownPeerEntry",
    "MethodSpec",
    "Mode",
    "NoParams",
    "PeerId",
    "PeerMessage",
    "PeerParams",
    "PeerStatus",
    "PingParams",
    "PingResult",
    "PipeWriteParams",
    "RecvParams",
    "ReloadResult",
    "Request",
    "Response",
    "RotateParams",
    "RpcError",
    "SendParams",
    "SendResult",
    "ServerHello",
    "SignalingStatus",
    "StatsResult",
    "StatusResult",
    "SubParams",
    "Subscribed",
    "TrustParams",
    "TrustResult",
    "UnknownMethod",
    "VersionMismatch",
    "check_access",
    "client_hello",
    "decode_payload",
    "encode_frame",
    "error_from_wire",
    "error_message",
    "error_to_wire",
    "event_message",
    "method_spec",
    "parse_client_hello",
    "parse_request",
    "parse_server_hello",
    "parse_server_message",
    "request",
    "request_id_of",
    "result_message",
    "server_hello",
    "short_repr",
    "to_wire",
    "validate_params",
]
