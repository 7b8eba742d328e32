"""The streams of a control connection: ``recv`` subscriptions and byte pipes.

A stream method (``recv``, ``pipe.open``) answers with a subscription number, then events:
``message`` for each message of a ``recv``; ``data`` and ``eof`` from the peer's side of a
pipe; one ``error`` if the stream breaks; ``end`` last, once. :class:`ConnectionStreams`
serves them for one connection: it pumps a handler's message iterator or
:class:`~mvpd.control_handler.PipeStream` into events, only as fast as the client's socket
takes them (backpressure), carries ``pipe.write`` and ``pipe.eof`` out one at a time in the
client's order (``pipe.eof`` answered once the peer has taken everything: the EOF-ACK),
answers ``cancel``, and ends every stream when the connection ends. A pipe opened with
``attach`` copies the client's passed input and output itself
(:mod:`mvpd.descriptor_copy`) and has only ``error`` and ``end`` events. A pipe's progress
is the table of :mod:`mvpd.proto.pipe_states`. The connection itself (reading, writing, dispatch)
is :class:`mvpd.control.ControlConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .control_handler import PipeStream
from .descriptor_copy import InputReader, OutputWriter, open_reader, open_writer
from .passed_descriptors import Passed, access_refusal, close_soon
from .proto.control import CallReceived, ControlLimits
from .proto.errors import BadRequest, Busy, ConnectionClosed, InvalidParams, MvpError, NotFound
from .proto.fsm import StateMachine
from .proto.pipe_states import PipeEvent, PipeState, eof_sent, pipe_machine
from .proto.rpc import (
    PeerMessage,
    PipeWriteParams,
    SubParams,
    error_message,
    event_message,
    result_message,
    to_wire,
)

log = logging.getLogger("mvpd.control")


@dataclass(eq=False)
class ServedStream:
    """One subscription of a control connection: a ``recv`` stream or a pipe.

    A pipe's progress is the table of :mod:`mvpd.proto.pipe_states`, seen from the client:
    its ``pipe.eof`` ends the local direction, the peer's ``eof`` the remote one; the pipe
    ends once both did, or when it broke."""

    sub: int
    kind: Literal["recv", "pipe"]
    task: asyncio.Task[None] | None = None
    pipe: PipeStream | None = None
    queue: asyncio.Queue[tuple[int, str, Any]] | None = None
    writer_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None
    #: An attached pipe's copies of the client's input and output.
    source: InputReader | None = None
    sink: OutputWriter | None = None
    stream: StateMachine[PipeState, PipeEvent] = field(
        default_factory=lambda: pipe_machine(PipeState.OPEN)
    )
    #: Why the stream failed (its ``error`` event was sent): said once, and to the
    #: ``pipe.write``/``pipe.eof`` calls still waiting when it ends.
    failure: Exception | None = None
    #: The ``pipe.write``/``pipe.eof`` request being carried out.
    writing: int | None = None
    ended: bool = False

    def advance(self, event: PipeEvent) -> None:
        """Apply ``event`` if the pipe's table takes it (a stream that broke takes no EOF)."""
        if self.stream.accepts(event):
            self.stream.handle(event)


class AttachedPipes:
    """How many pipes copy passed descriptors, daemon-wide (each costs two threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def take(self) -> None:
        """Count one more; :class:`Busy` at the limit."""
        if self.count >= self.limit:
            raise Busy(f"too many pipes copying passed descriptors ({self.limit} at most)")
        self.count += 1

    def give(self) -> None:
        self.count -= 1

    def give_when_closed(self, *copies: InputReader | OutputWriter) -> None:
        """Count one less once every copy has let go of its descriptor: a thread stuck in
        a read or write it cannot be woken from keeps its pipe counted, so such threads
        stay bounded by the limit."""
        left = len(copies)

        def closed() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                self.give()

        for copy in copies:
            copy.when_closed(closed)


class ConnectionStreams:
    """The subscriptions of one control connection.

    ``send`` writes one message to the client (raising
    :class:`~mvpd.proto.errors.ConnectionClosed` once it is gone); ``spawn`` runs a
    coroutine as one of the connection's tasks (cancelled when the connection ends);
    ``attached`` counts the daemon's attached pipes."""

    def __init__(
        self,
        limits: ControlLimits,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        spawn: Callable[[Awaitable[None]], asyncio.Task[None]],
        attached: AttachedPipes | None = None,
    ) -> None:
        self.limits = limits
        self._send = send
        self._spawn = spawn
        self._attached = attached or AttachedPipes(limits.max_attached_pipes)
        self._subs: dict[int, ServedStream] = {}
        self._next_sub = 1
        self._reserved = 0
        #: Descriptors passed with ``pipe.open`` requests not served yet, with their
        #: request (the very one: a client may use an id twice).
        self._descriptors: list[tuple[CallReceived, list[Passed] | None]] = []
        #: The connection is ending: streams end without telling the client.
        self.closing = False

    async def open(self, call: CallReceived, start: Callable[[], Awaitable[Any]]) -> None:
        """Serve the stream method ``call``: ``start()`` is the handler's answer (a message
        iterator, or a :class:`PipeStream` for ``pipe.open``). :class:`Busy` if the
        connection has :attr:`ControlLimits.max_streams` already (those starting included)."""
        attaching, passed = self._adopted(call)
        fds: list[int] | None = None
        try:
            if attaching:
                fds = _attachable(passed)
            if len(self._subs) + self._reserved >= self.limits.max_streams:
                raise Busy(
                    f"too many streams on this connection ({self.limits.max_streams} at most)"
                )
            if fds is not None:
                self._attached.take()
        except BaseException:
            close_soon(_descriptors_of(passed))
            raise
        self._reserved += 1
        try:
            value = await start()
        except BaseException:
            if fds is not None:
                close_soon(fds)
                self._attached.give()
            raise
        finally:
            self._reserved -= 1
        await self._start(call, value, fds)

    def adopt_descriptors(self, call: CallReceived, passed: list[Passed] | None) -> None:
        """Keep the descriptors passed with the ``pipe.open`` request ``call`` (None: it came
        without) until :meth:`open` serves it."""
        self._descriptors.append((call, passed))

    def _adopted(self, call: CallReceived) -> tuple[bool, list[Passed] | None]:
        """Whether ``call`` came to attach, and the descriptors it brought."""
        for index, (adopted, passed) in enumerate(self._descriptors):
            if adopted is call:
                del self._descriptors[index]
                return True, passed
        return False, None

    async def close(self) -> None:
        """End every stream (the connection ends): close their pipes, stop their tasks."""
        for _, passed in self._descriptors:
            close_soon(_descriptors_of(passed))
        self._descriptors.clear()
        for sub in list(self._subs.values()):
            await self._end(sub, notify=False)

    async def cancel(self, call: CallReceived) -> None:
        """``cancel``: answer it, then end the subscription (its ``end`` event follows)."""
        assert isinstance(call.params, SubParams)
        sub = self._subs.get(call.params.sub)
        if sub is None:
            await self._send(error_message(call.id, NotFound(f"no subscription {call.params.sub}")))
            return
        await self._send(result_message(call.id, {}))
        await self._end(sub)

    async def _start(self, call: CallReceived, value: Any, fds: list[int] | None) -> None:
        sub = ServedStream(self._next_sub, "pipe" if call.method == "pipe.open" else "recv")
        self._next_sub += 1
        if fds is not None:
            sub.pipe = value
            try:
                sub.source, sub.sink = _open_copies(fds)
            except BaseException:
                self._attached.give()
                try:
                    await value.close()
                except Exception:
                    log.exception("closing pipe %d failed", sub.sub)
                raise
        elif sub.kind == "pipe":
            sub.pipe = value
            sub.queue = asyncio.Queue(self.limits.pipe_queue)
        self._subs[sub.sub] = sub
        try:
            await self._send(result_message(call.id, {"sub": sub.sub}))
        except BaseException:
            await self._end(sub, notify=False)
            raise
        if sub.kind == "recv":
            sub.task = self._spawn(self._pump_messages(sub, value))
        elif sub.source is not None:
            sub.task = self._spawn(self._copy_out(sub))
            sub.writer_task = self._spawn(self._copy_in(sub))
            sub.watch_task = self._spawn(self._watch_pipe(sub))
        else:
            sub.task = self._spawn(self._pump_pipe(sub))
            sub.writer_task = self._spawn(self._pipe_writer(sub))
            sub.watch_task = self._spawn(self._watch_pipe(sub))

    async def _pump_messages(
        self, sub: ServedStream, messages: AsyncIterator[PeerMessage]
    ) -> None:
        try:
            async for message in messages:
                await self._send(event_message(sub.sub, "message", to_wire(message)))
        except (asyncio.CancelledError, ConnectionClosed):
            raise
        except Exception as exc:
            await self._stream_error(sub, exc)
        finally:
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        sub.task = None
        await self._end(sub)

    # A pipe's own failures (the peer went away) are told to the client; only a failure to
    # write to the client itself (ConnectionClosed from _send) means the client is gone. The
    # two are kept apart by never sending from inside the try that calls into the pipe.

    async def _pump_pipe(self, sub: ServedStream) -> None:
        assert sub.pipe is not None
        chunks = sub.pipe.read()
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._fail_stream(sub, exc)
                return
            await self._send(event_message(sub.sub, "data", {"data": bytes(chunk)}))
        await self._send(event_message(sub.sub, "eof"))
        sub.advance(PipeEvent.EOF_RECEIVED)
        sub.task = None
        if sub.stream.state == PipeState.CLOSED:
            await self._end(sub)

    async def _pipe_writer(self, sub: ServedStream) -> None:
        assert sub.pipe is not None and sub.queue is not None
        while True:
            request_id, method, data = await sub.queue.get()
            sub.writing = request_id
            reply: dict[str, Any]
            try:
                if eof_sent(sub.stream.state):
                    raise BadRequest(f"pipe {sub.sub}: the writing side has already ended")
                if method == "pipe.write":
                    await sub.pipe.write(data)
                else:
                    await sub.pipe.write_eof()
                    sub.advance(PipeEvent.EOF_SENT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, MvpError | TimeoutError):
                    log.exception("pipe %s failed", method)
                reply = error_message(request_id, exc)
            else:
                reply = result_message(request_id, {})
            sub.writing = None
            await self._send(reply)
            if sub.stream.state == PipeState.CLOSED:
                sub.writer_task = None
                await self._end(sub)
                return

    async def _copy_in(self, sub: ServedStream) -> None:
        """An attached pipe: the client's input to the peer, then EOF."""
        assert sub.pipe is not None and sub.source is not None
        try:
            while data := await sub.source.read():
                await sub.pipe.write(data)
            await sub.pipe.write_eof()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail_stream(sub, exc)
            return
        sub.advance(PipeEvent.EOF_SENT)
        sub.writer_task = None
        if sub.stream.state == PipeState.CLOSED:
            await self._end(sub)

    async def _copy_out(self, sub: ServedStream) -> None:
        """An attached pipe: the peer's bytes to the client's output, closed at the peer's
        EOF once everything is written."""
        assert sub.pipe is not None and sub.sink is not None
        try:
            async for chunk in sub.pipe.read():
                await sub.sink.write(chunk)
            await sub.sink.finish()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail_stream(sub, exc)
            return
        sub.advance(PipeEvent.EOF_RECEIVED)
        sub.task = None
        if sub.stream.state == PipeState.CLOSED:
            await self._end(sub)

    async def _watch_pipe(self, sub: ServedStream) -> None:
        assert sub.pipe is not None
        try:
            error: Exception = await self._first_failure(sub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        sub.watch_task = None
        await self._fail_stream(sub, error)

    async def _first_failure(self, sub: ServedStream) -> Exception:
        """The pipe's break, or (attached) the client's output failing, whichever first:
        a failed output is noticed even while no data comes to write."""
        assert sub.pipe is not None
        if sub.sink is None:
            return await sub.pipe.wait_broken()
        waits = [asyncio.ensure_future(sub.pipe.wait_broken()),
                 asyncio.ensure_future(sub.sink.failed())]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return done.pop().result()

    async def _fail_stream(self, sub: ServedStream, exc: Exception) -> None:
        """The stream cannot go on: one ``error`` event, then ``end``."""
        if sub.ended or sub.failure is not None:
            return
        sub.failure = exc
        sub.advance(PipeEvent.FAILED)
        await self._stream_error(sub, exc)
        await self._end(sub)

    async def enqueue_pipe(self, call: CallReceived) -> None:
        """``pipe.write`` or ``pipe.eof``: queued for the pipe's writer, which carries them
        out in order and answers each; while the queue is full this connection is not read."""
        params = call.params
        assert isinstance(params, PipeWriteParams | SubParams)
        sub = self._subs.get(params.sub)
        if sub is None or sub.ended:
            await self._send(error_message(call.id, NotFound(f"no subscription {params.sub}")))
            return
        if sub.kind != "pipe" or sub.queue is None:
            what = "copies the descriptors passed with it" if sub.source else "is not a pipe"
            await self._send(
                error_message(call.id, InvalidParams(f"subscription {params.sub} {what}"))
            )
            return
        data = params.data if isinstance(params, PipeWriteParams) else None
        # Awaiting here stops reading this connection while the pipe is backed up.
        await sub.queue.put((call.id, call.method, data))
        if sub.ended:  # it ended while we waited for room: nobody will carry this out
            reason = sub.failure or ConnectionClosed(f"pipe {sub.sub} has ended")
            await self._send(error_message(call.id, reason))

    async def _stream_error(self, sub: ServedStream, exc: Exception) -> None:
        if not isinstance(exc, MvpError | TimeoutError):
            log.exception("stream %d failed", sub.sub)
        await self._send(event_message(sub.sub, "error", error_message(None, exc)["error"]))

    async def _end(self, sub: ServedStream, *, notify: bool = True) -> None:
        """Finish a subscription once: stop its tasks, close its pipe, send ``end``."""
        if sub.ended:
            return
        sub.ended = True
        current = asyncio.current_task()
        for task in (sub.task, sub.writer_task, sub.watch_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if sub.source is not None and sub.sink is not None:
            sub.source.stop()
            sub.sink.stop()
            self._attached.give_when_closed(sub.source, sub.sink)
        if sub.pipe is not None:
            try:
                await sub.pipe.close()
            except Exception:
                log.exception("closing pipe %d failed", sub.sub)
        self._subs.pop(sub.sub, None)
        if sub.queue is not None and not self.closing:
            # Writes that were waiting get an answer too (clients may wait for each one).
            unanswered = [sub.writing] if sub.writing is not None else []
            while not sub.queue.empty():
                unanswered.append(sub.queue.get_nowait()[0])
            reason = sub.failure or ConnectionClosed(f"pipe {sub.sub} has ended")
            for request_id in unanswered:
                with contextlib.suppress(ConnectionClosed):
                    await self._send(error_message(request_id, reason))
        if notify and not self.closing:
            with contextlib.suppress(ConnectionClosed):
                await self._send(event_message(sub.sub, "end"))


def _descriptors_of(passed: list[Passed] | None) -> list[int]:
    """The descriptors among ``passed`` (the refused ones are closed already)."""
    return [fd for fd in passed or [] if isinstance(fd, int)]


def _attachable(passed: list[Passed] | None) -> list[int]:
    """The input and output passed with ``pipe.open``; :class:`InvalidParams` (closing
    nothing) if they are missing or cannot be copied."""
    if passed is None:
        raise InvalidParams(
            "pipe.open with attach needs two descriptors, the input and the output, "
            "sent with the request (SCM_RIGHTS)"
        )
    for role, item in zip(("input", "output"), passed, strict=True):
        reason = item if isinstance(item, str) else access_refusal(
            item, writing=role == "output")
        if reason is not None:
            raise InvalidParams(
                f"the {role} passed with pipe.open {reason}; without attach "
                "(mvpctl pipe --framed) its bytes go over the control socket"
            )
    return _descriptors_of(passed)


def _open_copies(fds: list[int]) -> tuple[InputReader, OutputWriter]:
    """The copies of the passed input and output (they own the descriptors, even if this
    fails: :class:`Busy`)."""
    try:
        source = open_reader(fds[0])
    except BaseException:
        close_soon([fds[1]])
        raise
    try:
        sink = open_writer(fds[1])
    except BaseException:
        source.stop()
        raise
    return source, sink
