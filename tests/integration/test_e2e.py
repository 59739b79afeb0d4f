"""A streamed conversation over /api/ws through the real embedded broker, node and a fake LM Studio."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.fakellm import FakeLLMConfig
from tests.conftest import run_system

pytestmark = pytest.mark.integration


async def collect(ws: aiohttp.ClientWebSocketResponse, task: str | None = None,
                  timeout: float = 15) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Frames of one task until its done frame."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            f = await ws.receive_json()
            if f["type"] == "accepted" and task is None:
                task = f["task"]
            if f.get("task") == task:
                frames.append(f)
                if f["type"] == "done":
                    return frames, f


async def test_streamed_answer_in_order(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=60, tokens_per_s=400, token_chars=3)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            first = await ws.receive_json()
            assert first == {"type": "node", "online": True}
            await ws.send_json({"type": "ask", "text": "你好，介绍一下你自己"})
            frames, done = await collect(ws)
        deltas = [f for f in frames if f["type"] == "delta"]
        assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
        assert len(deltas) > 1, "answer should stream in several chunks"
        assert done["status"] == "ok"
        assert done["text"] == "".join(d["text"] for d in deltas)
        assert len(done["text"]) == 60 * 3
        assert done["usage"]["completion_tokens"] == 60
        # history through the HTTP API
        async with s.get(f"{sys_.http}/api/tasks", headers={"Authorization": f"Bearer {token}"}) as r:
            tasks = (await r.json())["tasks"]
        assert tasks[0]["status"] == "ok" and tasks[0]["answer"] == done["text"]
        async with s.get(f"{sys_.http}/api/tasks/{done['task']}", headers={"Authorization": f"Bearer {token}"}) as r:
            assert (await r.json())["answer"] == done["text"]


@pytest.mark.parametrize(
    "fake, code",
    [
        ({"http_status": 500}, "llm_http"),
        ({"http_status": 404}, "llm_no_model"),
        ({"error_after": 3}, "llm_stream_error"),
        ({"drop_after": 3}, "llm_dropped"),
        ({"stall_after": 3}, "llm_stall"),
    ],
)
async def test_llm_failures_reach_user_as_clear_errors(tmp_path: Path, pki_dir: Path, fake: dict[str, Any],
                                                      code: str) -> None:
    cfg = FakeLLMConfig(n_tokens=10, **fake)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            await ws.receive_json()
            t0 = time.monotonic()
            await ws.send_json({"type": "ask", "text": "hi"})
            frames, done = await collect(ws, timeout=10)
        assert time.monotonic() - t0 < 8
        assert done["status"] == "error"
        assert done["error"]["code"] == code
        assert done["error"]["message"]  # readable Chinese message
        deltas = "".join(f["text"] for f in frames if f["type"] == "delta")
        assert done["text"] == deltas


async def test_refused_llm_connection(tmp_path: Path, pki_dir: Path) -> None:
    from tests.conftest import free_port
    async with run_system(tmp_path, pki_dir, node={"llm_url": f"http://127.0.0.1:{free_port()}/v1"}) as sys_, \
            aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "hi"})
            _, done = await collect(ws, timeout=10)
        assert done["status"] == "error" and done["error"]["code"] == "llm_unreachable"


async def test_stop_cancels_end_to_end(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=400, tokens_per_s=50)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "long"})
            task = None
            async with asyncio.timeout(10):
                while True:
                    f = await ws.receive_json()
                    task = f.get("task", task)
                    if f["type"] == "delta":
                        break
            await ws.send_json({"type": "stop", "task": task})
            frames, done = await collect(ws, task, timeout=10)
        assert done["status"] == "cancelled"
        assert len(done["text"]) < 400 * 4
        await asyncio.sleep(0.3)
        assert sys_.fake.stats.client_closed >= 1  # the LM Studio stream was closed (GPU freed)
