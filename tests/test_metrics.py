"""The metrics endpoint's configuration rules and the RPC call counter (the scrape itself is
tests/e2e/test_e2e_observe.py, with a real Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mvpd.metrics import RpcCallCounter
from mvpd.proto.errors import ConfigError, NotFound
from tests.peerlink import make_settings


def test_metrics_are_off_by_default_and_loopback_only_unless_allowed() -> None:
    assert make_settings("a").metrics_listen is None
    assert make_settings("a", metrics_listen="").metrics_listen is None
    for ok in ("127.0.0.1:9477", "[::1]:9477", "localhost:9477", "127.0.0.2:1"):
        assert make_settings("a", metrics_listen=ok).metrics_listen == ok
    for remote in ("0.0.0.0:9477", "192.0.2.1:9477", ":9477", "example.org:9477"):
        with pytest.raises(ConfigError, match="metrics_allow_remote"):
            make_settings("a", metrics_listen=remote)
        assert make_settings("a", metrics_listen=remote, metrics_allow_remote=True)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        make_settings("a", metrics_listen="9477")


def test_calls_are_counted_by_method_and_outcome() -> None:
    class Handler:
        async def rpc_status(self, params: Any, caller: Any) -> str:
            return "ok"

        async def rpc_disconnect(self, params: Any, caller: Any) -> None:
            raise NotFound("not connected to bob")

        async def rpc_pipe_open(self, params: Any, caller: Any) -> None:
            raise RuntimeError("a bug")

        def helper(self) -> int:
            return 1

    counter = RpcCallCounter()
    wrapped = counter.wrap(Handler())

    async def body() -> None:
        assert await wrapped.rpc_status(None, None) == "ok"
        assert await wrapped.rpc_status(None, None) == "ok"
        with pytest.raises(NotFound):
            await wrapped.rpc_disconnect(None, None)
        with pytest.raises(RuntimeError):
            await wrapped.rpc_pipe_open(None, None)

    asyncio.run(body())
    assert wrapped.helper() == 1  # not an RPC method: passed through, not counted
    assert getattr(wrapped, "rpc_nothing", None) is None
    assert dict(counter.calls) == {("status", "ok"): 2, ("disconnect", "not-found"): 1,
                                   ("pipe.open", "internal"): 1}
