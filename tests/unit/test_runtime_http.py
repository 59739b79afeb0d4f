"""core.runtime.start_http: the one way edge and node open an HTTP listener."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web

from core.runtime import start_http


async def test_serves_on_a_free_port_and_a_taken_address_is_a_clear_error() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner, port = await start_http(app, "127.0.0.1:0", "test")
    try:
        assert port > 0
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
            assert await r.text() == "ok"
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = taken.getsockname()[1]
            with pytest.raises(RuntimeError, match=rf"^node.metrics_listen: cannot listen on 127.0.0.1:{busy}"):
                await start_http(web.Application(), f"127.0.0.1:{busy}", "node.metrics_listen")
    finally:
        await runner.cleanup()
