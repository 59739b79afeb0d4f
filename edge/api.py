"""Client API: ``/api/login``, ``/api/ws`` (streaming), ``/api/tasks``, ``/healthz``, ``/metrics``, chat page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

import wire

from .bridge import Bridge, LiveTask, done_frame
from .keys import BRIDGE, SESSIONS, SETTINGS, STORE, TOKENS
from .store import StoreFull

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_ASK_CHARS = 8000
STORE_FULL_MSG = "服务器 A 存储已满，暂时无法接收新问题，请联系管理员。"
WS_QUEUE = 1024  # frames buffered per WebSocket before it is judged too slow and closed ...
WS_QUEUE_CHARS = 2 * 1024 * 1024  # ... or this many characters of text (≤ 6 MB of UTF-8) in them
_json = msgspec.json.Encoder()
DIRECT_BUFFER = 64 * 1024  # WsSession writes a frame at once only while the transport holds at most this
_LEN1 = struct.Struct("!BB").pack  # RFC 6455 frame header: FIN + opcode, 7-bit length
_LEN2 = struct.Struct("!BBH").pack  # ... 16-bit length
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


# ---- HTTP ------------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    body = {"ok": bridge.connected, "mqtt": bridge.connected, "node_online": bridge.node_online,
            "nodes": {k: {"state": v.state, "active": v.active, "capacity": v.capacity}
                      for k, v in bridge.nodes.items()},
            "live_tasks": bridge.open_count}
    return web.json_response(body, status=200 if bridge.connected else 503)


async def login(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return _err(400, "bad_json", "请求体不是有效的 JSON")
    if not isinstance(body, dict):
        return _err(400, "bad_json", "请求体必须是 JSON 对象")
    if "dev_user" in body:
        if not s.edge.dev_login:
            return _err(403, "dev_login_disabled", "未启用开发登录（edge.dev_login = false）")
        name = body["dev_user"]
        if not isinstance(name, str) or not _DEV_USER.fullmatch(name):
            return _err(400, "bad_user", "用户名只能包含字母、数字、_、@、-，最多 64 个字符")
        uid = f"web.{name}"
    elif "code" in body:
        return _err(501, "miniapp_login_unavailable", "小程序登录尚未配置（[miniapp] appid/secret）")
    else:
        return _err(400, "missing_code", "缺少 code")
    token, expires = request.app[TOKENS].issue(uid)
    return web.json_response({"token": token, "uid": uid, "expires": expires})


def _auth_uid(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    return request.app[TOKENS].verify(token) if token else None


async def list_tasks(request: web.Request) -> web.Response:
    uid = _auth_uid(request)
    if uid is None:
        return _err(401, "unauthorized", "未登录或登录已过期")
    try:
        limit = min(200, max(1, int(request.query.get("limit", "50"))))
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        return _err(400, "bad_query", "limit/before 必须是整数")
    recs = request.app[STORE].history(uid, limit=limit, before_ts=before)
    return web.json_response({"tasks": [r.to_api() for r in recs]})


async def get_task(request: web.Request) -> web.Response:
    uid = _auth_uid(request)
    if uid is None:
        return _err(401, "unauthorized", "未登录或登录已过期")
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
    b = request.app[BRIDGE]
    st = b.stats
    lines = [
        "# TYPE claw_edge_tasks_published_total counter", f"claw_edge_tasks_published_total {st.published}",
        "# TYPE claw_edge_tasks_republished_total counter", f"claw_edge_tasks_republished_total {st.republished}",
        "# TYPE claw_edge_replies_total counter", f"claw_edge_replies_total {st.replies}",
        "# TYPE claw_edge_batches_total counter", f"claw_edge_batches_total {st.batches}",
        "# TYPE claw_edge_duplicates_total counter", f"claw_edge_duplicates_total {st.duplicates}",
        "# TYPE claw_edge_gaps_total counter", f"claw_edge_gaps_total {st.gaps}",
        "# TYPE claw_edge_replay_asks_total counter", f"claw_edge_replay_asks_total {st.replay_asks}",
        "# TYPE claw_edge_redispatched_total counter", f"claw_edge_redispatched_total {st.redispatched}",
        "# TYPE claw_edge_bad_messages_total counter", f"claw_edge_bad_messages_total {st.bad_messages}",
        "# TYPE claw_edge_tasks_finished_total counter",
        *[f'claw_edge_tasks_finished_total{{status="{k}"}} {v}' for k, v in sorted(st.finished.items())],
        "# TYPE claw_edge_live_tasks gauge", f"claw_edge_live_tasks {b.open_count}",
        "# TYPE claw_edge_recent_tasks gauge", f"claw_edge_recent_tasks {len(b.live)}",
        "# TYPE claw_edge_ws_sessions gauge", f"claw_edge_ws_sessions {len(request.app[SESSIONS])}",
        "# TYPE claw_edge_node_online gauge", f"claw_edge_node_online {int(b.node_online)}",
        "# TYPE claw_edge_mqtt_connected gauge", f"claw_edge_mqtt_connected {int(b.connected)}",
        *b.stages.prometheus("claw_edge_stage_seconds",
                             "Stage latency of answers seen by the edge, from the wire timing stamps (seconds)"),
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


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

    def __init__(self, ws: web.WebSocketResponse, uid: str, transport: asyncio.Transport | None = None) -> None:
        self.ws = ws
        self.uid = uid
        self.transport = transport
        self._busy = False  # the writer task is sending a frame
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(WS_QUEUE)
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

    def push(self, frame: dict[str, Any]) -> None:
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
                tr.write((_LEN1(0x81, n) if n < 126 else _LEN2(0x81, 126, n)) + data)
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


async def ws_handler(request: web.Request) -> web.StreamResponse:
    uid = _auth_uid(request)
    if uid is None:
        return _err(401, "unauthorized", "未登录或登录已过期")
    app = request.app
    sessions = app[SESSIONS]
    if sum(1 for s in sessions if s.uid == uid) >= app[SETTINGS].edge.max_ws_per_user:
        return _err(429, "too_many_sockets", "同一用户的连接过多")
    # compress=False: frames are written by WsSession as they are (see there); the deltas are small anyway.
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=64 * 1024, compress=False)
    await ws.prepare(request)
    bridge = app[BRIDGE]
    sess = WsSession(ws, uid, request.transport)
    sessions.add(sess)
    bridge.presence.add(sess)
    sess.push({"type": "node", "online": bridge.node_online})
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await _on_frame(app, bridge, sess, msg.data)
            elif msg.type == WSMsgType.BINARY:
                sess.push({"type": "error", "code": "bad_frame", "message": "只接受 JSON 文本帧"})
    finally:
        bridge.detach_all(sess)
        sessions.discard(sess)
        await sess.close()
    return ws


async def _on_frame(app: web.Application, bridge: Bridge, sess: WsSession, data: str) -> None:
    try:
        frame = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep (a 64 KiB frame can)
        sess.push({"type": "error", "code": "bad_json", "message": "帧不是有效的 JSON"})
        return
    if not isinstance(frame, dict):
        sess.push({"type": "error", "code": "bad_frame", "message": "帧必须是 JSON 对象"})
        return
    kind = frame.get("type")
    if kind == "ask":
        await _ask(app, bridge, sess, frame)
    elif kind == "stop":
        tid = _task_id(sess, frame.get("task"))
        if tid is not None and not bridge.cancel(tid, sess.uid):
            sess.push({"type": "error", "code": "not_running", "message": "该任务不在进行中", "task": frame.get("task")})
    elif kind == "resume":
        _resume(app, bridge, sess, frame)
    elif kind == "ping":
        sess.push({"type": "pong"})
    else:
        sess.push({"type": "error", "code": "bad_type", "message": f"未知的帧类型: {str(kind)[:32]}"})


def _task_id(sess: WsSession, value: Any) -> bytes | None:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        sess.push({"type": "error", "code": "bad_task_id", "message": "任务 ID 应为 32 位十六进制"})
        return None
    return bytes.fromhex(value)


async def _ask(app: web.Application, bridge: Bridge, sess: WsSession, frame: dict[str, Any]) -> None:
    text = frame.get("text")
    if not isinstance(text, str) or not text.strip():
        sess.push({"type": "error", "code": "empty", "message": "问题不能为空"})
        return
    if len(text) > MAX_ASK_CHARS:
        sess.push({"type": "error", "code": "too_long", "message": f"问题过长（最多 {MAX_ASK_CHARS} 字）"})
        return
    conv = frame.get("conv")
    if conv is not None and (not isinstance(conv, str) or len(conv) > 64):
        sess.push({"type": "error", "code": "bad_conv", "message": "conv 必须是不超过 64 字符的字符串"})
        return
    tid = None
    if frame.get("id") is not None:
        tid = _task_id(sess, frame.get("id"))
        if tid is None:
            return
    if bridge.pending(sess.uid) >= app[SETTINGS].edge.max_pending_per_user and (tid is None or bridge.get(tid) is None):
        sess.push({"type": "error", "code": "rate_limited",
                   "message": f"进行中的问题过多（最多 {app[SETTINGS].edge.max_pending_per_user} 个），请稍候"})
        return
    try:
        live = await bridge.submit(sess.uid, sess.uid.partition(".")[0], text, conv, tid, hold=True)
    except PermissionError:
        sess.push({"type": "error", "code": "forbidden", "message": "该任务 ID 属于其他用户"})
        return
    except wire.WireError as exc:
        sess.push({"type": "error", "code": "bad_task", "message": f"任务无效: {exc}"})
        return
    except StoreFull:  # not recorded, so not acknowledged: nothing is lost silently
        sess.push({"type": "error", "code": "store_full", "message": STORE_FULL_MSG})
        return
    sess.push({"type": "accepted", "task": live.hex, "queue": live.stream.queue})
    if not bridge.node_online:
        sess.push({"type": "node", "online": False})
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
        sess.push({"type": "delta", "task": live.hex, "seq": seq, "text": text})
    if live.finished_at is not None:
        sess.push(done_frame(live.rec) | {"seq": live.stream.next_seq - 1})


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
            sess.push({"type": "delta", "task": live.hex, "seq": sent, "text": parts[sent - 1]})
        if live.finished_at is not None:
            if await sess.room(len(live.rec.answer) * 2):  # the done carries the whole answer: queue it alone
                sess.push(done_frame(live.rec) | {"seq": live.stream.next_seq - 1})
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
        sess.push({"type": "error", "code": "bad_seq", "message": "seq 必须是非负整数"})
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
        sess.push({"type": "error", "code": "not_found", "message": "没有这个任务", "task": frame.get("task")})
        return
    sess.push(done_frame(rec))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/login", login)
    app.router.add_get("/api/ws", ws_handler)
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_get("/api/tasks/{id}", get_task)
