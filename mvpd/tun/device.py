"""Layer-3 TUN devices: created on ``/dev/net/tun``, configured through pyroute2, read and
written without blocking the asyncio loop.

Lifetime
--------
mvpd creates its devices *non-persistent*: the kernel deletes such a device, with its
addresses and routes, the moment the last file descriptor on it closes - on :meth:`close`,
on a normal exit, and also when the daemon is killed with SIGKILL. The descriptor is opened
with ``O_CLOEXEC`` so no child process can keep a device alive.

So a "stale" device can only be a *persistent* one (``TUNSETPERSIST``; ``ip tuntap add``
makes those) that no process has open: left by an older mvpd, a crashed test that asked for
``persist=True``, or an operator. :func:`cleanup_stale` removes exactly those, and only with
our name prefix; a device some live process holds is never touched.

Netlink
-------
pyroute2 0.9's synchronous ``IPRoute`` refuses to run inside a running asyncio loop, and its
``AsyncIPRoute`` does not work under uvloop (no AF_NETLINK datagram endpoints). So every
netlink call here runs the synchronous ``IPRoute`` in a worker thread, on a plain selector
loop of its own (never the policy's, which may be uvloop); they are rare (configuration
time) and take a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import re
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..proto.errors import TunError, TunUnavailable

log = logging.getLogger(__name__)

TUN_DEVICE_PATH = "/dev/net/tun"
DEFAULT_NAME_TEMPLATE = "mvp-tun%d"
#: The longest interface name the kernel takes (IFNAMSIZ - 1).
MAX_NAME_LENGTH = 15

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_IFREQ = struct.Struct("16sH22x")

# linux/if_addr.h: an address usable at once, without duplicate address detection.
IFA_F_NODAD = 0x02
_ESRCH = 3
#: Packets read per readiness callback, so one busy device cannot starve the loop.
READ_BATCH = 64
#: A TUN read returns one packet; reading less than a packet would truncate it.
READ_SIZE = 65536

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PacketsCallback = Callable[[list[bytes]], None]
ErrorCallback = Callable[[TunError], None]
_T = TypeVar("_T")

_NAME_TEMPLATE = re.compile(r"^[A-Za-z0-9_.-]*(%d)?[A-Za-z0-9_.-]*$")


def check_name_template(template: str) -> str:
    """Return ``template`` if it can name a device (at most one ``%d`` for "first free
    number", letters, digits, ``_.-``, at most 15 bytes); raise :class:`TunError` if not."""
    if not template or template in (".", "..") or not _NAME_TEMPLATE.match(template):
        raise TunError(
            f"invalid TUN device name {template!r}: use letters, digits, '_', '.', '-' and at "
            "most one '%d' (replaced by the first free number), e.g. 'mvp-tun%d'"
        )
    if len(template.encode()) > MAX_NAME_LENGTH:
        raise TunError(f"TUN device name {template!r} is longer than {MAX_NAME_LENGTH} bytes")
    return template


def name_prefix(template: str) -> str:
    """The part of a name template before ``%d`` (the whole name if it has none)."""
    return template.split("%", 1)[0]


async def _netlink(operation: Callable[[Any], _T]) -> _T:
    """Run ``operation(ipr)`` with a fresh synchronous IPRoute in a worker thread."""

    def run() -> _T:
        from pyroute2 import IPRoute  # the daemon's only netlink user; keep it off import

        # IPRoute makes its own event loop through the global policy, which is uvloop's in
        # the daemon, and uvloop has no AF_NETLINK: give it a plain selector loop.
        loop = asyncio.SelectorEventLoop()
        try:
            with IPRoute(use_event_loop=loop) as ipr:
                return operation(ipr)
        finally:
            loop.close()

    return await asyncio.to_thread(run)


def _netlink_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


@dataclass
class TunStats:
    """Traffic through one device, as mvpd saw it."""

    packets_read: int = 0
    bytes_read: int = 0
    packets_written: int = 0
    bytes_written: int = 0
    write_errors: int = 0


class TunDevice:
    """One layer-3 TUN device (IFF_TUN | IFF_NO_PI: the fd carries bare IP packets).

    Create with :meth:`create`, configure with the ``async`` methods, then
    :meth:`start_reading`; :meth:`write` hands packets to the kernel. :meth:`close` (or
    leaving the ``with`` block) deletes the device and, with it, its addresses and routes.
    """

    def __init__(self, fd: int, name: str, *, persist: bool = False) -> None:
        """Wrap an attached TUN descriptor; use :meth:`create` instead."""
        self.fd = fd
        self.name = name
        self.persist = persist
        self.stats = TunStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packets: PacketsCallback | None = None
        self._on_error: ErrorCallback | None = None
        self._reading = False
        self._closed = False
        self._routes: set[IPNetwork] = set()
        self._ifindex: int | None = None
        #: The addresses and MTU :meth:`configure` gave the device.
        self.addresses: list[IPInterface] = []
        self.mtu: int | None = None

    # --- creation -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str = DEFAULT_NAME_TEMPLATE,
        *,
        path: str | os.PathLike[str] = TUN_DEVICE_PATH,
        persist: bool = False,
    ) -> TunDevice:
        """Create a TUN device named ``name`` (``%d``: the kernel picks the first free number).

        ``persist=True`` makes the device outlive its descriptor until :meth:`close`; mvpd
        never asks for it (see the module docstring), tests do. Raises
        :class:`TunUnavailable` when TUN devices cannot be made here at all (no ``path``, no
        CAP_NET_ADMIN), :class:`TunError` for a bad or busy name.
        """
        check_name_template(name)
        fd = _open_clone_device(os.fspath(path))
        try:
            request = _IFREQ.pack(name.encode(), IFF_TUN | IFF_NO_PI)
            try:
                reply = fcntl.ioctl(fd, TUNSETIFF, request)
            except OSError as exc:
                raise _tunsetiff_error(exc, name) from None
            actual = _IFREQ.unpack(reply)[0].rstrip(b"\0").decode()
            if persist:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except BaseException:
            os.close(fd)
            raise
        log.info("created TUN device %s", actual)
        return cls(fd, actual, persist=persist)

    @property
    def ifindex(self) -> int:
        """The interface index (in the network namespace the device lives in)."""
        if self._ifindex is None:
            try:
                self._ifindex = socket.if_nametoindex(self.name)
            except OSError:
                raise TunError(f"TUN device {self.name} no longer exists") from None
        return self._ifindex

    # --- configuration (netlink) ----------------------------------------------------------

    async def configure(
        self,
        address: str | IPInterface | None = None,
        *,
        mtu: int | None = None,
        up: bool = True,
    ) -> None:
        """Give the device an address with prefix (``10.0.0.1/24``; the kernel adds the
        connected route), set its MTU, bring it up. IPv6 needs an MTU of at least 1280."""
        iface = ipaddress.ip_interface(address) if isinstance(address, str) else address
        index = self.ifindex

        def apply(ipr: Any) -> None:
            if mtu is not None:
                ipr.link("set", index=index, mtu=mtu)
            if iface is not None:
                extra = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                        **extra,
                    )
                except Exception as exc:
                    if _netlink_code(exc) != errno.EEXIST:
                        raise
            if up:
                ipr.link("set", index=index, state="up")

        try:
            await _netlink(apply)
        except Exception as exc:
            raise TunError(
                f"cannot configure TUN device {self.name} (address {iface}, mtu {mtu}): {exc}"
            ) from None
        if iface is not None and iface not in self.addresses:
            self.addresses.append(iface)
        if mtu is not None:
            self.mtu = mtu
        log.info("configured %s: address %s, mtu %s, up %s", self.name, iface, mtu, up)

    @property
    def routes(self) -> frozenset[IPNetwork]:
        """The routes this object added through the device."""
        return frozenset(self._routes)

    async def add_route(self, network: str | IPNetwork) -> None:
        """Route ``network`` through this device. A route that already goes through it is
        fine; one through another interface is a :class:`TunError` (never stolen)."""
        net = _as_network(network)
        index = self.ifindex

        def apply(ipr: Any) -> bool:
            try:
                ipr.route("add", **_route_keys(net), oif=index)
                return True
            except Exception as exc:
                if _netlink_code(exc) != errno.EEXIST:
                    raise
            if any(r.get("oif") == index for r in _routes_for(ipr, net)):
                return False
            raise TunError(
                f"cannot route {net} through {self.name}: a route for it already exists via "
                "another interface (remove it or change this peer's allowed_ips)"
            )

        try:
            added = await _netlink(apply)
        except TunError:
            raise
        except Exception as exc:
            raise TunError(f"cannot route {net} through {self.name}: {exc}") from None
        if added:
            self._routes.add(net)
            log.info("route %s via %s", net, self.name)

    async def remove_route(self, network: str | IPNetwork) -> None:
        """Remove a route through this device; a route that is not there is fine."""
        net = _as_network(network)
        self._routes.discard(net)
        index = self.ifindex

        def apply(ipr: Any) -> None:
            try:
                ipr.route("del", **_route_keys(net), oif=index)
            except Exception as exc:
                if _netlink_code(exc) not in (_ESRCH, errno.ENODEV):
                    raise

        try:
            await _netlink(apply)
        except Exception as exc:
            raise TunError(f"cannot remove route {net} from {self.name}: {exc}") from None
        log.info("removed route %s via %s", net, self.name)

    async def set_routes(self, networks: Iterable[str | IPNetwork]) -> None:
        """Make the routes this object added exactly ``networks`` (e.g. the allowed IPs of
        the peers behind the device)."""
        wanted = {_as_network(n) for n in networks}
        for net in sorted(self._routes - wanted, key=str):
            await self.remove_route(net)
        for net in sorted(wanted - self._routes, key=str):
            await self.add_route(net)

    # --- data (asyncio) -----------------------------------------------------------------

    def start_reading(
        self,
        on_packets: PacketsCallback,
        *,
        on_error: ErrorCallback | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Call ``on_packets(list_of_packets)`` from the event loop whenever the kernel has
        packets for us (up to 64 per call). ``on_error`` hears once when the device breaks
        (e.g. deleted from outside); reading then stops."""
        if self._closed:
            raise TunError(f"TUN device {self.name} is closed")
        self._loop = loop or asyncio.get_running_loop()
        self._on_packets = on_packets
        self._on_error = on_error
        self.resume_reading()

    def pause_reading(self) -> None:
        """Stop reading (backpressure); the kernel queues up to txqueuelen packets, then drops."""
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def resume_reading(self) -> None:
        """Read again after :meth:`pause_reading`."""
        if self._closed or self._reading or self._loop is None:
            return
        self._loop.add_reader(self.fd, self._readable)
        self._reading = True

    @property
    def reading(self) -> bool:
        """Whether the device is being read (started and not paused)."""
        return self._reading

    def _readable(self) -> None:
        packets: list[bytes] = []
        error: OSError | None = None
        for _ in range(READ_BATCH):
            try:
                packet = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                error = exc
                break
            packets.append(packet)
            self.stats.bytes_read += len(packet)
        self.stats.packets_read += len(packets)
        if packets and self._on_packets is not None:
            self._on_packets(packets)
        if error is not None:
            self.pause_reading()
            log.warning("reading TUN device %s failed: %s", self.name, error)
            if self._on_error is not None:
                self._on_error(TunError(f"TUN device {self.name} failed: {error.strerror}"))

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Hand one IP packet to the kernel; False (and counted) when it was refused, e.g. not
        an IP packet, or the device is down or closed. Never blocks."""
        try:
            written = os.write(self.fd, packet)
        except OSError as exc:
            self.stats.write_errors += 1
            log.debug("write to %s refused: %s", self.name, exc)
            return False
        self.stats.packets_written += 1
        self.stats.bytes_written += written
        return True

    # --- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading and delete the device (its addresses and routes go with it)."""
        if self._closed:
            return
        self.pause_reading()
        self._closed = True
        if self.persist:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, TUNSETPERSIST, 0)
        os.close(self.fd)
        self._routes.clear()
        log.info("removed TUN device %s", self.name)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("reading" if self._reading else "idle")
        return f"<TunDevice {self.name} fd={self.fd} {state}>"


def _open_clone_device(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunUnavailable(
            f"{path} does not exist: load the tun kernel module (modprobe tun); in a container "
            f"or systemd unit make the device available (DeviceAllow={path} rw, no "
            "PrivateDevices=yes)"
        ) from None
    except PermissionError:
        raise TunUnavailable(
            f"no permission to open {path}: run mvpd as root or with CAP_NET_ADMIN"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise TunUnavailable(
                f"{path} exists but the tun kernel module is not loaded (modprobe tun)"
            ) from None
        raise TunUnavailable(f"cannot open {path}: {exc.strerror}") from None


def _tunsetiff_error(exc: OSError, name: str) -> TunError:
    if exc.errno == errno.EPERM:
        return TunUnavailable(
            f"creating TUN device {name!r} needs CAP_NET_ADMIN: run mvpd as root (under systemd "
            "keep CAP_NET_ADMIN and do not set PrivateUsers=yes)"
        )
    if exc.errno == errno.EBUSY:
        return TunError(f"TUN device {name!r} is in use by another process")
    if exc.errno == errno.EINVAL:
        return TunError(
            f"cannot create TUN device {name!r}: the name is invalid or belongs to an "
            "interface that is not a TUN device"
        )
    return TunError(f"cannot create TUN device {name!r}: {exc.strerror}")


def _as_network(value: str | IPNetwork) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise TunError(f"not a network: {exc}") from None


def _routes_for(ipr: Any, net: IPNetwork) -> list[Any]:
    """The main-table routes whose destination is exactly ``net``."""
    keys = _route_keys(net)
    return [
        r
        for r in ipr.route("dump", family=keys["family"])
        if r["dst_len"] == net.prefixlen
        and (r.get("dst") or str(net.network_address)) == keys["dst"]
        and r.get("table", 254) == 254
    ]


def _route_keys(net: IPNetwork) -> dict[str, Any]:
    return {
        "family": socket.AF_INET if net.version == 4 else socket.AF_INET6,
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
    }


# --- stale devices --------------------------------------------------------------------


def attached_tun_names(proc: str | os.PathLike[str] = "/proc") -> set[str]:
    """Names of TUN/TAP devices some process has open (from ``/proc/*/fdinfo``'s ``iff:``).

    A name held in another network namespace counts too: the check errs on the side of
    leaving a device alone."""
    names: set[str] = set()
    for pid_dir in Path(proc).iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            entries = list((pid_dir / "fdinfo").iterdir())
        except OSError:  # the process ended, or we may not look
            continue
        for entry in entries:
            try:
                text = entry.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("iff:"):
                    names.add(line[4:].strip())
    return names


async def find_stale(prefix: str = name_prefix(DEFAULT_NAME_TEMPLATE)) -> list[str]:
    """Persistent TUN devices named ``prefix...`` that no process has open (see the module
    docstring), in this network namespace."""

    def persistent_tuns(ipr: Any) -> list[str]:
        found = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            info = link.get_attr("IFLA_LINKINFO")
            if not name.startswith(prefix) or info is None:
                continue
            if info.get_attr("IFLA_INFO_KIND") != "tun":
                continue
            data = info.get_attr("IFLA_INFO_DATA")
            if data is not None and data.get_attr("IFLA_TUN_PERSIST"):
                found.append(name)
        return found

    candidates = await _netlink(persistent_tuns)
    if not candidates:
        return []
    held = await asyncio.to_thread(attached_tun_names)
    return sorted(name for name in candidates if name not in held)


async def cleanup_stale(prefix: str = name_prefix(DEFAULT_NAME_TEMPLATE)) -> list[str]:
    """Delete the devices :func:`find_stale` reports; return their names. Errors on one
    device are logged and the rest still go."""
    if not prefix:
        raise TunError("refusing to clean up TUN devices with an empty name prefix")
    stale = await find_stale(prefix)
    removed: list[str] = []
    for name in stale:

        def delete(ipr: Any, name: str = name) -> None:
            ipr.link("del", ifname=name)

        try:
            await _netlink(delete)
        except Exception as exc:
            if _netlink_code(exc) != errno.ENODEV:
                log.warning("cannot remove stale TUN device %s: %s", name, exc)
            continue
        log.info("removed stale TUN device %s", name)
        removed.append(name)
    return removed
