"""What mvpctl shows: the daemon's answers as text for humans, JSON, and received messages.

The ``format_*`` functions turn a result of ``status``, ``peers``, ``stats``, ``id`` and
``trust`` (plain dicts, as :mod:`mvpctl.client` decodes them) into the text the commands
print. :func:`print_json` writes a result as JSON (bytes as base64) and :func:`print_message`
writes one received message, so that a peer's text cannot drive the operator's terminal.
Nothing here talks to the daemon.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from typing import Any

import typer

from mvpd.proto.text import neutralise


def print_json(value: Any) -> None:
    """``value`` on stdout as indented JSON with sorted keys."""
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=json_default))


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default``: bytes become ``{"base64": ...}``."""
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_message(
    message: dict[str, Any], as_json: bool, prefix: str = "", *, one_line: bool = False
) -> None:
    """One received message on stdout. A peer's text reaches a terminal without its control
    characters (escape sequences could drive the terminal); ``one_line`` (chat) escapes line
    breaks too, so a message cannot fake lines of the conversation. Into a pipe or a file,
    text goes as it came."""
    kind, data = message.get("kind"), message.get("data")
    if as_json:
        typer.echo(json.dumps(message, sort_keys=True, default=json_default))
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
        sys.stdout.write(f"{prefix}{json.dumps(data, default=json_default)}\n")
    sys.stdout.flush()


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



# --- stats -------------------------------------------------------------------------------------


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
        if "packets_sent" in sctp:
            lines.append(
                f"            packets out {sctp['packets_sent']} / in "
                f"{sctp.get('packets_received', 0)}, SACKs out {sctp.get('sacks_sent', 0)} / "
                f"in {sctp.get('sacks_received', 0)}, rwnd ours {_size(sctp.get('our_rwnd'))}"
                f" / peer's {_size(sctp.get('peer_rwnd'))}")
    dropped = status.get("dropped") or {}
    lines.append("  drops     " + (", ".join(f"{reason} {count}" for reason, count
                                            in sorted(dropped.items())) or "none"))
    if status.get("tun"):
        lines.append(format_tun(str(peer), status["tun"]))
    return "\n".join(lines)



# --- identity ----------------------------------------------------------------------------------


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



def format_known(result: dict[str, Any]) -> str:
    """The ``trust`` result: the peer's fingerprints in known_peers, one a line."""
    entries = result.get("entries") or []
    if not entries:
        return f"{result.get('peer')}: nothing in known_peers"
    return "\n".join(
        f"{result.get('peer')}: {e.get('fingerprint')} ({e.get('how')})" for e in entries
    )

