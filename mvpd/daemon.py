"""The daemon's lifecycle: start everything, serve, reload on SIGHUP, stop cleanly.

Start order (each step logged): the embedded signaling server when enabled, the signaling
client (which connects and reconnects by itself: the daemon starts even while the server is
down), the agent core, the control socket; then READY=1 for systemd. Stop order is the
reverse, after STOPPING=1: no new control calls, bye to every peer, sessions and TUN devices
released, signaling closed. The data plane never waits for signaling: established peers keep
their channels while the signaling server is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import signal
from typing import Any

from . import __version__, sd_notify
from .config import EX_CONFIG, AgentSettings, load_settings
from .control import ControlServer
from .core import AgentCore
from .logs import log_event, setup_logging
from .observability import Observability
from .peer import PeerState
from .proto.errors import ConfigError, MvpError
from .proto.rpc import ReloadResult
from .rpc_methods import RpcMethods
from .signaling.client import SignalingClient
from .signaling.server import SignalingServer
from .socket_file import check_socket_path
from .tun.tunnel import Tunnel

log = logging.getLogger("mvpd")

#: Settings that SIGHUP applies without a restart.
RELOADABLE = ("allowed_peers", "ice_servers", "ice_transport_policy", "log_level",
              "connect_timeout", "peer_timeout", "auto_connect", "peers", "trust")
#: Seconds between auto-connect attempts for a peer that is not connected (with jitter).
AUTO_CONNECT_INTERVAL = 10.0


class Daemon:
    """One running mvpd."""

    def __init__(self, settings: AgentSettings, *, verbose: bool = False) -> None:
        self.settings = settings
        self.verbose = verbose
        self.signaling_server: SignalingServer | None = None
        self.signaling: SignalingClient | None = None
        self.core: AgentCore | None = None
        self.tunnel: Tunnel | None = None
        self.methods: RpcMethods | None = None
        self.control: ControlServer | None = None
        self.observability: Observability | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._dialing: set[str] = set()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring every part up; raise :class:`MvpError` (after undoing what started) if one
        cannot start."""
        s = self.settings
        log_event(log, logging.INFO, "starting", "mvpd starting as %s (config %s)",
                  s.agent_id, s.config_file or "none")
        check_socket_path(s.socket)  # a bad path is a config error (78): say it first
        try:
            if s.signaling_server.enabled:
                self.signaling_server = SignalingServer(s.signaling_server)
                await self.signaling_server.start()
                log.info("embedded signaling server on %s", self.signaling_server.url)
            self.signaling = SignalingClient(s, on_state=self._on_signaling_state)
            self.signaling.start()
            self.tunnel = Tunnel(s)
            await self.tunnel.start()  # stale devices from an earlier run
            self.core = AgentCore(s, self.signaling)
            self.core.add_connect_check(self.tunnel.check)
            self.core.add_transport_hook(self.tunnel.attach)
            await self.core.start()
            self.observability = Observability(s, self.core, self.signaling)
            self.methods = RpcMethods(
                s, self.core, signaling_state=self._signaling_state, reload=self.reload,
                sampler=self.observability.sampler,
            )
            await self.observability.start(self.methods)
            self.control = ControlServer(
                s.socket,
                self.observability.count_calls(self.methods),
                group=s.socket_group,
                others_access=s.others_access,
                agent_id=s.agent_id,
                version=__version__,
            )
            await self.control.start()
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.ensure_future(self._track_peers()))
        self._tasks.append(asyncio.ensure_future(self._auto_connect()))
        watchdog = sd_notify.start_watchdog()
        if watchdog is not None:
            self._tasks.append(watchdog)
        sd_notify.notify_ready(self.status_line())
        log_event(log, logging.INFO, "ready", "mvpd ready: control socket %s", s.socket)

    async def run(self) -> None:
        """Start, serve until a stop signal, stop."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    def request_stop(self, signum: int | None = None) -> None:
        if not self._stop.is_set():
            name = signal.Signals(signum).name if signum else "request"
            log_event(log, logging.INFO, "stopping", "stopping (%s)", name)
            sd_notify.notify_stopping("stopping: saying bye to peers")
            if self.signaling is not None:
                # Byes still go out on a connection that is up; nothing connects again.
                self.signaling.begin_stopping()
            self._stop.set()

    async def stop(self) -> None:
        """Stop every part that started, in reverse order. Never raises."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        steps = [
            ("control socket", self.control.close if self.control else None),
            ("rpc", self.methods.close if self.methods else None),
            ("metrics", self.observability.close if self.observability else None),
            ("peers", self.core.stop if self.core else None),
            ("tun device", self.tunnel.close if self.tunnel else None),
            ("signaling client", self.signaling.close if self.signaling else None),
            ("signaling server",
             self.signaling_server.close if self.signaling_server else None),
        ]
        for name, step in steps:
            if step is None:
                continue
            try:
                await asyncio.wait_for(step(), 10)
            except Exception as exc:
                log.warning("stopping the %s: %s", name, exc)
        self.control = self.methods = self.core = None
        self.observability = None
        self.tunnel = None
        self.signaling = self.signaling_server = None

    # --- reload ----------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        sd_notify.notify_reloading("reloading configuration")
        result = self.reload()
        sd_notify.notify_ready(self.status_line())
        applied = ", ".join(result.applied) or "nothing changed"
        not_applied = "; ".join(result.not_applied) or "nothing"
        # APPLIED/NOT_APPLIED as fields: `journalctl -u mvpd EVENT=reloaded -o json`.
        log_event(log, logging.INFO, "reloaded", "reload: applied %s; not applied: %s",
                  applied, not_applied, applied=applied, not_applied=not_applied)

    def reload(self) -> ReloadResult:
        """Re-read the configuration and apply what can change at run time."""
        try:
            new = load_settings(config_file=self.settings.config_file)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return ReloadResult(not_applied=[f"invalid configuration: {exc}"])
        result = ReloadResult()
        for key in AgentSettings.model_fields:
            old_value, new_value = getattr(self.settings, key), getattr(new, key)
            if old_value == new_value:
                continue
            if key in RELOADABLE:
                setattr(self.settings, key, new_value)
                result.applied.append(key)
            elif key not in ("ice_url", "ice_urls", "ice_username", "ice_credential"):
                result.not_applied.append(f"{key} (needs a restart)")
        if "log_level" in result.applied:
            setup_logging(self.settings.log_level, verbose=self.verbose)
        for warning in self.settings.ice_warnings():
            log.warning("ICE servers: %s", warning)
        if result.not_applied:
            log.warning("reload: these changes need `systemctl restart mvpd`: %s",
                        ", ".join(result.not_applied))
        return result

    # --- status ----------------------------------------------------------------------------

    def _signaling_state(self) -> str:
        return self.signaling.state if self.signaling is not None else "stopped"

    def status_line(self) -> str:
        """The one-line summary systemd shows (``systemctl status mvpd``)."""
        peers = self.core.sessions.values() if self.core else []
        connected = sum(1 for p in peers if p.state == PeerState.CONNECTED)
        return (f"id {self.settings.agent_id}, signaling {self._signaling_state()}, "
                f"{connected} peer(s) connected")

    def _on_signaling_state(self, state: str) -> None:
        url = self.signaling.url if self.signaling is not None else self.settings.signaling_url
        log_event(log, logging.INFO, "signaling-" + state, "signaling %s (%s)", state, url)
        sd_notify.notify_status(self.status_line())

    async def _track_peers(self) -> None:
        """Keep systemd's status line current. (Peer state changes are logged, with their
        journal fields, by the peer sessions themselves.)"""
        assert self.core is not None
        events = self.core.subscribe(kinds={"peer-state"}, maxsize=256)
        try:
            async for _event in events:
                sd_notify.notify_status(self.status_line())
        finally:
            events.close()

    async def _auto_connect(self) -> None:
        """Keep the configured auto-connect peers connected."""
        while True:
            core = self.core
            if core is not None:
                for peer in list(self.settings.auto_connect):
                    session = core.get_session(peer)
                    if (session is None or session.state.is_final) and peer not in self._dialing:
                        self._dialing.add(peer)
                        self._tasks.append(asyncio.ensure_future(self._try_connect(peer)))
            await asyncio.sleep(AUTO_CONNECT_INTERVAL * (0.8 + 0.4 * random.random()))

    async def _try_connect(self, peer: str) -> None:
        if self.core is None:
            return
        try:
            await self.core.connect_to(peer)
        except MvpError as exc:
            log_event(log, logging.INFO, "auto-connect-failed", "auto-connect to %s: %s",
                      peer, exc, peer=peer)
        finally:
            self._dialing.discard(peer)
            self._tasks[:] = [t for t in self._tasks if not t.done()]


def _install_uvloop() -> None:
    """uvloop makes aiortc's pure-Python SCTP much faster (see BENCHMARKS.md)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_open_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit and return it.

    systemd keeps the soft limit at 1024 for programs that still use select(2) and lets the
    others raise it (the unit sets the hard limit, ``LimitNOFILE=``); asyncio uses epoll.
    Every peer costs a few UDP sockets and every control client one, so 1024 runs out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open file limit %d", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
        return soft
    log.info("open file limit raised from %d to %d (the hard limit)", soft, hard)
    return hard


def run_daemon(settings: AgentSettings, *, verbose: bool = False) -> int:
    """Run until stopped; the process exit code (0 clean, 1 failure, 78 bad config)."""
    setup_logging(settings.log_level, verbose=verbose)
    raise_open_file_limit()
    _install_uvloop()
    daemon = Daemon(settings, verbose=verbose)
    try:
        asyncio.run(daemon.run())
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return EX_CONFIG
    except MvpError as exc:
        log_event(log, logging.ERROR, "start-failed", "mvpd cannot run: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    log_event(log, logging.INFO, "stopped", "mvpd stopped")
    return 0
