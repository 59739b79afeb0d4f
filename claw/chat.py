"""``claw chat``: a terminal client for the edge's WebSocket API (answers stream as they are generated)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any

import aiohttp


class ChatError(Exception):
    pass


async def _readline(loop: asyncio.AbstractEventLoop) -> str:
    """Read one stdin line in a daemon thread (an abandoned read must not block exit)."""
    import threading

    fut: asyncio.Future[str] = loop.create_future()

    def work() -> None:
        line = sys.stdin.readline()
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(line))

    threading.Thread(target=work, daemon=True).start()
    return await fut


async def _login(session: aiohttp.ClientSession, url: str, user: str) -> str:
    try:
        async with session.post(f"{url}/api/login", json={"dev_user": user}) as r:
            body = await r.json(content_type=None)
    except aiohttp.ClientError as exc:
        raise ChatError(f"无法连接 {url}：{exc}") from None
    if r.status != 200:
        raise ChatError(f"登录失败：{body.get('error', {}).get('message', r.status)}")
    return str(body["token"])


async def chat(url: str, user: str, question: str | None, out: Any = sys.stdout) -> int:
    url = url.rstrip("/")
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        token = await _login(session, url, user)
        ws_url = url.replace("http", "ws", 1) + "/api/ws"
        async with session.ws_connect(ws_url, params={"token": token}, heartbeat=20) as ws:
            current: dict[str, Any] = {"task": None, "done": None}
            interrupted = asyncio.Event()

            def on_sigint() -> None:
                if current["task"] is not None:
                    asyncio.ensure_future(ws.send_json({"type": "stop", "task": current["task"]}))
                    out.write("\n[正在停止…]\n")
                    out.flush()
                else:
                    interrupted.set()
                    if current["done"] is not None and not current["done"].done():
                        current["done"].set_result("interrupted")  # Ctrl-C before the edge accepted the ask

            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGINT, on_sigint)

            async def reader() -> None:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    f = msg.json()
                    t = f.get("type")
                    if t == "node" and not f.get("online"):
                        out.write("[助手离线：问题已排队，上线后自动回答]\n")
                    elif t == "accepted" and current["task"] is None and current["done"] is not None:
                        current["task"] = f["task"]
                    elif t == "delta" and f.get("task") == current["task"]:
                        out.write(f["text"])
                    elif t == "done" and f.get("task") == current["task"]:
                        if f["status"] == "error":
                            out.write(f"\n[出错] {f.get('error', {}).get('message', '')}")
                        elif f["status"] == "cancelled":
                            out.write("\n[已停止]")
                        out.write("\n")
                        current["task"] = None
                        current["done"].set_result(f["status"])
                    elif t == "error":
                        out.write(f"\n[错误] {f.get('message')}\n")
                        if current["done"] is not None and not current["done"].done() and current["task"] is None:
                            current["done"].set_result("error")
                    out.flush()
                if current["done"] is not None and not current["done"].done():
                    current["done"].set_result("disconnected")

            rd = asyncio.create_task(reader())

            async def ask(text: str) -> str:
                current["done"] = loop.create_future()
                current["task"] = None
                await ws.send_json({"type": "ask", "text": text})
                return await current["done"]

            status = "ok"
            try:
                if question is not None:
                    status = await ask(question)
                else:
                    out.write("智控未来 终端聊天：输入问题后回车；回答时按 Ctrl-C 停止，空闲时按 Ctrl-C 或 Ctrl-D 退出。\n")
                    while True:
                        out.write("\n你> ")
                        out.flush()
                        read = asyncio.ensure_future(_readline(loop))
                        stop = asyncio.ensure_future(interrupted.wait())
                        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                        if stop.done() or not read.result():
                            stop.cancel()
                            break
                        stop.cancel()
                        line = read.result().strip()
                        if line:
                            out.write("助手> ")
                            status = await ask(line)
            finally:
                rd.cancel()
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signal.SIGINT)
            if status == "interrupted":
                return 130
            return 0 if status in ("ok", "cancelled") else 1


def run_chat(url: str, user: str, question: str | None) -> int:
    from .runtime import run

    try:
        return run(lambda: chat(url, user, question))
    except ChatError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
