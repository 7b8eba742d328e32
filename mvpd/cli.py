"""The ``mvpd`` command: run the daemon, the standalone signaling server, or helpers.

``mvpd`` alone is ``mvpd run``. Exit codes: 0 clean stop, 1 runtime failure, 2 usage,
78 (EX_CONFIG) invalid configuration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from .config import EX_CONFIG, AgentSettings, load_settings
from .proto.errors import ConfigError, MvpError

app = typer.Typer(
    name="mvpd",
    help=(
        "mvp-agent daemon: WebRTC data channels (chat, JSON, bytes, IP tunnel) between peers, "
        "driven by mvpctl over a Unix socket. Settings come from the environment, .env and "
        "/etc/mvp-agent.yaml (or AGENT_CONFIG); see `mvpd check-config`."
    ),
    epilog="Exit codes: 0 clean stop, 1 failure, 2 usage, 78 invalid configuration.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="Config file (YAML or JSON); replaces AGENT_CONFIG."
)


def _load(config: Path | None, **overrides: Any) -> AgentSettings:
    try:
        return load_settings(config_file=config, **{k: v for k, v in overrides.items() if v})
    except ConfigError as exc:
        typer.echo(f"mvpd: {exc}", err=True)
        raise typer.Exit(EX_CONFIG) from None


@app.command()
def run(
    config: Path | None = ConfigOption,
    socket: Path | None = typer.Option(
        None, "--socket",
        help="Control socket path (MVPD_SOCKET; default /run/mvpd/mvpd.sock). Its directory "
        "and those above it must be writable only by root; missing ones are created.",
    ),
    agent_id: str | None = typer.Option(None, "--id", help="This agent's id (AGENT_ID)."),
    signaling_url: str | None = typer.Option(
        None, "--signaling-url", help="Signaling server URL (SIGNALING_URL)."
    ),
    embed_signaling: bool = typer.Option(
        False,
        "--embed-signaling",
        help="Also run the reference signaling server in this process "
        "(signaling_server.enabled).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT (what systemd runs)."""
    from .daemon import run_daemon  # heavy imports (aiortc) only when running

    settings = _load(config, socket=socket, agent_id=agent_id, signaling_url=signaling_url)
    if embed_signaling:
        settings.signaling_server.enabled = True
    raise typer.Exit(run_daemon(settings, verbose=verbose))


@app.command()
def signal(
    listen: str = typer.Option(
        "127.0.0.1:8765", "--listen", "-l", help="HOST:PORT to listen on (port 0: any free port)."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="MVPD_SIGNALING_TOKEN", help="One token every agent must present."
    ),
    tokens_file: Path | None = typer.Option(
        None, "--tokens-file", help="File of 'agent-id token' lines: one token per agent id."
    ),
    redis: str | None = typer.Option(
        None,
        "--redis",
        envvar="MVPD_SIGNALING_SERVER__REDIS",
        help="redis://HOST:PORT/DB shared by several servers: agents on any of them reach each "
        "other, and an agent whose server died registers again on another.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Run the reference signaling server alone (no root needed)."""
    from .signaling.server import main as signal_main

    argv = ["--listen", listen]
    if token:
        argv += ["--token", token]
    if tokens_file:
        argv += ["--tokens-file", str(tokens_file)]
    if redis:
        argv += ["--redis", redis]
    if verbose:
        argv += ["--verbose"]
    raise typer.Exit(signal_main(argv))


@app.command("check-config")
def check_config(config: Path | None = ConfigOption) -> None:
    """Validate the configuration and print the effective settings (secrets hidden)."""
    settings = _load(config)
    data = settings.redacted()
    data["config_file"] = str(settings.config_file) if settings.config_file else None
    typer.echo(json.dumps(data, indent=2))
    for warning in settings.ice_warnings():
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def identity(config: Path | None = ConfigOption) -> None:
    """Print this agent's identity (made now if there is none): the SHA-256 fingerprint of
    its DTLS certificate, which peers pin in peers.ID.fingerprints, and a short form to read
    aloud. Works without the daemon (e.g. to pin peers before their first start); the
    running daemon's `mvpctl id` says the same. Exit 78 if a file in state_dir is unsafe."""
    from .identity import IdentityStore

    settings = _load(config)
    try:
        current = IdentityStore(settings.state_dir).load()
    except ConfigError as exc:
        typer.echo(f"mvpd: {exc}", err=True)
        raise typer.Exit(EX_CONFIG) from None
    typer.echo(f"fingerprint  {current.fingerprint}\nshort        {current.short}")


@app.command("install-units")
def install_units(
    prefix: Path = typer.Option(Path("/"), "--prefix", help="Root to install under."),
    bin_path: Path | None = typer.Option(
        None, "--bin", help="The mvpd executable the units run (default: this mvpd)."
    ),
    sysusers: bool = typer.Option(
        True, "--sysusers/--no-sysusers",
        help="Run systemd-sysusers to create group mvp (only with --prefix /).",
    ),
    daemon_reload: bool = typer.Option(
        True, "--daemon-reload/--no-daemon-reload",
        help="Run systemctl daemon-reload (only with --prefix /).",
    ),
) -> None:
    """Install the systemd units, the sysusers.d entry and /etc/mvp-agent.yaml (an existing
    config is kept); with --prefix / also run systemd-sysusers and systemctl daemon-reload."""
    from .units import CONFIG_NAME, TMP_DROPIN, activate_units
    from .units import install_units as do_install

    # A given --bin is kept as written (a stable symlink survives upgrades of its target).
    target = bin_path.absolute() if bin_path else Path(sys.argv[0]).resolve()
    config = prefix / "etc" / CONFIG_NAME
    try:
        written = do_install(prefix=prefix, bin_path=target)
    except OSError as exc:
        hint = " (run as root)" if isinstance(exc, PermissionError) else ""
        raise MvpError(f"cannot install under {prefix}: {exc.strerror or exc}: "
                       f"{exc.filename or ''}{hint}") from None
    for path in written:
        typer.echo(f"installed {path}")
    if any(path.name == TMP_DROPIN for path in written):
        typer.echo("note: mvpd runs from /tmp or /var/tmp: the units bind it read-only into "
                   f"their private /tmp ({TMP_DROPIN}); those directories are often emptied "
                   "at boot, so install mvpd elsewhere for lasting use", err=True)
    if config not in written and config.exists():
        typer.echo(f"kept      {config} (an existing config is never overwritten)")
    if prefix.resolve() == Path("/"):
        for line in activate_units(sysusers=sysusers, daemon_reload=daemon_reload):
            typer.echo(line)
    else:
        typer.echo(f"not run for --prefix {prefix}: systemd-sysusers, systemctl daemon-reload")
    typer.echo(
        "next: edit /etc/mvp-agent.yaml, then `systemctl enable --now mvpd`;\n"
        "      `usermod -aG mvp USER` lets USER change things with mvpctl"
    )


@app.command("version")
def version() -> None:
    """Print the version and which SCTP build is loaded (``sctp: compiled`` or ``pure``;
    also ``mvpd --version``)."""
    from . import __version__
    from .sctp import BUILD, PURE_REASON

    note = f": {PURE_REASON}" if BUILD == "pure" and PURE_REASON else ""
    typer.echo(f"mvpd {__version__} (sctp: {BUILD}{note})")


def with_default_command(argv: list[str]) -> list[str]:
    """``mvpd`` alone, or with options only (``mvpd -v``), is ``mvpd run``; ``mvpd --help``
    stays the overview. Done on the arguments rather than in a typer callback, which would
    have to call ``run`` with typer's parameter objects as its defaults."""
    if argv and argv[0] == "--version":
        return ["version", *argv[1:]]
    if not argv or (argv[0].startswith("-") and argv[0] != "--help"):
        return ["run", *argv]
    return argv


def main() -> None:
    """Console-script entry point."""
    try:
        app(args=with_default_command(sys.argv[1:]), prog_name="mvpd")
    except MvpError as exc:
        typer.echo(f"mvpd: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
