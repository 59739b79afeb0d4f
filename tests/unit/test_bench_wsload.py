"""bench.wsload: the load generator's own WebSocket client against a real aiohttp WebSocket server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from bench.wsload import WsError, connect
from tests.conftest import serve_app

BOUND = 10.0  # seconds: anything that must "eventually" happen does so well within this


class Seen:
    """``on_frame`` / ``on_close`` callbacks that record, with an event per arrival (no polling)."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.closed: list[str] = []
        self._more = asyncio.Event()

    def on_frame(self, _user: Any, frame: Any) -> None:
        self.frames.append(frame)
        self._more.set()

    def on_close(self, _user: Any, reason: str) -> None:
        self.closed.append(reason)
        self._more.set()

    async def until(self, cond: Any) -> None:
        async with asyncio.timeout(BOUND):
            while not cond():
                self._more.clear()
                await self._more.wait()


async def _server(handler: Any) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/ws", handler)
    return await serve_app(app)


async def test_frames_of_every_length_class_arrive_whole_and_masked_frames_are_accepted() -> None:
    sizes = [0, 1, 125, 126, 1000, 65535, 65536, 300_000]

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for msg in ws:  # echo each of the client's (masked) frames, then a frame of every size
            assert msg.type is WSMsgType.TEXT
            await ws.send_str(json.dumps({"echo": json.loads(msg.data)}))
            for n in sizes:
                await ws.send_str(json.dumps({"n": n, "s": "字" * n}))
        return ws

    runner, port = await _server(handler)
    seen = Seen()
    got, closed = seen.frames, seen.closed
    try:
        u = await connect("127.0.0.1", port, "/ws?x=1", seen.on_frame, seen.on_close)
        u.send_text(json.dumps({"ask": "你好" * 100}))
        await seen.until(lambda: len(got) >= 1 + len(sizes))
        assert got[0] == {"echo": {"ask": "你好" * 100}}
        assert [(f["n"], len(f["s"])) for f in got[1:]] == [(n, n) for n in sizes]
        u.close()
        await seen.until(lambda: closed)
        assert closed and u.closed
    finally:
        await runner.cleanup()


async def test_ping_is_answered_and_a_close_frame_reports_its_code() -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, autoping=False)
        await ws.prepare(request)
        await ws.ping(b"hb")
        msg = await ws.receive()
        assert msg.type is WSMsgType.PONG and msg.data == b"hb"
        await ws.send_str('{"type":"ok"}')
        await ws.close(code=1013, message=b"too slow")
        return ws

    runner, port = await _server(handler)
    seen = Seen()
    got, closed = seen.frames, seen.closed
    try:
        await connect("127.0.0.1", port, "/ws", seen.on_frame, seen.on_close)
        await seen.until(lambda: closed)
        assert got == [{"type": "ok"}]
        assert closed == ["socket closed (1013)"]
    finally:
        await runner.cleanup()


async def test_a_refused_upgrade_is_an_error_not_a_hang() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=401, text="no")

    runner, port = await _server(handler)
    try:
        with pytest.raises(WsError, match="upgrade refused"):
            await connect("127.0.0.1", port, "/ws", lambda _u, f: None, lambda _u, r: None, timeout=5)
    finally:
        await runner.cleanup()


async def test_a_binary_frame_ends_the_connection_with_a_reason() -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        await ws.send_bytes(b"\x00\x01")
        await asyncio.sleep(0.5)
        return ws

    runner, port = await _server(handler)
    seen = Seen()
    closed = seen.closed
    try:
        await connect("127.0.0.1", port, "/ws", seen.on_frame, seen.on_close)
        await seen.until(lambda: closed)
        assert closed and "opcode 2" in closed[0]
    finally:
        await runner.cleanup()
