"""``mvpctl``: drive the mvpd daemon from the command line.

Only a client: every command is one or a few calls over the control socket (see
:mod:`mvpctl.client`); the daemon decides and authorises everything.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import selectors
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer

from mvpd.proto.errors import DaemonNotRunning, Forbidden, MvpError, RpcTimeout
from mvpd.proto.modes import is_mode, mode_list
from mvpd.proto.text import neutralise

from .client import DEFAULT_SOCKET, Client, Subscription
from .plain_params import PlainParamsGroup

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
#: Bytes per pipe.write, and pipe.writes in flight at once.
PIPE_CHUNK = 64 * 1024
PIPE_WINDOW = 4

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


def _handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn mvpd errors into a message on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except MvpError as exc:
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


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- status ------------------------------------------------------------------------------------


def _size(n: Any) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _since(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return f"{stamp} ({_duration(time.time() - value)} ago)"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def format_peers(peers: list[dict[str, Any]]) -> str:
    """The peers as a human table."""
    if not peers:
        return "no peers"
    rows = [["PEER", "STATE", "MODE", "PATH", "SINCE", "IN", "OUT", "MSGS IN/OUT", "DROPPED"]]
    for p in peers:
        dropped = sum(int(v) for v in (p.get("dropped") or {}).values())
        rows.append(
            [
                str(p.get("peer", "?")),
                str(p.get("state", "?")),
                str(p.get("mode") or "-"),
                str(p.get("path") or "unknown"),
                _since(p.get("since")),
                _size(p.get("bytes_in")),
                _size(p.get("bytes_out")),
                f"{p.get('messages_in', 0)}/{p.get('messages_out', 0)}",
                str(dropped),
            ]
        )
    lines = [_table(rows)]
    for p in peers:
        if p.get("fingerprint"):
            lines.append(f"{p.get('peer')}: identity {p['fingerprint']} ({p.get('identity')})")
        if p.get("error"):
            lines.append(f"{p.get('peer')}: {neutralise(str(p['error']))}")
        if p.get("dropped"):
            lines.append(f"{p.get('peer')}: dropped: {_counts(p['dropped'])}")
        inbox = p.get("inbox")
        if inbox and inbox.get("queued"):
            lines.append(
                f"{p.get('peer')}: inbox {inbox['queued']} messages unread "
                f"({_size(inbox.get('queued_bytes'))})"
            )
        if p.get("tun"):
            lines.append(format_tun(str(p.get("peer", "?")), p["tun"]))
    return "\n".join(lines)


def format_tun(peer: str, tun: dict[str, Any]) -> str:
    """One tun peer's device, addresses, packets and drops by reason, on two lines."""
    addresses = ", ".join(tun.get("addresses") or []) or "no address"
    allowed = ", ".join(tun.get("allowed_ips") or []) or "none"
    drops = {**(tun.get("drops") or {})}
    for reason, count in (tun.get("device_drops") or {}).items():
        drops[f"device {reason}"] = count
    dropped = _counts(drops)
    return (
        f"{peer}: tun {tun.get('device') or '-'} ({addresses}, mtu {tun.get('mtu') or '-'}), "
        f"allowed IPs {allowed}\n"
        f"{peer}: packets in {tun.get('packets_in', 0)} ({_size(tun.get('bytes_in'))}), "
        f"out {tun.get('packets_out', 0)} ({_size(tun.get('bytes_out'))}); drops: {dropped}"
        + _format_tun_path(peer, tun)
    )


def _format_tun_path(peer: str, tun: dict[str, Any]) -> str:
    """The path tun packets take: datagrams on the ICE pair, or the data channel and why."""
    path = tun.get("path")
    dgram = tun.get("datagram") or {}
    if path is None:
        return ""
    if path != "datagram":
        return f"\n{peer}: path data channel ({dgram.get('unavailable') or 'no datagram path'})"
    return (
        f"\n{peer}: path datagrams on {dgram.get('ice_pair', '?')}, session "
        f"{dgram.get('session_id', '?')}, epoch {dgram.get('send_epoch', 0)}/"
        f"{dgram.get('receive_epoch', 0)}: in {dgram.get('packets_in', 0)}, out "
        f"{dgram.get('packets_out', 0)}, replayed {dgram.get('replayed', 0)}, undecryptable "
        f"{dgram.get('undecryptable', 0)}, dropped {dgram.get('dropped', 0)}"
    )


def _counts(counts: dict[str, Any]) -> str:
    """``{"inbox-full": 3, "invalid-json": 1}`` as ``inbox-full 3, invalid-json 1``."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def format_status(status: dict[str, Any]) -> str:
    """The ``status`` result as text for humans."""
    signaling = status.get("signaling") or {}
    inboxes = status.get("inboxes") or {}
    lines = [
        f"agent      {status.get('agent_id', '?')}",
        f"version    {status.get('version', '?')}",
        f"uptime     {_duration(float(status.get('uptime') or 0))}",
        f"signaling  {signaling.get('state', '?')} ({signaling.get('url', '?')})",
        f"inboxes    {inboxes.get('inboxes', 0)} peers, {inboxes.get('queued', 0)} messages "
        f"unread ({_size(inboxes.get('queued_bytes'))}), "
        f"{inboxes.get('waiting_followers', 0)} followers waiting for absent peers",
        f"dropped    {_counts(status.get('dropped') or {})} (peers not listed below)",
    ]
    refused = status.get("refused_offers") or {}
    if refused:
        detail = ", ".join(f"{reason} {count}" for reason, count in sorted(refused.items()))
        lines.append(f"refused    {sum(refused.values())} offers ({detail})")
    lines += [
        "",
        format_peers(list(status.get("peers") or [])),
    ]
    return "\n".join(lines)


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
        _print_json(result)
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
        _print_json(result)
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
        _print_json(result)
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
        _print_json(result)
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
        _print_json(result)


def _print_message(
    message: dict[str, Any], as_json: bool, prefix: str = "", *, one_line: bool = False
) -> None:
    """One received message on stdout. A peer's text reaches a terminal without its control
    characters (escape sequences could drive the terminal); ``one_line`` (chat) escapes line
    breaks too, so a message cannot fake lines of the conversation. Into a pipe or a file,
    text goes as it came."""
    kind, data = message.get("kind"), message.get("data")
    if as_json:
        typer.echo(json.dumps(message, sort_keys=True, default=_json_default))
    elif kind == "bytes" and isinstance(data, bytes | bytearray):
        sys.stdout.buffer.write(data)
    elif kind == "text":
        text = str(data)
        if sys.stdout.isatty():
            text = neutralise(text, keep="" if one_line else "\n\t")
        # Not typer.echo: click strips ANSI sequences from what goes to a pipe, and a
        # message written to a file must arrive as the peer sent it.
        sys.stdout.write(f"{prefix}{text}\n")
    else:
        sys.stdout.write(f"{prefix}{json.dumps(data, default=_json_default)}\n")
    sys.stdout.flush()


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
        stream = client.subscribe("recv", **params)
        for event in _events_forever(client, stream):
            if event.event == "message":
                _print_message(event.data, use_json)


def _events_forever(client: Client, stream: Subscription) -> Iterator[Any]:
    while not stream.ended:
        event = client.next_event(stream.sub, timeout=None)
        if stream.check(event):
            yield event


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
    prefix = f"{peer}> " if sys.stdout.isatty() else ""
    with _client(ctx) as commands, _client(ctx, timeout=None) as events:
        if connect_first:
            commands.call("connect", reply_timeout=None, peer=peer, wait=True)
        stream = events.subscribe("recv", peer=peer, follow=True)
        selector = selectors.PollSelector()  # poll also takes regular files as stdin
        stdin = sys.stdin.fileno()
        selector.register(stdin, selectors.EVENT_READ)
        selector.register(events, selectors.EVENT_READ)
        pending = b""
        while True:
            while (event := events.take_event(stream.sub)) is not None:
                if stream.check(event) and event.event == "message":
                    _print_message(event.data, options.json, prefix, one_line=True)
            if stream.ended:
                typer.echo(f"mvpctl: {peer} is gone", err=True)
                return
            for key, _ in selector.select():
                if key.fd == stdin:
                    data = os.read(stdin, 65536)
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    if not data and pending:
                        lines, pending = [*lines, pending], b""
                    for line in lines:
                        commands.call("send", peer=peer, text=line.decode("utf-8", "replace"))
                    if not data:
                        return
                else:
                    events.poll()


@app.command()
@_handles_errors
def pipe(
    ctx: typer.Context,
    peer: str = typer.Argument(..., help="The peer's agent id."),
    connect_first: bool = typer.Option(
        True, "--connect/--no-connect", help="Connect to PEER first if not connected."
    ),
) -> None:
    """Pipe bytes to and from PEER, like netcat.

    Stdin goes to PEER, PEER's bytes go to stdout; end of input is passed on. Exits 0
    when both directions are done and PEER has read everything; 1, saying why, if the
    other side ends first (its pipe, its daemon or the connection).
    """
    with _client(ctx, timeout=None) as client:
        if connect_first:
            client.call("connect", reply_timeout=None, peer=peer, wait=True)
        stream = client.open_pipe(peer)
        _run_pipe(client, stream)


def _run_pipe(client: Client, stream: Subscription) -> None:
    stdin = sys.stdin.fileno()
    out = sys.stdout.buffer
    selector = selectors.PollSelector()
    selector.register(client, selectors.EVENT_READ)
    reading_stdin = False
    stdin_open = True
    in_flight: deque[int] = deque()
    while True:
        while (event := client.take_event(stream.sub)) is not None:
            if not stream.check(event):
                continue
            if event.event == "data":
                out.write(event.data["data"])
                out.flush()
            elif event.event == "eof":
                out.flush()
        while in_flight and client.done(in_flight[0]):
            client.wait(in_flight.popleft())
        if stream.ended:
            return
        want_stdin = stdin_open and len(in_flight) < PIPE_WINDOW
        if want_stdin != reading_stdin:
            if want_stdin:
                selector.register(stdin, selectors.EVENT_READ)
            else:
                selector.unregister(stdin)
            reading_stdin = want_stdin
        for key, _ in selector.select():
            if key.fd == stdin:
                data = os.read(stdin, PIPE_CHUNK)
                if data:
                    in_flight.append(client.pipe_write(stream.sub, data))
                else:
                    in_flight.append(client.pipe_eof(stream.sub))
                    stdin_open = False
            else:
                client.poll()


# --- stats, ping, web --------------------------------------------------------------------------


def _rate(per_second: Any) -> str:
    return f"{_size(per_second)}/s"


def _endpoint(candidate: dict[str, Any] | None) -> str:
    if not candidate:
        return "?"
    address = str(candidate.get("address", "?"))
    if ":" in address:
        address = f"[{address}]"
    return f"{address}:{candidate.get('port', '?')} {candidate.get('type', '?')}"


def format_stats(stats: dict[str, Any]) -> str:
    """The ``stats`` result as text for humans."""
    status = stats.get("status") or {}
    peer = status.get("peer", "?")
    lines = [f"{peer}: {status.get('state', '?')}, {status.get('mode') or '-'} mode, "
             f"path {status.get('path', 'unknown')}, connected {_since(status.get('since'))}"]
    pair = stats.get("pair")
    if pair:
        local, remote = pair.get("local") or {}, pair.get("remote") or {}
        lines.append(f"  pair      {local.get('protocol', '?')} {_endpoint(local)} -> "
                     f"{_endpoint(remote)}")
    rtt = stats.get("ice_rtt")
    if rtt:
        lines.append(f"  ice rtt   {rtt['last_ms']:.2f} ms (min {rtt['min_ms']:.2f}, avg "
                     f"{rtt['avg_ms']:.2f}, max {rtt['max_ms']:.2f} ms over "
                     f"{rtt['samples']} checks)")
    else:
        lines.append("  ice rtt   - (no liveness check answered yet)")
    rates = stats.get("rates")
    if rates:
        lines.append(
            f"  rate      in {_rate(rates['bytes_in_per_s'])} "
            f"({rates['messages_in_per_s']:.1f} msg/s), out {_rate(rates['bytes_out_per_s'])} "
            f"({rates['messages_out_per_s']:.1f} msg/s) over {rates['window_s']:.0f} s")
    for label, channel in sorted((stats.get("channels") or {}).items()):
        state = "open" if channel.get("open") else "closed"
        lines.append(
            f"  channel   {label} ({channel.get('mode')}, {state}): in "
            f"{_size(channel.get('bytes_in'))} / {channel.get('messages_in', 0)} msgs, out "
            f"{_size(channel.get('bytes_out'))} / {channel.get('messages_out', 0)} msgs")
    sctp = stats.get("sctp")
    if sctp:
        srtt = sctp.get("srtt_ms")
        lines.append(
            f"  sctp      cwnd {_size(sctp.get('cwnd'))}, in flight "
            f"{_size(sctp.get('flight_size'))}, srtt "
            f"{'-' if srtt is None else f'{srtt:.1f} ms'}, retransmissions "
            f"{sctp.get('retransmissions', 0)}, abandoned {sctp.get('abandoned', 0)}, "
            f"T3 timeouts {sctp.get('t3_expirations', 0)}")
    dropped = status.get("dropped") or {}
    lines.append("  drops     " + (", ".join(f"{reason} {count}" for reason, count
                                            in sorted(dropped.items())) or "none"))
    if status.get("tun"):
        lines.append(format_tun(str(peer), status["tun"]))
    return "\n".join(lines)


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
        while True:
            result = client.call("stats", peer=peer)
            if use_json:
                typer.echo(json.dumps(result, sort_keys=True, default=_json_default,
                                      indent=None if watch else 2))
            else:
                if watch and sys.stdout.isatty():
                    typer.echo("\x1b[H\x1b[2J", nl=False)
                typer.echo(format_stats(result))
            if not watch:
                return
            sys.stdout.flush()
            time.sleep(1.0)


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
    as_json = _want_json(ctx, False)
    rtts: list[float] = []
    sent = 0
    with _client(ctx, timeout=None) as client:
        for index in range(count):
            if index:
                time.sleep(interval)
            result = client.call("ping", reply_timeout=timeout + 10, peer=peer,
                                 timeout=timeout, padding=size)
            sent += 1
            if as_json:
                typer.echo(json.dumps(result, sort_keys=True))
            elif result.get("rtt_ms") is None:
                typer.echo(f"no reply from {peer}: seq={result.get('sequence')} "
                           f"(timeout {timeout:g} s)")
            else:
                typer.echo(f"reply from {peer}: seq={result.get('sequence')} "
                           f"time={result['rtt_ms']:.3f} ms path={result.get('path')}")
            if result.get("rtt_ms") is not None:
                rtts.append(float(result["rtt_ms"]))
            sys.stdout.flush()
    if not as_json:
        lost = 100 * (sent - len(rtts)) / max(sent, 1)
        summary = f"--- {peer}: {sent} probes, {len(rtts)} replies, {lost:.0f}% lost"
        if rtts:
            summary += (f"; rtt min/avg/max {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/"
                        f"{max(rtts):.3f} ms")
        typer.echo(summary)
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


def format_id(result: dict[str, Any]) -> str:
    """The ``id`` result for humans."""
    current = result.get("current") or {}
    lines = [
        f"agent        {result.get('agent_id', '?')}",
        f"fingerprint  {current.get('fingerprint', '?')}",
        f"short        {current.get('short', '?')}",
    ]
    pending = result.get("next")
    if pending:
        lines += [
            f"next         {pending.get('fingerprint', '?')}",
            f"next short   {pending.get('short', '?')}",
            "rotation in progress: connections still use the current identity. Once every "
            "peer\nruns `mvpctl trust "
            f"{result.get('agent_id', 'AGENT')} '{pending.get('fingerprint', '')}'` (or pins "
            "it), run\n`mvpctl id rotate --finish`.",
        ]
    return "\n".join(lines)


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
        _print_json(result)
    else:
        typer.echo(format_id(result))


def _format_known(result: dict[str, Any]) -> str:
    entries = result.get("entries") or []
    if not entries:
        return f"{result.get('peer')}: nothing in known_peers"
    return "\n".join(
        f"{result.get('peer')}: {e.get('fingerprint')} ({e.get('how')})" for e in entries
    )


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
    typer.echo(_format_known(result))


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


def main() -> None:
    """Console entry point (``mvpctl``)."""
    app()


__all__ = ["EXIT_CODES", "app", "exit_code_for", "format_stats", "format_status", "main"]
