"""Liveness checks: notice a vanished peer within 1.2 x ``peer_timeout``.

aioice's consent freshness (RFC 7675) gives up only after about 30 s. These checks are the
same kind of request on the selected candidate pair, an authenticated STUN binding request
that the remote ICE agent (aioice or a browser) answers by itself however busy its channels
are: one every ``peer_timeout``/5 s, one at a time, and the peer counts as gone when no
answer came for ``peer_timeout`` s. A few bytes per check; nothing on the data channels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..rtc import PeerConnection
from ..rtc import aiortc_internals as internals

#: Liveness checks per ``peer_timeout`` (one every peer_timeout/5 s).
LIVENESS_CHECKS_PER_TIMEOUT = 5
#: Retransmissions of one liveness check (sent at 0, 0.5 and 1.5 s; given up at 3.5 s).
LIVENESS_RETRANSMISSIONS = 2
#: Timed liveness checks kept for ``mvpctl stats`` (the ICE round trip).
LIVENESS_RTTS = 16


async def watch_liveness(
    pc: PeerConnection,
    *,
    peer_timeout: Callable[[], float],
    active: Callable[[], bool],
    log: logging.LoggerAdapter[logging.Logger] | logging.Logger,
    on_rtt: Callable[[float], None] | None = None,
) -> str | None:
    """Check ``pc``'s selected pair until ``active()`` turns false or the peer stops
    answering.

    ``peer_timeout()`` is read before each check (0 or less: no checks); ``on_rtt`` gets the
    round trip (s) of each answered check. Returns why the
    peer counts as gone, or ``None`` when watching stopped for another reason (inactive,
    disabled, or this aioice's checks work differently: then consent freshness remains).
    """
    loop = asyncio.get_running_loop()
    last_answer = loop.time()
    probe: asyncio.Task[bool] | None = None

    async def check() -> bool:
        nonlocal last_answer
        sent = time.monotonic()  # not loop.time(): uvloop's has a 1 ms resolution
        answered = await internals.probe_selected_pair(
            pc.ice_transport, retransmissions=LIVENESS_RETRANSMISSIONS
        )
        if answered:
            last_answer = loop.time()
            if on_rtt is not None:
                on_rtt(time.monotonic() - sent)
        return answered

    try:
        while active():
            timeout = peer_timeout()
            if timeout <= 0:
                return None
            await asyncio.sleep(timeout / LIVENESS_CHECKS_PER_TIMEOUT)
            if not active():
                return None
            if probe is not None and probe.done():
                error = None if probe.cancelled() else probe.exception()
                probe = None
                if error is not None and not isinstance(error, internals.ProbeUnanswered):
                    # Not a missing answer: this aioice works differently. Leave the peer
                    # to consent freshness rather than fail healthy sessions.
                    log.warning("liveness checks unavailable (%s: %s); relying on ICE "
                                "consent freshness", type(error).__name__, error)
                    return None
            silent = loop.time() - last_answer
            if silent >= timeout:
                return (f"no reply to liveness checks for {silent:.0f} s "
                        f"(peer_timeout {timeout:g} s)")
            if probe is None and pc.selected_pair() is not None:
                probe = asyncio.ensure_future(check())
        return None
    finally:
        if probe is not None and not probe.done():
            probe.cancel()
