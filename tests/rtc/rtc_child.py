"""A peer of our WebRTC stack in its own process (started inside a test's network namespace),
driven by JSON lines on stdin; replies and events are JSON lines on stdout.

Commands: ``{"op": "offer", "echo": bool}`` (creates channel "c" first, which echoes unless
``echo`` is false) -> ``{"sdp": ...}``; ``{"op": "answer", "sdp": offer}`` -> ``{"sdp": ...}``;
``{"op": "remote", "sdp": answer}``; ``{"op": "close"}`` closes every channel;
``{"op": "send", "count": N, "size": S}`` sends N numbered binary messages of S bytes on "c"
and reports ``{"event": "sent", "ok": bool, "seconds": ...}`` once N echoes came back in
order. Every text message received is echoed back with ``echo:`` in front, every binary one
reversed; events: ``{"event": "open"|"close", "label": ...}``, ``{"event": "state", ...}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from aiortc import RTCSessionDescription

from mvpd.rtc import DataChannel, IceConfiguration, PeerConnection


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def serve(channel: DataChannel, echo: bool = True) -> asyncio.Queue[str | bytes]:
    """Echo what arrives on ``channel``, or else queue it (returned)."""
    inbox: asyncio.Queue[str | bytes] = asyncio.Queue()

    def on_message(message: str | bytes) -> None:
        if not echo:
            inbox.put_nowait(message)
        else:
            channel.send("echo:" + message if isinstance(message, str) else message[::-1])

    channel.on("message", on_message)
    channel.on("open", lambda: emit(event="open", label=channel.label))
    channel.on("close", lambda: emit(event="close", label=channel.label))
    if channel.readyState == "open":
        emit(event="open", label=channel.label)
    return inbox


async def send_numbered(channel: DataChannel, inbox: asyncio.Queue[str | bytes], count: int,
                        size: int) -> None:
    """Numbered messages out, their reversed echoes back in order; waits on buffer room."""
    low = asyncio.Event()
    channel.bufferedAmountLowThreshold = 256 * 1024
    channel.on("bufferedamountlow", low.set)
    started = time.monotonic()
    messages = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
    for message in messages:
        while channel.bufferedAmount > 1024 * 1024:
            low.clear()
            await low.wait()
        channel.send(message)
    ok = all([await inbox.get() == message[::-1] for message in messages])
    emit(event="sent", ok=ok, seconds=time.monotonic() - started)


async def main() -> None:
    pc = PeerConnection(IceConfiguration(servers=()))
    channels: list[DataChannel] = []
    own_inbox: asyncio.Queue[str | bytes] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    def on_datachannel(channel: DataChannel) -> None:
        channels.append(channel)
        serve(channel)

    pc.on("datachannel", on_datachannel)
    pc.on("connectionstatechange", lambda: emit(event="state", state=pc.connectionState))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command["op"]
            if op == "offer":
                channel = pc.createDataChannel("c", protocol="p")
                channels.append(channel)
                own_inbox = serve(channel, echo=command.get("echo", True))
                await pc.setLocalDescription(await pc.createOffer())
                emit(sdp=pc.localDescription.sdp if pc.localDescription else "")
            elif op == "answer":
                await pc.setRemoteDescription(RTCSessionDescription(command["sdp"], "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                emit(sdp=pc.localDescription.sdp if pc.localDescription else "")
            elif op == "remote":
                await pc.setRemoteDescription(RTCSessionDescription(command["sdp"], "answer"))
            elif op == "send":
                task = asyncio.ensure_future(
                    send_numbered(channels[0], own_inbox, command["count"], command["size"])
                )
                tasks.add(task)
            elif op == "close":
                for channel in channels:
                    channel.close()
    finally:
        await pc.close()


if __name__ == "__main__":
    asyncio.run(main())
