"""Server A's edge: aiohttp app factory (client API, MQTT bridge, embedded broker) and ``serve()``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
from aiohttp import WSCloseCode, web
from aiohttp.http_exceptions import HttpProcessingError

from broker.local import LocalLink
from core.config import Settings
from core.mqtt import client_from_settings
from core.perms import secure_tree
from core.runtime import start_http
from core.store import open_db

from . import api, oauth
from .auth import Tokens, load_or_create_secret
from .bridge import Bridge
from .api import SESSIONS
from .keys import BRIDGE, BROKER, RETENTION, SETTINGS, STORE, TOKENS, WECOM, WECOM_API
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
    app = web.Application(client_max_size=api.MAX_BODY, middlewares=[api.json_errors, api.body_timeout])
    app[SETTINGS] = settings
    app[INFO] = EdgeInfo()
    app[SESSIONS] = weakref.WeakSet()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_auth_ctx)
    app.cleanup_ctx.append(_mqtt_ctx)
    app.on_shutdown.append(_close_websockets)
    api.add_routes(app)
    oauth.add_routes(app)  # GET /api/login/options, /auth/wecom (WeCom web sign-in)
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
        api = WeComApi(s.wecom, session, store.writer, open_db(store.env, b"wc_kv"))  # token cache in wc_kv
        app[WECOM_API] = api  # shared with the web sign-in (edge.oauth): one access token for the app
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
    app[RETENTION] = retention = Retention(app[STORE], s.edge.history_days, first_s=RETENTION_FIRST_S,
                                           every_s=RETENTION_EVERY_S)
    retention.start()
    try:
        yield
    finally:
        await retention.close()
        await app[STORE].flush()
        app[STORE].close()


async def _auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """Client tokens and sessions (``<data_dir>/auth.lmdb``), and the watch closing revoked users' sockets."""
    s = app[SETTINGS]
    tokens = app[TOKENS] = Tokens(load_or_create_secret(s.edge.token_secret, s.data_dir), s.edge.token_ttl,
                                  s.data_dir, s.edge.session_ttl)
    watch = asyncio.create_task(api.watch_revocations(app), name="edge-revocations")
    try:
        yield
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        tokens.close()


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
            app[BROKER] = handle.broker
            # The bridge is in the broker's process: an in-process link, not a loopback MQTT client.
            client: aiomqtt.Client | LocalLink = LocalLink(handle.broker)
        else:
            client = client_from_settings(s.mqtt, identifier=s.mqtt.username or "edge", data_dir=s.data_dir)
        bridge = Bridge(s, app[STORE], client)
        app[BRIDGE] = bridge
        task = asyncio.create_task(bridge.run(), name="edge-bridge")
        try:
            if not await bridge.wait_connected(10):
                log.warning("edge: MQTT not connected yet; continuing and retrying in the background")
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _close_websockets(app: web.Application) -> None:
    for sess in list(app[SESSIONS]):
        await sess.ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")


class _ServerLog:
    """aiohttp's server logger: a malformed request (a bad request line or header, garbage, TLS on the plain
    port) is a rate-limited WARNING line without a traceback (a flood of them must not flood the log); anything
    else (a bug in a handler) is logged as before, with its traceback."""

    def __init__(self, base: logging.Logger) -> None:
        self._base = base

    def exception(self, msg: str, *args: object, exc_info: object = True, **kw: object) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            api.quiet_log("malformed", "edge: malformed HTTP request from %s: %s", args[0] if args else "?",
                           str(exc).replace("\n", " ")[:200])
            return
        self._base.exception(msg, *args, exc_info=exc_info, **kw)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._base, name)


def _limit_per_ip(runner: web.AppRunner, cap: int) -> None:
    """At most ``cap`` open connections per peer address (edge.max_conns_per_ip); more are closed at once.
    Loopback peers are not counted: a reverse proxy on the same host (every connection comes from it) and local
    tools such as the bench must not be capped; limit per client in the proxy instead."""
    server = runner.server
    assert server is not None
    counts: dict[str, int] = {}
    made, lost = server.connection_made, server.connection_lost
    peers: dict[object, str] = {}
    last_log = [0.0]

    def connection_made(handler: object, transport: asyncio.Transport) -> None:
        made(handler, transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else "?"
        if api.is_loopback(ip):
            return
        if counts.get(ip, 0) >= cap:
            if time.monotonic() - last_log[0] > 10:
                last_log[0] = time.monotonic()
                log.warning("edge: %s has %d HTTP connections open (edge.max_conns_per_ip); refusing more", ip, cap)
            transport.abort()
            return
        counts[ip] = counts.get(ip, 0) + 1
        peers[handler] = ip

    def connection_lost(handler: object, exc: BaseException | None = None) -> None:
        ip = peers.pop(handler, None)
        if ip is not None:
            counts[ip] -= 1
            if not counts[ip]:
                del counts[ip]
        lost(handler, exc)  # type: ignore[arg-type]

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def run_edge(settings: Settings) -> AsyncIterator[web.Application]:
    """Start the edge (HTTP + bridge + embedded broker), yield the app, then shut down in order."""
    secure_tree(settings.data_dir)  # files 0600, directories 0700 (core.perms)
    app = create_app(settings)
    log.info("edge: waiting for application startup")
    # keepalive_timeout: aiohttp arms it at connection start and after each response, and closes the connection
    # if no complete request (line + headers) has arrived when it fires -- that is the header timeout, and the
    # idle keep-alive limit too. Request bodies: api.body_timeout.
    runner, app[INFO].http_port = await start_http(
        app, settings.edge.http, "edge", on_setup=lambda r: _limit_per_ip(r, settings.edge.max_conns_per_ip),
        keepalive_timeout=settings.edge.header_timeout_s, logger=_ServerLog(logging.getLogger("aiohttp.server")))
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
