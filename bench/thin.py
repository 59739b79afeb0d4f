"""The thinnest relay this stack can build: the ceiling the sweep's knee is compared with
(``claw bench sweep --broker thin``, and the third sweep of ``claw bench brokers``).

One process does what the edge and the node do between them on a token's path, and nothing else: it takes a
WebSocket ask (the edge's ``/api/ws`` protocol, as far as the bench's load generator uses it), streams the
answer from the fake LM Studio with the node's own client (``node.llm.chat``: keep-alive HTTP/1.1, SSE parsed
in the read callback) and writes every delta to the client's socket at once, framed by ``core.wsframe`` as the
edge's ``WsSession`` does. No broker, no MQTT, no TLS, no LMDB, no coalescing, no sequence bookkeeping, no second
process: a token costs one loopback read and one loopback write plus the least Python that relays it.

Whatever knee this relay reaches with the same fake LLM and load generator, on the same machine, in the same
run, is about the most a relay on Python + uvloop + aiohttp can reach here; SmartClaw's knee is reported as
a share of it. It is a measuring instrument, not a product path: it has no authentication (``/api/login``
hands out the user name as the token) and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from node.llm import LLMClient, LLMError, chat

from core.runtime import now_us as _now_us
from core.wsframe import server_frame

__all__ = ["make_app", "serve"]

_json = msgspec.json.Encoder()


def _frame(obj: dict[str, Any]) -> bytes:
    return server_frame(_json.encode(obj))


def make_app(llm_url: str, model: str = "fake-model") -> web.Application:
    app = web.Application()
    client_box: list[LLMClient] = []
    counter = [0]

    async def on_startup(_: web.Application) -> None:
        client_box.append(LLMClient())

    async def on_cleanup(_: web.Application) -> None:
        for c in client_box:
            await c.close()

    async def login(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"token": str(body.get("dev_user", "anon"))})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node_online": True})

    async def answer(tr: asyncio.Transport, text: str) -> None:
        counter[0] += 1
        task = f"{counter[0]:032x}"
        seq = 0
        parts: list[str] = []

        def on_event(kind: str, delta: str) -> None:
            nonlocal seq
            if kind == "text" and delta and not tr.is_closing():
                seq += 1
                parts.append(delta)
                tr.write(_frame({"type": "delta", "task": task, "seq": seq, "text": delta,
                                 "timing": {"n_pub": _now_us()}}))

        status, err = "ok", None
        try:
            await chat(client_box[0], llm_url, on_event=on_event, model=model,
                       messages=[{"role": "user", "content": text}])
        except LLMError as exc:
            status, err = "error", {"code": "llm_error", "message": str(exc)}
        if not tr.is_closing():
            frame: dict[str, Any] = {"type": "done", "task": task, "seq": seq, "status": status,
                                     "text": "".join(parts)}
            if err:
                frame["error"] = err
            tr.write(_frame(frame))

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(autoping=True, compress=False)
        await sock.prepare(request)
        tr = request.transport
        assert tr is not None
        await sock.send_str('{"type":"node","online":true}')
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for msg in sock:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    ask = msgspec.json.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                if isinstance(ask, dict) and ask.get("type") == "ask":
                    t = asyncio.ensure_future(answer(tr, str(ask.get("text", ""))))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        finally:
            for t in tasks:
                t.cancel()
        return sock

    app.router.add_post("/api/login", login)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/ws", ws)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(llm_url: str, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(make_app(llm_url), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server  # noqa: SLF001 - the bound port of an ephemeral listen
    assert server is not None and server.sockets
    return runner, int(server.sockets[0].getsockname()[1])
