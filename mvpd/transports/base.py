"""The data-channel transport base: sending with size limits and backpressure, receiving into
callbacks and the peer's inbox, counters.

A transport wraps one data channel. It never imports aiortc: the channel is anything that
looks like an ``RTCDataChannel`` (see :class:`DataChannelLike`), so a transport can be unit
tested and the TUN transport can build on it.

Backpressure: ``channel.send()`` queues without limit inside aiortc. The ``*_async`` senders
wait until the channel's ``bufferedAmount`` is below :attr:`Transport.high_watermark`
before handing over one more message, so the buffer never exceeds the watermark by more than
one message. Waiting uses the channel's ``bufferedamountlow`` event with
``bufferedAmountLowThreshold`` set to :attr:`Transport.low_watermark` (no polling).

Receiving: a message over :data:`MAX_MESSAGE_SIZE` (what we advertise as
``a=max-message-size``) is refused before it is decoded, counted as ``message-too-large``;
the channel stays open (RFC 8841 only obliges the sender; one bad message does not cost the
peer's queued data). A decoded chat/json/bytes message goes to the message listeners and into
one :class:`~mvpd.inbox.Inbox`: the transport's own, or, in the daemon, the peer's inbox the
core gives it (:meth:`Transport.use_inbox`), which ``mvpctl recv`` reads. No other queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ..inbox import Inbox, InboxMessage
from ..proto.errors import ConnectionClosed, MessageTooLarge, TransportError
from ..proto.modes import MAX_MESSAGE_SIZE, MessageKind, encode_json, wire_size

log = logging.getLogger(__name__)

#: Default send-buffer watermarks: wait above the high one, wake at the low one.
DEFAULT_HIGH_WATERMARK = 1024 * 1024
DEFAULT_LOW_WATERMARK = 256 * 1024
#: Default number of received messages a transport's own inbox keeps for
#: :meth:`Transport.recv` (when no core gives it its peer's inbox).
DEFAULT_QUEUE_SIZE = 1024

T = TypeVar("T")


class DataChannelLike(Protocol):
    """What a transport needs from a data channel (``aiortc.RTCDataChannel`` has it)."""

    @property
    def label(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    @property
    def readyState(self) -> str: ...

    @property
    def bufferedAmount(self) -> int: ...

    bufferedAmountLowThreshold: int

    def send(self, data: str | bytes) -> None: ...

    def close(self) -> None: ...

    def on(self, event: str, f: Callable[..., Any]) -> Any: ...


@dataclass(frozen=True)
class ChannelOptions:
    """How the channel for a transport is created (reliability, ordering)."""

    ordered: bool = True
    max_retransmits: int | None = None
    max_packet_lifetime: int | None = None


@dataclass(frozen=True)
class TransportErrorEvent:
    """Something the peer sent that could not be used (never fatal), or a failed send."""

    reason: str
    detail: str


@dataclass
class TransportCounters:
    """Traffic and error counters of one transport. ``errors`` counts, by reason, received
    messages this transport refused (``message-too-large``, ``invalid-utf8``, ``inbox-limit``
    ...) and failed sends; drops in the inbox are the inbox's own counters."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def add(self, other: TransportCounters) -> None:
        """Add ``other``'s counts to these (e.g. a closed channel's to a running total)."""
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.messages_in += other.messages_in
        self.messages_out += other.messages_out
        for reason, count in other.errors.items():
            self.errors[reason] = self.errors.get(reason, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "errors": dict(self.errors),
        }


class DecodeError(Exception):
    """Raised by :meth:`Transport.decode` for a message from the peer that is unusable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Transport(Generic[T]):
    """One data channel, with typed messages in and size-checked, flow-controlled sends out.

    Subclasses set :attr:`mode` and override :meth:`decode` (peer data -> message). Incoming
    messages go to every listener added with :meth:`add_message_listener` and into one
    bounded inbox read by :meth:`recv` (see the module docstring). Unusable or oversized peer
    data is counted in ``counters.errors`` and reported to error listeners; it is never fatal.
    ``queue_size=0`` means no inbox (pipe and tun transports, which deliver elsewhere).
    """

    mode: ClassVar[str] = "base"
    #: The kind of the messages this transport puts in its inbox.
    kind: ClassVar[MessageKind] = "bytes"
    channel_options: ClassVar[ChannelOptions] = ChannelOptions()

    def __init__(
        self,
        *,
        high_watermark: int = DEFAULT_HIGH_WATERMARK,
        low_watermark: int = DEFAULT_LOW_WATERMARK,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        if not 0 <= low_watermark < high_watermark:
            raise ValueError("need 0 <= low_watermark < high_watermark")
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.max_message_size = max_message_size
        self.counters = TransportCounters()
        self._channel: DataChannelLike | None = None
        self._queue_size = queue_size
        self._inbox: Inbox | None = None
        self._inbox_source: Callable[[], Inbox | None] | None = None
        self._message_listeners: list[Callable[[T], None]] = []
        self._error_listeners: list[Callable[[TransportErrorEvent], None]] = []
        self._close_listeners: list[Callable[[], None]] = []
        # Woken on bufferedamountlow, on open and on close.
        self._writable = asyncio.Event()
        self._opened = asyncio.Event()
        self._closed = asyncio.Event()
        self._send_lock = asyncio.Lock()

    # --- channel ---------------------------------------------------------------------------

    @property
    def channel(self) -> DataChannelLike | None:
        """The attached data channel, if any."""
        return self._channel

    @property
    def label(self) -> str:
        return self._channel.label if self._channel is not None else ""

    @property
    def is_open(self) -> bool:
        return (
            self._channel is not None
            and self._channel.readyState == "open"
            and not self._closed.is_set()
        )

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    def attach_channel(self, channel: DataChannelLike) -> None:
        """Use ``channel`` for sending and receiving. One channel per transport."""
        if self._channel is not None:
            raise TransportError("a channel is already attached to this transport")
        self._channel = channel
        channel.bufferedAmountLowThreshold = self.low_watermark
        channel.on("message", self._on_channel_message)
        channel.on("bufferedamountlow", self._on_buffered_amount_low)
        channel.on("open", self._on_channel_open)
        channel.on("close", self._on_channel_close)
        if channel.readyState == "open":
            self._on_channel_open()
        elif channel.readyState == "closed":
            self._on_channel_close()

    async def wait_open(self) -> None:
        """Wait until the channel is open; raise :class:`ConnectionClosed` if it closes."""
        if self._opened.is_set() and not self._closed.is_set():
            return
        await wait_for_first(
            asyncio.ensure_future(self._opened.wait()), asyncio.ensure_future(self._closed.wait())
        )
        if self._closed.is_set():
            raise ConnectionClosed("the data channel closed before it opened")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def close(self) -> None:
        """Close the channel (idempotent). Pending receivers and senders wake up."""
        if self._channel is not None and self._channel.readyState not in ("closing", "closed"):
            try:
                self._channel.close()
            except Exception as exc:  # the peer connection may be gone already
                log.debug("closing channel %r: %s", self.label, exc)
        self._on_channel_close()

    # --- listeners -------------------------------------------------------------------------

    def add_message_listener(self, listener: Callable[[T], None]) -> Callable[[], None]:
        """Call ``listener(message)`` for every message; returns a function that removes it."""
        self._message_listeners.append(listener)
        return lambda: _discard(self._message_listeners, listener)

    def add_error_listener(
        self, listener: Callable[[TransportErrorEvent], None]
    ) -> Callable[[], None]:
        """Call ``listener(event)`` for each unusable message; returns a remover."""
        self._error_listeners.append(listener)
        return lambda: _discard(self._error_listeners, listener)

    def add_close_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._close_listeners.append(listener)
        return lambda: _discard(self._close_listeners, listener)

    # --- receiving -------------------------------------------------------------------------

    def decode(self, data: str | bytes) -> T:
        """Turn what the peer sent into a message; raise :class:`DecodeError` if unusable."""
        raise NotImplementedError

    def use_inbox(self, source: Callable[[], Inbox | None]) -> None:
        """Deliver into the inbox ``source()`` returns (the core's inbox of this peer) instead
        of one of our own; when it returns None the message is dropped as ``inbox-limit``.
        Once this transport is closed, ``source`` must return an existing inbox or None."""
        self._inbox_source = source

    @property
    def inbox(self) -> Inbox | None:
        """The inbox received messages go to (None for pipe and tun transports, and while
        the core has none for this peer)."""
        if self._inbox_source is not None:
            return self._inbox_source()
        if self._inbox is None and self._queue_size > 0:
            self._inbox = Inbox(max_messages=self._queue_size)
        return self._inbox

    async def recv(self) -> T:
        """The next received message; :class:`ConnectionClosed` once closed and drained."""
        while True:
            inbox = self.inbox
            message = inbox.pop() if inbox is not None else None
            if message is not None:
                value: T = message.value
                return value
            if self._closed.is_set() or inbox is None:
                raise ConnectionClosed("the data channel is closed")
            await inbox.wait()

    async def messages(self) -> AsyncIterator[T]:
        """Iterate received messages until the channel closes."""
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    def _on_channel_message(self, data: str | bytes) -> None:
        # Called from inside aiortc's SCTP receive path: an exception here would tear down
        # the whole association, so nothing may escape.
        try:
            size = wire_size(data)
            self.counters.messages_in += 1
            self.counters.bytes_in += size
            if size > MAX_MESSAGE_SIZE:
                # aiortc has reassembled the whole message by now (it does not bound
                # reassembly by our advertised limit): all we can do here is not keep it.
                # The bound belongs in reassembly: our own SCTP (mvpd/sctp/reassembly.py),
                # which replaces aiortc's, refuses a message there as soon as its partial
                # size passes the limit; this check stays for any channel that does not.
                self.report_error(
                    "message-too-large",
                    f"refused a {size}-byte message: over the advertised max-message-size "
                    f"of {MAX_MESSAGE_SIZE} bytes",
                )
                return
            self.receive(data)
        except Exception as exc:
            self.counters.count_error("internal")
            log.exception("transport %r failed on a received message: %s", self.label, exc)

    def receive(self, data: str | bytes) -> None:
        """Handle one message from the peer (override for stream protocols)."""
        try:
            message = self.decode(data)
        except DecodeError as exc:
            self.report_error(exc.reason, exc.detail)
            return
        self.deliver(message, wire_size(data))

    def deliver(self, message: T, size: int = 0) -> None:
        """Hand a decoded message (of ``size`` bytes on the channel) to the listeners and
        the inbox."""
        if self._queue_size > 0:
            inbox = self.inbox
            if inbox is None:
                self.counters.count_error("inbox-limit")
            else:
                inbox.put(InboxMessage(self.kind, message, max(size, 1)))
        for listener in list(self._message_listeners):
            try:
                listener(message)
            except Exception:
                self.counters.count_error("listener")
                log.exception("message listener of transport %r failed", self.label)

    def report_error(self, reason: str, detail: str) -> None:
        """Count an error and tell the error listeners."""
        self.counters.count_error(reason)
        log.debug("transport %r: %s: %s", self.label, reason, detail)
        event = TransportErrorEvent(reason, detail)
        for listener in list(self._error_listeners):
            try:
                listener(event)
            except Exception:
                log.exception("error listener of transport %r failed", self.label)

    # --- sending ---------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """Send one text message now (no waiting; see :meth:`send_text_async`)."""
        self._send(text)

    def send_json(self, obj: Any) -> None:
        """Send one JSON value as a text message."""
        self._send(encode_json(obj))

    def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send one binary message now."""
        self._send(bytes(data))

    async def send_text_async(self, text: str) -> None:
        """Wait for buffer room, then send one text message."""
        await self._send_async(text)

    async def send_json_async(self, obj: Any) -> None:
        await self._send_async(encode_json(obj))

    async def send_bytes_async(self, data: bytes | bytearray | memoryview) -> None:
        await self._send_async(bytes(data))

    @property
    def buffered_amount(self) -> int:
        return self._channel.bufferedAmount if self._channel is not None else 0

    async def wait_writable(self) -> None:
        """Wait until the send buffer is below the high watermark (or raise if closed)."""
        channel = self._require_open()
        while channel.bufferedAmount >= self.high_watermark:
            self._writable.clear()
            await self._writable.wait()
            channel = self._require_open()

    async def _send_async(self, data: str | bytes) -> None:
        self.check_size(data)
        # One sender at a time, so concurrent writers cannot together overshoot the watermark.
        async with self._send_lock:
            await self.wait_writable()
            self._send(data)

    def check_size(self, data: str | bytes) -> None:
        size = wire_size(data)
        if size > self.max_message_size:
            self.counters.count_error("too-large")
            raise MessageTooLarge(
                f"message of {size} bytes is over the data channel limit of "
                f"{self.max_message_size} bytes; split it or use a pipe"
            )

    def _send(self, data: str | bytes) -> None:
        self.check_size(data)
        channel = self._require_open()
        try:
            channel.send(data)
        except Exception as exc:  # aiortc: InvalidStateError, ValueError (remote limit)
            self.counters.count_error("send-failed")
            raise TransportError(f"cannot send on channel {self.label!r}: {exc}") from exc
        self.counters.messages_out += 1
        self.counters.bytes_out += wire_size(data)

    def _require_open(self) -> DataChannelLike:
        channel = self._channel
        if channel is None:
            raise TransportError("no data channel is attached to this transport")
        if self._closed.is_set() or channel.readyState != "open":
            state = "closed" if self._closed.is_set() else channel.readyState
            raise ConnectionClosed(f"data channel {channel.label!r} is not open ({state})")
        return channel

    # --- channel events --------------------------------------------------------------------

    def _on_buffered_amount_low(self) -> None:
        self._writable.set()

    def _on_channel_open(self) -> None:
        self._opened.set()
        self.on_open()

    def on_open(self) -> None:
        """Hook for subclasses: the channel just opened."""

    def _on_channel_close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        # Wake our readers (an inbox source makes no new inbox for a closed transport).
        inbox = self._inbox_source() if self._inbox_source is not None else self._inbox
        if inbox is not None:
            inbox.wake()
        self._writable.set()
        for listener in list(self._close_listeners):
            try:
                listener()
            except Exception:
                log.exception("close listener of transport %r failed", self.label)


def _discard(items: list[Any], item: Any) -> None:
    with contextlib.suppress(ValueError):
        items.remove(item)


async def wait_for_first(*aws: asyncio.Future[Any]) -> None:
    """Wait until the first of ``aws`` finishes and cancel the others."""
    try:
        await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in aws:
            fut.cancel()
