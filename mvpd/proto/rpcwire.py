"""The control RPC's wire layer: framing, hellos, envelopes and error codes (sans-I/O).

This is all a client needs, and it is plain Python on purpose: no pydantic, so that ``mvpctl``
starts fast. The daemon side (the method table, typed parameters and results) lives in
:mod:`mvpd.proto.rpc`, which re-exports everything here.

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
from typing import Any, Literal, NamedTuple, TypeGuard

import msgpack

from .errors import (
    BadRequest,
    Busy,
    ConnectionClosed,
    DaemonNotRunning,
    DescriptorFailed,
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

#: Bumped on any incompatible change of the messages or methods.
PROTOCOL_VERSION = 1
#: Largest frame payload either side accepts (the 4-byte header not counted).
MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")
#: Request ids are unsigned and fit a msgpack uint64; clients count up from 1.
MAX_REQUEST_ID = 2**63 - 1
MAX_METHOD_NAME = 64

#: What a caller may do: ``read`` (status, peers) or ``write`` (everything).
Access = Literal["read", "write"]
_ACCESS_VALUES: tuple[str, ...] = ("read", "write")


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
    DESCRIPTOR = "descriptor"
    #: Writing a passed output failed because nobody reads it any more (EPIPE).
    OUTPUT_CLOSED = "output-closed"
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
    ErrorCode.DESCRIPTOR.value: DescriptorFailed,
    ErrorCode.OUTPUT_CLOSED.value: DescriptorFailed,
    ErrorCode.INTERNAL.value: RpcError,
    ErrorCode.NOT_RUNNING.value: DaemonNotRunning,
}


def error_from_wire(error: Any) -> RpcError:
    """The exception for an ``error`` member of a reply (tolerant of junk: the server may be
    newer than the client)."""
    if not isinstance(error, dict):
        return BadRequest(f"malformed error reply: {short_repr(error)}")
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


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters, for error messages about junk input."""
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


class ServerHello(NamedTuple):
    """The server's answer to a hello: who it is and what this caller may do. Extra keys a
    newer server may add are ignored."""

    hello: int
    server: str = ""
    agent_id: str = ""
    access: Access = "read"


def client_hello(client: str) -> dict[str, Any]:
    """The hello a client sends first."""
    return {"hello": PROTOCOL_VERSION, "client": client}


def server_hello(server: str, agent_id: str, access: Access) -> dict[str, Any]:
    """The server's hello answer."""
    return {"hello": PROTOCOL_VERSION, "server": server, "agent_id": agent_id, "access": access}


def parse_server_hello(message: dict[str, Any]) -> ServerHello:
    """Check the server's answer to our hello; raises the error it carries, if any."""
    if "error" in message:
        raise error_from_wire(message["error"])
    version = message.get("hello")
    server = message.get("server", "")
    agent_id = message.get("agent_id", "")
    access = message.get("access", "read")
    if (
        not _is_int(version)
        or not isinstance(server, str)
        or not isinstance(agent_id, str)
        or access not in _ACCESS_VALUES
    ):
        raise BadRequest(f"the daemon's hello is malformed: {short_repr(message)}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"mvpd speaks control protocol version {version}, this mvpctl speaks {PROTOCOL_VERSION}"
        )
    return ServerHello(version, server, agent_id, "write" if access == "write" else "read")


def request(request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A request message."""
    return {"id": request_id, "method": method, "params": params}


def request_id_of(message: dict[str, Any]) -> int | None:
    """The ``id`` of a possibly malformed request, so its error reply can name it."""
    value = message.get("id")
    if _is_int(value) and 0 <= value <= MAX_REQUEST_ID:
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
        if request_id is None or _is_int(request_id):
            if "error" in message:
                return Response(request_id, None, error_from_wire(message["error"]))
            return Response(request_id, message["result"], None)
    raise BadRequest(f"unexpected message from mvpd: {short_repr(message)}")


def _is_int(value: object) -> TypeGuard[int]:
    # msgpack gives bools for true/false; they are not numbers on this wire.
    return isinstance(value, int) and not isinstance(value, bool)
