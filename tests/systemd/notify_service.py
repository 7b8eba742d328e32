"""A tiny Type=notify service for the harness tests: READY, STATUS, watchdog, structured logs.

Runs with the project's venv inside the booted container; mirrors what mvpd run does."""

from __future__ import annotations

import asyncio
import logging
import signal

from mvpd import sd_notify
from mvpd.logs import FieldsAdapter, fields, log_event, setup_logging


async def main() -> int:
    setup_logging("debug")
    log = logging.getLogger("notify-probe")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload(log)))
    watchdog = sd_notify.start_watchdog()
    log_event(log, logging.INFO, "connected", "peer %s connected", "bob", peer="bob",
              mode="chat", token="hunter2-field")
    FieldsAdapter(log, peer="carol", mode="tun").warning(
        "dropped %d packets, token=hunter2-text", 3, extra=fields(event="drop", count=3))
    sd_notify.notify_ready("probe up: 2 peers")
    await stop.wait()
    sd_notify.notify_stopping("probe stopping")
    log_event(log, logging.INFO, "stopping", "stopping")
    if watchdog is not None:
        watchdog.cancel()
    return 0


async def reload(log: logging.Logger) -> None:
    sd_notify.notify_reloading("reloading")
    await asyncio.sleep(0.2)
    log_event(log, logging.INFO, "reloaded", "reloaded")
    sd_notify.notify_ready("probe up: reloaded")


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
