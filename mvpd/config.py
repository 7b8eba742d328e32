"""Configuration: ``AgentSettings`` and ``load_settings()``.

Sources, highest precedence first:

1. keyword arguments to :func:`load_settings` (tests, the library API);
2. environment variables (``AGENT_ID``, ``SIGNALING_URL``, ..., ``MVPD_*``);
3. a ``.env`` file in the working directory (or ``env_file=``);
4. the config file: ``AGENT_CONFIG`` (from the environment or ``.env``), else
   ``/etc/mvp-agent.yaml`` when it exists; YAML or JSON by its extension;
5. the defaults below, which make a single machine a working setup.

Every key, with its default and environment name, is documented in ``etc/mvp-agent.yaml``.
Invalid values raise :class:`~mvpd.proto.errors.ConfigError` with one line per problem naming
the key, the value (never for secrets) and what is allowed; the daemon exits 78 (EX_CONFIG).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .proto.errors import ConfigError
from .proto.modes import Mode
from .proto.signaling import AGENT_ID_PATTERN
from .proto.trust import TrustPolicy, normalize_fingerprint

DEFAULT_CONFIG_FILE = Path("/etc/mvp-agent.yaml")
#: The config file :func:`load_settings` chose, for the sources of the settings it builds.
_FILE_OVERRIDE: ContextVar[tuple[Path | None] | None] = ContextVar("config_file", default=None)
DEFAULT_SOCKET = Path("/run/mvpd/mvpd.sock")
#: Where the identity key and known_peers live (systemd's StateDirectory=mvpd).
DEFAULT_STATE_DIR = Path("/var/lib/mvpd")
DEFAULT_SIGNALING_PORT = 8765
EX_CONFIG = 78

AgentId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
#: The ``peers`` key whose settings apply to every peer without an entry of its own.
ANY_PEER = "*"
#: Fields whose values never appear in messages or logs.
SECRET_KEYS = frozenset({"signaling_token", "ice_credential", "credential", "token", "redis"})
#: Environment variables that can hold settings: these prefixes (AGENT_ID, AGENT_CONFIG,
#: SIGNALING_URL, ICE_URL, MVPD_SOCKET, MVPD_TUN__MTU, ...) and names.
SETTING_ENV_PREFIXES = ("AGENT_", "SIGNALING_", "ICE_", "MVPD_")
SETTING_ENV_NAMES = frozenset({"MODE", "DATA_CHANNEL_LABEL"})


def is_setting_variable(name: str) -> bool:
    """Whether the environment variable ``name`` can change mvpd's settings (for a child
    process, a test or a benchmark that must not inherit its caller's)."""
    upper = name.upper()  # settings are read case-insensitively
    return upper.startswith(SETTING_ENV_PREFIXES) or upper in SETTING_ENV_NAMES


def _csv(value: Any) -> Any:
    """Accept ``a,b,c`` (environment style) as well as a list (file style)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class IceServer(BaseModel):
    """One STUN or TURN server, as in RTCIceServer."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(min_length=1)
    username: str | None = None
    credential: SecretStr | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("urls")
    @classmethod
    def _scheme(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^(stun|stuns|turn|turns):[^\s]+$", url):
                raise ValueError(f"{url!r} is not a stun:, stuns:, turn: or turns: URL")
        return urls


class SignalingServerSettings(BaseModel):
    """The reference signaling server, embedded in the daemon or run by ``mvpd signal``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    listen: str = f"127.0.0.1:{DEFAULT_SIGNALING_PORT}"
    #: One token every agent must present. Secret.
    token: SecretStr | None = None
    #: A file of ``agent-id token`` lines (or ``agent-id: token`` YAML): one token per id.
    tokens_file: Path | None = None
    max_message_size: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: Sustained messages per second per connection, and the burst allowed above it.
    rate: float = Field(default=50.0, gt=0)
    burst: int = Field(default=200, ge=1)
    #: WebSocket keepalive: ping every ``ping_interval`` seconds (0 disables).
    ping_interval: float = Field(default=20.0, ge=0)
    #: ``redis://HOST:PORT/DB`` shared by several servers (see README, "Running several
    #: signaling servers"); unset: this server alone. Secret (it may hold a password).
    redis: SecretStr | None = None

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(
            r"^(rediss?://[^\s]+|unix:///[^\s]+)$", value.get_secret_value()
        ):
            raise ValueError("must be a redis://HOST:PORT/DB, rediss:// or unix:/// URL")
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value


class PeerSettings(BaseModel):
    """Per-peer settings under ``peers.<id>`` (``peers."*"``: every peer without its own)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = None
    #: TUN mode: the addresses this peer may send from and that are routed to it. Having
    #: them is what lets a peer use TUN mode here; they never default to anything.
    allowed_ips: list[IPNetwork] = Field(default_factory=list)
    #: The peer's identities (``sha-256 AB:CD:...``, as its ``mvpctl id`` prints them):
    #: when given, the only ones accepted.
    fingerprints: list[str] = Field(default_factory=list)
    #: This peer's trust policy; the global ``trust`` when unset.
    trust: TrustPolicy | None = None

    @field_validator("fingerprints", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("fingerprints")
    @classmethod
    def _canonical(cls, value: list[str]) -> list[str]:
        return [normalize_fingerprint(item) for item in value]


class TunSettings(BaseModel):
    """TUN mode device settings."""

    model_config = ConfigDict(extra="forbid")

    #: Device name; ``%d`` is replaced by the first free number.
    name: str = Field(default="mvp-tun%d", pattern=r"^[A-Za-z0-9_.%-]{1,15}$")
    #: This machine's address on the tunnel, with prefix, e.g. ``10.0.0.1/24``.
    address: IPInterface | None = None
    #: 1420, WireGuard's: a packet plus the datagram path's 28 bytes fits one unfragmented
    #: datagram on a 1500-byte path, over IPv6 and through a TURN relay too (mvpd.tun).
    #: Larger packets still work, on the data channel.
    mtu: int = Field(default=1420, ge=576, le=65535)
    #: Destinations besides ``address`` that a peer's packets may have: networks this agent
    #: forwards to (a LAN behind it, or other tun peers for a hub; needs IP forwarding).
    #: Empty: a peer reaches this agent's tunnel address and nothing else of this host.
    forward_to: list[IPNetwork] = Field(default_factory=list)


class AgentSettings(BaseSettings):
    """Everything mvpd and the library API read from the environment and files."""

    model_config = SettingsConfigDict(
        env_prefix="",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
        validate_default=True,
    )

    # --- the seed's settings --------------------------------------------------------------
    #: Unique id of this agent on the signaling server. Defaults to the host name.
    agent_id: AgentId = Field(default_factory=lambda: _default_agent_id())
    #: ws:// or wss:// URL of the signaling server. The default is the embedded server's.
    signaling_url: str = f"ws://127.0.0.1:{DEFAULT_SIGNALING_PORT}"
    #: Several servers of one cluster, tried in turn (``SIGNALING_URLS``, comma-separated);
    #: replaces ``signaling_url``, which may also be given as a list in the config file.
    signaling_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    signaling_token: SecretStr | None = None
    mode: Mode = "chat"
    data_channel_label: str = Field(default="mvp", min_length=1, max_length=64)
    ice_url: str | None = None
    ice_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ice_username: str | None = None
    ice_credential: SecretStr | None = None
    ice_servers: list[IceServer] = Field(default_factory=list)

    # --- daemon settings ------------------------------------------------------------------
    #: ``all`` or ``relay`` (force the TURN path).
    ice_transport_policy: Literal["all", "relay"] = "all"
    #: CA bundle for wss:// signaling; the system store when unset.
    signaling_ca_file: Path | None = None
    socket: Path = Field(
        default=DEFAULT_SOCKET, validation_alias=AliasChoices("MVPD_SOCKET", "socket")
    )
    #: Members of this group (and root) may change things through the control socket.
    socket_group: str = Field(
        default="mvp", validation_alias=AliasChoices("MVPD_SOCKET_GROUP", "socket_group")
    )
    #: What other local users may do: ``read`` (status only) or ``none``.
    others_access: Literal["read", "none"] = Field(
        default="read", validation_alias=AliasChoices("MVPD_OTHERS_ACCESS", "others_access")
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias=AliasChoices("MVPD_LOG_LEVEL", "log_level")
    )
    #: Serve Prometheus metrics at ``http://HOST:PORT/metrics`` (off when unset).
    metrics_listen: str | None = Field(
        default=None, validation_alias=AliasChoices("MVPD_METRICS_LISTEN", "metrics_listen")
    )
    #: Allow ``metrics_listen`` on an address other than loopback.
    metrics_allow_remote: bool = Field(
        default=False,
        validation_alias=AliasChoices("MVPD_METRICS_ALLOW_REMOTE", "metrics_allow_remote"),
    )
    #: Peers whose offers are answered: ``["*"]`` for everyone on the signaling server.
    allowed_peers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        validation_alias=AliasChoices("MVPD_ALLOWED_PEERS", "allowed_peers"),
    )
    #: Peers to connect to at start (and again after they drop), in their configured mode.
    auto_connect: Annotated[list[AgentId], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("MVPD_AUTO_CONNECT", "auto_connect")
    )
    #: Seconds from offer to an open data channel before a connect fails.
    connect_timeout: float = Field(
        default=30.0,
        gt=0,
        le=600,
        validation_alias=AliasChoices("MVPD_CONNECT_TIMEOUT", "connect_timeout"),
    )
    #: Seconds an open connection may go without an answer to its liveness checks before it
    #: counts as failed (0: off, leaving ICE consent freshness, about 30 s).
    peer_timeout: float = Field(
        default=10.0,
        ge=0,
        le=600,
        validation_alias=AliasChoices("MVPD_PEER_TIMEOUT", "peer_timeout"),
    )
    #: Sessions answering an offer that may be setting up at once (not connected yet);
    #: further offers are refused until some connect or time out.
    max_pending_sessions: int = Field(
        default=32,
        ge=1,
        le=4096,
        validation_alias=AliasChoices("MVPD_MAX_PENDING_SESSIONS", "max_pending_sessions"),
    )
    #: Offers one peer id may make per minute (a token bucket); further ones are refused.
    offers_per_minute: float = Field(
        # A script that connects and disconnects in a loop stays under it; a flood from one
        # id does not (the pending-session cap bounds floods from many ids).
        default=30.0,
        gt=0,
        le=600,
        validation_alias=AliasChoices("MVPD_OFFERS_PER_MINUTE", "offers_per_minute"),
    )
    #: Remote ICE candidates used per session (in the SDP and trickled); more are ignored.
    max_remote_candidates: int = Field(
        default=64,
        ge=1,
        le=1024,
        validation_alias=AliasChoices("MVPD_MAX_REMOTE_CANDIDATES", "max_remote_candidates"),
    )
    #: Where this agent's identity key and known_peers are kept (0700, root only).
    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR, validation_alias=AliasChoices("MVPD_STATE_DIR", "state_dir")
    )
    #: Trust policy for peers without one of their own: tofu, pinned or any. Unset: tofu,
    #: but pinned for peers in tun mode.
    trust: TrustPolicy | None = Field(
        default=None, validation_alias=AliasChoices("MVPD_TRUST", "trust")
    )
    signaling_server: SignalingServerSettings = Field(
        default_factory=SignalingServerSettings,
        validation_alias=AliasChoices("MVPD_SIGNALING_SERVER", "signaling_server"),
    )
    peers: dict[str, PeerSettings] = Field(
        default_factory=dict, validation_alias=AliasChoices("MVPD_PEERS", "peers")
    )
    tun: TunSettings = Field(
        default_factory=TunSettings, validation_alias=AliasChoices("MVPD_TUN", "tun")
    )

    _config_file: Path | None = None

    @field_validator("ice_urls", "allowed_peers", "auto_connect", "signaling_urls", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        return _csv(value)

    @model_validator(mode="before")
    @classmethod
    def _signaling_url_list(cls, data: Any) -> Any:
        """``signaling_url: [a, b]`` in a config file means ``signaling_urls``."""
        if isinstance(data, dict) and isinstance(data.get("signaling_url"), list):
            data = dict(data)
            data.setdefault("signaling_urls", data["signaling_url"])
            data["signaling_url"] = data["signaling_url"][0] if data["signaling_url"] else ""
        return data

    @field_validator("signaling_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        if not re.match(r"^wss?://[^\s/]+", value):
            raise ValueError("must be a ws:// or wss:// URL, e.g. ws://127.0.0.1:8765")
        return value

    @field_validator("signaling_urls")
    @classmethod
    def _ws_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            cls._ws_url(url)
        return value

    @property
    def signaling_url_list(self) -> list[str]:
        """The signaling servers to try, in order."""
        return list(self.signaling_urls) or [self.signaling_url]

    @field_validator("allowed_peers")
    @classmethod
    def _peer_patterns(cls, value: list[str]) -> list[str]:
        for item in value:
            if item != "*" and not re.match(AGENT_ID_PATTERN, item):
                raise ValueError(f"{item!r} is neither '*' nor an agent id")
        return value

    @field_validator("peers")
    @classmethod
    def _peer_ids(cls, value: dict[str, PeerSettings]) -> dict[str, PeerSettings]:
        for key in value:
            if key != ANY_PEER and not re.match(AGENT_ID_PATTERN, key):
                raise ValueError(f"{key!r} is neither '*' nor an agent id")
        return value

    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _metrics_off(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _metrics_address(self) -> AgentSettings:
        """The metrics name the peers and show their traffic: loopback only, unless allowed."""
        if self.metrics_listen is None:
            return self
        host, _ = split_host_port(self.metrics_listen)
        if host == "localhost" or self.metrics_allow_remote:
            return self
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"metrics_listen {self.metrics_listen} is not a loopback address: the metrics "
                "name your peers and their traffic. Use 127.0.0.1 (and an SSH tunnel or an "
                "authenticating proxy), or set metrics_allow_remote: true"
            )
        return self

    @model_validator(mode="after")
    def _tun_peers(self) -> AgentSettings:
        """TUN access is given per peer, with addresses no other peer and not this agent has
        (WireGuard's rule: one owner per address)."""
        problems = tun_policy_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _ice_from_seed_variables(self) -> AgentSettings:
        """ICE_URL / ICE_URLS (with ICE_USERNAME / ICE_CREDENTIAL) replace ``ice_servers``."""
        urls = ([self.ice_url] if self.ice_url else []) + list(self.ice_urls)
        if urls:
            self.ice_servers = [
                IceServer(urls=[url], username=self.ice_username, credential=self.ice_credential)
                for url in urls
            ]
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        override = _FILE_OVERRIDE.get()
        path = override[0] if override is not None else config_file_path()
        return (init_settings, env_settings, dotenv_settings, ConfigFileSource(settings_cls, path))

    # --- helpers used by the daemon ---------------------------------------------------------

    def allows(self, peer_id: str) -> bool:
        """Whether offers from ``peer_id`` are answered."""
        return "*" in self.allowed_peers or peer_id in self.allowed_peers

    def peer_settings(self, peer_id: str) -> PeerSettings | None:
        """``peers.<peer_id>``, else ``peers."*"``, else None."""
        return self.peers.get(peer_id, self.peers.get(ANY_PEER))

    def mode_for(self, peer_id: str) -> Mode:
        """The mode a connection to ``peer_id`` uses unless the caller names one."""
        peer = self.peer_settings(peer_id)
        return peer.mode if peer is not None and peer.mode is not None else self.mode

    def tun_networks(self, peer_id: str) -> list[IPNetwork]:
        """The tunnel addresses ``peer_id`` may use; empty when it may not use TUN mode."""
        peer = self.peer_settings(peer_id)
        return list(peer.allowed_ips) if peer is not None else []

    def grants_mode(self, peer_id: str, mode: str) -> bool:
        """Whether ``peer_id`` may have a connection in ``mode`` here: TUN mode only with
        allowed IPs of its own (or of a ``"*"`` entry); every other mode always."""
        return mode != "tun" or bool(self.tun_networks(peer_id))

    def ice_warnings(self) -> list[str]:
        """What the operator should know about the ICE server list: aiortc uses only the
        first STUN and the first TURN server."""
        stun = [u for s in self.ice_servers for u in s.urls if u.startswith("stun")]
        turn = [u for s in self.ice_servers for u in s.urls if u.startswith("turn")]
        out = []
        if len(stun) > 1:
            out.append(f"only the first STUN server is used ({stun[0]}); ignored: {stun[1:]}")
        if len(turn) > 1:
            out.append(f"only the first TURN server is used ({turn[0]}); ignored: {turn[1:]}")
        if self.ice_transport_policy == "relay" and not turn:
            out.append("ice_transport_policy is 'relay' but no TURN server is configured")
        return out

    @property
    def config_file(self) -> Path | None:
        """The config file that was read, if any."""
        return self._config_file

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with secrets replaced by ``***`` (for status and logs)."""
        redacted: dict[str, Any] = _redact(json.loads(self.model_dump_json()))
        return redacted


def tun_policy_problems(settings: AgentSettings) -> list[str]:
    """What is wrong with the TUN access of ``settings.peers``, one sentence each: a tun peer
    without allowed IPs, allowed IPs that overlap another peer's or hold this agent's own
    tunnel address, an auto-connect tun peer with no entry."""
    problems = []
    own = settings.tun.address
    owned: list[tuple[IPNetwork, str]] = []
    for peer_id, peer in settings.peers.items():
        key = f"peers.{peer_id}" if peer_id != ANY_PEER else 'peers."*"'
        mode = peer.mode or settings.mode
        if mode == "tun" and not peer.allowed_ips:
            problems.append(
                f"{key} is in tun mode without allowed_ips: list the tunnel addresses this "
                f"peer may use, e.g. {key}.allowed_ips: [10.0.0.2/32] (they are never taken "
                "from tun.address)"
            )
        for net in peer.allowed_ips:
            if own is not None and own.ip in net:
                problems.append(
                    f"{key}.allowed_ips {net} holds this agent's own tunnel address {own.ip}: "
                    "give the peer only its own addresses (e.g. a /32)"
                )
            for other_net, other in owned:
                if other != peer_id and net.version == other_net.version and \
                        net.overlaps(other_net):
                    problems.append(
                        f"{key}.allowed_ips {net} overlaps {other_net} of peers.{other}: "
                        "each tunnel address belongs to one peer"
                    )
            owned.append((net, peer_id))
    for peer_id in settings.auto_connect:
        if settings.mode_for(peer_id) == "tun" and settings.peer_settings(peer_id) is None:
            problems.append(
                f"auto_connect peer {peer_id} would use tun mode but has no peers.{peer_id} "
                f"entry: set peers.{peer_id}.allowed_ips"
            )
    return problems


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: ("***" if k in SECRET_KEYS and v is not None else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _default_agent_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._:@-]", "-", socket.gethostname())[:64].lstrip("._:@-")
    return name or "mvp-agent"


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a host and a port number."""
    match = re.match(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s]*)):(?P<port>\d{1,5})$", value)
    if not match or int(match["port"]) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8765 or [::1]:8765)")
    return (match["v6"] or match["host"] or "0.0.0.0"), int(match["port"])


class ConfigFileSource(PydanticBaseSettingsSource):
    """The YAML or JSON config file: ``AGENT_CONFIG`` or ``/etc/mvp-agent.yaml``.

    Unknown keys are errors (a typo must not silently fall back to a default)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.data: dict[str, Any] = self._read() if self.path is not None else {}

    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {self.path} does not exist (AGENT_CONFIG)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {self.path} cannot be read: {exc}") from None
        try:
            data = json.loads(text) if self.path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {self.path} is not valid: {_syntax_error(exc)}") \
                from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {self.path} must hold a mapping of keys to values")
        known = set(AgentSettings.model_fields)
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(
                f"config file {self.path}: unknown key(s) {', '.join(unknown)}; "
                "see etc/mvp-agent.yaml for the keys"
            )
        return data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def _syntax_error(exc: ValueError | yaml.YAMLError) -> str:
    """Where a file failed to parse and why, without quoting the file: the offending line
    may hold a token or a credential. PyYAML's messages show the line and can quote its
    text (an undefined alias, an unknown escape), so quoted parts are left out too."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno}, column {exc.colno}"  # positions only
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = re.sub(r"'[^']*'|\"[^\"]*\"", "(...)", exc.problem or exc.context or "")
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"YAML syntax error at {where}: {problem}".replace(" at : ", ": ")
    return "YAML syntax error"


def config_file_path(env_file: str | Path | None = ".env") -> Path | None:
    """Which config file applies: ``AGENT_CONFIG`` from the environment, then from ``.env``,
    then ``/etc/mvp-agent.yaml`` if it exists."""
    named = os.environ.get("AGENT_CONFIG")
    if not named and env_file is not None and Path(env_file).is_file():
        named = dotenv_values(env_file).get("AGENT_CONFIG")
    if named:
        return Path(named)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


ENV_NAMES: dict[str, str] = {
    "socket": "MVPD_SOCKET",
    "socket_group": "MVPD_SOCKET_GROUP",
    "others_access": "MVPD_OTHERS_ACCESS",
    "log_level": "MVPD_LOG_LEVEL",
    "metrics_listen": "MVPD_METRICS_LISTEN",
    "metrics_allow_remote": "MVPD_METRICS_ALLOW_REMOTE",
    "allowed_peers": "MVPD_ALLOWED_PEERS",
    "auto_connect": "MVPD_AUTO_CONNECT",
    "connect_timeout": "MVPD_CONNECT_TIMEOUT",
    "peer_timeout": "MVPD_PEER_TIMEOUT",
    "max_pending_sessions": "MVPD_MAX_PENDING_SESSIONS",
    "offers_per_minute": "MVPD_OFFERS_PER_MINUTE",
    "max_remote_candidates": "MVPD_MAX_REMOTE_CANDIDATES",
    "state_dir": "MVPD_STATE_DIR",
    "trust": "MVPD_TRUST",
    "signaling_server": "MVPD_SIGNALING_SERVER__*",
    "peers": "MVPD_PEERS",
    "tun": "MVPD_TUN__*",
}


def load_settings(
    config_file: str | Path | None = None, env_file: str | Path | None = ".env", **overrides: Any
) -> AgentSettings:
    """Read the settings from every source; raise :class:`ConfigError` naming each bad key.

    ``config_file`` replaces ``AGENT_CONFIG``; ``overrides`` beat everything (library use).
    """
    path = Path(config_file) if config_file is not None else config_file_path(env_file)

    token = _FILE_OVERRIDE.set((path,))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings = AgentSettings(_env_file=env_file, **overrides)
    except ValidationError as exc:
        raise ConfigError(format_config_error(exc)) from None
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as exc:  # e.g. JSON in an env var
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        _FILE_OVERRIDE.reset(token)
    settings._config_file = path
    return settings


def format_config_error(exc: ValidationError) -> str:
    """One line per problem: key (and its environment name), what is wrong, the bad value
    unless the key is secret."""
    lines = ["invalid configuration:"]
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if loc:
            loc[0] = _field_for(loc[0])
        key = ".".join(loc) or "(settings)"
        top = loc[0] if loc else ""
        env = ENV_NAMES.get(top, top.upper())
        where = f" (environment {env})" if top else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        line = f"  {key}{where}: {msg}"
        if _shows_input(err["type"], loc, err.get("input")):
            line += f"; got {_show(err.get('input'))}"
        lines.append(line)
    return "\n".join(lines)


def _shows_input(kind: str, loc: list[str], value: Any) -> bool:
    """Whether an error may quote the bad value: never for a secret key, for an unknown key
    (a misspelt ``signaling_tokn`` is still a token) or for a whole mapping or list (the
    settings, an ICE server, ...: they may hold secrets)."""
    if kind in ("missing", "extra_forbidden") or not loc or set(loc) & SECRET_KEYS:
        return False
    return not isinstance(value, dict | list | tuple)


def _field_for(name: str) -> str:
    for field_name, info in AgentSettings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if name == field_name or name in choices:
            return field_name
    return name


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
