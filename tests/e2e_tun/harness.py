"""TUN-mode end-to-end helpers: hosts in network namespaces, each running a real ``mvpd run``,
joined by veth pairs, with a real ``mvpd signal`` server inside the first host.

    with tun_lab(tmp_path, ["alice", "bob"], configs) as lab:
        lab["alice"].call("connect", peer="bob", mode="tun", wait=True)
        lab["alice"].ns.run("ping", "-c1", "-W2", "10.77.0.2")

Topology: host 0 (the hub) has a veth pair to every other host, subnet ``10.201.<i>.0/24``
(hub ``.1``, host ``.2``); the other hosts route everything through the hub, so they reach
the signaling server on ``10.201.1.1``. Every address exists only inside the namespaces,
which are removed (with every process in them) when the block ends.

``tun_lab(..., impairable=True)`` lets :meth:`Lab.impair` delay and drop packets between the
hub and the other hosts: with netem on the veth ends where the kernel has it, otherwise
through a router namespace per link (``tests/impair.py``; the host then sits on
``10.202.<i>.2/24`` and reaches the hub's subnet through the router).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mvpctl.client import Client
from mvpd.proto.errors import MvpError
from tests.e2e.harness import base_env, wait_until
from tests.impair import ImpairedLink, impaired_link
from tests.netns import (
    ROOT,
    Namespace,
    VethPair,
    namespace,
    netem,
    netem_unavailable_reason,
    veth_pair,
)

START_TIMEOUT = 20.0
#: ``mvpd`` run by this interpreter, whether or not the console script is installed.
MVPD = (sys.executable, "-c", "from mvpd.cli import main; main()")


def _env(**extra: str) -> dict[str, str]:
    """A clean environment (no MVPD_* or ICE_* of the runner) that imports this tree."""
    return {**base_env(), "PYTHONPATH": str(ROOT), **extra}


@dataclass
class Host:
    """One namespace with one daemon in it."""

    ns: Namespace
    agent_id: str
    workdir: Path
    veth_address: str
    config_text: str = ""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    @property
    def socket(self) -> Path:
        return self.workdir / f"{self.agent_id}.sock"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.agent_id}.log"

    def start(
        self, signaling_url: str, *, hide_tun: bool = False, mvpd: Sequence[str] = MVPD,
        **env: str,
    ) -> Host:
        """Start the daemon; ``hide_tun`` runs it in a mount namespace whose /dev/net is an
        empty tmpfs (no /dev/net/tun, as without the tun module). ``mvpd``: the command
        (benchmarks start a variant)."""
        config = self.workdir / f"{self.agent_id}.yaml"
        config.write_text(self.config_text)
        self.starts += 1
        with self.log.open("ab") as log:
            argv = self.ns.argv(*mvpd, "run")
            if hide_tun:
                argv = self.ns.argv(
                    "unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs tmpfs /dev/net && exec "$@"', "sh", *MVPD, "run",
                )
            self.proc = subprocess.Popen(
                argv,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env=_env(AGENT_ID=self.agent_id, AGENT_CONFIG=str(config),
                         SIGNALING_URL=signaling_url, MVPD_SOCKET=str(self.socket),
                         MVPD_STATE_DIR=str(self.workdir / f"{self.agent_id}.state"),
                         MVPD_CONNECT_TIMEOUT="20", **self._trust(env)),
            )
        proc = self.proc

        def serving() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"mvpd {self.agent_id} exited with {proc.returncode}:\n"
                            f"{self.log_tail()}")
            try:
                return self.socket.exists() and bool(self.call("status"))
            except (MvpError, OSError):
                return False

        wait_until(serving, START_TIMEOUT, what=f"mvpd {self.agent_id} to serve")
        return self

    def _trust(self, env: dict[str, str]) -> dict[str, str]:
        """Tunnel tests trust peers on first use unless their config says otherwise (tun
        mode's default is pinned; test_tun_identity_e2e.py tests that)."""
        if "trust:" in self.config_text or "MVPD_TRUST" in env:
            return env
        return {"MVPD_TRUST": "tofu", **env}

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def call(self, method: str, timeout: float = 40, **params: Any) -> Any:
        """One control RPC to this host's daemon."""
        with Client.connect(self.socket, timeout=timeout) as client:
            return client.call(method, **params, reply_timeout=timeout)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The real ``mvpctl --socket SOCK ARGS``."""
        return subprocess.run(
            [sys.executable, "-m", "mvpctl", "--socket", str(self.socket), *args],
            capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT,
        )

    def peer(self, peer: str) -> dict[str, Any] | None:
        """This daemon's status of ``peer`` (None if it has no session)."""
        for entry in self.call("peers"):
            if entry["peer"] == peer:
                return dict(entry)
        return None

    def tun_links(self) -> list[str]:
        """TUN devices in this namespace whose name starts like mvpd's."""
        return sorted(n for n in self.ns.link_names() if n.startswith("mvp-tun"))

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
            self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Lab:
    """The hosts by agent id, and the signaling server's URL."""

    def __init__(
        self, hosts: dict[str, Host], url: str,
        links: Sequence[VethPair | ImpairedLink] = (), urls: Sequence[str] = (),
    ) -> None:
        self.hosts = hosts
        self.url = url
        #: Every signaling server (several with ``tun_lab(signal_servers=N)``).
        self.urls = list(urls) or [url]
        #: The hub's links to the other hosts, in host order.
        self.links = list(links)

    def impair(self, spec: str) -> None:
        """Impair every link both ways, netem style (``"delay 20ms loss 5%"``): netem on
        both veth ends, or the forwarder of an impaired link (``tun_lab(impairable=True)``)."""
        for link in self.links:
            if isinstance(link, ImpairedLink):
                link.set_netem(spec)
            else:
                netem(link.a, link.dev_a, spec)
                netem(link.b, link.dev_b, spec)

    def __getitem__(self, agent_id: str) -> Host:
        return self.hosts[agent_id]

    def connect(self, a: str, b: str, timeout: float = 30) -> dict[str, Any]:
        """``a`` connects to ``b`` in tun mode; both sides' TUN devices are routed."""
        status = self[a].call("connect", peer=b, mode="tun", wait=True, timeout=timeout)
        assert status["state"] == "connected", status
        wait_until(lambda: (self[b].peer(a) or {}).get("state") == "connected", 15,
                   what=f"{b} to see {a} connected")
        return dict(status)


def ping(ns: Namespace, target: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    """Ping ``target`` from ``ns``: a short interval, and a deadline so a lost first packet
    (routes still being added) is retried rather than failing."""
    return ns.run("ping", "-c", str(count), "-i", "0.2", "-w", "15", target, timeout=30)


@contextlib.contextmanager
def tun_lab(
    tmp_path: Path, agent_ids: list[str], configs: dict[str, str], *,
    mvpd: Sequence[str] = MVPD, impairable: bool = False, signal_servers: int = 1,
) -> Iterator[Lab]:
    """Namespaces, veths, a signaling server in the first host, a daemon per host.
    ``impairable``: links :meth:`Lab.impair` can impair even without netem.
    ``signal_servers`` > 1: that many servers in the first host sharing a redis-server
    there, and host ``i`` registers with server ``i % signal_servers``."""
    routed = impairable and netem_unavailable_reason() is not None
    with contextlib.ExitStack() as stack:
        spaces = [stack.enter_context(namespace(f"tun{i}")) for i in range(len(agent_ids))]
        hub = spaces[0]
        hosts: dict[str, Host] = {}
        links: list[VethPair | ImpairedLink] = []
        for i, (agent_id, ns) in enumerate(zip(agent_ids, spaces, strict=True)):
            if i == 0:
                continue
            link: VethPair | ImpairedLink
            if routed:
                link = stack.enter_context(impaired_link(
                    hub, ns, subnet_a=f"10.201.{i}.0/24", subnet_b=f"10.202.{i}.0/24"))
                gateway = link.gateway_b.ip
            else:
                link = stack.enter_context(veth_pair(hub, ns, f"10.201.{i}.0/24"))
                gateway = link.addr_a.ip
            links.append(link)
            ns.run("ip", "route", "add", "default", "via", str(gateway))
            hosts[agent_id] = Host(ns, agent_id, tmp_path, str(link.addr_b.ip),
                                   configs.get(agent_id, ""))
        hosts = {agent_ids[0]: Host(hub, agent_ids[0], tmp_path, "10.201.1.1",
                                    configs.get(agent_ids[0], "")), **hosts}
        cluster: list[str] = []
        if signal_servers > 1:
            # The hub's own loopback: a fixed port is free in a fresh namespace.
            redis = subprocess.Popen(
                hub.argv("redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(tmp_path)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )
            stack.callback(redis.wait, 5)
            stack.callback(redis.kill)
            wait_until(lambda: hub.run("redis-cli", "ping", check=False).stdout.strip()
                       == "PONG", START_TIMEOUT, what="redis-server in the hub")
            cluster = ["--redis", "redis://127.0.0.1:6379/0"]
        servers: list[tuple[subprocess.Popen[bytes], Path]] = []
        for n in range(signal_servers):
            server_out = tmp_path / ("signal.out" if n == 0 else f"signal{n}.out")
            with server_out.open("wb") as out:
                servers.append((subprocess.Popen(
                    hub.argv(*MVPD, "signal", "--listen", "10.201.1.1:0", *cluster),
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                    env=_env(),
                ), server_out))

        def listening(server: subprocess.Popen[bytes], server_out: Path) -> str | None:
            if server.poll() is not None:
                pytest.fail(f"mvpd signal exited: {server_out.read_text()}")
            for line in server_out.read_text().splitlines():
                if line.startswith("listening on "):
                    return line.split()[-1]
            return None

        try:
            urls = [wait_until(lambda s=s, o=o: listening(s, o), START_TIMEOUT,
                               what="the signaling server") for s, o in servers]
            lab = Lab(hosts, urls[0], links, urls)
            for i, host in enumerate(hosts.values()):
                host.start(urls[i % len(urls)], mvpd=mvpd)
            yield lab
        finally:
            for host in hosts.values():
                host.stop()
            for server, _ in servers:
                server.terminate()
            for server, _ in servers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(10)
                if server.poll() is None:
                    server.kill()
                    server.wait(5)


def dump_logs(lab: Lab) -> str:
    """Every daemon's log tail, for failure messages."""
    return "\n".join(f"--- {h.agent_id} ---\n{h.log_tail()}" for h in lab.hosts.values())


def status_json(host: Host) -> dict[str, Any]:
    """``mvpctl status --json`` parsed."""
    done = host.ctl("status", "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))
