"""The modes, defined once: names and how a message of each kind fits each mode."""

from __future__ import annotations

from typing import Any

import pytest

from mvpd.proto.errors import PeerError
from mvpd.proto.modes import KIND_OF_MODE, MODES, encode_message, is_mode, mode_list, wire_size


def test_names_come_from_one_place() -> None:
    from mvpd.config import AgentSettings
    from mvpd.proto.rpc import ConnectParams
    from mvpd.transports import TRANSPORTS

    assert MODES == ("chat", "json", "bytes", "tun")
    assert set(TRANSPORTS) == set(MODES)
    for mode, kind in KIND_OF_MODE.items():
        assert TRANSPORTS[mode]().kind == kind
    assert mode_list() == "chat, json, bytes or tun"
    assert is_mode("tun") and not is_mode("pipe")
    for model in (AgentSettings.model_fields["mode"], ConnectParams.model_fields["mode"]):
        assert "chat" in str(model.annotation) and "tun" in str(model.annotation)


@pytest.mark.parametrize(
    ("mode", "kind", "value", "wire"),
    [
        ("chat", "text", "héllo", "héllo"),
        ("chat", "json", {"a": [1, None]}, '{"a":[1,null]}'),
        ("chat", "bytes", b"ok", "ok"),
        ("json", "json", "s", '"s"'),
        ("json", "text", "[1, 2]", "[1, 2]"),
        ("json", "bytes", b"{}", "{}"),
        ("bytes", "text", "é", "é".encode()),
        ("bytes", "json", [1], b"[1]"),
        ("bytes", "bytes", b"\x00\xff", b"\x00\xff"),
    ],
)
def test_encode_message_fits_each_kind_to_each_mode(
    mode: str, kind: Any, value: Any, wire: str | bytes
) -> None:
    assert encode_message(mode, kind, value) == wire


@pytest.mark.parametrize(
    ("mode", "kind", "value", "error"),
    [
        ("chat", "bytes", b"\xff", "not UTF-8: connect with --mode bytes"),
        ("json", "text", "not json", "not JSON; use --json"),
        ("tun", "text", "hi", "tun mode, which carries no messages"),
    ],
)
def test_encode_message_refuses_what_the_mode_cannot_carry(
    mode: str, kind: Any, value: Any, error: str
) -> None:
    with pytest.raises(PeerError, match=error):
        encode_message(mode, kind, value)


def test_wire_size_counts_utf8_bytes_and_empty_as_one() -> None:
    assert (wire_size("é"), wire_size(b""), wire_size("")) == (2, 1, 1)
