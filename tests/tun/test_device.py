"""Real TUN devices, inside network namespaces the tests create and remove.

The device code runs in a child Python started with ``ip netns exec``; the child prints what
it saw as one ``RESULT {json}`` line and the test checks it (and the namespace) from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from mvpd.proto.errors import MvpError, TunError, TunUnavailable
from mvpd.tun.device import TunDevice, check_name_template, name_prefix
from tests.netns import ROOT, Namespace, namespace, require_tun

pytestmark = pytest.mark.root

PRELUDE = r'''
import asyncio, json, os, subprocess, sys
from mvpd.tun.device import TunDevice, cleanup_stale, find_stale
from mvpd.proto.errors import TunError
from mvpd.proto.ippacket import parse_header


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def echo_request(src, dst, seq=1, payload=b"mvp-echo"):
    """An IPv4 ICMP echo request with correct checksums (the kernel checks them)."""
    icmp = bytearray(b"\x08\x00\x00\x00" + (0x4D56).to_bytes(2, "big")
                     + seq.to_bytes(2, "big") + payload)
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(20)
    header[0] = 0x45
    header[2:4] = (20 + len(icmp)).to_bytes(2, "big")
    header[8] = 64
    header[9] = 1
    header[12:16] = bytes(int(x) for x in src.split("."))
    header[16:20] = bytes(int(x) for x in dst.split("."))
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header + icmp)


def is_echo_reply(packet):
    return len(packet) >= 28 and packet[0] >> 4 == 4 and packet[9] == 1 and packet[20] == 0


def ip_json(*args):
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def link_names():
    return sorted(link["ifname"] for link in ip_json("link", "show"))


def report(value):
    print("RESULT " + json.dumps(value), flush=True)
'''


def run_child(ns: Namespace, body: str, *args: str, timeout: float = 60) -> Any:
    """Run PRELUDE + body in ``ns``; return what it reported."""
    result = ns.python(PRELUDE + body, *args, timeout=timeout)
    return parse_result(result.stdout, result.stderr)


def parse_result(stdout: str, stderr: str = "") -> Any:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"child reported nothing\nstdout:\n{stdout}\nstderr:\n{stderr}")


# --- without root ---------------------------------------------------------------------------


def test_missing_clone_device_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(TunUnavailable, match=r"does not exist.*modprobe tun") as caught:
        TunDevice.create("mvp-tun%d", path=tmp_path / "no-such-tun")
    assert isinstance(caught.value, MvpError)
    assert caught.value.code == "tun-unavailable"


def test_a_clone_device_that_is_not_tun_is_a_clear_error() -> None:
    # /dev/null opens fine but refuses TUNSETIFF: the error names the device and the cause.
    with pytest.raises(TunError, match="cannot create TUN device 'mvp-tun%d'"):
        TunDevice.create("mvp-tun%d", path="/dev/null")


@pytest.mark.parametrize(
    "template", ["", "a/b", "x" * 16, "two%d%d", "sp ace", "%s", "..", "mvp-tun%"]
)
def test_bad_name_templates_are_refused(template: str) -> None:
    with pytest.raises(TunError):
        check_name_template(template)


def test_good_name_templates() -> None:
    assert check_name_template("mvp-tun%d") == "mvp-tun%d"
    assert check_name_template("wg0") == "wg0"
    assert name_prefix("mvp-tun%d") == "mvp-tun"
    assert name_prefix("tun-fixed") == "tun-fixed"


# --- with root, inside namespaces -------------------------------------------------------


def test_create_configure_echo_and_close() -> None:
    require_tun()
    body = r"""
async def main():
    dev = TunDevice.create()
    dev2 = TunDevice.create()
    await dev.configure("10.77.0.1/24", mtu=1380)
    await dev.configure("fd00:77::1/64")
    link = ip_json("link", "show", "dev", dev.name)[0]
    addrs = [(a["family"], a["local"], a["prefixlen"])
             for a in ip_json("addr", "show", "dev", dev.name)[0]["addr_info"]
             if a.get("scope") == "global"]
    loop = asyncio.get_running_loop()
    replies = loop.create_future()
    seen = []
    def on_packets(packets):
        seen.append(len(packets))
        for p in packets:
            if is_echo_reply(p) and not replies.done():
                replies.set_result(p)
    dev.start_reading(on_packets)
    ok = dev.write(echo_request("10.77.0.2", "10.77.0.1", payload=b"hello-tun"))
    reply = await asyncio.wait_for(replies, 10)
    header = parse_header(reply)
    refused = dev.write(b"\x00not an ip packet")
    stats = vars(dev.stats).copy()
    names_before = link_names()
    dev.close()
    dev.close()  # idempotent
    report({
        "names": [dev.name, dev2.name], "link": link, "addrs": addrs, "write_ok": ok,
        "reply_src": str(header.src_address), "reply_dst": str(header.dst_address),
        "reply_tail": reply[-9:].decode(), "refused": refused, "stats": stats,
        "before": names_before, "after": link_names(), "closed": dev.closed,
    })
    dev2.close()

asyncio.run(main())
"""
    with namespace("tun") as ns:
        r = run_child(ns, body)
        assert ns.link_names() == {"lo"}
    name, name2 = r["names"]
    assert name.startswith("mvp-tun") and name2.startswith("mvp-tun") and name != name2
    assert r["link"]["mtu"] == 1380
    assert "UP" in r["link"]["flags"]
    assert ["inet", "10.77.0.1", 24] in r["addrs"]
    assert ["inet6", "fd00:77::1", 64] in r["addrs"]
    assert r["write_ok"] is True
    assert (r["reply_src"], r["reply_dst"]) == ("10.77.0.1", "10.77.0.2")
    assert r["reply_tail"] == "hello-tun"
    assert r["refused"] is False
    assert r["stats"]["write_errors"] == 1
    assert r["stats"]["packets_written"] == 1
    assert r["stats"]["packets_read"] >= 1
    assert name in r["before"] and name not in r["after"] and name2 in r["after"]
    assert r["closed"] is True


def test_pause_and_resume_reading() -> None:
    require_tun()
    body = r"""
async def main():
    dev = TunDevice.create("pause%d")
    await dev.configure("10.78.0.1/24")
    replies = []
    got = asyncio.Event()
    def on_packets(packets):
        replies.extend(p for p in packets if is_echo_reply(p))
        if replies:
            got.set()
    dev.start_reading(on_packets)
    dev.pause_reading()
    paused_state = dev.reading
    for seq in range(3):
        dev.write(echo_request("10.78.0.2", "10.78.0.1", seq=seq))
    await asyncio.sleep(0.3)  # replies wait in the kernel's queue meanwhile
    while_paused = len(replies)
    dev.resume_reading()
    dev.resume_reading()  # a second resume is harmless
    await asyncio.wait_for(got.wait(), 10)
    while len(replies) < 3:
        got.clear()
        await asyncio.wait_for(got.wait(), 10)
    report({"paused_state": paused_state, "while_paused": while_paused,
            "after": len(replies), "reading": dev.reading})
    dev.close()

asyncio.run(main())
"""
    with namespace("pause") as ns:
        r = run_child(ns, body)
    assert r == {"paused_state": False, "while_paused": 0, "after": 3, "reading": True}


def test_routes_are_added_removed_and_never_stolen() -> None:
    require_tun()
    body = r"""
def routes(dev):
    return sorted(f"{r['dst']}" for r in ip_json("route", "show", "dev", dev))

async def main():
    subprocess.run(["ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1"],
                   check=True)
    subprocess.run(["ip", "link", "set", "other0", "up"], check=True)
    subprocess.run(["ip", "route", "add", "10.99.0.0/24", "dev", "other0"], check=True)
    dev = TunDevice.create("rt%d")
    await dev.configure("10.79.0.1/24", mtu=1400)
    out = {}
    await dev.add_route("10.80.0.0/16")
    await dev.add_route("10.80.0.0/16")   # already there via us: fine
    await dev.add_route("10.79.0.0/24")   # the connected route: fine, not "ours"
    await dev.add_route("fd00:80::/64")
    out["added"] = routes(dev.name)
    out["ours"] = sorted(map(str, dev.routes))
    v6 = ip_json("-6", "route", "show", "dev", dev.name)
    out["v6"] = sorted(r["dst"] for r in v6)
    try:
        await dev.add_route("10.99.0.0/24")
    except TunError as exc:
        out["conflict"] = str(exc)
    await dev.remove_route("10.80.0.0/16")
    await dev.remove_route("10.80.0.0/16")  # gone already: fine
    out["removed"] = routes(dev.name)
    await dev.set_routes(["10.81.0.0/24", "10.82.0.7/32"])
    await dev.set_routes(["10.82.0.7/32", "10.83.0.0/24"])
    out["set"] = routes(dev.name)
    out["ours_after_set"] = sorted(map(str, dev.routes))
    try:
        await dev.add_route("not-a-network")
    except TunError as exc:
        out["bad"] = str(exc)
    name = dev.name
    dev.close()
    out["after_close"] = [r["dst"] for r in ip_json("route", "show")
                          if r.get("dev") == name]
    out["other"] = routes("other0")
    report(out)

asyncio.run(main())
"""
    with namespace("route") as ns:
        r = run_child(ns, body)
    assert r["added"] == ["10.79.0.0/24", "10.80.0.0/16"]
    assert r["ours"] == ["10.80.0.0/16", "fd00:80::/64"]
    assert "fd00:80::/64" in r["v6"]
    assert "already exists via another interface" in r["conflict"]
    assert r["removed"] == ["10.79.0.0/24"]
    assert r["set"] == ["10.79.0.0/24", "10.82.0.7", "10.83.0.0/24"]
    assert r["ours_after_set"] == ["10.82.0.7/32", "10.83.0.0/24"]
    assert "not a network" in r["bad"]
    assert r["after_close"] == []
    assert r["other"] == ["10.99.0.0/24"]


def test_busy_name_and_device_deleted_from_outside() -> None:
    require_tun()
    body = r"""
async def main():
    out = {}
    dev = TunDevice.create("busy0")
    try:
        TunDevice.create("busy0")
    except TunError as exc:
        out["busy"] = str(exc)
    subprocess.run(["ip", "link", "add", "dummy7", "type", "veth", "peer", "name", "dummy8"],
                   check=True)
    try:
        TunDevice.create("dummy7")
    except TunError as exc:
        out["not_tun"] = str(exc)
    await dev.configure("10.84.0.1/24")
    errors = asyncio.get_running_loop().create_future()
    dev.start_reading(lambda packets: None, on_error=errors.set_result)
    subprocess.run(["ip", "link", "del", dev.name], check=True)
    err = await asyncio.wait_for(errors, 10)
    out["error"] = str(err)
    out["reading"] = dev.reading
    out["write_after_delete"] = dev.write(echo_request("10.84.0.2", "10.84.0.1"))
    dev.close()
    report(out)

asyncio.run(main())
"""
    with namespace("busy") as ns:
        r = run_child(ns, body)
    assert "'busy0' is in use by another process" in r["busy"]
    assert "not a TUN device" in r["not_tun"]
    assert "busy0 failed" in r["error"]
    assert r["reading"] is False
    assert r["write_after_delete"] is False


def test_a_killed_process_leaves_no_device_and_stale_ones_are_cleaned() -> None:
    """SIGKILL closes the descriptor, so mvpd's non-persistent devices vanish with it; only
    persistent devices that nobody holds are stale, and only those with our prefix go."""
    require_tun()
    holder = r"""
dev = TunDevice.create(sys.argv[1], persist=sys.argv[2] == "persist")
print(dev.name, flush=True)
if sys.argv[3] == "hold":
    sys.stdin.read()
else:
    os._exit(0)  # no close(): a persistent device stays behind
"""
    # A prefix of its own: a device held by any process on the machine (in any namespace)
    # counts as held, so tests elsewhere using mvp-tun* must not change this one's result.
    with namespace("stale") as ns:
        # A daemon killed with SIGKILL: its device goes with it.
        child = ns.python_popen(PRELUDE + holder, "zstale%d", "no", "hold")
        assert child.stdout is not None
        killed_name = child.stdout.readline().strip()
        assert killed_name in ns.link_names()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert killed_name not in ns.link_names()

        # Left over: persistent and unheld, with our prefix (one by us, one by ip tuntap).
        ns.python(PRELUDE + holder, "zstale%d", "persist", "exit")
        ns.run("ip", "tuntap", "add", "dev", "zstale9", "mode", "tun")
        # Not ours to remove: another prefix, or held by a live process.
        ns.run("ip", "tuntap", "add", "dev", "other-tun0", "mode", "tun")
        live = ns.python_popen(PRELUDE + holder, "zstale%d", "persist", "hold")
        assert live.stdout is not None
        live_name = live.stdout.readline().strip()
        try:
            before = ns.link_names()
            r = run_child(
                ns,
                "stale = asyncio.run(find_stale('zstale'))\n"
                "removed = asyncio.run(cleanup_stale('zstale'))\n"
                "again = asyncio.run(cleanup_stale())\n"
                "try:\n"
                "    asyncio.run(cleanup_stale(''))\n"
                "except TunError as exc:\n"
                "    empty = str(exc)\n"
                "report({'stale': stale, 'removed': removed, 'again': again, 'empty': empty})\n",
            )
            after = ns.link_names()
        finally:
            assert live.stdin is not None
            live.stdin.close()
            live.wait(timeout=10)
    assert {"zstale0", "zstale9", "other-tun0", live_name} <= before
    assert r["stale"] == r["removed"] == ["zstale0", "zstale9"]
    assert r["again"] == []
    assert "empty name prefix" in r["empty"]
    assert "other-tun0" in after and live_name in after
    assert "zstale0" not in after and "zstale9" not in after


def test_no_permission_is_a_clear_error() -> None:
    """Without CAP_NET_ADMIN (a user namespace as nobody), creation fails naming the cause."""
    require_tun()
    code = (
        "from mvpd.tun.device import TunDevice\n"
        "from mvpd.proto.errors import TunUnavailable\n"
        "try:\n"
        "    TunDevice.create()\n"
        "except TunUnavailable as exc:\n"
        "    print('RESULT ' + __import__('json').dumps(str(exc)))\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    if "RESULT" not in result.stdout and "Permission denied" in result.stderr:
        pytest.skip(f"cannot run Python as nobody here: {result.stderr.strip()[-200:]}")
    message = parse_result(result.stdout, result.stderr)
    assert "CAP_NET_ADMIN" in message
