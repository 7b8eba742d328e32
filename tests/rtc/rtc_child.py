"""A peer of our WebRTC stack in its own process (started inside a test's network namespace),
driven by JSON lines on stdin; replies and events are JSON lines on stdout.

Commands: ``{"op": "offer"}`` (creates channel "c" first) -> ``{"sdp": ...}``;
``{"op": "answer", "sdp": offer}`` -> ``{"sdp": ...}``; ``{"op": "remote", "sdp": answer}``;
``{"op": "close"}`` closes every channel. Every text message received is echoed back with
``echo:`` in front, every binary one reversed; events: ``{"event": "open"|"close",
"label": ...}``, ``{"event": "state", "state": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiortc import RTCSessionDescription

from mvpd.rtc import DataChannel, IceConfiguration, PeerConnection


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def serve(channel: DataChannel) -> None:
    def on_message(message: str | bytes) -> None:
        channel.send("echo:" + message if isinstance(message, str) else message[::-1])

    channel.on("message", on_message)
    channel.on("open", lambda: emit(event="open", label=channel.label))
    channel.on("close", lambda: emit(event="close", label=channel.label))
    if channel.readyState == "open":
        emit(event="open", label=channel.label)


async def main() -> None:
    pc = PeerConnection(IceConfiguration(servers=()))
    channels: list[DataChannel] = []

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
                serve(channel)
                await pc.setLocalDescription(await pc.createOffer())
                emit(sdp=pc.localDescription.sdp if pc.localDescription else "")
            elif op == "answer":
                await pc.setRemoteDescription(RTCSessionDescription(command["sdp"], "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                emit(sdp=pc.localDescription.sdp if pc.localDescription else "")
            elif op == "remote":
                await pc.setRemoteDescription(RTCSessionDescription(command["sdp"], "answer"))
            elif op == "close":
                for channel in channels:
                    channel.close()
    finally:
        await pc.close()


if __name__ == "__main__":
    asyncio.run(main())
