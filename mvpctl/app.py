"""``mvpctl``: drive the mvpd daemon from the command line.

Only a client: every command is one or a few calls over the control socket (see
:mod:`mvpctl.client`); the daemon decides and authorises everything. This module owns the
typer app: the global options, the commands (their options and help texts), and how errors
become a message and a documented exit code (:data:`EXIT_CODES`). What the commands print
is :mod:`mvpctl.render`; the loops of ``recv``, ``chat``, ``pipe``, ``stats --watch`` and
``ping`` are :mod:`mvpctl.interactive`; ``mvpctl web`` is :mod:`mvpctl.web` (imported only
by that command).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer

from mvpd.proto.errors import DaemonNotRunning, Forbidden, MvpError, RpcTimeout
from mvpd.proto.modes import is_mode, mode_list
from mvpd.proto.rpcwire import ErrorCode
from mvpd.proto.text import neutralise

from .client import DEFAULT_SOCKET, Client
from .interactive import print_messages, run_chat, run_pings, run_pipe, show_stats
from .plain_params import PlainParamsGroup
from .render import format_id, format_known, format_peers, format_status, print_json

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_FORBIDDEN = 4
EXIT_TIMEOUT = 5
#: Exit codes, as documented in ``mvpctl --help``.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_ERROR: "the daemon reported an error (or the connection broke)",
    EXIT_USAGE: "usage error (bad option or argument)",
    EXIT_NOT_RUNNING: "mvpd is not running (no control socket)",
    EXIT_FORBIDDEN: "permission denied (not root and not in the socket's group)",
    EXIT_TIMEOUT: "timed out",
}

_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())

app = typer.Typer(
    name="mvpctl",
    help="Control the mvpd WebRTC data-channel daemon: connect peers, send and receive "
    "messages, pipe bytes, show status. Talks to mvpd over its control socket.",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    # Converts mvpctl's plain str/int/float parameters without typer's pydantic adapters.
    cls=PlainParamsGroup,
)

P = ParamSpec("P")
R = TypeVar("R")


class _Options:
    def __init__(self, socket: str | None, as_json: bool) -> None:
        self.socket = socket
        self.json = as_json


def _fail(message: str, code: int) -> typer.Exit:
    # Errors may quote what a peer or a server said: shown on one line, no terminal control.
    typer.echo(f"mvpctl: {neutralise(message)}", err=True)
    return typer.Exit(code)


def exit_code_for(exc: MvpError) -> int:
    """The documented exit code for an error."""
    if isinstance(exc, DaemonNotRunning):
        return EXIT_NOT_RUNNING
    if isinstance(exc, Forbidden):
        return EXIT_FORBIDDEN
    if isinstance(exc, RpcTimeout):
        return EXIT_TIMEOUT
    return EXIT_ERROR


OUTPUT_CLOSED = ErrorCode.OUTPUT_CLOSED.value


def _handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn mvpd errors into a message on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except MvpError as exc:
            if exc.code == OUTPUT_CLOSED:  # what BrokenPipeError is below, seen by mvpd
                sys.stderr.close()
                raise typer.Exit(EXIT_OK) from None
            raise _fail(exc.message, exit_code_for(exc)) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # stdout went away (e.g. `| head`): not an error of ours.
            sys.stderr.close()
            raise typer.Exit(EXIT_OK) from None

    return wrapper


@contextmanager
def _client(ctx: typer.Context, *, timeout: float | None = 30.0) -> Iterator[Client]:
    options: _Options = ctx.ensure_object(_Options)
    client = Client.connect(options.socket, timeout=timeout)
    try:
        yield client
    finally:
        client.close()


@app.callback()
def _main(
    ctx: typer.Context,
    # A str, not a Path: click would check that the socket is readable and exit 2 (usage)
    # where the daemon's refusal (exit 4) is the right answer.
    socket: str | None = typer.Option(
        None,
        "--socket",
        "-s",
        envvar="MVPD_SOCKET",
        help=f"The daemon's control socket (default {DEFAULT_SOCKET}).",
        show_default=False,
    ),
    as_json: bool = typer.Option(
        False, "--json", "-j", help="Machine-readable JSON output where it applies."
    ),
) -> None:
    ctx.obj = _Options(socket, as_json)


def _want_json(ctx: typer.Context, flag: bool) -> bool:
    options: _Options = ctx.ensure_object(_Options)
    return flag or options.json


# --- status ------------------------------------------------------------------------------------


@app.command()
@_handles_errors
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", "-j", help="Print the raw status as JSON."),
) -> None:
    """Show the agent, its signaling state and every peer.

    For each peer: state, mode, connected since, direct or relayed, bytes and messages
    in and out, drops.
    """
    with _client(ctx) as client:
        result = client.call("status")
    if _want_json(ctx, as_json):
        print_json(result)
    else:
        typer.echo(format_status(result))


@app.command()
@_handles_errors
def peers(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", "-j", help="Print the peers as JSON."),
) -> None:
    """List the known peers."""
    with _client(ctx) as client:
        result = client.call("peers")
    if _want_json(ctx, as_json):
        print_json(result)
    else:
        typer.echo(format_peers(list(result)))


# --- connect / disconnect / reload -----------------------------------------------------------


@app.command()
@_handles_errors
def connect(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    mode: str | None = typer.Option(
        None, "--mode", "-m", help=f"{mode_list()} (default: the peer's configured mode)."
    ),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="Wait until the data channel is open."
    ),
    timeout: float | None = typer.Option(
        None,
        "--timeout",
        "-t",
        min=0.001,
        help="Seconds to wait (default: the daemon's connect timeout).",
    ),
) -> None:
    """Connect to PEER (or reuse the open connection)."""
    if mode is not None and not is_mode(mode):
        raise typer.BadParameter(f"must be {mode_list()}", param_hint="--mode")
    params: dict[str, Any] = {"peer": peer, "wait": wait}
    if mode is not None:
        params["mode"] = mode
    if timeout is not None:
        params["timeout"] = timeout
    # The daemon enforces the connect timeout; our socket just must not give up before it.
    with _client(ctx, timeout=None) as client:
        result = client.call("connect", reply_timeout=None, **params)
    if _want_json(ctx, False):
        print_json(result)
    else:
        typer.echo(f"{result.get('peer', peer)}: {result.get('state', '?')}")


@app.command()
@_handles_errors
def disconnect(
    ctx: typer.Context, peer: str = typer.Argument(..., help="The peer's agent id.")
) -> None:
    """Close the connection to PEER."""
    with _client(ctx) as client:
        client.call("disconnect", peer=peer)


@app.command()
@_handles_errors
def reload(ctx: typer.Context) -> None:
    """Make mvpd re-read its configuration.

    Shows what took effect and what needs a restart.
    """
    with _client(ctx) as client:
        result = client.call("reload")
    if _want_json(ctx, False):
        print_json(result)
        return
    applied, not_applied = result.get("applied") or [], result.get("not_applied") or []
    typer.echo("applied: " + (", ".join(applied) or "nothing changed"))
    if not_applied:
        typer.echo("need a restart: " + ", ".join(not_applied))


# --- messages --------------------------------------------------------------------------------


@app.command()
@_handles_errors
def send(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    text: str | None = typer.Argument(None, help="A text message."),
    json_text: str | None = typer.Option(
        None, "--json", "-j", metavar="JSON", help="Send this JSON value (e.g. '{\"a\": 1}')."
    ),
    file: str | None = typer.Option(
        None, "--file", "-f", metavar="FILE", help="Send this file's bytes ('-' for stdin)."
    ),
) -> None:
    """Send one message to PEER.

    The message is TEXT, a JSON value (--json) or a file's bytes (--file).
    """
    given = [v for v in (text, json_text, file) if v is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of TEXT, --json and --file")
    params: dict[str, Any] = {"peer": peer}
    if text is not None:
        params["text"] = text
    elif json_text is not None:
        try:
            params["json"] = json.loads(json_text)
        except ValueError as exc:
            raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--json") from None
    else:
        assert file is not None
        try:
            params["data"] = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {file}: {exc}", param_hint="--file") from None
    with _client(ctx) as client:
        result = client.call("send", **params)
    if _want_json(ctx, False):
        print_json(result)


@app.command()
@_handles_errors
def recv(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    follow: bool = typer.Option(
        False, "--follow", "-F", help="Keep printing new messages as they arrive."
    ),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Stop after N messages."),
    as_json: bool = typer.Option(False, "--json", "-j", help="One JSON object per message."),
) -> None:
    """Print PEER's messages: those waiting now, then (--follow) new ones.

    Text prints as lines, JSON as JSON, bytes raw (base64 inside --json output).
    """
    params: dict[str, Any] = {"peer": peer, "follow": follow}
    if limit is not None:
        params["limit"] = limit
    use_json = _want_json(ctx, as_json)
    with _client(ctx) as client:
        print_messages(client, client.subscribe("recv", **params), use_json)



@app.command()
@_handles_errors
def chat(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    connect_first: bool = typer.Option(
        True, "--connect/--no-connect", help="Connect to PEER first if not connected."
    ),
) -> None:
    """Chat with PEER interactively.

    Each line typed goes out as a text message; the peer's messages print as they
    arrive. Ends at end of input (Ctrl-D) or when the peer goes away.
    """
    options: _Options = ctx.ensure_object(_Options)
    with _client(ctx) as commands, _client(ctx, timeout=None) as events:
        run_chat(commands, events, peer, connect_first=connect_first, as_json=options.json)


@app.command()
@_handles_errors
def pipe(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    connect_first: bool = typer.Option(
        True, "--connect/--no-connect", help="Connect to PEER first if not connected."
    ),
    framed: bool = typer.Option(
        False, "--framed",
        help="Carry the bytes through mvpctl over the control socket instead of handing "
        "stdin and stdout to mvpd (slower; the default when stdin is a terminal).",
    ),
) -> None:
    """Pipe bytes to and from PEER, like netcat.

    Stdin goes to PEER, PEER's bytes go to stdout; end of input is passed on.
    Exits 0 when both directions are done and PEER has read everything; 1,
    saying why, if the other side ends first (its pipe, its daemon or the
    connection).

    mvpd reads stdin and writes stdout itself (mvpctl hands them over and
    waits), so the bytes do not pass through mvpctl. A terminal on stdin is
    read by mvpctl instead, so job control works as usual.
    """
    with _client(ctx, timeout=None) as client:
        if connect_first:
            client.call("connect", reply_timeout=None, peer=peer, wait=True)
        run_pipe(client, peer, framed=framed)


# --- stats, ping, web --------------------------------------------------------------------------



@app.command()
@_handles_errors
def stats(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    as_json: bool = typer.Option(False, "--json", "-j", help="Print the raw stats as JSON."),
    watch: bool = typer.Option(
        False, "--watch", "-w", help="Show them again every second until interrupted."
    ),
) -> None:
    """Show live statistics of the connection to PEER.

    The selected ICE candidate pair (address, port, type, protocol), the ICE round trip of
    the liveness checks, traffic rates over the last seconds, bytes and messages per
    channel, SCTP counters (congestion window, retransmissions, abandoned chunks) and drops
    by reason.
    """
    use_json = _want_json(ctx, as_json)
    with _client(ctx) as client:
        show_stats(client, peer, as_json=use_json, watch=watch)


@app.command()
@_handles_errors
def ping(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    count: int = typer.Option(4, "--count", "-c", min=1, help="Stop after N probes."),
    interval: float = typer.Option(
        1.0, "--interval", "-i", min=0, help="Seconds between probes."
    ),
    timeout: float = typer.Option(
        2.0, "--timeout", "-W", min=0.001, help="Seconds to wait for each reply (at most 30)."
    ),
    size: int = typer.Option(
        0, "--padding", "-s", min=0, max=1008, help="Zero bytes added to each probe."
    ),
) -> None:
    """Measure the round trip to PEER over the data path itself.

    Like `tailscale ping`: each probe travels on a data channel of its own (label mvp-ping)
    through DTLS, SCTP and the selected ICE pair (and the TURN relay, if any); PEER's mvpd
    echoes it. Each reply shows its time and the path (direct or relayed). Exits 0 when at
    least one reply came, 1 otherwise (also when PEER does not answer data-path pings).
    """
    with _client(ctx, timeout=None) as client:
        rtts = run_pings(client, peer, count=count, interval=interval, timeout=timeout,
                         padding=size, as_json=_want_json(ctx, False))
    if not rtts:
        raise typer.Exit(EXIT_ERROR)


@app.command()
@_handles_errors
def web(
    ctx: typer.Context,
    listen: str = typer.Option(
        "127.0.0.1:0", "--listen", "-l", metavar="HOST:PORT",
        help="Where the page is served (loopback only; port 0 picks a free one).",
    ),
    open_browser: bool = typer.Option(
        False, "--open", help="Open the page in the default browser too."
    ),
) -> None:
    """Serve a local web page showing the daemon: peers, live throughput and RTT plots.

    The page talks to mvpd with your rights: anyone may watch what `mvpctl status` shows;
    members of the control socket's group may also connect, disconnect and send. It prints
    a URL with a random token (like Jupyter); requests without the token, from another
    origin or for another host name are refused. Stop it with Ctrl-C.
    """
    from .web.server import serve  # only this command pays for the web server's imports

    options: _Options = ctx.ensure_object(_Options)
    serve(listen, options.socket, open_browser=open_browser)


# --- identity and trust ----------------------------------------------------------------------



@app.command("id")
@_handles_errors
def id_(
    ctx: typer.Context,
    action: str | None = typer.Argument(
        None, help="'rotate': make the next identity (connections keep the current one).",
        show_default=False,
    ),
    finish: bool = typer.Option(
        False, "--finish", help="With rotate: use the next identity from now on, delete the old."
    ),
    as_json: bool = typer.Option(False, "--json", "-j", help="Print the identity as JSON."),
) -> None:
    """Show this agent's identity: the SHA-256 fingerprint of its DTLS certificate, which
    peers pin (peers.ID.fingerprints) or remember, and a short form to read aloud.

    `mvpctl id rotate` makes a new identity without using it yet; tell every peer
    (`mvpctl trust ID NEW-FINGERPRINT` there), then `mvpctl id rotate --finish` switches
    new connections to it. Peers that only remembered the old one refuse the new one until then.
    """
    if action not in (None, "rotate"):
        raise typer.BadParameter("the only action is 'rotate'", param_hint="ACTION")
    if finish and action is None:
        raise typer.BadParameter("--finish goes with 'rotate'", param_hint="--finish")
    with _client(ctx) as client:
        if action == "rotate":
            result = client.call("id.rotate", finish=finish)
        else:
            result = client.call("id")
    if _want_json(ctx, as_json):
        print_json(result)
    else:
        typer.echo(format_id(result))



@app.command()
@_handles_errors
def trust(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    fingerprint: str = typer.Argument(
        ..., help="Its fingerprint as its `mvpctl id` prints it (sha-256 AB:CD:...)."
    ),
) -> None:
    """Accept FINGERPRINT as PEER's identity (added to known_peers, next to what is there).

    Check it with the peer first (its `mvpctl id`, the short form read aloud): this is what
    stops someone else from answering in its name. Used for new connections.
    """
    with _client(ctx) as client:
        result = client.call("trust", peer=peer, fingerprint=fingerprint)
    typer.echo(format_known(result))


@app.command()
@_handles_errors
def forget(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    fingerprint: str | None = typer.Argument(
        None, help="Only this fingerprint (default: all of the peer's).", show_default=False
    ),
) -> None:
    """Remove PEER's remembered and trusted fingerprints from known_peers: under trust on
    first use, its next connection is a first contact again. Pins in the config stay."""
    params: dict[str, Any] = {"peer": peer}
    if fingerprint is not None:
        params["fingerprint"] = fingerprint
    with _client(ctx) as client:
        result = client.call("forget", **params)
    typer.echo(f"{peer}: forgot {result.get('changed', 0)} fingerprint(s)")


def _reflowed(doc: str) -> str:
    """``doc`` with each paragraph on one line: the help renderer keeps a docstring's line
    breaks, which then break again mid-line on a terminal narrower than the source."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in part.splitlines()) for part in paragraphs)


for _command in app.registered_commands:
    if _command.help is None and _command.callback is not None and _command.callback.__doc__:
        _command.help = _reflowed(_command.callback.__doc__)


def main() -> None:
    """Console entry point (``mvpctl``)."""
    app()


__all__ = ["EXIT_CODES", "app", "exit_code_for", "main"]
