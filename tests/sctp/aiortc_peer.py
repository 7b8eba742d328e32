"""Our association against aiortc's RTCSctpTransport, in one asyncio loop, with a fake DTLS
transport between them (packets go straight across, optionally dropped)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from aiortc.rtcsctptransport import RTCSctpTransport

from mvpd.sctp import Association, Event


class FakeDtls:
    """What RTCSctpTransport needs of an RTCDtlsTransport."""

    def __init__(self, role: str, deliver: Callable[[bytes], None]) -> None:
        self.state = "connected"
        self._role = role
        self._deliver = deliver
        self.receiver: Any = None

    def _register_data_receiver(self, receiver: Any) -> None:
        self.receiver = receiver

    def _unregister_data_receiver(self, receiver: Any) -> None:
        self.receiver = None

    async def _send_data(self, data: bytes) -> None:
        self._deliver(data)


class OurSide:
    """Drives an :class:`Association` from asyncio: packets in, timers, packets out."""

    def __init__(self, association: Association, send: Callable[[bytes], None]) -> None:
        self.association = association
        self._send = send
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def now(self) -> float:
        return self._loop.time()

    def receive(self, data: bytes) -> None:
        self.association.receive_packet(data, self.now())
        self.flush()

    def flush(self) -> None:
        association = self.association
        for packet in association.packets_to_send():
            self._send(packet)
        new = association.events()
        if new:
            self.events.extend(new)
            self.changed.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = association.next_deadline()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.association.handle_timeout(self.now())
        self.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


class Wire:
    """Our side and aiortc's side with a lossy hop between them (``loss`` each way)."""

    def __init__(self, *, loss: float = 0.0, seed: int = 7, aiortc_role: str = "server",
                 **options: Any) -> None:
        self.random = random.Random(seed)
        self.loss = loss
        loop = asyncio.get_running_loop()
        self.dtls = FakeDtls(aiortc_role, self._to_us)
        self.theirs = RTCSctpTransport(self.dtls)  # type: ignore[arg-type]
        self.ours = OurSide(Association(**options), self._to_them)
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    def _lost(self) -> bool:
        return self.loss > 0 and self.random.random() < self.loss

    def _to_us(self, data: bytes) -> None:
        if not self._lost():
            self._loop.call_soon(self.ours.receive, data)

    def _to_them(self, data: bytes) -> None:
        if self._lost():
            return
        receiver = self.dtls.receiver
        if receiver is not None:
            task = self._loop.create_task(receiver._handle_data(data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def start(self, *, we_connect: bool = True) -> None:
        from aiortc.rtcsctptransport import RTCSctpCapabilities

        await self.theirs.start(RTCSctpCapabilities(maxMessageSize=262144), 5000)
        if we_connect:
            self.ours.association.connect(self.ours.now())
            self.ours.flush()

    async def stop(self) -> None:
        self.ours.close()
        await self.theirs.stop()
        for task in list(self._tasks):
            task.cancel()
