"""The whole system in this process, on free 127.0.0.1 ports, for the bench scenarios.

Fake LM Studio + edge (aiohttp, embedded amqtt broker with its TLS listener) + node (aiomqtt over
TLS, verified against a private CA made for the run). The same topology as
``tests/conftest.py::run_system`` -- kept separate so the bench never imports ``tests/``.
Everything listens on loopback only and is torn down on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from core.config import Settings, load_settings
from core.perms import private_dir
from core.pki import issue_server_cert


def _deep(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class System:
    edge_settings: Settings
    node_settings: Settings
    http: str  # base URL of the edge, e.g. http://127.0.0.1:PORT
    mqtt_tls_port: int
    app: Any  # the edge's aiohttp Application
    node: Any  # node.worker.Node
    fake: Any  # fakes.llm.FakeLLM

    async def login(self, session: aiohttp.ClientSession, user: str) -> str:
        async with session.post(f"{self.http}/api/login", json={"dev_user": user}) as r:
            if r.status != 200:
                raise RuntimeError(f"dev login failed: HTTP {r.status}: {await r.text()}")
            return str((await r.json())["token"])


async def _wait_until(cond: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise RuntimeError(f"bench: {what} not reached within {timeout:.0f} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def run_system(data: Path, *, fake_cfg: Any = None, edge: dict[str, Any] | None = None,
                     node: dict[str, Any] | None = None, start_timeout: float = 20.0) -> AsyncIterator[System]:
    """Start fake LLM, edge (+ broker) and node under ``data``; yield a :class:`System`; stop them all."""
    from broker.creds import CredentialStore
    from edge.app import INFO, run_edge
    from edge.keys import BRIDGE
    from fakes.llm import FakeLLMConfig, run_fake_llm
    from node.worker import Node

    a_dir, b_dir = data / "a", data / "b"
    private_dir(a_dir)  # data directories are 0700 (core.perms; else the edge tightens them with a warning)
    private_dir(b_dir)
    pki = issue_server_cert(a_dir / "pki", ["localhost", "127.0.0.1"])
    async with run_fake_llm(fake_cfg or FakeLLMConfig()) as fake:
        edge_settings = load_settings(env={}, overrides=_deep({
            "data_dir": str(a_dir),
            "log": {"level": "WARNING"},
            "broker": {"listen": "127.0.0.1:0", "local_listen": "127.0.0.1:0"},
            "edge": {"http": "127.0.0.1:0", "dev_login": True},
        }, {"edge": edge or {}}))
        user, password = CredentialStore(edge_settings.data_dir).add("node", "bench", replace=True)
        async with run_edge(edge_settings) as app:
            tls_port = app[INFO].mqtt_tls_port
            if tls_port is None:
                raise RuntimeError("bench: the embedded broker has no TLS listener")
            node_settings = load_settings(env={}, overrides={
                "data_dir": str(b_dir),
                "log": {"level": "WARNING"},
                "mqtt": {"host": "localhost", "port": tls_port, "tls": True, "ca_file": str(pki.ca_cert),
                         "username": user, "password": password, "reconnect_min": 0.1, "reconnect_max": 1.0},
                "node": {"id": "bench", "llm_url": fake.url, "model": "fake-model", **(node or {})},
            })
            worker = Node(node_settings)
            task = asyncio.create_task(worker.run(), name="bench-node")
            try:
                bridge = app[BRIDGE]
                await _wait_until(lambda: bridge.node_online or task.done(), start_timeout, "node online")
                if task.done():
                    task.result()  # surface why the node stopped
                    raise RuntimeError("bench: the node stopped during start-up")
                yield System(edge_settings, node_settings, f"http://127.0.0.1:{app[INFO].http_port}", tls_port,
                             app, worker, fake)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
