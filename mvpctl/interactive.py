"""The commands that run until something ends: ``recv --follow``, ``chat``, ``pipe``,
``stats --watch`` and ``ping``.

Each loop takes connected :class:`~mvpctl.client.Client` objects (the command opened them)
and returns when its stream, its input or its count is done; errors are the client's
:class:`~mvpd.proto.errors.MvpError`, which the command turns into an exit code. ``chat``
and ``pipe`` wait on stdin and the control socket at once with a poll selector (poll also
takes regular files as stdin); ``pipe`` keeps at most :data:`PIPE_WINDOW` writes in flight,
so a slow peer slows the reading of stdin.
"""

from __future__ import annotations

import json
import os
import selectors
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import typer

from mvpd.proto.errors import Busy, InvalidParams

from .client import Client, Subscription
from .render import format_stats, json_default, print_message

#: Bytes per pipe.write, and pipe.writes in flight at once.
PIPE_CHUNK = 256 * 1024
PIPE_WINDOW = 4


def print_messages(client: Client, stream: Subscription, as_json: bool) -> None:
    """Print the messages of a ``recv`` stream until it ends (never, when following)."""
    for event in _events_forever(client, stream):
        if event.event == "message":
            print_message(event.data, as_json)


def _events_forever(client: Client, stream: Subscription) -> Iterator[Any]:
    while not stream.ended:
        event = client.next_event(stream.sub, timeout=None)
        if stream.check(event):
            yield event


def run_chat(
    commands: Client, events: Client, peer: str, *, connect_first: bool, as_json: bool
) -> None:
    """Send each line of stdin to ``peer`` (over ``commands``) and print its messages (from
    a ``recv --follow`` on ``events``) until end of input or until the peer is gone."""
    prefix = f"{peer}> " if sys.stdout.isatty() else ""
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
                print_message(event.data, as_json, prefix, one_line=True)
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


def run_pipe(client: Client, peer: str, *, framed: bool = False) -> None:
    """Pipe stdin to ``peer`` and its bytes to stdout until both directions are done (or
    the pipe breaks: then the client raises).

    Unless ``framed`` or stdin is a terminal, mvpd copies stdin and stdout itself (they
    travel with ``pipe.open``) and this only waits for the end; a daemon that cannot (too
    busy, or too old) gets the bytes framed over the control socket instead."""
    if not framed and _passable(0) and _passable(1) and not os.isatty(0):
        try:
            stream = client.attach_pipe(peer, 0, 1)
        except (Busy, InvalidParams):
            pass
        else:
            for _ in stream:  # only error (raised) and end
                pass
            return
    _copy_framed(client, client.open_pipe(peer))


def _passable(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _copy_framed(client: Client, stream: Subscription) -> None:
    """Copy stdin to the pipe ``stream`` (then its EOF) and the pipe's bytes to stdout,
    until the stream ends (both directions done, or broken: then the client raises)."""
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
        want_stdin = stdin_open and len(in_flight) < PIPE_WINDOW and not client.unsent
        if want_stdin != reading_stdin:
            if want_stdin:
                selector.register(stdin, selectors.EVENT_READ)
            else:
                selector.unregister(stdin)
            reading_stdin = want_stdin
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.unsent else 0)
        if selector.get_key(client).events != wanted:
            selector.modify(client, wanted)
        for key, mask in selector.select():
            if key.fd != stdin and mask & selectors.EVENT_WRITE:
                client.send_some()
                if not mask & selectors.EVENT_READ:
                    continue
            if key.fd == stdin:
                data = os.read(stdin, PIPE_CHUNK)
                if data:
                    in_flight.append(client.pipe_write(stream.sub, data, block=False))
                else:
                    in_flight.append(client.pipe_eof(stream.sub, block=False))
                    stdin_open = False
            else:
                client.poll()


def show_stats(client: Client, peer: str, *, as_json: bool, watch: bool) -> None:
    """Print ``peer``'s stats once, or (``watch``) every second until interrupted: a
    terminal is cleared first, JSON goes one object a line."""
    while True:
        result = client.call("stats", peer=peer)
        if as_json:
            typer.echo(json.dumps(result, sort_keys=True, default=json_default,
                                  indent=None if watch else 2))
        else:
            if watch and sys.stdout.isatty():
                typer.echo("\x1b[H\x1b[2J", nl=False)
            typer.echo(format_stats(result))
        if not watch:
            return
        sys.stdout.flush()
        time.sleep(1.0)


def run_pings(
    client: Client, peer: str, *, count: int, interval: float, timeout: float, padding: int,
    as_json: bool,
) -> list[float]:
    """Send ``count`` data-path pings to ``peer``, a line for each; without ``as_json`` a
    summary line at the end. The round trips (ms) of those answered."""
    rtts: list[float] = []
    sent = 0
    for index in range(count):
        if index:
            time.sleep(interval)
        result = client.call("ping", reply_timeout=timeout + 10, peer=peer,
                             timeout=timeout, padding=padding)
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
    return rtts
