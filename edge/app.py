"""Server A's edge: aiohttp app factory (client API, MQTT bridge, embedded broker) and ``serve()``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
from aiohttp import WSCloseCode, web

from broker.local import LocalLink
from claw.config import Settings
from claw.mqtt import client_from_settings
from claw.runtime import start_http

from . import api
from .auth import Tokens, load_or_create_secret
from .bridge import Bridge
from .keys import BRIDGE, RETENTION, SESSIONS, SETTINGS, STORE, TOKENS, WECOM
from .store import Retention, TaskStore

log = logging.getLogger(__name__)


@dataclass
class EdgeInfo:
    """What a running edge bound (useful when ports were 0)."""

    http_port: int = 0
    mqtt_tls_port: int | None = None
    mqtt_local_port: int | None = None


INFO = web.AppKey("info", EdgeInfo)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=api.MAX_BODY, middlewares=[api.json_errors])
    app[SETTINGS] = settings
    app[INFO] = EdgeInfo()
    app[SESSIONS] = weakref.WeakSet()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_mqtt_ctx)
    app.on_shutdown.append(_close_websockets)
    api.add_routes(app)
    if settings.wecom.enabled:
        app.cleanup_ctx.append(_wecom_ctx)
        app.router.add_get("/wecom/callback", _wecom_get)
        app.router.add_post("/wecom/callback", _wecom_post)
    return app


async def _wecom_ctx(app: web.Application) -> AsyncIterator[None]:
    """WeCom channel: API client (token cache in LMDB), durable paced outbox, callback handling."""
    import aiohttp

    from .wecom.channel import WeComChannel
    from .wecom.client import WeComApi
    from .wecom.outbox import Outbox

    s = app[SETTINGS]
    store = app[STORE]
    async with aiohttp.ClientSession(headers={"User-Agent": "SmartClaw"}) as session:
        api = WeComApi(s.wecom, session, store.writer, store.env.open_db(b"wc_kv"))  # token cache in wc_kv
        outbox = Outbox(s.wecom, api, store)
        channel = WeComChannel(s, store, app[BRIDGE], outbox)
        app[WECOM] = channel
        outbox.load()
        channel.recover()
        channel.start()
        log.info("edge: WeCom app %s (AgentId %s) enabled at /wecom/callback; API %s", s.wecom.corp_id,
                 s.wecom.agent_id, s.wecom.api_base)
        try:
            yield
        finally:
            await channel.close()
            await outbox.close()


async def _wecom_get(request: web.Request) -> web.StreamResponse:
    return await request.app[WECOM].handle_get(request)


async def _wecom_post(request: web.Request) -> web.StreamResponse:
    return await request.app[WECOM].handle_post(request)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    app[STORE] = TaskStore(s.data_dir, map_size=s.edge.store_map_mb << 20)
    app[TOKENS] = Tokens(load_or_create_secret(s.edge.token_secret, s.data_dir), s.edge.token_ttl)
    app[RETENTION] = retention = Retention(app[STORE], s.edge.history_days, first_s=RETENTION_FIRST_S,
                                           every_s=RETENTION_EVERY_S)
    retention.start()
    try:
        yield
    finally:
        await retention.close()
        await app[STORE].flush()
        app[STORE].close()


RETENTION_FIRST_S = 60.0  # edge.history_days: the first retention pass, seconds after start ...
RETENTION_EVERY_S = 3600.0  # ... then one every this many (edge.store.Retention)


async def _mqtt_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        if s.broker.enabled:
            from broker.app import run_broker

            log.info("edge: starting embedded MQTT broker")
            handle = await stack.enter_async_context(run_broker(s))
            app[INFO].mqtt_tls_port = handle.tls_port
            app[INFO].mqtt_local_port = handle.local_port
            # The bridge is in the broker's process: an in-process link, not a loopback MQTT client.
            client: aiomqtt.Client | LocalLink = LocalLink(handle.broker)
        else:
            client = client_from_settings(s.mqtt, identifier=s.mqtt.username or "edge", data_dir=s.data_dir)
        bridge = Bridge(s, app[STORE], client)
        app[BRIDGE] = bridge
        task = asyncio.create_task(bridge.run(), name="edge-bridge")
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(bridge._connected.wait()), 10)
            if not bridge.connected:
                log.warning("edge: MQTT not connected yet; continuing and retrying in the background")
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _close_websockets(app: web.Application) -> None:
    for sess in list(app[SESSIONS]):
        await sess.ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")


@contextlib.asynccontextmanager
async def run_edge(settings: Settings) -> AsyncIterator[web.Application]:
    """Start the edge (HTTP + bridge + embedded broker), yield the app, then shut down in order."""
    app = create_app(settings)
    log.info("edge: waiting for application startup")
    runner, app[INFO].http_port = await start_http(app, settings.edge.http, "edge")
    log.info("edge: application startup complete; HTTP on %s:%d", settings.edge.http.rpartition(":")[0],
             app[INFO].http_port)
    try:
        yield app
    finally:
        log.info("edge: shutting down")
        await runner.cleanup()
        log.info("edge: stopped")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    async with run_edge(settings):
        await (stop or asyncio.Event()).wait()
