"""Prometheus metrics: ``GET /metrics`` on ``metrics_listen`` (off by default).

Served from the daemon's own event loop by a deliberately tiny HTTP/1.1 responder (one
request per connection, ``GET`` only, a few connections at once, bounded request heads): the
metrics are read from the live objects at scrape time by a prometheus_client collector, so
nothing is counted twice and there is no thread touching the core. prometheus_client only
formats the exposition (``generate_latest``).

The address must be a loopback one unless ``metrics_allow_remote`` is set: the metrics name
the peers and show their traffic, which is not for everyone on the network (use an SSH
tunnel or a reverse proxy with authentication, or allow it knowingly).

Metrics (all prefixed ``mvpd_``): ``info``, ``signaling_state``, ``signaling_connections``,
``signaling_reconnects``, ``peers``, ``peer_state``, ``peer_path``, ``peer_bytes_received``,
``peer_bytes_sent``, ``peer_messages_received``, ``peer_messages_sent``, ``peer_dropped``,
``peer_ice_rtt_seconds``, ``peer_sctp_retransmissions``, ``peer_sctp_abandoned``,
``peer_sctp_cwnd_bytes``, ``refused_offers``, ``rpc_calls`` (by ``method`` and ``outcome``:
``ok``, ``cancelled`` or the error code; counted around the daemon's methods, so calls the
control server refuses before them, such as ``forbidden``, are only in the log).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .core import AgentCore
from .peer import PeerSession, PeerState
from .proto.errors import MvpError
from .proto.rpc import METHODS, PeerStatus
from .proto.rpcwire import error_to_wire
from .stats import ice_rtts, sctp_counters

log = logging.getLogger(__name__)

#: Largest request head accepted (request line and headers).
MAX_REQUEST_HEAD = 8 * 1024
#: Seconds a client has to send its request.
REQUEST_TIMEOUT = 5.0
#: Scrapes served at once; more connections are closed at once.
MAX_CONNECTIONS = 8
SIGNALING_STATES = ("disconnected", "connecting", "connected", "rejected", "closed")
PATHS = ("direct", "relayed", "unknown")


class RpcCallCounter:
    """Control calls by method and outcome; :meth:`wrap` counts a handler's calls."""

    def __init__(self) -> None:
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def wrap(self, handler: Any) -> Any:
        """A stand-in for ``handler`` whose ``rpc_*`` coroutines are counted."""
        return _CountingHandler(handler, self)


class _CountingHandler:
    _NAMES: ClassVar[dict[str, str]] = {
        "rpc_" + method.replace(".", "_"): method for method in METHODS
    }

    def __init__(self, handler: Any, counter: RpcCallCounter) -> None:
        self._handler = handler
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._handler, name)
        method = self._NAMES.get(name)
        if method is None or not callable(value):
            return value
        calls = self._counter.calls

        @functools.wraps(value)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await value(*args, **kwargs)
            except asyncio.CancelledError:
                calls[method, "cancelled"] += 1
                raise
            except BaseException as exc:
                calls[method, error_to_wire(exc)["code"]] += 1
                raise
            calls[method, "ok"] += 1
            return result

        return counted


class DaemonCollector(Collector):
    """Reads the daemon's state at each scrape."""

    def __init__(
        self,
        core: AgentCore,
        *,
        signaling: Any,
        peer_status: Callable[[PeerSession], PeerStatus],
        calls: RpcCallCounter,
    ) -> None:
        self.core = core
        self.signaling = signaling
        self.peer_status = peer_status
        self.calls = calls

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("mvpd_info", "This mvpd.", labels=["agent_id", "version"])
        info.add_metric([self.core.agent_id, __version__], 1)
        yield info
        yield from self._signaling()
        yield from self._peers()
        refused = CounterMetricFamily("mvpd_refused_offers", "Offers refused, by reason.",
                                      labels=["reason"])
        for reason, count in sorted(self.core.admission.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        calls = CounterMetricFamily("mvpd_rpc_calls", "Control calls, by method and outcome "
                                    "(ok or the error code).", labels=["method", "outcome"])
        for (method, outcome), count in sorted(self.calls.calls.items()):
            calls.add_metric([method, outcome], count)
        yield calls

    def _signaling(self) -> Iterator[Metric]:
        current = str(getattr(self.signaling, "state", "unknown"))
        state = GaugeMetricFamily("mvpd_signaling_state", "1 for the signaling client's "
                                  "current state.", labels=["state"])
        for name in SIGNALING_STATES:
            state.add_metric([name], 1 if name == current else 0)
        yield state
        connections = int(getattr(self.signaling, "connections", 0))
        yield CounterMetricFamily("mvpd_signaling_connections", "Connections made to the "
                                  "signaling server.", value=connections)
        yield CounterMetricFamily("mvpd_signaling_reconnects", "Connections to the signaling "
                                  "server after the first.", value=max(connections - 1, 0))

    def _peers(self) -> Iterator[Metric]:
        sessions = sorted(self.core.sessions.items())
        peers = GaugeMetricFamily("mvpd_peers", "Peer sessions, by state.", labels=["state"])
        by_state = collections.Counter(s.state.value for _, s in sessions)
        for state in PeerState:
            peers.add_metric([state.value], by_state[state.value])
        yield peers
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "state": GaugeMetricFamily("mvpd_peer_state", "1 for each peer's current state.",
                                       labels=["peer", "state"]),
            "path": GaugeMetricFamily("mvpd_peer_path", "1 for each peer's current path "
                                      "(direct, relayed or unknown).", labels=["peer", "path"]),
            "bytes_in": CounterMetricFamily("mvpd_peer_bytes_received", "Bytes received from "
                                            "the peer on data channels.", labels=["peer"]),
            "bytes_out": CounterMetricFamily("mvpd_peer_bytes_sent", "Bytes sent to the peer "
                                             "on data channels.", labels=["peer"]),
            "messages_in": CounterMetricFamily("mvpd_peer_messages_received", "Messages "
                                               "received from the peer.", labels=["peer"]),
            "messages_out": CounterMetricFamily("mvpd_peer_messages_sent", "Messages sent to "
                                                "the peer.", labels=["peer"]),
            "dropped": CounterMetricFamily("mvpd_peer_dropped", "Messages or packets dropped, "
                                           "by reason.", labels=["peer", "reason"]),
            "rtt": GaugeMetricFamily("mvpd_peer_ice_rtt_seconds", "Round trip of the last "
                                     "liveness check on the selected ICE pair.",
                                     labels=["peer"]),
            "retransmissions": CounterMetricFamily(
                "mvpd_peer_sctp_retransmissions", "SCTP DATA chunks sent again.",
                labels=["peer"]),
            "abandoned": CounterMetricFamily("mvpd_peer_sctp_abandoned", "SCTP chunks "
                                             "abandoned (partial reliability).", labels=["peer"]),
            "cwnd": GaugeMetricFamily("mvpd_peer_sctp_cwnd_bytes", "SCTP congestion window.",
                                      labels=["peer"]),
        }
        for peer, session in sessions:
            status = self.peer_status(session)
            families["state"].add_metric([peer, status.state], 1)
            families["path"].add_metric([peer, status.path], 1)
            for key in ("bytes_in", "bytes_out", "messages_in", "messages_out"):
                families[key].add_metric([peer], getattr(status, key))
            for reason, count in sorted(status.dropped.items()):
                families["dropped"].add_metric([peer, reason], count)
            rtts = ice_rtts(session)
            if rtts:
                families["rtt"].add_metric([peer], rtts[-1])
            sctp = sctp_counters(session)
            if sctp is not None:
                families["retransmissions"].add_metric([peer], sctp["retransmissions"])
                families["abandoned"].add_metric([peer], sctp["abandoned"])
                if isinstance(sctp["cwnd"], int | float):
                    families["cwnd"].add_metric([peer], sctp["cwnd"])
        yield from families.values()


class MetricsServer:
    """``GET /metrics`` on ``host:port``, from the running event loop."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self._server: asyncio.Server | None = None
        self._connections = 0

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        assert self._server is not None
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                      limit=MAX_REQUEST_HEAD)
        except OSError as exc:
            raise MvpError(f"cannot serve metrics on {self.host}:{self.port}: "
                           f"{exc.strerror or exc}; change metrics_listen") from None

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                return
            await asyncio.wait_for(self._answer(reader, writer), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError):
            pass  # a client that is not a scraper, or went away: nothing to tell it
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _respond(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await _respond(writer, 405, b"GET only\n", allow="GET, HEAD")
            return
        if target == "/metrics":
            body = generate_latest(self.registry)
            await _respond(writer, 200, body, content_type=CONTENT_TYPE_LATEST,
                           head_only=method == "HEAD")
        elif target == "/":
            await _respond(writer, 200,
                           b'<a href="/metrics">mvpd metrics</a>\n', content_type="text/html")
        else:
            await _respond(writer, 404, b"not found: try /metrics\n")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str | None = None,
    head_only: bool = False,
) -> None:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
    ]
    if allow is not None:
        headers.append(f"Allow: {allow}")
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()


def metrics_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own holding ``collector`` (not the process-wide default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


__all__ = ["DaemonCollector", "MetricsServer", "RpcCallCounter", "metrics_registry"]
