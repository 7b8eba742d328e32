"""Counters inside aiortc's SCTP association, for benchmarks of mvpd's tunnel.

``install(path)`` wraps a few methods of ``RTCSctpTransport`` in this process and appends
one JSON line per association to ``path`` every half second: congestion window, flight size,
queues, RTO, and counts of T3-rtx expiries, fast-recovery entries (a loss noticed from gap
reports), abandoned chunks and FORWARD-TSN chunks sent. Used as a daemon start-up hook:

    python -c "import sys; sys.path.insert(0, 'bench'); import sctp_probe; \
sctp_probe.install('/tmp/x.jsonl'); from mvpd.cli import main; main()"
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from typing import Any

from aiortc import rtcsctptransport as sctp_module

_ASSOCIATIONS: weakref.WeakSet[Any] = weakref.WeakSet()


def _counters(transport: Any) -> dict[str, int]:
    counters: dict[str, int] | None = getattr(transport, "_probe", None)
    if counters is None:
        counters = {"t3": 0, "fast_recovery": 0, "abandoned": 0, "forward_tsn": 0,
                    "chunks_sent": 0, "sacks_in": 0, "cwnd_min_hits": 0}
        transport._probe = counters
        _ASSOCIATIONS.add(transport)
    return counters


def install(path: str) -> None:
    """Wrap the SCTP transport's methods and start writing samples to ``path``."""
    cls = sctp_module.RTCSctpTransport
    original_t3 = cls._t3_expired
    original_sack = cls._receive_sack_chunk
    original_abandon = cls._maybe_abandon
    original_send_chunk = cls._send_chunk

    def t3_expired(self: Any) -> None:
        _counters(self)["t3"] += 1
        original_t3(self)

    async def receive_sack(self: Any, chunk: Any) -> None:
        counters = _counters(self)
        counters["sacks_in"] += 1
        before = self._fast_recovery_exit
        await original_sack(self, chunk)
        if before is None and self._fast_recovery_exit is not None:
            counters["fast_recovery"] += 1
        if self._cwnd <= 4 * sctp_module.USERDATA_MAX_LENGTH:
            counters["cwnd_min_hits"] += 1

    def maybe_abandon(self: Any, chunk: Any) -> bool:
        was = chunk._abandoned
        result: bool = original_abandon(self, chunk)
        if result and not was:
            _counters(self)["abandoned"] += 1
        return result

    async def send_chunk(self: Any, chunk: Any) -> None:
        counters = _counters(self)
        if isinstance(chunk, sctp_module.DataChunk):
            counters["chunks_sent"] += 1
        elif isinstance(chunk, sctp_module.ForwardTsnChunk):
            counters["forward_tsn"] += 1
        await original_send_chunk(self, chunk)

    cls._t3_expired = t3_expired
    cls._receive_sack_chunk = receive_sack
    cls._maybe_abandon = maybe_abandon
    cls._send_chunk = send_chunk

    original_init = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _counters(self)

    cls.__init__ = init

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.5)
            with open(path, "a") as out:  # noqa: ASYNC230 (a few lines, twice a second)
                for transport in list(_ASSOCIATIONS):
                    buffered = sum(
                        len(data) for _, _, data in transport._data_channel_queue
                    )
                    out.write(json.dumps({
                        "association": id(transport),
                        "t": round(time.time(), 2),
                        "cwnd": transport._cwnd,
                        "ssthresh": getattr(transport, "_ssthresh", None),
                        "flight": transport._flight_size,
                        "sent_q": len(transport._sent_queue),
                        "out_q": len(transport._outbound_queue),
                        "dc_q_bytes": buffered,
                        "rto": transport._rto,
                        "srtt": transport._srtt,
                        "unreliable_losses_ignored": getattr(
                            transport, "_mvpd_unreliable_losses_ignored", 0),
                        **transport._probe,
                    }) + "\n")

    original_start = cls.start

    async def start(self: Any, *args: Any, **kwargs: Any) -> None:
        if not getattr(cls, "_probe_sampling", False):
            cls._probe_sampling = True
            task = asyncio.ensure_future(sample())
            cls._probe_task = task
        await original_start(self, *args, **kwargs)

    cls.start = start
