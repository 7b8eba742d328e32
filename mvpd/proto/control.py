"""One control connection, daemon side, as a sans-I/O protocol: bytes in, calls and bytes out.

:class:`ControlProtocol` is what ``mvpd.control`` runs for each client, without any I/O of
its own (the same split as python-websockets' ``Protocol`` and its asyncio connection):

* the I/O layer feeds what it reads with :meth:`~ControlProtocol.receive_data`, then takes
  :meth:`~ControlProtocol.events_received` (what it must act on) and sends
  :meth:`~ControlProtocol.data_to_send`;
* it answers calls with :meth:`~ControlProtocol.send` (a reply or event built with the
  helpers of :mod:`mvpd.proto.rpcwire`) and sends :meth:`~ControlProtocol.data_to_send`;
* once :attr:`~ControlProtocol.closing` is true it sends what is left and closes the socket.

The protocol owns the conversation's rules (see :mod:`mvpd.proto.rpcwire` for the wire):

* the first frame must be the hello; a frame error, a bad hello or a caller without access
  gets one error frame (``id`` nil) and the connection ends;
* before the hello, frames are capped at 4 KiB for callers without write access (a hello is
  tiny); after it, at ``max_frame`` or ``read_only_max_frame`` by access;
* a malformed frame gets an error reply and the connection goes on; an oversize header ends
  it (the stream cannot be resynchronised);
* every request is checked, in this order: envelope, method (:data:`~mvpd.proto.rpc.METHODS`),
  access (:func:`~mvpd.proto.rpc.check_access`, the only access rule), parameters. A request
  that fails gets its error reply here and the I/O layer never sees it (a refusal is reported
  as :class:`CallRefused` so that it can be logged); a good one becomes a
  :class:`CallReceived` carrying its typed parameters and method spec.

The caller's access is set by the I/O layer (from the kernel's peer credentials, re-resolved
now and then): :attr:`ControlProtocol.access`.

Before any of that, at ``accept``, :class:`ConnectionLedger` decides whether a connection may
be opened at all under the :class:`ControlLimits` (per uid, before the hello, for callers
without write access, the part reserved for root); see :mod:`mvpd.control` for the rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .errors import BadRequest, Forbidden, FrameError, FrameTooLarge, RpcError
from .rpc import (
    Access,
    MethodSpec,
    check_access,
    parse_client_hello,
    parse_request,
    validate_params,
)
from .rpcwire import (
    MAX_FRAME,
    FrameDecoder,
    encode_frame,
    error_message,
    request_id_of,
    server_hello,
)

#: Frames a caller without write access may send before its hello (a hello is tiny).
PRE_HELLO_READ_ONLY_FRAME = 4096


class ConnectionState(str, enum.Enum):
    """``awaiting-hello`` -> ``ready`` -> ``closing``; ``closing`` is final."""

    AWAITING_HELLO = "awaiting-hello"
    READY = "ready"
    CLOSING = "closing"


@dataclass(frozen=True)
class HelloReceived:
    """The client said hello and was answered; calls may follow."""

    client: str
    access: Access


@dataclass(frozen=True)
class HelloRefused:
    """A well-formed hello from a caller without access (its error frame is queued and the
    connection is closing)."""

    client: str


@dataclass(frozen=True)
class CallReceived:
    """A checked request: the caller may call ``method``, ``params`` are valid."""

    id: int
    method: str
    params: BaseModel
    spec: MethodSpec


@dataclass(frozen=True)
class CallRefused:
    """A request refused for want of access (its error reply is queued already)."""

    id: int | None
    method: str


ControlEvent = HelloReceived | HelloRefused | CallReceived | CallRefused


class ControlProtocol:
    """The daemon's side of one control connection (see the module documentation).

    ``access`` is the caller's (None: may not use the socket); ``forbidden_text`` is what such
    a caller is told, ``write_hint`` what a caller without write access is told about who
    may; ``server_name`` and ``agent_id`` go into the hello answer."""

    def __init__(
        self,
        *,
        access: Access | None,
        server_name: str,
        agent_id: str,
        forbidden_text: str = "you may not use this control socket",
        write_hint: str = "",
        max_frame: int = MAX_FRAME,
        read_only_max_frame: int = 64 * 1024,
    ) -> None:
        self.access = access
        self.server_name = server_name
        self.agent_id = agent_id
        self.forbidden_text = forbidden_text
        self.write_hint = write_hint
        self.max_frame = max_frame
        self.read_only_max_frame = read_only_max_frame
        self.state = ConnectionState.AWAITING_HELLO
        self._decoder = FrameDecoder(
            max_frame if access == "write" else min(read_only_max_frame, PRE_HELLO_READ_ONLY_FRAME)
        )
        self._events: list[ControlEvent] = []
        self._outgoing = bytearray()

    @property
    def partial_frame(self) -> bool:
        """Bytes of a frame not complete yet are waiting for more."""
        return self._decoder.buffered > 0

    @property
    def closing(self) -> bool:
        """The connection must end once :meth:`data_to_send` has been sent."""
        return self.state == ConnectionState.CLOSING

    # --- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client. Ignored once closing."""
        if self.closing:
            return
        for item in self._decoder.feed_items(data):
            if self.closing:
                return
            if isinstance(item, FrameError):
                self._frame_error(item)
            elif self.state == ConnectionState.AWAITING_HELLO:
                self._hello(item)
            else:
                self._request(item)

    def hello_timed_out(self) -> None:
        """The client did not say hello in time: tell it, then close."""
        if self.state == ConnectionState.AWAITING_HELLO:
            self._fail(BadRequest("no hello received in time"))

    def events_received(self) -> list[ControlEvent]:
        """What happened since the last call, in order."""
        events, self._events = self._events, []
        return events

    # --- output ------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Queue one message (a reply or an event). A reply too large for a frame becomes a
        ``too-large`` error reply; an event too large raises :class:`FrameTooLarge`."""
        try:
            frame = encode_frame(message)
        except FrameTooLarge as exc:
            if "id" not in message:
                raise
            frame = encode_frame(error_message(message["id"], exc))
        self._outgoing += frame

    def data_to_send(self) -> bytes:
        """Bytes to write to the client now (empty if none)."""
        data, self._outgoing = bytes(self._outgoing), bytearray()
        return data

    def close(self) -> None:
        """End the conversation (the I/O layer closes the socket)."""
        self.state = ConnectionState.CLOSING

    # --- the rules -----------------------------------------------------------------------------

    def _fail(self, exc: RpcError) -> None:
        self.send(error_message(None, exc))
        self.close()

    def _frame_error(self, exc: FrameError) -> None:
        if self.state == ConnectionState.AWAITING_HELLO or isinstance(exc, FrameTooLarge):
            self._fail(exc)
        else:
            self.send(error_message(None, exc))

    def _hello(self, message: dict[str, Any]) -> None:
        try:
            hello = parse_client_hello(message)
        except RpcError as exc:
            self._fail(exc)
            return
        if self.access is None:
            self._fail(Forbidden(self.forbidden_text))
            self._events.append(HelloRefused(hello.client))
            return
        self.state = ConnectionState.READY
        self._decoder.max_frame = (
            self.max_frame if self.access == "write" else self.read_only_max_frame
        )
        self.send(server_hello(self.server_name, self.agent_id, self.access))
        self._events.append(HelloReceived(hello.client, self.access))

    def _request(self, message: dict[str, Any]) -> None:
        request_id = request_id_of(message)
        method = ""
        try:
            request = parse_request(message)
            method = request.method
            spec = check_access(method, self.access, self.write_hint)
            params = validate_params(method, request.params)
        except Forbidden as exc:
            self.send(error_message(request_id, exc))
            self._events.append(CallRefused(request_id, method))
            return
        except RpcError as exc:
            self.send(error_message(request_id, exc))
            return
        self._events.append(CallReceived(request.id, method, params, spec))


# --- admission: who may open a connection, counted at accept ---------------------------------


@dataclass(frozen=True)
class ControlLimits:
    """Resource limits of the control server."""

    #: Largest frame from callers with write access.
    max_frame: int = MAX_FRAME
    #: Largest frame from read-only callers (they can only ask for status).
    read_only_max_frame: int = 64 * 1024
    #: Calls running at once per connection; more requests wait in the socket buffer.
    max_inflight: int = 16
    #: Subscriptions (recv streams, pipes) per connection.
    max_streams: int = 16
    #: Queued ``pipe.write``/``pipe.eof`` calls per pipe before the server stops reading.
    pipe_queue: int = 8
    #: Pipes copying passed descriptors (``pipe.open`` with ``attach``), from everyone at
    #: once: each has two threads. Past it, ``busy`` (``mvpctl pipe`` then frames its bytes).
    max_attached_pipes: int = 64
    #: Connections at once, from everyone; the last ``reserved_for_root`` only for root.
    max_connections: int = 512
    reserved_for_root: int = 16
    #: Connections at once from one uid (root excepted), and how many of them may still be
    #: waiting for their hello.
    max_connections_per_uid: int = 64
    max_pre_hello_per_uid: int = 32
    #: Connections at once from callers without write access (outside root and the group),
    #: all of them together and per uid; counted from ``accept``, before the hello.
    max_read_only_connections: int = 32
    max_read_only_per_uid: int = 8
    #: Seconds a new connection has to send its hello.
    hello_timeout: float = 5.0
    #: The listen backlog; connections are accepted at once, so it only absorbs bursts.
    backlog: int = 256
    #: Seconds a resolved access level is trusted before group membership is looked up again.
    access_ttl: float = 5.0


@dataclass(eq=False)
class Admission:
    """What was decided about a connection at ``accept``, and what it counts against."""

    pid: int
    uid: int
    gid: int
    access: Access | None
    #: Counted in the pool of callers without write access.
    read_only: bool
    hello_pending: bool = True


class ConnectionLedger:
    """The open control connections and the limits of :class:`ControlLimits` on them:
    :meth:`refusal` says whether one more from a uid fits, :meth:`admit` counts it in,
    :meth:`release` out. ``group`` is only named in refusals."""

    def __init__(self, limits: ControlLimits, group: str) -> None:
        self.limits = limits
        self.group = group
        self._admitted: list[Admission] = []

    def __len__(self) -> int:
        return len(self._admitted)

    def admit(self, pid: int, uid: int, gid: int, access: Access | None) -> Admission:
        """Count a connection in (after :meth:`refusal` said None)."""
        admission = Admission(pid, uid, gid, access, read_only=access != "write")
        self._admitted.append(admission)
        return admission

    def release(self, admission: Admission) -> None:
        """The connection closed."""
        self._admitted.remove(admission)

    def refusal(self, uid: int, access: Access | None) -> str | None:
        """Why a new connection from ``uid`` would break a limit, or None."""
        limits = self.limits
        total = len(self._admitted)
        if total >= limits.max_connections:
            return "too many control connections; try again later"
        if uid == 0:
            return None
        if total >= limits.max_connections - limits.reserved_for_root:
            return "too many control connections; try again later"
        mine = [a for a in self._admitted if a.uid == uid]
        if len(mine) >= limits.max_connections_per_uid:
            return (f"too many control connections from uid {uid} "
                    f"({limits.max_connections_per_uid} at most); close some")
        if sum(a.hello_pending for a in mine) >= limits.max_pre_hello_per_uid:
            return (f"too many control connections from uid {uid} still without their hello "
                    f"({limits.max_pre_hello_per_uid} at most)")
        if access != "write":
            if sum(a.read_only for a in mine) >= limits.max_read_only_per_uid:
                return (f"too many read-only control connections from uid {uid} "
                        f"({limits.max_read_only_per_uid} at most); close some")
            if sum(a.read_only for a in self._admitted) >= limits.max_read_only_connections:
                return (f"too many control connections from users outside group "
                        f"{self.group!r}; try again later")
        return None
