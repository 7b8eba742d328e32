"""Runs inside the booted container under mvpd.service's hardening options and checks that
what mvpd needs still works (TUN, netlink, UDP, the control socket, aiortc end to end) and
that the hardening is really in force. Prints one JSON object; exits 1 if any check failed."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import grp
import json
import os
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
TUN_NAME = "mvpprobe0"
TUN_ADDRESS = "10.99.0.1"

results: dict[str, str] = {}


def check(name: str, func: Callable[[], object]) -> None:
    try:
        detail = func()
        results[name] = "ok" if detail is None else f"ok: {detail}"
    except Exception as exc:  # every failure is a result, not a crash
        results[name] = f"FAILED: {type(exc).__name__}: {exc}"


def expect_errno(func: Callable[[], object], *codes: int) -> str:
    try:
        func()
    except OSError as exc:
        if exc.errno in codes:
            return errno.errorcode[exc.errno]
        raise
    raise AssertionError("allowed, but the hardening should forbid it")


def home_hidden() -> str:
    """/root is empty, or holds only the way to the bound interpreter (ProtectHome=tmpfs)."""
    allowed = set(os.environ.get("PROBE_HOME_ALLOWED", "").split())
    try:
        entries = set(os.listdir("/root"))
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    assert entries <= allowed, f"visible in /root: {sorted(entries - allowed)}"
    return f"only {sorted(entries)}"


def tmp_private() -> str:
    """/tmp is the service's own, empty but for the bound code (PrivateTmp=yes), and
    writable."""
    allowed = set(os.environ.get("PROBE_TMP_ALLOWED", "").split())
    entries = set(os.listdir("/tmp"))
    assert entries <= allowed, f"visible in /tmp: {sorted(entries - allowed)}"
    Path("/tmp/mvpd-probe-private").write_text("private\n")
    return f"only {sorted(entries)}"


def main() -> int:
    tun_fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)

    def tunsetiff() -> None:
        fcntl.ioctl(tun_fd, TUNSETIFF, struct.pack("16sH22x", TUN_NAME.encode(),
                                                    IFF_TUN | IFF_NO_PI))

    check("tun_create", tunsetiff)

    def netlink_configure() -> str:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=TUN_NAME)[0]
            ipr.addr("add", index=index, address=TUN_ADDRESS, prefixlen=24)
            ipr.link("set", index=index, state="up", mtu=1400)
            ipr.route("add", dst="10.98.0.0/24", oif=index)
            return f"index {index}"

    check("netlink_configure", netlink_configure)

    def udp_loopback() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
            a.bind(("127.0.0.1", 0))
            b.sendto(b"ping", a.getsockname())
            a.settimeout(5)
            assert a.recv(10) == b"ping"

    check("udp_loopback", udp_loopback)

    def control_socket() -> str:
        # What mvpd does: check the directories, bind under a temporary name through the
        # directory's descriptor, fchownat/fchmodat without following, link into place.
        from mvpd.socket_file import SocketFile

        path = Path("/run/mvpd/probe.sock")
        gid = grp.getgrnam("mvp").gr_gid
        socket_file = SocketFile(path)
        try:
            with socket_file.bind(group_id=gid, mode=0o660, backlog=8):
                st = os.lstat(path)
                assert st.st_gid == gid and st.st_mode & 0o777 == 0o660
        finally:
            socket_file.close()
        assert not path.exists()
        return f"group mvp ({gid})"

    check("control_socket_group", control_socket)

    def open_file_limit() -> str:
        # LimitNOFILE=1024:524288; mvpd raises the soft limit to the hard one at start.
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft == 1024, soft
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return f"raised from {soft} to {hard}"

    check("open_file_limit", open_file_limit)
    check("aiortc_data_channel", lambda: asyncio.run(aiortc_round_trip()))

    # The hardening is in force:
    check("no_write_usr", lambda: expect_errno(
        lambda: open("/usr/mvpd-probe", "w"), errno.EROFS))  # noqa: SIM115
    check("home_hidden", home_hidden)
    check("tmp_private", tmp_private)
    check("no_packet_sockets", lambda: expect_errno(
        lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW), errno.EAFNOSUPPORT))
    check("no_sethostname", lambda: expect_errno(
        lambda: socket.sethostname("probe"), errno.EPERM))
    check("no_sysctl_write", lambda: expect_errno(
        lambda: Path("/proc/sys/net/ipv4/ip_forward").write_text("1"), errno.EROFS,
        errno.EPERM, errno.EACCES))
    check("no_mknod", lambda: expect_errno(
        lambda: os.mknod("/run/mvpd/kmsg", 0o600 | 0o020000, os.makedev(1, 11)), errno.EPERM))

    def status_fields() -> str:
        status = dict(line.split(":\t", 1) for line in
                      Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
        assert status["NoNewPrivs"].strip() == "1", status["NoNewPrivs"]
        # CAP_CHOWN (0) and CAP_NET_ADMIN (12) only.
        assert int(status["CapBnd"], 16) == (1 << 0) | (1 << 12), status["CapBnd"]
        assert status["Seccomp"].strip() == "2", status["Seccomp"]
        return f"CapBnd {status['CapBnd'].strip()}"

    check("bounding_set_nnp_seccomp", status_fields)
    os.close(tun_fd)
    print(json.dumps(results, sort_keys=True), flush=True)
    return 0 if all(v.startswith("ok") for v in results.values()) else 1


async def aiortc_round_trip() -> str:
    """Two aiortc peers in this process, meeting on the TUN device's address (the only
    non-loopback address here), exchange one message: DTLS, SCTP, UDP under the filter."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    config = RTCConfiguration(iceServers=[])
    offerer, answerer = RTCPeerConnection(config), RTCPeerConnection(config)
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    try:
        channel = offerer.createDataChannel("probe")
        channel.on("open", lambda: channel.send("hello through the hardening"))

        @answerer.on("datachannel")
        def _on_channel(remote: object) -> None:
            remote.on("message", lambda msg: received.done() or received.set_result(msg))  # type: ignore[attr-defined]

        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        return await asyncio.wait_for(received, 20)
    finally:
        await offerer.close()
        await answerer.close()


if __name__ == "__main__":
    sys.exit(main())
