"""The control RPC between ``mvpctl`` and ``mvpd``: framing, messages, methods (sans-I/O).

Transport: a Unix stream socket. Every message is one *frame*: a 4-byte big-endian length,
then that many bytes holding one msgpack map. Frames longer than :data:`MAX_FRAME` are refused
(:class:`~mvpd.proto.errors.FrameTooLarge`); the connection cannot be resynchronised after that.

Conversation::

    client -> {"hello": 1, "client": "mvpctl 0.1.0"}
    server -> {"hello": 1, "server": "mvpd 0.1.0", "agent_id": "alice", "access": "write"}
    client -> {"id": 1, "method": "status", "params": {}}
    server -> {"id": 1, "result": {...}}                        # or
    server -> {"id": 1, "error": {"code": "not-found", "message": "no peer 'bob'"}}
    server -> {"sub": 3, "event": "message", "data": {...}}      # pushed, for streams

A version mismatch in the hello gets an error reply (``id`` nil) and the connection is closed.
Errors that cannot be tied to a request (bad frames) carry ``"id": nil``.

Streams: ``recv`` and ``pipe.open`` answer ``{"sub": N}``; events for that subscription follow
as ``{"sub": N, "event": ..., "data": ...}``. The last event of every subscription is ``end``
(after it the number is dead); an ``error`` event ``{code, message}`` may come just before it.
``recv`` sends ``message`` events ``{peer, kind, data}``; a pipe sends ``data`` ``{data}`` and
``eof`` when the peer finished sending, and ends once both directions are done (``pipe.eof``
from the client plus ``eof`` or ``error`` from the peer). ``cancel {sub}`` ends one early.

Everything here is pure: :class:`FrameDecoder` is fed bytes and hands back maps; the other
functions build and check messages. The I/O lives in ``mvpd.control`` (server) and
``mvpctl.client`` (client).
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Annotated, Any, Literal, NamedTuple

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import (
    BadRequest,
    Busy,
    ConnectionClosed,
    DaemonNotRunning,
    Forbidden,
    FrameError,
    FrameTooLarge,
    InvalidParams,
    MvpError,
    NotFound,
    PeerError,
    RpcError,
    RpcPeerError,
    RpcTimeout,
    TransportError,
    UnknownMethod,
    VersionMismatch,
)
from .signaling import AGENT_ID_PATTERN

#: Bumped on any incompatible change of the messages or methods below.
PROTOCOL_VERSION = 1
#: Largest frame payload either side accepts (the 4-byte header not counted).
MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")
#: Request ids are unsigned and fit a msgpack uint64; clients count up from 1.
MAX_REQUEST_ID = 2**63 - 1
MAX_METHOD_NAME = 64

Access = Literal["read", "write"]
Mode = Literal["chat", "json", "bytes", "tun"]
PeerId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]


class ErrorCode(str, Enum):
    """Error codes that travel in ``{"error": {"code": ...}}``.

    A daemon may also send the ``code`` of any other :class:`MvpError` (e.g. ``config``); a
    client maps codes it does not know to a plain :class:`RpcError` carrying that code."""

    BAD_FRAME = "bad-frame"
    BAD_REQUEST = "bad-request"
    VERSION_MISMATCH = "version-mismatch"
    UNKNOWN_METHOD = "unknown-method"
    INVALID_PARAMS = "invalid-params"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not-found"
    PEER_ERROR = "peer-error"
    TIMEOUT = "timeout"
    TOO_LARGE = "too-large"
    BUSY = "busy"
    INTERNAL = "internal"
    NOT_RUNNING = "not-running"


#: Which exception class stands for which wire code.
ERROR_CLASSES: dict[str, type[RpcError]] = {
    ErrorCode.BAD_FRAME.value: FrameError,
    ErrorCode.TOO_LARGE.value: FrameTooLarge,
    ErrorCode.BAD_REQUEST.value: BadRequest,
    ErrorCode.VERSION_MISMATCH.value: VersionMismatch,
    ErrorCode.UNKNOWN_METHOD.value: UnknownMethod,
    ErrorCode.INVALID_PARAMS.value: InvalidParams,
    ErrorCode.FORBIDDEN.value: Forbidden,
    ErrorCode.NOT_FOUND.value: NotFound,
    ErrorCode.PEER_ERROR.value: RpcPeerError,
    ErrorCode.TIMEOUT.value: RpcTimeout,
    ErrorCode.BUSY.value: Busy,
    ErrorCode.INTERNAL.value: RpcError,
    ErrorCode.NOT_RUNNING.value: DaemonNotRunning,
}


def error_from_wire(error: Any) -> RpcError:
    """The exception for an ``error`` member of a reply (tolerant of junk: the server may be
    newer than the client)."""
    if not isinstance(error, dict):
        return BadRequest(f"malformed error reply: {_short(error)}")
    code = str(error.get("code", ErrorCode.INTERNAL.value))[:64]
    message = str(error.get("message", code))[:4096]
    cls = ERROR_CLASSES.get(code, RpcError)
    exc = cls(message)
    exc.code = code
    return exc


def error_to_wire(exc: BaseException) -> dict[str, str]:
    """The ``error`` member for an exception raised while serving a call.

    :class:`MvpError` messages are written for users and travel as they are; anything else is
    a bug in the daemon and is reported as ``internal`` without details (they go to the log)."""
    if isinstance(exc, MvpError):
        code = exc.code
        if not isinstance(exc, RpcError) and _is_peer_family(exc):
            code = ErrorCode.TOO_LARGE.value if code == "too-large" else ErrorCode.PEER_ERROR.value
        return {"code": code, "message": exc.message}
    if isinstance(exc, TimeoutError):
        return {"code": ErrorCode.TIMEOUT.value, "message": str(exc) or "timed out"}
    return {"code": ErrorCode.INTERNAL.value, "message": "internal error; see the mvpd log"}


def _is_peer_family(exc: MvpError) -> bool:
    return isinstance(exc, PeerError | TransportError | ConnectionClosed)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- framing --------------------------------------------------------------------------------


def encode_frame(obj: dict[str, Any], *, max_frame: int = MAX_FRAME) -> bytes:
    """One frame: length header + msgpack map. Raises :class:`FrameTooLarge` past the cap and
    :class:`RpcError` (internal) for values msgpack cannot hold."""
    try:
        payload = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RpcError(f"cannot encode message: {exc}") from None
    if len(payload) > max_frame:
        raise FrameTooLarge(
            f"message of {len(payload)} bytes is larger than the {max_frame}-byte frame limit"
        )
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """The map in one frame's payload; :class:`FrameError` if it is not exactly one map."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError...)
        raise FrameError(f"frame is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame must hold a msgpack map, not {type(obj).__name__}")
    if not all(isinstance(key, str) for key in obj):
        raise FrameError("frame map keys must be strings")
    return obj


class FrameDecoder:
    """Incremental frame decoder: feed it bytes as they arrive, get whole messages back.

    Raises only :class:`FrameError` and its subclass :class:`FrameTooLarge`:

    * a frame whose payload is not a msgpack map raises :class:`FrameError`; the frame is
      consumed and the decoder stays usable (the length header kept us in sync);
    * a header announcing more than ``max_frame`` bytes raises :class:`FrameTooLarge`; the
      stream cannot be resynchronised, so every later :meth:`feed` raises it again.

    Messages decoded before a bad frame are never lost: :meth:`feed` returns them and raises
    the error on the next call. So any chunking of the same bytes gives the same messages and
    errors in the same order.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._pending: FrameError | None = None
        self._fatal: FrameTooLarge | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    @property
    def broken(self) -> bool:
        """True after an oversize header: the connection must be closed."""
        return self._fatal is not None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; return every message completed by it, in order."""
        if self._fatal is not None:
            raise self._fatal
        self._buffer += data
        if self._pending is not None:
            error, self._pending = self._pending, None
            raise error
        out: list[dict[str, Any]] = []
        while True:
            try:
                message = self._next()
            except FrameError as exc:
                if not out:
                    raise
                self._pending = exc
                return out
            if message is None:
                return out
            out.append(message)

    def feed_items(self, data: bytes) -> list[dict[str, Any] | FrameError]:
        """Like :meth:`feed`, but never raises: errors come back as items in stream order, so
        an I/O loop can answer each one and carry on with the messages after it. After a
        :class:`FrameTooLarge` item (always the last) the connection must be closed."""
        items: list[dict[str, Any] | FrameError] = []
        while True:
            try:
                messages = self.feed(data)
            except FrameTooLarge as exc:
                items.append(exc)
                return items
            except FrameError as exc:
                items.append(exc)
                data = b""
                continue
            items.extend(messages)
            if not messages or self._pending is None:
                return items
            data = b""

    def _next(self) -> dict[str, Any] | None:
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self.max_frame:
            self._buffer.clear()
            self._fatal = FrameTooLarge(
                f"frame of {length} bytes announced; the limit is {self.max_frame} bytes"
            )
            raise self._fatal
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return decode_payload(payload)


# --- messages -------------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ClientHello(BaseModel):
    """First frame from a client. Unknown extra keys are allowed (newer clients)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    hello: int
    client: str = Field(default="", max_length=256)


class ServerHello(BaseModel):
    """The server's answer to a hello: who it is and what this caller may do."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    hello: int
    server: str = ""
    agent_id: str = ""
    access: Access = "read"


class Request(_Wire):
    """``{id, method, params}``."""

    id: int = Field(ge=0, le=MAX_REQUEST_ID)
    method: str = Field(max_length=MAX_METHOD_NAME)
    params: dict[str, Any] = Field(default_factory=dict)


class Event(NamedTuple):
    """A server-pushed event on subscription ``sub``."""

    sub: int
    event: str
    data: Any


class Response(NamedTuple):
    """A reply to request ``id``: exactly one of ``result`` and ``error`` is meaningful."""

    id: int | None
    result: Any
    error: RpcError | None


def client_hello(client: str) -> dict[str, Any]:
    """The hello a client sends first."""
    return {"hello": PROTOCOL_VERSION, "client": client}


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


def server_hello(server: str, agent_id: str, access: Access) -> dict[str, Any]:
    """The server's hello answer."""
    return {"hello": PROTOCOL_VERSION, "server": server, "agent_id": agent_id, "access": access}


def parse_server_hello(message: dict[str, Any]) -> ServerHello:
    """Check the server's answer to our hello; raises the error it carries, if any."""
    if "error" in message:
        raise error_from_wire(message["error"])
    try:
        hello = ServerHello.model_validate(message)
    except ValidationError:
        raise BadRequest(f"the daemon's hello is malformed: {_short(message)}") from None
    if hello.hello != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"mvpd speaks control protocol version {hello.hello}, this mvpctl speaks "
            f"{PROTOCOL_VERSION}"
        )
    return hello


def request(request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A request message."""
    return {"id": request_id, "method": method, "params": params}


def parse_request(message: dict[str, Any]) -> Request:
    """Check a request's envelope (not its params); :class:`BadRequest` if malformed."""
    try:
        return Request.model_validate(message)
    except ValidationError as exc:
        raise BadRequest(
            "a request is {id: int, method: str, params: map}: " + _first_error(exc)
        ) from None


def request_id_of(message: dict[str, Any]) -> int | None:
    """The ``id`` of a possibly malformed request, so its error reply can name it."""
    value = message.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REQUEST_ID:
        return value
    return None


def result_message(request_id: int, result: Any) -> dict[str, Any]:
    """A success reply."""
    return {"id": request_id, "result": result}


def error_message(request_id: int | None, exc: BaseException) -> dict[str, Any]:
    """An error reply (``id`` nil when the error is not tied to a request)."""
    return {"id": request_id, "error": error_to_wire(exc)}


def event_message(sub: int, event: str, data: Any = None) -> dict[str, Any]:
    """A pushed event."""
    return {"sub": sub, "event": event, "data": data}


def parse_server_message(message: dict[str, Any]) -> Response | Event:
    """Classify a message from the server (client side)."""
    if "sub" in message and "event" in message:
        sub, event = message["sub"], message["event"]
        if isinstance(sub, int) and isinstance(event, str):
            return Event(sub, event, message.get("data"))
    if "id" in message and ("result" in message or "error" in message):
        request_id = message["id"]
        if request_id is None or (isinstance(request_id, int) and not isinstance(request_id, bool)):
            if "error" in message:
                return Response(request_id, None, error_from_wire(message["error"]))
            return Response(request_id, message["result"], None)
    raise BadRequest(f"unexpected message from mvpd: {_short(message)}")


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
    #: Drops by reason (e.g. ``queue-full``, ``bad-source``); never silently lost.
    dropped: dict[str, int] = Field(default_factory=dict)
    error: str | None = None
    #: TUN mode only: ``device``, ``addresses``, ``mtu``, ``allowed_ips``,
    #: ``packets_in/out``, ``bytes_in/out`` (IP packets), ``drops`` (this peer's, by reason)
    #: and ``device_drops`` (the shared device's, e.g. ``no-route``).
    tun: dict[str, Any] | None = None


class SignalingStatus(BaseModel):
    """The signaling session as ``status`` reports it (the URL never holds secrets)."""

    model_config = ConfigDict(extra="allow")

    url: str
    state: str


class StatusResult(BaseModel):
    """The ``status`` result."""

    model_config = ConfigDict(extra="allow")

    agent_id: str
    version: str
    #: Seconds since the daemon started.
    uptime: float
    signaling: SignalingStatus
    peers: list[PeerStatus] = Field(default_factory=list)


class SendResult(BaseModel):
    """The ``send`` result: how many bytes went on the channel."""

    bytes: int


class ReloadResult(BaseModel):
    """The ``reload`` result: which changed settings took effect and which need a restart."""

    applied: list[str] = Field(default_factory=list)
    not_applied: list[str] = Field(default_factory=list)


class Message(BaseModel):
    """One message from a peer, as the ``recv`` stream's ``message`` events carry it.

    ``data`` is a str for ``text``, any msgpack-able value for ``json``, bytes for ``bytes``."""

    peer: str
    kind: Literal["text", "json", "bytes"]
    data: Any


class Subscribed(BaseModel):
    """The result of a stream-opening call (``recv``, ``pipe.open``)."""

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
    def kind(self) -> Literal["text", "json", "bytes"]:
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


class SubParams(_Wire):
    """``pipe.eof`` and ``cancel``: name a subscription of this connection."""

    sub: int = Field(ge=0)


class PipeWriteParams(_Wire):
    """``pipe.write``: bytes for the peer. The reply comes once the daemon accepted them."""

    sub: int = Field(ge=0)
    data: bytes


class MethodSpec(NamedTuple):
    """One entry of :data:`METHODS`."""

    access: Access
    params: type[BaseModel]
    doc: str
    #: Answers ``{sub}`` and then pushes events.
    stream: bool = False


METHODS: dict[str, MethodSpec] = {
    "status": MethodSpec("read", NoParams, "agent id, version, uptime, signaling and peers"),
    "peers": MethodSpec("read", NoParams, "every known peer's status"),
    "connect": MethodSpec("write", ConnectParams, "connect to a peer (optionally wait)"),
    "disconnect": MethodSpec("write", PeerParams, "close the connection to a peer"),
    "send": MethodSpec("write", SendParams, "send one text, JSON or bytes message"),
    "recv": MethodSpec(
        "write", RecvParams, "stream a peer's messages: events message, end", stream=True
    ),
    "pipe.open": MethodSpec(
        "write", PeerParams, "byte pipe to a peer: events data, eof, error, end", stream=True
    ),
    "pipe.write": MethodSpec("write", PipeWriteParams, "write bytes to a pipe (backpressure)"),
    "pipe.eof": MethodSpec("write", SubParams, "end the writing side of a pipe"),
    "cancel": MethodSpec("read", SubParams, "end one of this connection's subscriptions"),
    "reload": MethodSpec("write", NoParams, "re-read the configuration"),
}


def method_spec(method: str) -> MethodSpec:
    """The spec of ``method``; :class:`UnknownMethod` if there is none."""
    spec = METHODS.get(method)
    if spec is None:
        raise UnknownMethod(f"unknown method {_short(method)}; known: {', '.join(sorted(METHODS))}")
    return spec


def validate_params(method: str, params: dict[str, Any]) -> BaseModel:
    """The typed parameters of a call; :class:`UnknownMethod` or :class:`InvalidParams`."""
    spec = method_spec(method)
    try:
        return spec.params.model_validate(params)
    except ValidationError as exc:
        raise InvalidParams(f"{method}: {_first_error(exc)}") from None


def check_access(method: str, access: Access | None) -> None:
    """Raise :class:`Forbidden` unless a caller with ``access`` may call ``method``."""
    spec = method_spec(method)
    if access == "write" or (access == "read" and spec.access == "read"):
        return
    raise Forbidden(f"{method} needs write access")


def to_wire(value: Any) -> Any:
    """Plain msgpack-able data from results (pydantic models, lists, dicts of them)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="python", by_alias=True)
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    return value
