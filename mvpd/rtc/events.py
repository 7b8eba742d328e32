"""A small event emitter with the surface of aiortc's (pyee's) ``on``/``once``/``emit``.

The transports in :mod:`mvpd.transports` subscribe to data channel events with
``channel.on("message", f)``; this keeps that surface without depending on pyee. Unlike
pyee, a listener that raises is logged and the others still run: events are emitted from
inside the SCTP receive path, which must not be torn down by one listener's bug.
Coroutine listeners are scheduled as tasks (and kept referenced until they finish).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Listener = TypeVar("Listener", bound=Callable[..., Any])


class EventEmitter:
    """Listeners by event name, called in the order they were added."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Callable[..., Any]]] = {}
        self._once: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def on(self, event: str, f: Listener | None = None) -> Any:
        """Add ``f`` for ``event``; without ``f``, a decorator that adds the function."""
        if f is None:

            def decorator(g: Listener) -> Listener:
                self._listeners.setdefault(event, []).append(g)
                return g

            return decorator
        self._listeners.setdefault(event, []).append(f)
        return f

    def once(self, event: str, f: Listener) -> Listener:
        """Add ``f`` for the next ``event`` only."""
        self._listeners.setdefault(event, []).append(f)
        self._once.add(id(f))
        return f

    def remove_listener(self, event: str, f: Callable[..., Any]) -> None:
        listeners = self._listeners.get(event, [])
        if f in listeners:
            listeners.remove(f)
        self._once.discard(id(f))

    def remove_all_listeners(self, event: str | None = None) -> None:
        if event is None:
            self._listeners.clear()
            self._once.clear()
        else:
            self._listeners.pop(event, None)

    def emit(self, event: str, *args: Any) -> bool:
        """Call the listeners of ``event`` with ``args``; ``True`` if there were any."""
        listeners = self._listeners.get(event)
        if not listeners:
            return False
        for f in list(listeners):
            if id(f) in self._once:
                self.remove_listener(event, f)
            try:
                result = f(*args)
            except Exception:
                log.exception("listener for %r failed", event)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
        return True

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("listener task failed", exc_info=task.exception())
