"""Chat, JSON and bytes transports over real data channels (mvpd.rtc) on loopback."""

from __future__ import annotations

import pytest

from mvpd.peer import PeerState
from mvpd.proto.errors import MessageTooLarge, TransportError
from mvpd.sctp.dcep import PPID_STRING, Outgoing
from mvpd.transports import (
    MAX_MESSAGE_SIZE,
    TRANSPORTS,
    BytesTransport,
    ChatTransport,
    JsonTransport,
    TransportCounters,
    TransportErrorEvent,
    TunTransport,
    create_transport,
)
from tests.peerlink import connected_pair, run, wait_for


async def inject_raw_text(transport: object, payload: bytes) -> None:
    """Send ``payload`` as a *text* message without UTF-8 checks (what a broken or hostile
    peer could do): straight to the SCTP driver with the string PPID (51)."""
    channel = transport.channel  # type: ignore[attr-defined]
    channel._transport._send(Outgoing(channel.id, PPID_STRING, payload))


def test_message_over_max_message_size_is_refused_and_counted_channel_stays() -> None:
    """A peer that ignores our a=max-message-size sends 1 MiB: our SCTP refuses it during
    reassembly (never buffered whole), counts it (status: sctp.messages_too_large), and the
    channel and the association carry on; the inbox never holds it (8 MiB from a hostile
    peer against a real daemon: tests/e2e/test_e2e_recv.py)."""

    async def body() -> None:
        sa, sb, ta, tb = await connected_pair("bytes")
        channel = ta.channel
        assert channel is not None
        sender = channel.transport  # the SCTP driver: lift both of its send limits
        sender.remote_max_message_size = 0  # type: ignore[attr-defined]
        sender.association.peer_max_message_size = 1 << 30  # type: ignore[attr-defined]
        errors: list[TransportErrorEvent] = []
        tb.add_error_listener(errors.append)
        channel.send(b"\x00" * (1024 * 1024))
        channel.send("x" * (MAX_MESSAGE_SIZE + 1))  # text counts too
        channel.send(b"\x01" * MAX_MESSAGE_SIZE)  # at the limit: accepted
        ta.send_bytes(b"after")
        assert len(await tb.recv()) == MAX_MESSAGE_SIZE
        assert await tb.recv() == b"after"
        assert sb.snapshot()["sctp"]["messages_too_large"] == 2
        assert tb.counters.errors == {"message-too-large": 2}
        assert [e.reason for e in errors] == ["message-too-large"] * 2
        assert "max-message-size of 262144 bytes" in errors[0].detail
        assert tb.inbox is not None and tb.inbox.bytes == 0 and not tb.inbox.dropped
        assert sb.state == PeerState.CONNECTED and tb.is_open
        await sa.close()
        await sb.close()

    run(body())


def test_library_reading_keeps_working_listeners_iteration_recv() -> None:
    """The seed's library API: message listeners and ``messages()``/``recv()`` on a
    transport of its own (no core), all fed by one delivery."""

    async def body() -> None:
        sa, sb, ta, tb = await connected_pair("json")
        heard: list[object] = []
        tb.add_message_listener(heard.append)
        for i in range(3):
            ta.send_json({"n": i})
        got = []
        async for message in tb.messages():
            got.append(message)
            if len(got) == 3:
                break
        assert got == heard == [{"n": 0}, {"n": 1}, {"n": 2}]
        await sa.close()
        await sb.close()

    run(body())


def test_factory_modes() -> None:
    assert isinstance(create_transport("chat"), ChatTransport)
    assert isinstance(create_transport("json"), JsonTransport)
    assert isinstance(create_transport("bytes"), BytesTransport)
    assert "tun" in TRANSPORTS
    assert isinstance(create_transport("tun"), TunTransport)
    with pytest.raises(TransportError, match="unknown transport mode 'telnet'"):
        create_transport("telnet")


def test_chat_invalid_utf8_from_peer_is_counted_not_fatal() -> None:
    async def body() -> None:
        sa, sb, ta, tb = await connected_pair("chat")
        errors: list[TransportErrorEvent] = []
        tb.add_error_listener(errors.append)
        await inject_raw_text(ta, b"\xff\xfe not utf-8")  # as a text message
        ta.send_bytes(b"\xc3\x28")  # as a binary message
        ta.send_text("still fine")
        assert await tb.recv() == "still fine"
        assert tb.counters.errors == {"invalid-utf8": 2}
        assert [e.reason for e in errors] == ["invalid-utf8", "invalid-utf8"]
        assert sb.state == PeerState.CONNECTED
        await tb.send_text_async("and back")
        assert await ta.recv() == "and back"
        await sa.close()
        await sb.close()

    run(body())


def test_json_values_and_invalid_json_counted_not_fatal() -> None:
    async def body() -> None:
        sa, sb, ta, tb = await connected_pair("json")
        errors: list[TransportErrorEvent] = []
        tb.add_error_listener(errors.append)
        seen: list[object] = []
        tb.add_message_listener(seen.append)
        ta.send_json({"a": [1, 2.5, None, True], "s": "ü"})
        ta.send_text("{not json")
        ta.send_text("[" * 1000 + "]" * 1000)  # too deep
        await ta.send_json_async(42)
        await ta.send_json_async("text")
        assert await tb.recv() == {"a": [1, 2.5, None, True], "s": "ü"}
        assert await tb.recv() == 42
        assert await tb.recv() == "text"
        assert tb.counters.errors == {"invalid-json": 2}
        assert len(errors) == 2 and "not JSON" in errors[0].detail
        assert seen == [{"a": [1, 2.5, None, True], "s": "ü"}, 42, "text"]
        with pytest.raises(TransportError, match="cannot be sent as JSON"):
            ta.send_json({"nan": float("nan")})
        with pytest.raises(TransportError):
            ta.send_json({1, 2})
        assert sb.state == PeerState.CONNECTED
        await sa.close()
        await sb.close()

    run(body())


def test_bytes_and_the_256_kib_limit() -> None:
    async def body() -> None:
        sa, sb, ta, tb = await connected_pair("bytes")
        ta.send_bytes(b"")
        assert await tb.recv() == b""
        biggest = bytes(range(256)) * (MAX_MESSAGE_SIZE // 256)
        assert len(biggest) == MAX_MESSAGE_SIZE
        await ta.send_bytes_async(biggest)
        assert await tb.recv() == biggest
        with pytest.raises(MessageTooLarge, match=r"262145 bytes is over .* 262144"):
            ta.send_bytes(biggest + b"x")
        with pytest.raises(MessageTooLarge):
            await ta.send_bytes_async(biggest + b"x")
        # The limit counts UTF-8 bytes, not characters.
        with pytest.raises(MessageTooLarge):
            ta.send_text("é" * (MAX_MESSAGE_SIZE // 2 + 1))
        ta.send_text("é" * (MAX_MESSAGE_SIZE // 2))
        assert len(await tb.recv()) == MAX_MESSAGE_SIZE
        assert ta.counters.errors == {"too-large": 3}
        assert ta.counters.messages_out == 3
        await sa.close()
        await wait_for(lambda: sb.state.is_final)

    run(body())


def test_counters_add_sums_every_count() -> None:
    total = TransportCounters(bytes_in=1, messages_in=1, errors={"bad-json": 1})
    total.add(TransportCounters(2, 3, 4, 5, {"bad-json": 2, "too-big": 1}))
    assert total.as_dict() == {
        "bytes_in": 3, "bytes_out": 3, "messages_in": 5, "messages_out": 5,
        "errors": {"bad-json": 3, "too-big": 1},
    }
