"""``claw chat``: a terminal client for the edge's WebSocket API (answers stream as they are generated).

It keeps its connection the way the chat page does. When the socket drops mid-answer (an edge restart, a
network cut) it reconnects with a bounded exponential backoff and sends ``resume {task, seq}`` for every
unfinished answer, ``seq`` being the last chunk it printed: the rest of the answer follows, nothing is
printed twice or lost. A question typed while disconnected is sent once the connection is back. Questions
carry a client-made task id (``ask`` with ``id``), so an ask whose acknowledgement was lost with the socket is
simply sent again (the edge treats a repeated id as the same task). If the edge stays unreachable for
``reconnect_timeout`` seconds the client says so and exits 1.

Sign-in: with a personal token (``--token-file`` or env ``CLAW_TOKEN``; ``claw token issue`` on server A)
``POST /api/login {"pat"}``; otherwise dev login as ``web.<--user>`` (default: the OS user name), which only an
edge with ``edge.dev_login`` accepts -- against any other the client says how to get a token. Either way the
access token is then renewed with the rotating refresh token, and a new sign-in follows when the session is gone.

Exit codes (docs/api.md, ``claw chat``): 0 a complete answer / end of input (Ctrl-D), 1 an error answer, an
edge error or the edge unreachable, 2 an empty or too long question, 130 Ctrl-C (at the prompt, or in
one-question mode; Ctrl-C while an interactive answer streams stops that answer and returns to the prompt).
User-facing text is Simplified Chinese; answers go to stdout, status and error lines to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import getpass
import ipaddress
import os
import re
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from core.runtime import Backoff

MAX_ASK_CHARS = 8000  # the edge's limit on a question (``MAX_ASK_CHARS`` in edge/api.py; a test keeps them equal)
MAX_FRAME_BYTES = 64 * 1024  # the edge's limit on one WebSocket frame
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
RECONNECT_TIMEOUT_S = 60.0  # default: give up when the edge has been unreachable this long
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.25, 5.0  # reconnect delays: up to 0.25, 0.5, 1, 2, 4, 5, 5, ... s (jittered)
ATTEMPT_TIMEOUT_S = 10.0  # one login + WebSocket handshake
STOP_WAIT_S = 10.0  # after Ctrl-C: how long to wait for the edge to confirm the stop
HEARTBEAT_S = 20.0  # WebSocket ping interval (a half-open connection is noticed within about 1.5x this)
RENEW_BEFORE_S = 60.0  # renew the access token when it has less than this left

MSG_EMPTY = "问题不能为空。不带问题运行 claw chat 即进入交互模式。"
MSG_DISCONNECTED = "连接已断开，正在重连…"
MSG_RECONNECTED = "已重新连接。"
MSG_QUEUED = "（连接已断开：问题将在重新连接后发送）"
MSG_OFFLINE = "[助手离线：问题已排队，上线后自动回答]"
MSG_ONLINE = "[助手已上线]"
MSG_BANNER = ("智控未来 终端聊天：输入问题后回车。回答时按 Ctrl-C 停止该回答；"
              "空闲时按 Ctrl-C 退出（退出码 130），按 Ctrl-D 结束（退出码 0）。")


_NOT_NAME = re.compile(r"[^A-Za-z0-9_@-]")


def default_user() -> str:
    """The dev-login name when ``--user`` is not given: the OS user name, with characters the edge does not
    take in a name replaced by ``_`` ("" if there is none)."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError, ImportError):
        return ""
    return _NOT_NAME.sub("_", name)[:64]


def no_dev_login_message(url: str) -> str:
    return ("该服务器未开放开发登录，需要个人令牌：请管理员在服务器 A 上运行 "
            "`claw token issue web.<你的名字> --config a.toml`，把输出的令牌存入文件，再运行 "
            f"`claw chat --url {url} --token-file 文件`（或设置环境变量 CLAW_TOKEN）。\n"
            "This edge has no dev login: ask its operator for a personal token (`claw token issue web.NAME` on "
            "server A), save it to a file and run `claw chat --url URL --token-file FILE` (or set CLAW_TOKEN).")


def _plain_remote(url: str) -> bool:
    """http:// to a host that is not loopback: a personal token would cross the network in clear text."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "http":
        return False
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def ssl_context(cafile: str | None) -> ssl.SSLContext | None:
    """Verification against the system CAs (None) or against ``cafile`` (a private CA)."""
    return ssl.create_default_context(cafile=cafile) if cafile else None


class ChatError(Exception):
    """A failure to tell the user about (Chinese message) before exiting 1."""


class _Refused(ChatError):
    """The edge answered but refused (e.g. dev login disabled): trying again will not help."""


def question_problem(text: str) -> str | None:
    """Why ``text`` cannot be asked (a Chinese message), or None: the same checks as the edge's, made first."""
    if not text.strip():
        return MSG_EMPTY
    if len(text) > MAX_ASK_CHARS:
        return (f"问题过长：共 {len(text)} 字，服务器每个问题最多接受 {MAX_ASK_CHARS} 字，"
                "请缩短后重试。")
    if len(_encode({"type": "ask", "text": text, "id": "0" * 32})) > MAX_FRAME_BYTES:  # not reachable today
        return f"问题过长：超过服务器单帧 {MAX_FRAME_BYTES // 1024} KiB 的上限，请缩短后重试。"
    return None


def _encode(frame: dict[str, Any]) -> bytes:
    # ensure_ascii=False: a Chinese character is 3 bytes of UTF-8, not a 6-byte \\uXXXX escape (12 for an emoji),
    # so every question within MAX_ASK_CHARS fits the edge's 64 KiB frame limit.
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "连接超时"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"WebSocket 握手失败（HTTP {exc.status}）"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (f"服务器证书验证失败（{exc.certificate_error}）；若服务器使用私有 CA，请用 --cafile 指定该 CA 的证书 / "
                "certificate verification failed: for a private CA pass --cafile")
    return str(exc) or type(exc).__name__


async def _readline(loop: asyncio.AbstractEventLoop) -> str:
    """Read one stdin line in a daemon thread (an abandoned read must not block exit)."""
    fut: asyncio.Future[str] = loop.create_future()

    def work() -> None:
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):
            line = ""
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(line))

    threading.Thread(target=work, daemon=True).start()
    return await fut


@dataclass
class _Answer:
    id: str  # 32 hex, made here: the ask is idempotent, so it can be sent again after a reconnect
    text: str
    done: asyncio.Future[str]  # the final status: ok, error, cancelled
    accepted: bool = False  # the edge acknowledged it (recorded): after a reconnect, resume instead of ask
    seq: int = 0  # the last seq printed
    parts: list[str] = field(default_factory=list)  # what was printed, for the done frame's full text
    sent_gen: int = -1  # the connection it was last sent (asked or resumed) on
    stop: bool = False  # the user stopped it: (re)send stop after every (re)connect


class ChatClient:
    def __init__(self, url: str, user: str, out: TextIO, err: TextIO,
                 reconnect_timeout: float = RECONNECT_TIMEOUT_S, pat: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.ws_url = self.url.replace("http", "ws", 1) + "/api/ws"
        self.user = user
        self.pat = pat  # a personal token: sent at sign-in only (POST /api/login {"pat"})
        self.out = out
        self.err = err
        self.reconnect_timeout = reconnect_timeout
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.gen = 0  # connection number
        self.answers: dict[str, _Answer] = {}  # unfinished answers, by task id
        self.abandoned: set[str] = set()  # stopped while disconnected: stop is sent after the reconnect
        self.node_online = True
        self.out_at_bol = True  # stdout's last character was a newline
        self.term_at_bol = True  # ... or stderr's (what a terminal shows: both streams)
        self.prompting = False  # the prompt is shown and stdin is being read
        self.sigint = asyncio.Event()
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._conn: asyncio.Task[None] | None = None
        self.token: str | None = None  # the access token (renewed before expiry, see _access_token)
        self.token_expires = 0.0
        self.refresh: str | None = None  # the refresh token (one use: every renewal rotates it)

    # ---- output ---------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.out_at_bol = self.term_at_bol = text.endswith("\n")

    def end_line(self) -> None:
        """End stdout's current line, if any (stdout alone: an answer always ends with a newline)."""
        if not self.out_at_bol:
            self.write("\n")

    def status(self, msg: str) -> None:
        """A status/error line on stderr, on a line of its own (stdout's text is left as it is)."""
        self.err.write(("" if self.term_at_bol else "\n") + msg + "\n")
        self.err.flush()
        self.term_at_bol = True  # on a terminal (stdout and stderr together) the cursor is at a line start
        if self.prompting:
            self.write("你> ")

    # ---- connection -----------------------------------------------------------------------------
    async def _post(self, path: str, body: dict[str, Any] | None, token: str | None = None) -> tuple[int, Any]:
        assert self.session is not None
        headers = {"Authorization": f"Bearer {token}"} if token else None
        # never follow a redirect: aiohttp re-sends the body of a POST on 307/308, to any host (and over http),
        # and these bodies carry the personal token and the refresh token
        async with self.session.post(f"{self.url}{path}", json=body or {}, headers=headers,
                                     allow_redirects=False) as r:
            if 300 <= r.status < 400:
                where = r.headers.get("Location", "")[:200]
                raise _Refused(f"服务器 {self.url} 返回了重定向（HTTP {r.status} → {where}），为保护令牌不跟随重定向："
                               f"请用实际地址作为 --url / the edge answered a redirect, which is not followed (it "
                               f"would carry the token elsewhere): pass the final address as --url")
            return r.status, await r.json(content_type=None)

    def _keep(self, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("token"), str):
            raise ValueError("登录应答缺少 token")
        self.token = body["token"]
        self.token_expires = float(body.get("expires") or 0)
        self.refresh = body.get("refresh") if isinstance(body.get("refresh"), str) else None

    async def _login(self) -> None:
        body_out = {"pat": self.pat} if self.pat else {"dev_user": self.user}
        status, body = await self._post("/api/login", body_out)
        if status != 200:
            error = body.get("error") if isinstance(body, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            msg = error.get("message") if isinstance(error, dict) else None
            if code == "dev_login_disabled" and not self.pat:
                raise _Refused(no_dev_login_message(self.url))
            if code == "pat_invalid":
                raise _Refused(f"登录失败：{msg}")
            if 400 <= status < 500 and status != 429:
                raise _Refused(f"登录失败：{msg or status}")
            raise aiohttp.ClientError(f"HTTP {status}：{msg or '登录失败'}")
        self._keep(body)

    async def _access_token(self) -> str:
        """A valid access token: the one held while it has a minute left, else renewed with the refresh token
        (rotated), else a new login (the refresh token expired or was revoked)."""
        if self.token is not None and time.time() < self.token_expires - RENEW_BEFORE_S:
            return self.token
        self.token = None
        if self.refresh is not None:
            refresh, self.refresh = self.refresh, None  # used up whatever happens
            status, body = await self._post("/api/refresh", {"refresh": refresh})
            if status == 200:
                self._keep(body)
            elif status >= 500 or status == 429:
                self.refresh = refresh  # not used up: the edge could not answer
                raise aiohttp.ClientError(f"HTTP {status}：续期失败")
        if self.token is None:
            await self._login()
        assert self.token is not None
        return self.token

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        """Get a one-time ticket (logging in or renewing the access token as needed) and open the WebSocket
        with it (one attempt): no long-lived credential goes into the URL."""
        assert self.session is not None
        for attempt in range(2):
            status, body = await self._post("/api/ws-ticket", None, await self._access_token())
            if status == 200 and isinstance(body, dict) and isinstance(body.get("ticket"), str):
                return await self.session.ws_connect(self.ws_url, params={"ticket": body["ticket"]},
                                                     heartbeat=HEARTBEAT_S,
                                                     max_msg_size=64 << 20)  # a done frame carries the whole answer
            if status == 401 and attempt == 0:
                self.token = None  # revoked: renew (or log in again) once
                continue
            msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
            raise ValueError(f"无法获取连接票据：{msg or status}")
        raise AssertionError("unreachable")

    async def connect(self) -> None:
        """The first connection: fails at once (a wrong URL should not make the user wait)."""
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                ws = await self._open()
        except _Refused:
            raise
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            raise ChatError(f"无法连接 {self.url}：{_reason(exc)}") from None
        self.ws = ws
        self._conn = asyncio.create_task(self._keep_connected(ws))

    async def _keep_connected(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            while True:
                await self._read(ws)
                self.ws = None
                self.status(MSG_DISCONNECTED)
                ws = await self._reconnect()
                self.ws = ws
                self.gen += 1
                self.status(MSG_RECONNECTED)
                await self._resend()
        except ChatError as exc:
            if not self.fatal.done():
                self.fatal.set_result(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug here must end the client with a message, not hang it
            if not self.fatal.done():
                self.fatal.set_result(f"内部错误：{exc!r}")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Handle frames until the socket closes (for whatever reason: all network errors end up here)."""
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        frame = json.loads(msg.data)
                    except ValueError:
                        continue
                    if isinstance(frame, dict):
                        self._on_frame(frame)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except BrokenPipeError:  # our stdout, not the network: reconnecting would only fail again
            raise ChatError("标准输出已关闭（例如管道另一端已退出），退出。") from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await ws.close()

    async def _reconnect(self) -> aiohttp.ClientWebSocketResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout
        backoff = Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S)
        last = ""
        while True:
            left = deadline - loop.time()
            if left > 0:
                try:
                    async with asyncio.timeout(min(ATTEMPT_TIMEOUT_S, left)):
                        return await self._open()
                except _Refused:
                    raise
                except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
                    last = _reason(exc)
            left = deadline - loop.time()
            if left <= 0:
                raise ChatError(f"无法连接服务器 {self.url}：已重试 {self.reconnect_timeout:g} 秒"
                                f"仍未恢复（{last or '连接超时'}），退出。未完成的回答没有显示完整。")
            await asyncio.sleep(min(backoff.next(), left))

    async def _send(self, frame: dict[str, Any]) -> bool:
        """Send a frame; False if there is no usable connection (the reconnect will take care of it)."""
        ws = self.ws
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_str(_encode(frame).decode())
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return False
        return True

    async def _resend(self) -> None:
        """After a reconnect: resume every unfinished answer from the last seq printed, ask again what was
        never acknowledged (same id), and repeat pending stops."""
        gen = self.gen
        for a in list(self.answers.values()):
            if a.sent_gen == gen or a.id not in self.answers:
                continue
            a.sent_gen = gen
            frame = ({"type": "resume", "task": a.id, "seq": a.seq} if a.accepted
                     else {"type": "ask", "text": a.text, "id": a.id})
            if not await self._send(frame) or (a.stop and not await self._send({"type": "stop", "task": a.id})):
                return
        for tid in list(self.abandoned):
            if not await self._send({"type": "stop", "task": tid}):
                return
            self.abandoned.discard(tid)

    # ---- frames ---------------------------------------------------------------------------------
    def _on_frame(self, f: dict[str, Any]) -> None:
        t = f.get("type")
        a = self.answers.get(f["task"]) if isinstance(f.get("task"), str) else None
        if t == "node":
            online = bool(f.get("online"))
            if online != self.node_online:
                self.node_online = online
                self.status(MSG_ONLINE if online else MSG_OFFLINE)
        elif t == "accepted" and a is not None:
            a.accepted = True
        elif t == "delta" and a is not None:
            seq, text = f.get("seq"), f.get("text")
            # Only the next chunk is printed: a replayed one (seq <= a.seq) was printed already; after a gap
            # (never sent by the edge) the rest comes from the done frame's full text.
            if isinstance(seq, int) and isinstance(text, str) and seq == a.seq + 1 and not a.done.done():
                a.seq = seq
                a.parts.append(text)
                self.write(text)
        elif t == "done" and a is not None:
            self._finish(a, f)
        elif t == "error":
            self._on_error(f, a)

    def _finish(self, a: _Answer, f: dict[str, Any]) -> None:
        del self.answers[a.id]
        printed = "".join(a.parts)
        full = f.get("text") if isinstance(f.get("text"), str) else printed
        if full.startswith(printed):
            self.write(full[len(printed):])  # chunks this client did not get as deltas
        else:  # not expected (the edge keeps one consistent answer): show the final text in full
            self.end_line()
            self.write(f"[回答已更正，完整回答如下]\n{full}")
        status = f.get("status")
        if status == "error":
            self.end_line()
            self.write(f"[出错] {(f.get('error') or {}).get('message', '')}")
        elif status == "cancelled":
            self.end_line()
            self.write("[已停止]")
        self.end_line()
        if not a.done.done():
            a.done.set_result(status if status in ("ok", "error", "cancelled") else "error")

    def _on_error(self, f: dict[str, Any], a: _Answer | None) -> None:
        code, msg = f.get("code"), f.get("message") or f.get("code") or "未知错误"
        if a is None and "task" not in f:
            # A frame-level error without a task answers the oldest ask not yet acknowledged (the edge
            # handles one socket's frames in order): that question was refused.
            a = next((x for x in self.answers.values() if not x.accepted), None)
        elif a is None or code == "not_running":
            return  # about an answer no longer shown, or a stop that crossed the done
        self.status(f"[错误] {msg}")
        if a is not None:
            self.answers.pop(a.id, None)
            if not a.done.done():
                a.done.set_result("error")

    # ---- actions --------------------------------------------------------------------------------
    async def ask(self, text: str) -> _Answer:
        a = _Answer(os.urandom(16).hex(), text, asyncio.get_running_loop().create_future())
        self.answers[a.id] = a
        if self.ws is None:
            self.status(MSG_QUEUED)
            return a
        a.sent_gen = self.gen
        await self._send({"type": "ask", "text": text, "id": a.id})
        return a

    async def interrupt(self, a: _Answer) -> bool:
        """Ctrl-C during an answer: stop it and wait for the edge to confirm (bounded). False if Ctrl-C was
        pressed again meanwhile (the user wants out)."""
        if a.done.done():
            return True
        a.stop = True
        if self.ws is None:  # nothing to tell the edge now: forget it here, stop it after a reconnect
            self.answers.pop(a.id, None)
            if a.sent_gen >= 0:
                self.abandoned.add(a.id)
            self.end_line()
            self.write("[已中断]\n")
            return True
        self.status("[正在停止…]")
        if a.sent_gen == self.gen:  # else the reconnect sends it, after the resume
            await self._send({"type": "stop", "task": a.id})
        got = await self.race(a.done, timeout=STOP_WAIT_S)
        if got != "done":  # no confirmation (yet): stop showing it
            self.answers.pop(a.id, None)
            self.end_line()
            self.write("[已中断]\n")
        return got != "sigint"

    async def race(self, fut: asyncio.Future[Any], timeout: float | None = None) -> str:
        """Wait for ``fut``, Ctrl-C or a lost connection: "done", "sigint" or "timeout" (a lost connection
        raises ChatError)."""
        sig = asyncio.ensure_future(self.sigint.wait())
        try:
            await asyncio.wait({fut, sig, self.fatal}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sig.cancel()
        if fut.done():
            return "done"
        if self.sigint.is_set():
            self.sigint.clear()
            return "sigint"
        if self.fatal.done():
            raise ChatError(self.fatal.result())
        return "timeout"

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._conn
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()

    # ---- the two modes --------------------------------------------------------------------------
    async def one_question(self, question: str) -> int:
        a = await self.ask(question)
        if await self.race(a.done) == "sigint":
            await self.interrupt(a)
            return EXIT_INTERRUPTED
        return EXIT_OK if a.done.result() == "ok" else EXIT_FAIL

    async def interactive(self) -> int:
        loop = asyncio.get_running_loop()
        self.write(MSG_BANNER + "\n")
        while True:
            self.write("\n你> ")
            self.prompting = True
            read = asyncio.ensure_future(_readline(loop))
            try:
                got = await self.race(read)
            finally:
                self.prompting = False
            if got == "sigint":
                self.write("\n")
                return EXIT_INTERRUPTED
            line = read.result()
            if not line:  # end of input (Ctrl-D)
                self.write("\n")
                return EXIT_OK
            line = line.strip()
            if not line:
                continue
            problem = question_problem(line)
            if problem is not None:
                self.status(problem)
                continue
            self.write("助手> ")
            a = await self.ask(line)
            if await self.race(a.done) == "sigint" and not await self.interrupt(a):
                self.write("\n")
                return EXIT_INTERRUPTED


async def chat(url: str, user: str, question: str | None, out: TextIO | None = None, err: TextIO | None = None,
               reconnect_timeout: float = RECONNECT_TIMEOUT_S, pat: str | None = None,
               cafile: str | None = None) -> int:
    """Run the client; returns the exit code (docs/api.md). ``question`` None: interactive. ``pat``: sign in
    with this personal token instead of dev login; ``cafile``: the CA to verify the edge's HTTPS with."""
    out = out or sys.stdout
    err = err or sys.stderr
    if question is not None and (problem := question_problem(question)) is not None:
        print(problem, file=err)
        return EXIT_USAGE
    try:
        ctx = ssl_context(cafile)
    except (OSError, ssl.SSLError) as exc:
        print(f"无法读取 CA 证书 {cafile}：{exc}", file=err)
        return EXIT_USAGE
    if pat and _plain_remote(url):
        print("警告：通过未加密的 http 发送个人令牌；部署中请使用 https:// 地址。", file=err)
    loop = asyncio.get_running_loop()
    client = ChatClient(url, user, out, err, reconnect_timeout, pat=pat)
    handler = False
    with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: Ctrl-C is a KeyboardInterrupt
        loop.add_signal_handler(signal.SIGINT, client.sigint.set)
        handler = True
    try:
        connector = aiohttp.TCPConnector(ssl=ctx) if ctx is not None else None
        async with aiohttp.ClientSession(connector=connector) as client.session:
            try:
                connect = asyncio.ensure_future(client.connect())
                if await client.race(connect) == "sigint":
                    connect.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await connect
                    return EXIT_INTERRUPTED
                connect.result()
                return await (client.interactive() if question is None else client.one_question(question))
            except ChatError as exc:
                client.status(str(exc))
                return EXIT_FAIL
            finally:
                await client.close()
    finally:
        if handler:
            loop.remove_signal_handler(signal.SIGINT)


def run_chat(url: str, user: str, question: str | None, reconnect_timeout: float = RECONNECT_TIMEOUT_S,
             pat: str | None = None, cafile: str | None = None) -> int:
    from core.runtime import run

    try:
        return run(lambda: chat(url, user, question, reconnect_timeout=reconnect_timeout, pat=pat, cafile=cafile))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed (e.g. piped into head)
        return EXIT_FAIL
    except (aiohttp.ClientError, OSError) as exc:  # a network error that slipped through: a message, no traceback
        print(f"网络错误：{_reason(exc)}", file=sys.stderr)
        return EXIT_FAIL
