"""Shared fixtures: free ports on 127.0.0.1, a private CA, and a whole system (edge+broker+node+fake LLM)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from core.config import Settings, load_settings
from core.pki import issue_server_cert


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    issue_server_cert(d, ["localhost", "127.0.0.1"])
    return d


def _deep(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def system_settings(data: Path, pki: Path, llm_url: str, **over: Any) -> tuple[Settings, int]:
    """Settings for a one-machine system on free ports; returns (settings, tls_port)."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "pki").mkdir(exist_ok=True)
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        target = data / "pki" / name
        if not target.exists():
            target.write_bytes((pki / name).read_bytes())
    tls_port = free_port()
    base = {
        "data_dir": str(data),
        "broker": {"listen": f"127.0.0.1:{tls_port}", "local_listen": "127.0.0.1:0"},
        "edge": {"http": "127.0.0.1:0", "dev_login": True, "republish_s": 1.0, "node_timeout_s": 3.0},
        "mqtt": {"host": "localhost", "port": tls_port, "tls": True, "reconnect_min": 0.1, "reconnect_max": 1.0},
        "node": {"id": "t1", "llm_url": llm_url, "model": "fake-model", "beat_s": 0.5,
                 "stall_timeout_s": 1.0, "first_token_timeout_s": 2.0, "connect_timeout_s": 1.0},
    }
    return load_settings(env={}, overrides=_deep(base, over)), tls_port


@dataclass
class System:
    settings: Settings
    http: str
    app: Any
    node: Any
    node_task: asyncio.Task[None] | None
    fake: Any

    async def login(self, session: Any, user: str = "alice") -> str:
        async with session.post(f"{self.http}/api/login", json={"dev_user": user}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["token"]

    @contextlib.asynccontextmanager
    async def chat_ws(self, session: Any, user: str = "alice") -> AsyncIterator[Any]:
        """``user``'s client WebSocket (/api/ws, logged in by :meth:`login`), its first frame (the node
        presence) already read."""
        token = await self.login(session, user)
        async with session.ws_connect(f"{self.http}/api/ws", params={"token": token}) as ws:
            await ws.receive_json()
            yield ws


async def serve_app(app: web.Application, **runner_kw: Any) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on a free loopback port: its runner (the caller cleans it up) and the port."""
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def wait_until(cond: Any, timeout: float = 10.0, step: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


@contextlib.asynccontextmanager
async def run_system(tmp: Path, pki: Path, *, fake_cfg: Any = None, start_node: bool = True,
                     **over: Any) -> AsyncIterator[System]:
    from broker.creds import CredentialStore
    from edge.app import INFO, run_edge
    from edge.keys import BRIDGE
    from fakes.llm import FakeLLMConfig, run_fake_llm
    from node.worker import Node

    async with run_fake_llm(fake_cfg or FakeLLMConfig()) as fake:
        settings, _ = system_settings(tmp / "a", pki, fake.url, **over)
        user, password = CredentialStore(settings.data_dir).add("node", "t1", replace=True)
        node_settings, _ = system_settings(tmp / "b", pki, fake.url, **_deep(over, {
            "mqtt": {"port": settings.mqtt.port, "username": user, "password": password}}))
        async with run_edge(settings) as app:
            node = Node(node_settings)
            task = asyncio.create_task(node.run()) if start_node else None
            sys_ = System(settings, f"http://127.0.0.1:{app[INFO].http_port}", app, node, task, fake)
            if start_node:
                await wait_until(lambda: app[BRIDGE].node_online, 10)
            try:
                yield sys_
            finally:
                if sys_.node_task is not None:
                    sys_.node_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sys_.node_task
