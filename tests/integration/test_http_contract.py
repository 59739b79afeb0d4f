"""The edge's HTTP contract as docs/api.md states it: every error in the JSON shape, and /healthz's fields."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.conftest import run_system
from tests.integration.test_e2e import collect

pytestmark = pytest.mark.integration


def assert_json_error(status: int, body: dict, code: str) -> None:
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def test_http_layer_errors_have_the_json_error_shape(tmp_path: Path, pki_dir: Path) -> None:
    """404, 405 and 413 come from aiohttp itself (router, body limit), not from a handler: they used to be plain
    text ("405: Method Not Allowed")."""
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_, aiohttp.ClientSession() as s:
        async with s.post(f"{sys_.http}/api/login", data=b"{" + b" " * (300 * 1024) + b"}",
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
            assert r.content_type == "application/json"
            body = await r.json()
            assert_json_error(r.status, body, "too_large")
            assert "256 KiB" in body["error"]["message"]
        async with s.get(f"{sys_.http}/api/login") as r:
            assert r.status == 405
            assert r.content_type == "application/json"
            assert_json_error(r.status, await r.json(), "method_not_allowed")
            assert "POST" in r.headers["Allow"]
        async with s.delete(f"{sys_.http}/api/tasks") as r:
            assert r.status == 405 and r.content_type == "application/json"
        async with s.get(f"{sys_.http}/api/no-such-thing") as r:
            assert r.status == 404
            assert r.content_type == "application/json"
            assert_json_error(r.status, await r.json(), "not_found")
        # a handler's own error keeps its code
        async with s.post(f"{sys_.http}/api/login", data=b"not json") as r:
            assert r.status == 400
            assert_json_error(r.status, await r.json(), "bad_json")
        # the page is still a page
        async with s.get(f"{sys_.http}/") as r:
            assert r.status == 200 and r.content_type == "text/html"


async def test_healthz_live_tasks_counts_only_unfinished_tasks(tmp_path: Path, pki_dir: Path) -> None:
    """``live_tasks`` is the tasks not finished yet; a finished one (kept a while for late replies) is not."""
    async with run_system(tmp_path, pki_dir) as sys_, aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            assert (await ws.receive_json())["type"] == "node"
            await ws.send_json({"type": "ask", "text": "你好"})
            _, done = await collect(ws)
        assert done["status"] == "ok"
        async with s.get(f"{sys_.http}/healthz") as r:
            health = await r.json()
        assert health["live_tasks"] == 0, health
        async with s.get(f"{sys_.http}/metrics") as r:
            metrics = await r.text()
        assert "claw_edge_live_tasks 0" in metrics
        assert "claw_edge_recent_tasks 1" in metrics
