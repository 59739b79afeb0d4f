"""Client API: ``/api/login``, ``/api/refresh``, ``/api/ws-ticket``, ``/api/ws`` (streaming), ``/api/tasks``,
``/healthz``, ``/metrics``, chat page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import math
import re
import time
import weakref
from pathlib import Path
from typing import Any

import lmdb
import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

import wire
from core.metrics import CONTENT_TYPE, exposition
from core.wsframe import server_frame

from .auth import Claims
from . import frames
from .bridge import Bridge
from .frames import Frame
from .keys import BRIDGE, SETTINGS, STORE, TOKENS
from .metrics import METRICS, edge_registry
from .miniapp import CODE_RE, MINIAPP, LoginError, miniapp_ctx
from .store import StoreFull
from .tasks import LiveTask

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_ASK_CHARS = 8000
STORE_FULL_MSG = "服务器 A 存储已满，暂时无法接收新问题，请联系管理员。"
WS_QUEUE = 1024  # frames buffered per WebSocket before it is judged too slow and closed ...
WS_QUEUE_CHARS = 2 * 1024 * 1024  # ... or this many characters of text (≤ 6 MB of UTF-8) in them
_json = frames.ENCODER  # client frames are encoded by edge.frames' one encoder
DIRECT_BUFFER = 64 * 1024  # WsSession writes a frame at once only while the transport holds at most this
_HEX32 = re.compile(r"[0-9a-f]{32}")
_DEV_USER = re.compile(r"[A-Za-z0-9_@-]{1,64}")


def _err(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


MAX_BODY = 256 * 1024  # the largest request body the edge reads (the app's client_max_size)
# The errors aiohttp itself raises (router, body limit), in the API's JSON shape. WeCom's callback keeps its own
# plain answers (WeCom reads only the status).
_HTTP_ERRORS = {
    400: ("bad_request", "请求格式不正确"),
    404: ("not_found", "没有这个地址"),
    405: ("method_not_allowed", "不支持该请求方法"),
    413: ("too_large", "请求体过大"),
}


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn the HTTP errors raised by aiohttp (404, 405, 413 …) into ``{"error": {"code", "message"}}``."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json" or request.path.startswith("/wecom/"):
            raise
        code, message = _HTTP_ERRORS.get(exc.status, (f"http_{exc.status}", exc.reason))
        if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
            message += f"（允许：{', '.join(sorted(exc.allowed_methods))}）"
        elif exc.status == 413:
            message += f"（上限 {MAX_BODY // 1024} KiB）"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response({"error": {"code": code, "message": message}}, status=exc.status,
                                 headers=headers)


@web.middleware
async def body_timeout(request: web.Request, handler: Any) -> web.StreamResponse:
    """Read a request's body within ``edge.body_timeout_s`` (a slow sender is answered 408 and cut off) before
    its handler runs. (Headers: aiohttp's keep-alive timer, set to ``edge.header_timeout_s``, closes a
    connection whose request line and headers have not arrived; see edge.app.) WeCom's callback reads its
    own body, under the same timeout (edge.wecom.channel)."""
    if request.can_read_body and not request.path.startswith("/wecom/"):
        try:
            async with asyncio.timeout(request.app[SETTINGS].edge.body_timeout_s):
                await request.read()
        except TimeoutError:
            quiet_log("body_timeout", "edge: request body from %s not received within %g s; closing",
                       request.remote, request.app[SETTINGS].edge.body_timeout_s)
            resp = _err(408, "body_timeout", "请求体接收超时")
            resp.force_close()
            return resp
    return await handler(request)


_QUIET: dict[str, list[float]] = {}  # kind -> [last logged (monotonic), lines suppressed since]
QUIET_EVERY_S = 10.0


def quiet_log(kind: str, msg: str, *args: Any) -> None:
    """A WARNING about a misbehaving client, at most one per QUIET_EVERY_S per kind (a flood of them must not
    flood the log), with the number suppressed since the last one."""
    now = time.monotonic()
    slot = _QUIET.setdefault(kind, [-math.inf, 0])
    if now - slot[0] < QUIET_EVERY_S:
        slot[1] += 1
        return
    more = f" (+{int(slot[1])} similar in the last {QUIET_EVERY_S:g} s)" if slot[1] else ""
    slot[0], slot[1] = now, 0
    log.warning(msg + more, *args)


# ---- HTTP ------------------------------------------------------------------------------------
def _privileged(request: web.Request) -> bool:
    """A loopback peer, or ``Authorization: Bearer <edge.metrics_token>``. X-Forwarded-For is not trusted: behind
    a reverse proxy on the same host every peer is loopback (docs/deploy.md: keep /metrics off the proxy)."""
    token = request.app[SETTINGS].edge.metrics_token
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token.encode()):
        return True
    return is_loopback(request.remote or "")


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or ::ffff:127.x.y.z (an IPv4 loopback peer on a dual-stack socket)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


async def healthz(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    status = 200 if bridge.connected else 503
    if not _privileged(request):
        return web.json_response({"ok": bridge.connected}, status=status)
    body = {"ok": bridge.connected, "mqtt": bridge.connected, "node_online": bridge.node_online,
            "nodes": {k: {"state": bridge.node_state(v), "active": v.active, "capacity": v.capacity}
                      for k, v in bridge.nodes.items()},
            "live_tasks": bridge.open_count}
    return web.json_response(body, status=status)


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return _err(400, "bad_json", "请求体不是有效的 JSON")
    if not isinstance(body, dict):
        return _err(400, "bad_json", "请求体必须是 JSON 对象")
    return body


async def login(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    if "dev_user" in body:
        if not s.edge.dev_login:
            return _err(403, "dev_login_disabled", "未启用开发登录（edge.dev_login = false）")
        name = body["dev_user"]
        if not isinstance(name, str) or not _DEV_USER.fullmatch(name):
            return _err(400, "bad_user", "用户名只能包含字母、数字、_、@、-，最多 64 个字符")
        uid = f"web.{name}"
    elif "code" in body:
        if not s.miniapp.enabled:
            return _err(501, "miniapp_login_unavailable", "小程序登录尚未配置：请在服务器 A 的配置文件 [miniapp] 中"
                        "设置 appid 和 secret（或 secret_file）")
        code = body["code"]
        if not isinstance(code, str) or not code:
            return _err(400, "missing_code", "缺少 code（请先调用 wx.login）")
        if not CODE_RE.fullmatch(code):
            return _err(400, "bad_code", "code 格式不正确（最多 128 个可见 ASCII 字符）")
        try:
            openid = await request.app[MINIAPP].openid(code)
        except LoginError as exc:
            body_err = {"code": exc.code, "message": exc.message}
            if exc.errcode is not None:
                body_err["errcode"] = exc.errcode
            headers = {"Retry-After": "60"} if exc.status == 429 else None  # WeChat: 100 calls/user/minute
            return web.json_response({"error": body_err}, status=exc.status, headers=headers)
        uid = f"mp.{openid}"
    elif "pat" in body:
        return await _pat_login(request, body["pat"])
    else:
        return _err(400, "missing_code", "缺少 code")
    try:
        return web.json_response(await request.app[TOKENS].login(uid))
    except lmdb.Error as exc:
        log.error("edge: cannot store a login session in auth.lmdb: %s", exc)
        return _err(503, "auth_store", "服务器暂时无法登录，请稍后再试")


PAT_INVALID_MSG = "个人令牌无效、已过期或已被吊销：请向管理员申请新的令牌（claw token issue）"


async def _pat_login(request: web.Request, value: Any) -> web.Response:
    """``{"pat": "pat_..."}`` (claw token issue) -> the usual pair. Failures are throttled per client address:
    over the budget the token is not even looked at (429), so personal tokens cannot be guessed online."""
    tokens = request.app[TOKENS]
    ip = request.remote or ""
    wait = tokens.pat_throttle.retry_after(ip)
    if wait > 0:
        quiet_log("pat_throttled", "edge: personal-token sign-ins from %s throttled after repeated failures", ip)
        return web.json_response({"error": {"code": "pat_throttled", "message": "个人令牌登录失败次数过多，请稍后再试"}},
                                 status=429, headers={"Retry-After": str(math.ceil(wait))})
    if not isinstance(value, str) or not value:
        return _err(400, "missing_pat", "缺少个人令牌（pat）")
    # checked and, if wrong, charged before anything is awaited: guesses sent at once cannot all pass the
    # throttle before the first of them has failed
    try:
        got = await tokens.login_pat(value) if tokens.pat_valid(value) else None
    except lmdb.Error as exc:
        log.error("edge: cannot store a login session in auth.lmdb: %s", exc)
        return _err(503, "auth_store", "服务器暂时无法登录，请稍后再试")
    if got is None:
        tokens.pat_throttle.failed(ip)
        quiet_log("pat_invalid", "edge: sign-in with an unknown, revoked or expired personal token from %s", ip)
        return _err(401, "pat_invalid", PAT_INVALID_MSG)
    return web.json_response(got)


async def _refresh_field(request: web.Request) -> str | None | web.Response:
    """The body's ``refresh`` token: the error response for a bad body, None when absent or malformed."""
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    value = body.get("refresh")
    return value if isinstance(value, str) and value and len(value) <= 256 else None


async def refresh(request: web.Request) -> web.Response:
    """``{refresh}`` → a new ``{token, expires, refresh, refresh_expires}``; the refresh token given is used up."""
    value = await _refresh_field(request)
    if isinstance(value, web.Response):
        return value
    if value is None:
        return _err(400, "missing_refresh", "缺少 refresh")
    try:
        got = await request.app[TOKENS].refresh(value)
    except lmdb.Error as exc:
        log.error("edge: cannot renew a login session in auth.lmdb: %s", exc)
        return _err(503, "auth_store", "服务器暂时无法续期登录，请稍后再试")
    if got is None:
        return _err(401, "refresh_invalid", "登录已失效，请重新登录")
    return web.json_response(got)


async def logout(request: web.Request) -> web.Response:
    value = await _refresh_field(request)
    if isinstance(value, web.Response):
        return value
    if value is not None:
        await request.app[TOKENS].logout(value)
    return web.json_response({"ok": True})


UNAUTHORIZED = (401, "unauthorized", "未登录或登录已过期")
TOKEN_IN_QUERY = (401, "token_in_query", "令牌不能放在网址中：请使用 Authorization: Bearer 请求头")


def _bearer(request: web.Request) -> Claims | web.Response:
    """The claims of the request's ``Authorization: Bearer`` access token, or the 401 to answer. A token in the
    query (``?token=``, which ends up in proxy logs) is refused outside ``/api/ws``."""
    if "token" in request.query:
        return _err(*TOKEN_IN_QUERY)
    header = request.headers.get("Authorization", "")
    claims = request.app[TOKENS].check(header[7:]) if header.startswith("Bearer ") else None
    return claims if claims is not None else _err(*UNAUTHORIZED)


async def ws_ticket(request: web.Request) -> web.Response:
    """A one-time ticket (30 s) for ``GET /api/ws?ticket=``, so the access token stays out of URLs."""
    claims = _bearer(request)
    if isinstance(claims, web.Response):
        return claims
    got = request.app[TOKENS].ticket(claims)
    if got is None:
        return _err(429, "too_many_tickets", "请求过于频繁，请稍后再试")
    return web.json_response({"ticket": got[0], "expires": got[1]})


MAX_TS = 2**63 - 1  # the store's key holds a 64-bit timestamp


async def list_tasks(request: web.Request) -> web.Response:
    claims = _bearer(request)
    if isinstance(claims, web.Response):
        return claims
    uid = claims.uid
    try:
        # limit is clamped to 1..200; before (ms since the epoch) to 0..2^63-1 (1e30 or -5 are not errors)
        limit = min(200, max(1, int(request.query.get("limit", "50"))))
        before = None
        if "before" in request.query:
            raw = request.query["before"]
            try:
                value = int(raw)
            except ValueError:
                num = float(raw)
                if math.isnan(num):
                    raise
                value = MAX_TS if num > MAX_TS else 0 if num < 0 else int(num)
            before = min(MAX_TS, max(0, value))
    except ValueError:
        return _err(400, "bad_query", "limit/before 必须是数字")
    recs = request.app[STORE].history(uid, limit=limit, before_ts=before)
    return web.json_response({"tasks": [r.to_api() for r in recs]})


async def get_task(request: web.Request) -> web.Response:
    claims = _bearer(request)
    if isinstance(claims, web.Response):
        return claims
    uid = claims.uid
    tid_hex = request.match_info["id"]
    if not _HEX32.fullmatch(tid_hex):
        return _err(400, "bad_task_id", "任务 ID 应为 32 位十六进制")
    rec = request.app[STORE].get(bytes.fromhex(tid_hex))
    if rec is None or rec.uid != uid:
        return _err(404, "not_found", "没有这个任务")
    out = rec.to_api()
    live = request.app[BRIDGE].get(rec.id)
    if live is not None and live.finished_at is None:
        out["answer"] = live.stream.text
    return web.json_response(out)


async def metrics(request: web.Request) -> web.Response:
    if not _privileged(request):
        return _err(403, "forbidden", "仅限本机或持有监控令牌（edge.metrics_token）访问")
    return web.Response(body=exposition(request.app[METRICS]), headers={"Content-Type": CONTENT_TYPE})


# The page's own files only (no directory listing, no path from the request reaches the file system); revalidated
# on every load (ETag), so an upgraded edge never runs with a stale script. The page's CSP allows no inline script
# and nothing from other origins (its Markdown escapes everything; this is the second fence). connect-src names
# ws(s)://host as well as 'self', which older WebKit (iOS WeCom) does not apply to WebSocket URLs.
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}  # not the OS's MIME table
STATIC_FILES = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES}
STATIC_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


async def index(request: web.Request) -> web.FileResponse:
    host = request.host if _HOST.fullmatch(request.host or "") else ""
    sockets = f" ws://{host} wss://{host}" if host else ""
    csp = (f"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"
           f"{sockets}; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
    return web.FileResponse(STATIC / "index.html", headers=STATIC_HEADERS | {
        "Content-Type": "text/html; charset=utf-8", "Referrer-Policy": "no-referrer", "Content-Security-Policy": csp})


async def static_file(request: web.Request) -> web.FileResponse:
    path = STATIC_FILES.get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers=STATIC_HEADERS | {"Content-Type": _TYPES[path.suffix]})


# ---- WebSocket -------------------------------------------------------------------------------
class WsSession:
    """One client socket: frames are written at once while the socket keeps up, else queued in a bounded
    queue drained by one writer task.

    The direct write (``transport`` given): a frame under 64 KiB, with nothing queued before it and at most
    ``DIRECT_BUFFER`` bytes waiting in the transport, is framed here (RFC 6455, unmasked, no compression:
    the socket is made with ``compress=False``) and written in the same pass, with no queue, task wake or
    coroutine per frame; measured in the bench sweep, that was ~10 µs of the edge's CPU per delta. Anything
    else -- a reader falling behind, a large frame -- takes the queue, which keeps the order (a direct write
    only happens when the queue is empty and its writer idle) and the bounds.
    """

    def __init__(self, ws: web.WebSocketResponse, uid: str, transport: asyncio.Transport | None = None,
                 claims: Claims | None = None) -> None:
        self.ws = ws
        self.uid = uid
        self.claims = claims  # what opened it: rechecked every WS_CHECK_S (a revoke closes the socket)
        self.transport = transport
        self._busy = False  # the writer task is sending a frame
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue(WS_QUEUE)
        self.overflowed = False
        self.queued_chars = 0  # text waiting in ``queue`` (chunks can be up to 64 KiB each)
        self.floor: dict[str, int] = {}  # task -> the seq this client resumed from (it has everything up to it)
        self.replaying: dict[str, asyncio.Task[None]] = {}  # task -> its paced replay to this client (_follow)
        self._drained = asyncio.Event()
        self.writer = asyncio.create_task(self._write())

    async def room(self, chars: int) -> bool:
        """Wait until the queue is at most half full and ``chars`` more fit under half the character bound
        (an empty queue always has room); False once the socket is gone."""
        while self.queued_chars and (self.queue.qsize() > WS_QUEUE // 2
                                     or self.queued_chars + chars > WS_QUEUE_CHARS // 2):
            if self.overflowed or self.writer.done():
                return False
            self._drained.clear()
            await self._drained.wait()
        return not (self.overflowed or self.writer.done())

    @property
    def sending(self) -> bool:
        """The writer task is sending a queued frame (a direct write is not possible meanwhile)."""
        return self._busy

    def push(self, frame: Frame) -> None:
        if self.overflowed:
            return
        if self.floor and frame["type"] == "delta" and frame["seq"] <= self.floor.get(frame["task"], 0):
            return  # replayed by the node after an edge restart: this client has it already
        # A done frame carries the whole answer (one string the edge holds anyway): it never counts against
        # the bound, or a client keeping up would be cut off by the end of a long answer.
        size = 0 if frame["type"] == "done" else len(frame.get("text") or "")
        tr = self.transport
        if tr is not None and not self._busy and not self.queue.qsize() and size < 16384:
            if self.ws.closed or tr.is_closing():
                return  # the socket is going: the writer would drop it too
            data = _json.encode(frame)
            n = len(data)
            if n < 65536 and tr.get_write_buffer_size() <= DIRECT_BUFFER:
                tr.write(server_frame(data))
                return
        try:
            if self.queued_chars + size > WS_QUEUE_CHARS and self.queued_chars:
                raise asyncio.QueueFull
            self.queue.put_nowait(frame)
            self.queued_chars += size
        except asyncio.QueueFull:
            # A client that cannot keep up is disconnected (it can resume), never allowed to grow memory.
            self.overflowed = True
            log.warning("edge: ws %s too slow (%d frames, %d characters queued); closing", self.uid,
                        self.queue.qsize(), self.queued_chars)
            asyncio.ensure_future(self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow; resume"))

    async def _write(self) -> None:
        try:
            while True:
                frame = await self.queue.get()
                if frame is None:
                    return
                if frame["type"] != "done":
                    self.queued_chars -= len(frame.get("text") or "")
                self._busy = True
                try:
                    await self.ws.send_str(_json.encode(frame).decode())
                finally:
                    self._busy = False
                self._drained.set()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._drained.set()  # a paced replay waiting for room sees the socket is gone

    async def close(self) -> None:
        for job in list(self.replaying.values()):
            job.cancel()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.writer, 2)


SESSIONS = web.AppKey("sessions", weakref.WeakSet[WsSession])  # the open client sockets


def allowed_origins(settings: Any) -> set[str]:
    """``edge.public_url``'s origin and ``edge.allowed_origins``, normalised (lower case, no trailing slash)."""
    return {o.rstrip("/").lower() for o in ([settings.edge.public_url] if settings.edge.public_url else [])
            + list(settings.edge.allowed_origins)}


def origin_ok(request: web.Request) -> bool:
    """No Origin (not a browser), the same host as the request's Host header, or an allowed origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed_origins(request.app[SETTINGS]):
        return True
    scheme, sep, authority = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and authority == (request.host or "").lower()


def _ws_claims(request: web.Request) -> Claims | None:
    """``?ticket=`` (one use), else ``Authorization: Bearer``, else ``?token=`` (kept for non-browser clients;
    the access token is short-lived, but a ticket keeps it out of URLs)."""
    tokens = request.app[TOKENS]
    if "ticket" in request.query:
        return tokens.take_ticket(request.query["ticket"])
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    return tokens.check(token) if token else None


WS_CHECK_S = 10.0  # open sockets are checked against revocations this often
WS_REVOKED = 4401  # close code: the user's tokens were revoked (log in again)


async def watch_revocations(app: web.Application) -> None:
    """Close every open socket whose user's tokens were revoked (``claw token revoke``), within WS_CHECK_S.
    An access token that merely expires does not end a socket it opened: it authenticated the handshake."""
    tokens = app[TOKENS]
    while True:
        await asyncio.sleep(WS_CHECK_S)
        for sess in list(app[SESSIONS]):
            if sess.claims is not None and not sess.ws.closed and not tokens.still_valid(sess.claims):
                log.info("edge: closing a WebSocket of %s: tokens revoked", sess.uid)
                with contextlib.suppress(Exception):
                    await sess.ws.close(code=WS_REVOKED, message=b"token revoked")


async def ws_handler(request: web.Request) -> web.StreamResponse:
    if not origin_ok(request):
        quiet_log("origin", "edge: WebSocket from a foreign origin %r refused [%s]",
                   request.headers.get("Origin", "")[:100], request.remote)
        return _err(403, "bad_origin", "不允许从该网站连接")
    claims = _ws_claims(request)
    if claims is None:
        return _err(*UNAUTHORIZED)
    uid = claims.uid
    app = request.app
    sessions = app[SESSIONS]
    if sum(1 for s in sessions if s.uid == uid) >= app[SETTINGS].edge.max_ws_per_user:
        return _err(429, "too_many_sockets", "同一用户的连接过多")
    # compress=False: frames are written by WsSession as they are (see there); the deltas are small anyway.
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=64 * 1024, compress=False)
    await ws.prepare(request)
    bridge = app[BRIDGE]
    sess = WsSession(ws, uid, request.transport, claims)
    sessions.add(sess)
    bridge.presence.add(sess)
    sess.push(frames.node(bridge.node_online))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await _on_frame(app, bridge, sess, msg.data)
            elif msg.type == WSMsgType.BINARY:
                sess.push(frames.error("bad_frame", "只接受 JSON 文本帧"))
    finally:
        bridge.detach_all(sess)
        sessions.discard(sess)
        await sess.close()
    return ws


async def _on_frame(app: web.Application, bridge: Bridge, sess: WsSession, data: str) -> None:
    try:
        frame = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep (a 64 KiB frame can)
        sess.push(frames.error("bad_json", "帧不是有效的 JSON"))
        return
    if not isinstance(frame, dict):
        sess.push(frames.error("bad_frame", "帧必须是 JSON 对象"))
        return
    kind = frame.get("type")
    if kind == "ask":
        await _ask(app, bridge, sess, frame)
    elif kind == "stop":
        tid = _task_id(sess, frame.get("task"))
        if tid is not None and not bridge.cancel(tid, sess.uid):
            sess.push(frames.error("not_running", "该任务不在进行中", frame.get("task")))
    elif kind == "resume":
        _resume(app, bridge, sess, frame)
    elif kind == "ping":
        sess.push(frames.pong())
    else:
        sess.push(frames.error("bad_type", f"未知的帧类型: {str(kind)[:32]}"))


def _task_id(sess: WsSession, value: Any) -> bytes | None:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        sess.push(frames.error("bad_task_id", "任务 ID 应为 32 位十六进制"))
        return None
    return bytes.fromhex(value)


async def _ask(app: web.Application, bridge: Bridge, sess: WsSession, frame: dict[str, Any]) -> None:
    text = frame.get("text")
    if not isinstance(text, str) or not text.strip():
        sess.push(frames.error("empty", "问题不能为空"))
        return
    if len(text) > MAX_ASK_CHARS:
        sess.push(frames.error("too_long", f"问题过长（最多 {MAX_ASK_CHARS} 字）"))
        return
    conv = frame.get("conv")
    if conv is not None and (not isinstance(conv, str) or len(conv) > 64):
        sess.push(frames.error("bad_conv", "conv 必须是不超过 64 字符的字符串"))
        return
    tid = None
    if frame.get("id") is not None:
        tid = _task_id(sess, frame.get("id"))
        if tid is None:
            return
    if bridge.pending(sess.uid) >= app[SETTINGS].edge.max_pending_per_user and (tid is None or bridge.get(tid) is None):
        sess.push(frames.error("rate_limited",
                               f"进行中的问题过多（最多 {app[SETTINGS].edge.max_pending_per_user} 个），请稍候"))
        return
    try:
        live = await bridge.submit(sess.uid, sess.uid.partition(".")[0], text, conv, tid, hold=True)
    except PermissionError:
        sess.push(frames.error("forbidden", "该任务 ID 属于其他用户"))
        return
    except wire.WireError as exc:
        sess.push(frames.error("bad_task", f"任务无效: {exc}"))
        return
    except StoreFull:  # not recorded, so not acknowledged: nothing is lost silently
        sess.push(frames.error("store_full", STORE_FULL_MSG))
        return
    sess.push(frames.accepted(live.hex, live.stream.queue))
    if not bridge.node_online:
        sess.push(frames.node(False))
    # "trace": true (bench/diagnostics) adds a "timing" map to this task's live delta frames.
    trace = frame.get("trace") is True
    if live.held is not None:  # a new task: what its node sent before this acknowledgement follows it now
        bridge.attach(live, sess, trace=trace)
        bridge.release(live)
    else:
        _follow(bridge, live, sess, 0, trace=trace)


REPLAY_AT_ONCE = WS_QUEUE_CHARS // 4  # text a replay may queue in one go; more is paced by the client's reading


def _follow(bridge: Bridge, live: LiveTask, sess: WsSession, after: int, trace: bool = False) -> None:
    """Send ``sess`` the task's chunks after seq ``after`` (and its done if finished), then attach it for
    the live ones. A small backlog goes out at once; a big one (a resume of a long answer) is paced by how
    fast the client reads, and the socket is attached only once the replay has caught up, so live chunks
    never overtake it. A slow reader therefore slows its own replay instead of being cut off."""
    old = sess.replaying.pop(live.hex, None)
    if old is not None:
        old.cancel()  # a newer resume of the same task replaces the replay in progress
    bridge.detach(live, sess)  # attached again once this replay has caught up: live chunks never overtake it
    parts = live.stream.parts
    if sum(len(p) for p in parts[after:]) <= REPLAY_AT_ONCE:
        _replay_now(live, sess, after)
        if live.finished_at is None:
            bridge.attach(live, sess, trace=trace)
        return
    sess.replaying[live.hex] = asyncio.create_task(_replay_paced(bridge, live, sess, after, trace))


def _replay_now(live: LiveTask, sess: WsSession, after: int) -> None:
    for seq, text in enumerate(live.stream.parts[after:], start=after + 1):
        sess.push(frames.delta(live.hex, seq, text))
    if live.finished_at is not None:
        sess.push(frames.done_from_record(live.rec, live.stream.next_seq - 1))


async def _replay_paced(bridge: Bridge, live: LiveTask, sess: WsSession, after: int, trace: bool) -> None:
    try:
        sent = after
        while True:
            parts = live.stream.parts  # grows while the node streams; read again each time
            if sent >= len(parts):
                break
            if not await sess.room(len(parts[sent])):
                return
            sent += 1
            sess.push(frames.delta(live.hex, sent, parts[sent - 1]))
        if live.finished_at is not None:
            if await sess.room(len(live.rec.answer) * 2):  # the done carries the whole answer: queue it alone
                sess.push(frames.done_from_record(live.rec, live.stream.next_seq - 1))
        else:
            bridge.attach(live, sess, trace=trace)  # caught up, same tick: no live chunk can slip between
            sess.floor[live.hex] = max(sess.floor.get(live.hex, 0), sent)
    finally:
        if sess.replaying.get(live.hex) is asyncio.current_task():
            del sess.replaying[live.hex]


def _resume(app: web.Application, bridge: Bridge, sess: WsSession, frame: dict[str, Any]) -> None:
    tid = _task_id(sess, frame.get("task"))
    if tid is None:
        return
    seq = frame.get("seq", 0)
    if not isinstance(seq, int) or seq < 0:
        sess.push(frames.error("bad_seq", "seq 必须是非负整数"))
        return
    live = bridge.get(tid)
    if live is not None and live.rec.uid == sess.uid:
        sess.floor[live.hex] = seq
        if live.held is not None:  # asked a moment ago, not acknowledged yet: everything follows its ack
            bridge.attach(live, sess)
            return
        _follow(bridge, live, sess, seq)
        return
    rec = app[STORE].get(tid)
    if rec is None or rec.uid != sess.uid:
        sess.push(frames.error("not_found", "没有这个任务", frame.get("task")))
        return
    sess.push(frames.done_from_record(rec))


def add_routes(app: web.Application) -> None:
    if app[SETTINGS].miniapp.enabled:
        app.cleanup_ctx.append(miniapp_ctx)  # the jscode2session client (POST /api/login {code})
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/healthz", healthz)
    app[METRICS] = edge_registry(app, lambda: len(app[SESSIONS]))
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/refresh", refresh)
    app.router.add_post("/api/logout", logout)
    app.router.add_post("/api/ws-ticket", ws_ticket)
    app.router.add_get("/api/ws", ws_handler)
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_get("/api/tasks/{id}", get_task)
