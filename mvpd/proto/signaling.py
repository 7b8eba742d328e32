"""Signaling messages: models, parsing and serialisation (sans-I/O).

The wire format is the seed's: one JSON object per WebSocket text frame, discriminated on
``type``::

    {"type": "register", "id": "alice", "token": "..."}
    {"type": "offer", "from": "alice", "to": "bob", "sdp": "v=0..."}
    {"type": "answer", "from": "bob", "to": "alice", "sdp": "v=0..."}
    {"type": "candidate", "from": "alice", "to": "bob",
     "candidate": {"candidate": "candidate:1 1 UDP ...", "sdpMid": "0", "sdpMLineIndex": 0}}
    {"type": "bye", "from": "alice", "to": "bob"}

Our reference server may also send ``registered`` and ``error``; clients must not depend on
them, since many signaling servers only route. Unknown extra fields are kept (browsers and other
servers add their own) but never trusted.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import MalformedMessage, UnknownMessageType
from .ids import AGENT_ID_PATTERN as AGENT_ID_PATTERN

AgentId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]

#: Upper bound for one SDP blob; real data-channel SDPs are ~1 KiB.
MAX_SDP_LENGTH = 64 * 1024
#: Default cap for one signaling frame, enforced by server and client.
MAX_MESSAGE_SIZE = 64 * 1024


class _Message(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow", frozen=True)

    def to_json(self) -> str:
        """Serialise to the wire form: aliases (``from``), no ``None`` fields."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


class _Routed(_Message):
    """A message from one agent to another. ``from`` may be absent on the way to the server,
    which fills it in; a routing-only server relays whatever the sender wrote."""

    sender: AgentId | None = Field(default=None, alias="from")
    to: AgentId


class Register(_Message):
    type: Literal["register"] = "register"
    id: AgentId
    token: str | None = Field(default=None, max_length=4096)

    def __repr__(self) -> str:  # never show the token
        return f"Register(id={self.id!r}, token={'***' if self.token else None})"


class Offer(_Routed):
    type: Literal["offer"] = "offer"
    sdp: str = Field(max_length=MAX_SDP_LENGTH)


class Answer(_Routed):
    type: Literal["answer"] = "answer"
    sdp: str = Field(max_length=MAX_SDP_LENGTH)


class IceCandidate(BaseModel):
    """The browser's RTCIceCandidateInit. An empty ``candidate`` string means end-of-candidates."""

    model_config = ConfigDict(extra="allow", frozen=True)

    candidate: str = Field(default="", max_length=1024)
    sdpMid: str | None = Field(default=None, max_length=64)  # wire name
    sdpMLineIndex: int | None = Field(default=None, ge=0, le=1024)  # wire name
    usernameFragment: str | None = Field(default=None, max_length=256)  # wire name


class Candidate(_Routed):
    type: Literal["candidate"] = "candidate"
    #: ``None`` (JSON null) is also end-of-candidates, as browsers send it.
    candidate: IceCandidate | None = None

    @property
    def is_end_of_candidates(self) -> bool:
        return self.candidate is None or not self.candidate.candidate


class Bye(_Routed):
    type: Literal["bye"] = "bye"
    reason: str | None = Field(default=None, max_length=256)


class Registered(_Message):
    """Optional extra from our server: registration accepted."""

    type: Literal["registered"] = "registered"
    id: AgentId


class Error(_Message):
    """Optional extra from our server: something the sender did was refused.

    ``code`` is one of :data:`ERROR_CODES`; ``peer`` names the target when it is offline.
    """

    type: Literal["error"] = "error"
    code: str = Field(max_length=64)
    message: str = Field(default="", max_length=1024)
    peer: AgentId | None = None
    #: The ``type`` of the message that caused it, when there was one.
    about: str | None = Field(default=None, max_length=64)


ERROR_CODES = {
    "bad-message": "the frame is not a valid signaling message",
    "unknown-type": "the message type is not known",
    "not-registered": "register first",
    "bad-token": "the token is missing or wrong",
    "id-in-use": "a live connection holds this id; the registration is refused",
    "id-taken": "another connection registered this id (older spelling of id-in-use)",
    "replaced": "this connection stopped answering and a newer one registered its id",
    "offline": "the target is not connected",
    "too-large": "the frame is over the size limit",
    "rate-limited": "too many messages, or too many failed registrations from one address",
}

Message: TypeAlias = Register | Offer | Answer | Candidate | Bye | Registered | Error
RoutedMessage: TypeAlias = Offer | Answer | Candidate | Bye

MESSAGE_TYPES: dict[str, type[_Message]] = {
    "register": Register,
    "offer": Offer,
    "answer": Answer,
    "candidate": Candidate,
    "bye": Bye,
    "registered": Registered,
    "error": Error,
}
ROUTED_TYPES = frozenset({"offer", "answer", "candidate", "bye"})

_ADAPTER: TypeAdapter[Message] = TypeAdapter(
    Annotated[Message, Field(discriminator="type")]
)


def parse_message(data: str | bytes | dict[str, Any]) -> Message:
    """Parse one signaling message from JSON text (or an already decoded object).

    Raises :class:`MalformedMessage` for anything that is not a valid message of a known type
    and :class:`UnknownMessageType` for a well-formed object with an unknown ``type``.
    Never raises anything else.
    """
    if isinstance(data, (str, bytes)):
        if len(data) > MAX_MESSAGE_SIZE * 16:
            raise MalformedMessage("message is far over any size limit")
        try:
            obj = json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise MalformedMessage(f"not JSON: {_short(exc)}") from None
    else:
        obj = data
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise MalformedMessage("missing or non-string 'type'")
    if kind not in MESSAGE_TYPES:
        raise UnknownMessageType(f"unknown message type {kind[:64]!r}", message_type=kind[:64])
    try:
        message = _ADAPTER.validate_python(obj)
        # Extra fields are kept unvalidated; make sure they can go back on the wire (a lone
        # surrogate from a JSON escape cannot), so relaying a parsed message never fails.
        message.to_json()
    except ValidationError as exc:
        detail = describe_validation_error(exc)
        raise MalformedMessage(f"invalid {kind!r} message: {detail}") from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise MalformedMessage(f"invalid {kind!r} message: {_short(exc)}") from None
    return message


def _reject_constant(name: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON, whatever Python's parser accepts."""
    raise ValueError(f"{name} is not valid JSON")


def dump_message(message: Message) -> str:
    """Serialise a message to its JSON wire text."""
    return message.to_json()


def describe_validation_error(exc: ValidationError, *, hide_input: bool = False) -> str:
    """A one-line summary of a pydantic error: ``field: problem`` for each, without input
    values when ``hide_input`` is set (secrets)."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "value"
        text = f"{loc}: {err['msg']}"
        if not hide_input and err["type"] not in ("missing",):
            text += f" (got {_short(err.get('input'))})"
        parts.append(text)
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
