"""sd_notify: the daemon tells systemd it is ready, reloading, stopping, alive (watchdog).

Every notify function is a no-op when the process does not run under a service manager that
listens (no ``NOTIFY_SOCKET``), so the daemon calls them unconditionally. Messages go through
systemd-python's ``systemd.daemon.notify`` when it is installed; without it a few lines of stdlib
send the same datagram, because a ``Type=notify`` unit whose process never says READY=1 is
killed after its start timeout: silently dropping the message would be worse than the extra
code. Installing the units is :mod:`mvpd.units`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

try:  # systemd-python is an optional extra (it needs libsystemd at build time).
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the installation
    _sd_daemon = None



def under_systemd() -> bool:
    """Whether a service manager listens for notifications (``NOTIFY_SOCKET`` is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(message: str) -> bool:
    """Send one sd_notify message (``KEY=value`` lines); False when nobody listens or it
    failed. Never raises: notifications must not take the daemon down."""
    if not under_systemd():
        return False
    try:
        if _sd_daemon is not None:
            return bool(_sd_daemon.notify(message))
        return _notify_stdlib(message)
    except (OSError, ValueError) as exc:
        log.debug("sd_notify failed: %s", exc)
        return False


def _notify_stdlib(message: str) -> bool:
    """The datagram sd_notify(3) sends, for installations without systemd-python."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # vsock and other forms are not used for services
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def _one_line(text: str, limit: int = 200) -> str:
    """STATUS= is a single line; keep it short enough for ``systemctl status``."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def notify_ready(status: str | None = None) -> bool:
    """READY=1 (with a STATUS= line when given): the service is up, e.g. the control socket
    listens. With ``Type=notify`` systemd keeps the unit ``activating`` until this arrives."""
    message = "READY=1"
    if status:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message)


def notify_status(text: str) -> bool:
    """STATUS=: the one-line summary ``systemctl status`` shows."""
    return notify(f"STATUS={_one_line(text)}")


def notify_stopping(status: str | None = None) -> bool:
    """STOPPING=1: the service has begun shutting down (send on SIGTERM)."""
    message = "STOPPING=1"
    if status:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message)


def notify_reloading(status: str | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC: a reload has begun; send :func:`notify_ready` when it
    is done. systemd >= 253 (``Type=notify-reload``) requires MONOTONIC_USEC to match the
    reload to its request; 252 (Debian 12) ignores the field and accepts the message as is."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = f"RELOADING=1\nMONOTONIC_USEC={usec}"
    if status:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message)


def notify_watchdog() -> bool:
    """WATCHDOG=1: one keep-alive ping."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``WATCHDOG_USEC``, or None when no watchdog is
    set for this process (unset, invalid, or ``WATCHDOG_PID`` names another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not under_systemd():
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


async def run_watchdog(interval: float) -> None:
    """Ping the watchdog every ``interval / 2`` seconds until cancelled.

    The pings come from the event loop itself, so a blocked or stuck loop stops them and
    systemd restarts the service (``WatchdogSec=`` with ``Restart=on-failure``)."""
    if interval <= 0:
        raise ValueError("the watchdog interval must be positive")
    period = interval / 2
    while True:
        notify_watchdog()
        await asyncio.sleep(period)


def start_watchdog() -> asyncio.Task[None] | None:
    """Start :func:`run_watchdog` as a task when systemd asked for a watchdog; keep the
    returned task and cancel it on shutdown. Must be called inside a running loop."""
    interval = watchdog_interval()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(run_watchdog(interval), name="sd-watchdog")


