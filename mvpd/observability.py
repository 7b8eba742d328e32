"""What the daemon starts so that it can be watched: the traffic sampler, the RPC call
counter and (when ``metrics_listen`` is set) the Prometheus endpoint. One object, so the
daemon wires it with a few lines. (SCTP counters need nothing started: each association
keeps its own, see :func:`mvpd.stats.sctp_counters`.)"""

from __future__ import annotations

import logging
from typing import Any, cast

from .config import AgentSettings, split_host_port
from .control_handler import ControlHandler
from .core import AgentCore
from .logs import log_event
from .metrics import DaemonCollector, MetricsServer, RpcCallCounter, metrics_registry
from .rpc_methods import RpcMethods
from .stats import TrafficSampler

log = logging.getLogger(__name__)


class Observability:
    """Sampler, counters and metrics server of one daemon."""

    def __init__(self, settings: AgentSettings, core: AgentCore, signaling: Any) -> None:
        self.settings = settings
        self.core = core
        self.signaling = signaling
        self.sampler = TrafficSampler(lambda: core.sessions)
        self.calls = RpcCallCounter()
        self.metrics: MetricsServer | None = None

    def count_calls(self, methods: RpcMethods) -> ControlHandler:
        """``methods`` with every control call counted by method and outcome."""
        return cast(ControlHandler, self.calls.wrap(methods))

    async def start(self, methods: RpcMethods) -> None:
        self.sampler.start()
        listen = self.settings.metrics_listen
        if listen is None:
            return
        host, port = split_host_port(listen)
        collector = DaemonCollector(self.core, signaling=self.signaling,
                                    peer_status=methods.peer_status, calls=self.calls)
        self.metrics = MetricsServer(host, port, metrics_registry(collector))
        await self.metrics.start()
        shown_host, shown_port = self.metrics.address
        if ":" in shown_host:
            shown_host = f"[{shown_host}]"
        log_event(log, logging.INFO, "metrics-listening",
                  "Prometheus metrics on http://%s:%d/metrics", shown_host, shown_port)

    async def close(self) -> None:
        await self.sampler.close()
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
