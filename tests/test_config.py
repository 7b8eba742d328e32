"""Configuration: precedence, the seed's variables, the shipped file, every error path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mvpd import config as config_module
from mvpd.config import AgentSettings, is_setting_variable, load_settings
from mvpd.proto.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "mvpd" / "data" / "mvp-agent.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No stray variables, no /etc file, and a working directory without a .env."""
    for name in list(os.environ):
        if is_setting_variable(name):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", tmp_path / "absent.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_make_a_single_machine_setup() -> None:
    s = load_settings()
    assert s.mode == "chat"
    assert s.data_channel_label == "mvp"
    assert s.signaling_url == "ws://127.0.0.1:8765"
    assert s.ice_servers == []
    assert str(s.socket) == "/run/mvpd/mvpd.sock"
    assert s.allows("anyone")
    assert re.match(r"^[A-Za-z0-9]", s.agent_id)
    assert s.config_file is None


def test_precedence_env_over_dotenv_over_file_over_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = write(tmp_path / "c.yaml", "mode: json\ndata_channel_label: from-file\nagent_id: f\n")
    monkeypatch.setenv("AGENT_CONFIG", str(cfg))
    s = load_settings()
    assert (s.mode, s.data_channel_label, s.agent_id) == ("json", "from-file", "f")
    assert s.config_file == cfg

    write(tmp_path / ".env", "MODE=bytes\nAGENT_ID=dotenv\n")
    s = load_settings()
    assert (s.mode, s.data_channel_label, s.agent_id) == ("bytes", "from-file", "dotenv")

    monkeypatch.setenv("MODE", "tun")
    s = load_settings()
    assert (s.mode, s.agent_id) == ("tun", "dotenv")

    # keyword overrides (the library API) beat everything
    assert load_settings(mode="chat").mode == "chat"


def test_agent_config_may_come_from_dotenv(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.json", json.dumps({"agent_id": "j", "mode": "bytes"}))
    write(tmp_path / ".env", f"AGENT_CONFIG={cfg}\n")
    s = load_settings()
    assert (s.agent_id, s.mode) == ("j", "bytes")


def test_default_file_is_read_when_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    etc = write(tmp_path / "mvp-agent.yaml", "agent_id: from-etc\n")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", etc)
    assert load_settings().agent_id == "from-etc"


def test_seed_file_keys(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "config.yaml",
        """
agent_id: "my-agent"
signaling_url: "wss://signaling.example.com"
signaling_token: "secret-token"
mode: "chat"
ice_servers:
  - urls: "stun:stun.l.google.com:19302"
  - urls: "turn:turn.example.com:3478"
    username: "user"
    credential: "pass"
""",
    )
    s = load_settings(config_file=cfg)
    assert s.agent_id == "my-agent"
    assert s.signaling_token is not None
    assert s.signaling_token.get_secret_value() == "secret-token"
    assert [srv.urls for srv in s.ice_servers] == [
        ["stun:stun.l.google.com:19302"],
        ["turn:turn.example.com:3478"],
    ]
    turn = s.ice_servers[1]
    assert turn.username == "user"
    assert turn.credential is not None and turn.credential.get_secret_value() == "pass"
    assert "pass" not in repr(s) and "secret-token" not in repr(s)
    assert "pass" not in json.dumps(s.redacted())
    assert "secret-token" not in json.dumps(s.redacted())


def test_seed_ice_variables_replace_the_list(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = write(tmp_path / "c.yaml", "ice_servers:\n  - urls: stun:file.example:3478\n")
    monkeypatch.setenv("AGENT_CONFIG", str(cfg))
    monkeypatch.setenv("ICE_URL", "stun:one.example:3478")
    monkeypatch.setenv("ICE_URLS", "stun:two.example:3478, turn:relay.example:3478")
    monkeypatch.setenv("ICE_USERNAME", "u")
    monkeypatch.setenv("ICE_CREDENTIAL", "c")
    s = load_settings()
    assert [srv.urls[0] for srv in s.ice_servers] == [
        "stun:one.example:3478",
        "stun:two.example:3478",
        "turn:relay.example:3478",
    ]
    assert all(srv.username == "u" for srv in s.ice_servers)
    warnings = s.ice_warnings()
    assert len(warnings) == 1 and "only the first STUN" in warnings[0]


def test_relay_policy_without_turn_is_warned() -> None:
    s = load_settings(ice_transport_policy="relay")
    assert any("no TURN" in w for w in s.ice_warnings())


def test_daemon_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVPD_SOCKET", "/tmp/elsewhere.sock")
    monkeypatch.setenv("MVPD_ALLOWED_PEERS", "alice, bob")
    monkeypatch.setenv("MVPD_AUTO_CONNECT", "bob")
    monkeypatch.setenv("MVPD_SIGNALING_SERVER__ENABLED", "true")
    monkeypatch.setenv("MVPD_SIGNALING_SERVER__LISTEN", "[::1]:9000")
    monkeypatch.setenv("MVPD_TUN__ADDRESS", "10.9.0.1/24")
    monkeypatch.setenv("MVPD_LOG_LEVEL", "debug")
    s = load_settings()
    assert str(s.socket) == "/tmp/elsewhere.sock"
    assert s.allowed_peers == ["alice", "bob"]
    assert s.allows("bob") and not s.allows("mallory")
    assert s.auto_connect == ["bob"]
    assert s.signaling_server.enabled
    assert config_module.split_host_port(s.signaling_server.listen) == ("::1", 9000)
    assert str(s.tun.address) == "10.9.0.1/24"
    assert s.log_level == "debug"


def test_per_peer_mode(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "c.yaml",
        "mode: json\npeers:\n  bob:\n    mode: tun\n    allowed_ips: [10.0.0.2/32]\n",
    )
    s = load_settings(config_file=cfg)
    assert s.mode_for("bob") == "tun"
    assert s.mode_for("carol") == "json"
    assert [str(n) for n in s.peers["bob"].allowed_ips] == ["10.0.0.2/32"]


def test_shipped_file_documents_every_key_with_its_default() -> None:
    shipped = load_settings(config_file=SHIPPED)
    assert shipped.model_dump() == AgentSettings(_env_file=None).model_dump()  # type: ignore[call-arg]
    text = SHIPPED.read_text()
    for key in AgentSettings.model_fields:
        assert re.search(rf"^#? ?{key}:", text, re.M), f"{key} is not documented in {SHIPPED}"
    for key in config_module.SignalingServerSettings.model_fields:
        assert re.search(rf"^  {key}:", text, re.M), f"signaling_server.{key} missing"
    for key in config_module.TunSettings.model_fields:
        assert re.search(rf"^  {key}:", text, re.M), f"tun.{key} missing"


# --- errors ----------------------------------------------------------------------------------


def error_of(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_bad_mode_names_key_value_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "carrier-pigeon")
    msg = error_of()
    assert "mode (environment MODE)" in msg
    assert "carrier-pigeon" in msg
    assert "'chat', 'json', 'bytes' or 'tun'" in msg


@pytest.mark.parametrize(
    ("env", "value", "expect"),
    [
        ("AGENT_ID", "has space", "agent_id"),
        ("SIGNALING_URL", "http://x", "ws:// or wss://"),
        ("MVPD_CONNECT_TIMEOUT", "-1", "connect_timeout"),
        ("MVPD_SIGNALING_SERVER__LISTEN", "nowhere", "HOST:PORT"),
        ("MVPD_TUN__MTU", "12", "tun.mtu"),
        ("MVPD_TUN__ADDRESS", "10.0.0.300/24", "tun.address"),
        ("MVPD_ALLOWED_PEERS", "ok,bad id", "neither '*' nor an agent id"),
        ("ICE_URL", "http://stun.example", "not a stun:"),
        ("MVPD_OTHERS_ACCESS", "all", "others_access"),
    ],
)
def test_each_bad_value_is_named(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expect: str
) -> None:
    monkeypatch.setenv(env, value)
    assert expect in error_of()


def test_several_problems_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "x")
    monkeypatch.setenv("MVPD_LOG_LEVEL", "loud")
    msg = error_of()
    assert "mode" in msg and "log_level" in msg


def test_secrets_are_never_printed(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "c.yaml",
        "signaling_token: [hunter2]\nsignaling_server:\n  token: {a: hunter3}\n"
        "ice_servers:\n  - urls: stun:x:1\n    credential: [hunter4]\n",
    )
    msg = error_of(config_file=cfg)
    assert "signaling_token" in msg and "signaling_server.token" in msg
    assert "credential" in msg
    assert "hunter" not in msg


@pytest.mark.parametrize(
    "content",
    [
        'agent_id: a\nsignaling_token: "hunter2-abc\nmode: chat\n',  # unclosed quote
        "agent_id: a\nsignaling_token: hunter2: abc\n",  # mapping in a plain scalar
        "agent_id: a\nsignaling_token: *hunter2abc\n",  # an undefined alias, quoted by PyYAML
        "agent_id: a\nsignaling_token: \"hunter2\\q\"\n",  # a bad escape
        "signaling_server:\n  tokn: hunter2\n",  # a misspelt secret key
        "signaling_token: hunter2\npeers:\n  bob: {mode: tun}\n",  # a model-level error
    ],
)
def test_config_errors_never_show_secret_values(tmp_path: Path, content: str) -> None:
    """A syntax error on the token's line used to print the line; an unknown key its value;
    an error about the whole settings the settings, token included."""
    msg = error_of(config_file=write(tmp_path / "c.yaml", content))
    assert str(tmp_path) in msg or "invalid configuration" in msg
    assert "hunter" not in msg, msg


def test_yaml_syntax_errors_still_say_where(tmp_path: Path) -> None:
    msg = error_of(config_file=write(tmp_path / "c.yaml", "agent_id: a\nmode: [chat\n"))
    assert "YAML syntax error at line 3, column 1" in msg, msg


def test_a_tun_peer_needs_allowed_ips(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "peers:\n  bob: {mode: tun}\n")
    msg = error_of(config_file=cfg)
    assert "peers.bob is in tun mode without allowed_ips" in msg, msg
    assert "never taken from tun.address" in msg
    # The global mode counts for an entry without a mode, and for auto_connect peers.
    cfg = write(tmp_path / "c.yaml", "mode: tun\nauto_connect: [carol]\npeers:\n  bob: {}\n")
    msg = error_of(config_file=cfg)
    assert "peers.bob is in tun mode without allowed_ips" in msg, msg
    assert "auto_connect peer carol would use tun mode but has no peers.carol entry" in msg


@pytest.mark.parametrize(
    ("peers", "expect"),
    [
        ({"bob": ["10.0.0.0/24"], "carol": ["10.0.0.3/32"]}, "10.0.0.3/32 overlaps 10.0.0.0/24"),
        ({"bob": ["10.0.0.2/32"], "carol": ["10.0.0.2/32"]}, "overlaps 10.0.0.2/32 of peers.bob"),
        ({"bob": ["fd00::/64"], "*": ["fd00::8/125"]}, "fd00::8/125 overlaps fd00::/64"),
        ({"bob": ["10.0.0.0/30"]}, "holds this agent's own tunnel address 10.0.0.1"),
    ],
)
def test_allowed_ips_have_one_owner(peers: dict[str, list[str]], expect: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None, agent_id="a", tun={"address": "10.0.0.1/24"},
                      peers={p: {"mode": "tun", "allowed_ips": ips} for p, ips in peers.items()})
    assert expect in info.value.message, info.value.message


def test_who_may_use_tun_mode() -> None:
    s = load_settings(env_file=None, agent_id="a", tun={"address": "10.0.0.1/24"}, peers={
        "bob": {"mode": "tun", "allowed_ips": ["10.0.0.2/32", "fd00::2/128"]},
        "carol": {"allowed_ips": ["10.0.0.3/32"]},  # tun on request, chat by default
        "dave": {"mode": "json"},
    })
    assert s.grants_mode("bob", "tun") and s.grants_mode("carol", "tun")
    assert not s.grants_mode("dave", "tun") and not s.grants_mode("mallory", "tun")
    assert all(s.grants_mode("mallory", mode) for mode in ("chat", "json", "bytes"))
    assert s.mode_for("carol") == "chat" and s.mode_for("dave") == "json"
    # A "*" entry, written on purpose, covers peers without their own entry.
    s = load_settings(env_file=None, agent_id="a", peers={
        "*": {"mode": "tun", "allowed_ips": ["10.0.0.128/25"]}, "dave": {"mode": "json"}})
    assert s.grants_mode("mallory", "tun") and s.mode_for("mallory") == "tun"
    assert [str(n) for n in s.tun_networks("mallory")] == ["10.0.0.128/25"]
    assert not s.grants_mode("dave", "tun")  # its own entry wins
    with pytest.raises(ConfigError, match="neither '\\*' nor an agent id"):
        load_settings(env_file=None, agent_id="a", peers={"bad id": {}})


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("mode: [unclosed\n", "is not valid"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("agent_id: a\nmdoe: chat\n", "unknown key(s) mdoe"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, expect: str) -> None:
    cfg = write(tmp_path / "c.yaml", content)
    msg = error_of(config_file=cfg)
    assert expect in msg and str(cfg) in msg


def test_missing_agent_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGENT_CONFIG", str(tmp_path / "nope.yaml"))
    assert "does not exist" in error_of()


def test_bad_json_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.json", "{not json")
    assert "is not valid" in error_of(config_file=cfg)


def test_empty_file_is_fine(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "# nothing but comments\n")
    assert load_settings(config_file=cfg).mode == "chat"


def test_unreadable_file(tmp_path: Path) -> None:
    cfg = tmp_path / "dir.yaml"
    cfg.mkdir()
    assert "cannot be read" in error_of(config_file=cfg)
