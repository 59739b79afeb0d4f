"""``claw demo``: server A (edge + embedded broker) and server B (node) on this machine.

Data lives in ``--data`` (default ``./.claw``): the private CA and broker certificate, the
broker's credential store, the edge's task store. The node dials the broker over TLS with
certificate verification on and a node credential made on first start, exactly like a real
server B. LM Studio is used when ``--llm`` answers; otherwise the built-in demo model runs
(and says so in every answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import httpx

from core.config import load_settings
from core.perms import private_dir
from core.pki import issue_server_cert

log = logging.getLogger("claw.demo")


def _node_credential(data: Path) -> tuple[str, str]:
    from broker.creds import CredentialStore

    secret_file = data / "demo-node.secret"
    store = CredentialStore(data)
    if secret_file.exists():
        username, _, password = secret_file.read_text().strip().partition(":")
        if store.verify(username, password) == "node":
            return username, password
    username, password = store.add("node", "demo", replace=True)
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{username}:{password}")
    return username, password


async def _llm_answers(url: str) -> list[str] | None:
    try:
        async with httpx.AsyncClient(timeout=1.5) as client:
            r = await client.get(url.rstrip("/") + "/models")
            if r.status_code == 200:
                return [m.get("id", "?") for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return None


def run_demo(args: Any) -> int:
    from core.runtime import claw_command, configure_logging, run

    data = Path(args.data).resolve()
    private_dir(data)  # 0700, like everything SmartClaw writes (core.perms)
    mqtt_host, _, mqtt_port = args.mqtt.rpartition(":")
    overrides = {
        "data_dir": str(data),
        "broker": {"enabled": True, "listen": args.mqtt, "local_listen": "127.0.0.1:0"},
        "edge": {"http": args.http, "dev_login": True},
        "mqtt": {"host": "localhost" if mqtt_host in ("127.0.0.1", "0.0.0.0", "localhost") else mqtt_host,
                 "port": int(mqtt_port), "tls": True},
        "node": {"id": "demo", "llm_url": args.llm},
    }
    settings = load_settings(args.config, overrides=overrides)
    configure_logging(args.log_level or settings.log.level)
    issue_server_cert(data / "pki", ["localhost", "127.0.0.1", mqtt_host])
    user, password = _node_credential(data)
    settings = load_settings(args.config, overrides=overrides | {
        "mqtt": overrides["mqtt"] | {"username": user, "password": password}})

    async def go() -> None:
        from edge.app import INFO, run_edge
        from node.app import serve as serve_node
        from fakes.llm import FakeLLMConfig, run_fake_llm

        from core.runtime import stop_event

        stop = stop_event()
        async with contextlib.AsyncExitStack() as stack:
            models = await _llm_answers(args.llm)
            node_settings = settings
            if models is None:
                fake = await stack.enter_async_context(run_fake_llm(FakeLLMConfig(demo=True)))
                llm_note = (f"LM Studio 未在 {args.llm} 响应 → 使用内置演示模型（不是真正的大模型）\n"
                            f"  LM Studio did not answer at {args.llm}: using the BUILT-IN DEMO MODEL at {fake.url}")
                node_settings = load_settings(args.config, overrides=overrides | {
                    "mqtt": overrides["mqtt"] | {"username": user, "password": password},
                    "node": {"id": "demo", "llm_url": fake.url, "model": "smartclaw-demo"}})
            else:
                llm_note = f"LM Studio at {args.llm}: models {', '.join(models) or '(none loaded)'}"
            app = await stack.enter_async_context(run_edge(settings))
            node_task = asyncio.create_task(serve_node(node_settings, stop))
            host, _, _ = args.http.rpartition(":")
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{app[INFO].http_port}"
            print(
                "\n智控未来 SmartClaw demo is running / 演示已启动\n"
                f"  chat page 聊天页面:   {url}/\n"
                f"  terminal 终端聊天:    {claw_command()} chat --url {url}\n"
                f"  MQTT over TLS:       {args.mqtt} (CA: {data / 'pki' / 'ca.crt'})\n"
                f"  data 数据目录:        {data}\n"
                f"  {llm_note}\n"
                "  Ctrl-C to stop / 按 Ctrl-C 退出\n",
                flush=True,
            )
            await stop.wait()
            node_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await node_task

    try:
        run(go)
    except (RuntimeError, OSError, ValueError) as exc:
        log.error("demo failed to start: %s", exc)
        return 1
    return 0
