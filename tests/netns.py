"""Network namespaces and veth pairs for tests and benchmarks.

Everything here creates uniquely named namespaces whose links and 10.x addresses exist only
inside them, and deletes what it created when the ``with`` block ends, also on failure
(processes still running inside a namespace - started by the test - are killed first).

    from tests.netns import namespace, require_netns, two_hosts, veth_pair

    def test_ping() -> None:
        require_netns()
        with two_hosts() as link:
            link.a.run("ping", "-c1", "-W2", str(link.addr_b.ip))

Tests that need them call :func:`require_netns` / :func:`require_tun`, which skip with the
reason when not root, ``ip`` is missing or namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def unique_name(label: str = "t") -> str:
    """A namespace name no other test run on this machine uses at the same time."""
    return f"mvpt-{label}-{os.getpid()}-{next(_counter)}"


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    name = unique_name("probe")
    result = _ip("netns", "add", name, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


@functools.cache
def tun_unavailable_reason() -> str | None:
    """Why TUN devices cannot be made here, or None when they can."""
    reason = netns_unavailable_reason()
    if reason:
        return reason
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (modprobe tun)"
    return None


def require_netns() -> None:
    """Skip the calling test, stating why, unless network namespaces work."""
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


def require_tun() -> None:
    """Skip the calling test, stating why, unless TUN devices in namespaces work."""
    reason = tun_unavailable_reason()
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class Namespace:
    """A network namespace made by :func:`namespace`."""

    name: str

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` wrapped to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and wait for it (text output captured). With
        ``check`` a failure raises an AssertionError that shows stdout and stderr."""
        result = subprocess.run(
            self.argv(*cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} in {self.name} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def popen(self, *cmd: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``cmd`` inside the namespace; stdin/stdout/stderr are text pipes unless
        given. It is killed when the namespace is removed, if still running."""
        for stream in ("stdin", "stdout", "stderr"):
            kwargs.setdefault(stream, subprocess.PIPE)
        kwargs.setdefault("text", True)
        return subprocess.Popen(self.argv(*cmd), **kwargs)

    def python(
        self, code: str, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``code`` with this project's Python inside the namespace (cwd: the repo)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        return self.run(sys.executable, "-c", code, *args, timeout=timeout, check=check, env=env)

    def python_popen(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``code`` with this project's Python inside the namespace."""
        kwargs.setdefault("env", dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
        return self.popen(sys.executable, "-c", code, *args, **kwargs)

    def ip_json(self, *args: str) -> Any:
        """``ip -j ARGS`` inside the namespace, parsed (``[]`` when it prints nothing)."""
        out = _ip("-n", self.name, "-j", *args).stdout.strip()
        return json.loads(out) if out else []

    def link_names(self) -> set[str]:
        """The names of every interface in the namespace."""
        return {link["ifname"] for link in self.ip_json("link", "show")}

    def pids(self) -> list[int]:
        """Processes running inside the namespace."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


@contextlib.contextmanager
def namespace(label: str = "t") -> Iterator[Namespace]:
    """A fresh network namespace with ``lo`` up; removed afterwards with everything in it."""
    ns = Namespace(unique_name(label))
    _ip("netns", "add", ns.name)
    try:
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        remove_namespace(ns)


def remove_namespace(ns: Namespace) -> None:
    """Kill what still runs inside ``ns`` (started by the test), then delete it."""
    for pid in ns.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", ns.name, check=False)


@dataclass(frozen=True)
class VethPair:
    """A veth pair between two namespaces, with an address on each end."""

    a: Namespace
    b: Namespace
    dev_a: str
    dev_b: str
    addr_a: ipaddress.IPv4Interface
    addr_b: ipaddress.IPv4Interface


@contextlib.contextmanager
def veth_pair(
    a: Namespace, b: Namespace, subnet: str = "10.201.0.0/24", *, mtu: int | None = None
) -> Iterator[VethPair]:
    """A veth pair created directly inside ``a`` and ``b`` (it never exists outside them),
    ``.1`` on a's end and ``.2`` on b's, both up."""
    net = ipaddress.IPv4Network(subnet)
    n = next(_counter)
    pair = VethPair(
        a,
        b,
        f"mvpv{n}a",
        f"mvpv{n}b",
        ipaddress.IPv4Interface(f"{net[1]}/{net.prefixlen}"),
        ipaddress.IPv4Interface(f"{net[2]}/{net.prefixlen}"),
    )
    _ip("link", "add", pair.dev_a, "netns", a.name, "type", "veth",
        "peer", "name", pair.dev_b, "netns", b.name)  # fmt: skip
    try:
        for ns, dev, addr in ((a, pair.dev_a, pair.addr_a), (b, pair.dev_b, pair.addr_b)):
            _ip("-n", ns.name, "addr", "add", str(addr), "dev", dev)
            if mtu is not None:
                _ip("-n", ns.name, "link", "set", dev, "mtu", str(mtu))
            _ip("-n", ns.name, "link", "set", dev, "up")
        yield pair
    finally:
        _ip("-n", a.name, "link", "del", pair.dev_a, check=False)


@contextlib.contextmanager
def two_hosts(subnet: str = "10.201.0.0/24", *, label: str = "h") -> Iterator[VethPair]:
    """Two fresh namespaces joined by a veth pair: a small two-host network."""
    with namespace(f"{label}a") as a, namespace(f"{label}b") as b, veth_pair(a, b, subnet) as p:
        yield p


def netem(ns: Namespace, dev: str, spec: Sequence[str] | str) -> None:
    """Impair ``dev``'s egress, e.g. ``netem(ns, dev, "delay 20ms loss 5%")``; it goes away
    with the device (or call :func:`clear_qdisc`)."""
    args = spec.split() if isinstance(spec, str) else list(spec)
    subprocess.run(
        ["tc", "-n", ns.name, "qdisc", "replace", "dev", dev, "root", "netem", *args],
        check=True,
        capture_output=True,
        timeout=20,
    )


def clear_qdisc(ns: Namespace, dev: str) -> None:
    """Remove an impairment set by :func:`netem`."""
    subprocess.run(
        ["tc", "-n", ns.name, "qdisc", "del", "dev", dev, "root"],
        check=False,
        capture_output=True,
        timeout=20,
    )


@functools.cache
def netem_unavailable_reason() -> str | None:
    """Why the netem qdisc cannot be used here (e.g. a kernel without sch_netem), or None.
    Without it, :func:`tests.impair.impaired_link` delays and drops packets instead."""
    reason = netns_unavailable_reason()
    if reason:
        return reason
    if shutil.which("tc") is None:
        return "needs the tc command (iproute2)"
    with namespace("netem") as ns:
        _ip("-n", ns.name, "link", "add", "mvpq0", "type", "veth", "peer", "name", "mvpq1")
        probe = subprocess.run(
            ["tc", "-n", ns.name, "qdisc", "add", "dev", "mvpq0", "root", "netem", "delay",
             "1ms"], capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    if probe.returncode != 0:
        return f"this kernel has no netem qdisc (sch_netem): {probe.stderr.strip()}"
    return None
