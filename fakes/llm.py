"""A deterministic fake LM Studio (OpenAI-compatible) server.

Used by the tests, by the bench suite and -- with ``demo=True`` -- as the product's built-in demo
model when no real LM Studio is reachable.

Endpoints (same shapes as LM Studio):

* ``GET  /v1/models`` → ``{"object":"list","data":[{"id":…,"object":"model","owned_by":"organization_owner"}]}``
* ``POST /v1/chat/completions`` with ``stream: true`` → ``text/event-stream`` of
  ``chat.completion.chunk`` objects, a last chunk with ``finish_reason`` and an empty delta, a usage
  chunk (``choices: []``) when ``stream_options.include_usage``, then ``data: [DONE]``.
  With ``stream: false`` → one ``chat.completion`` object.

Everything is deterministic: the reply is a fixed text or derived from the last user message by a
seeded generator, and pacing uses fixed sleeps.

Per-request overrides: a request body may carry ``"fake": {...}`` with any :class:`FakeLLMConfig`
field names; they replace the server's config for that request only (``stream_chat(...,
extra={"fake": {...}})``).  Statistics (:class:`FakeLLMStats`) are in ``app[STATS]`` and on
``FakeLLM.stats``.

Shapes of real servers it can take on (see :class:`FakeLLMConfig`): a running answer ended by a clean
``[DONE]`` without any ``finish_reason`` (``done_after``; llama-cpp-python's server does this when another
request arrives), ``finish_reason: "length"`` (``max_tokens`` in the request, or the context filling up), and
a context window (``n_ctx``, in prompt tokens estimated from characters: see :func:`prompt_tokens`) whose
overflow is reported the way ``ctx_error`` says: ``"http"`` (llama.cpp's HTTP 400 "request (N tokens) exceeds
the available context size (M tokens)"), ``"http500"`` (HTTP 500 "Context size has been exceeded."),
``"empty"`` (a 200 stream with no event at all), ``"done"`` (a 200 stream of just ``[DONE]``) or ``"stream"``
(a 200 stream whose first event is an ``error`` object with LM Studio's "context length" message). An answer
that would not fit after its prompt stops where the context is full: with ``ctx_error="stream"`` an ``error``
object "Context size has been exceeded." follows its last token, otherwise ``finish_reason: "length"``.

Run standalone: ``python -m fakes.llm --port 1234 [--demo] [--ttft S] [--tps N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import time
import zlib
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from aiohttp import web

__all__ = [
    "FakeLLMConfig",
    "FakeLLMStats",
    "FakeLLM",
    "STATS",
    "CONFIG",
    "DEMO_MODEL",
    "DEMO_INTRO",
    "make_app",
    "run_fake_llm",
    "reply_tokens",
    "prompt_tokens",
    "CTX_ERRORS",
    "main",
]

DEMO_MODEL = "smartclaw-demo"
DEMO_INTRO = (
    "【演示模型】我是 SmartClaw 内置的演示模型，不是真正的大模型；"
    "请在服务器 B 上启动 LM Studio（端口 1234）以获得真实回答。"
)
NO_MODELS_MESSAGE = (
    "No models loaded. Please load a model in the developer page or use the `lms load` command."
)
_DEFAULT_MODELS = ["fake-model"]
_POLL = 0.05  # seconds between "is the client still there?" checks while stalled
CTX_ERRORS = ("http", "http500", "empty", "done", "stream")  # how a context overflow is reported (ctx_error)
CTX_FULL_MESSAGE = "Context size has been exceeded."

_WORDS = (
    "the quick brown fox jumps over lazy dog model token stream server client reply test "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega"
).split()


@dataclass
class FakeLLMConfig:
    """Behaviour of the fake server (and of one request, via ``"fake": {...}`` overrides)."""

    ttft: float = 0.0  # seconds before the first token (headers are sent at once)
    tokens_per_s: float = 0  # 0 = as fast as possible (demo: 0 means 30)
    token_chars: int = 4  # characters per token (demo: 4 means 2)
    reply: str | None = None  # fixed reply; default: derived from the last user message
    n_tokens: int = 20  # length of the derived reply, in tokens
    models: list[str] = field(default_factory=lambda: list(_DEFAULT_MODELS))  # [] = "no models loaded"
    include_usage: bool = True  # honour stream_options.include_usage
    send_done: bool = True  # end with data: [DONE] (False: just close after the finish chunk)
    reasoning: str | None = None  # if set, streamed first as delta.reasoning
    # ---- error injection
    http_status: int | None = None  # error before the stream (OpenAI-style JSON body)
    error_after: int | None = None  # data: {"error": {"message": "Compute error."}} after N tokens, then end
    drop_after: int | None = None  # close the connection abruptly after N tokens (no finish, no [DONE])
    stall_after: int | None = None  # stop after N tokens and hang until the client disconnects
    bad_json_after: int | None = None  # send an unparseable data: line after N tokens, then end
    done_after: int | None = None  # data: [DONE] and a clean end after N tokens, no finish_reason ever sent
    n_ctx: int | None = None  # context window in tokens (prompt_tokens() + answer tokens); None = unlimited
    ctx_error: str = "http"  # how a prompt over n_ctx is refused: one of CTX_ERRORS (see the module docs)
    content_type: str = "text/event-stream"  # Content-Type of the stream response
    require_key: str | None = None  # 401 unless Authorization: Bearer <require_key>
    demo: bool = False  # the built-in demo model (Chinese reply saying it is a demo)


@dataclass
class FakeLLMStats:
    requests: int = 0  # every HTTP request
    chat_requests: int = 0  # POST /v1/chat/completions
    model_requests: int = 0  # GET /v1/models
    streams_started: int = 0
    streams_completed: int = 0  # sent to the end ([DONE] or clean close)
    active_streams: int = 0
    max_active_streams: int = 0
    client_closed: int = 0  # streams the client closed before the server finished
    errors_injected: int = 0
    context_errors: int = 0  # chat requests refused or cut short because of n_ctx
    tokens_sent: int = 0
    last_request: dict | None = None  # body of the last chat request
    recent_requests: deque[dict] = field(default_factory=lambda: deque(maxlen=64))  # bodies of the last chat requests
    last_headers: dict[str, str] = field(default_factory=dict)


STATS: web.AppKey[FakeLLMStats] = web.AppKey("fakellm_stats", FakeLLMStats)
CONFIG: web.AppKey[FakeLLMConfig] = web.AppKey("fakellm_config", FakeLLMConfig)

_FIELDS = frozenset(f.name for f in dataclasses.fields(FakeLLMConfig))


class _ClientGone(Exception):
    pass


# --------------------------------------------------------------------------- reply text


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _last_user(messages: Any) -> str:
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return _text_of(m.get("content"))
    return ""


def _demo_reply(question: str) -> str:
    q = " ".join(question.split())
    if len(q) > 200:
        q = q[:199] + "…"
    return (
        f"{DEMO_INTRO}\n\n"
        f"你的问题是：\n> {q or '（空）'}\n\n"
        "演示模式下我只能：\n"
        "- 复述你的问题\n"
        "- 演示逐字流式输出的效果\n"
        "- 确认消息通道（企业微信 / 小程序 → 服务器 A → 服务器 B）工作正常\n\n"
        "接入真实模型后，这里会显示大模型的回答。"
    )


def _derived_reply(question: str, n_tokens: int, token_chars: int) -> str:
    rng = random.Random(zlib.crc32(question.encode("utf-8")))
    need = max(0, n_tokens) * max(1, token_chars)
    parts: list[str] = []
    size = 0
    while size < need:
        w = rng.choice(_WORDS) + " "
        parts.append(w)
        size += len(w)
    return "".join(parts)[:need]


def _effective(cfg: FakeLLMConfig) -> tuple[float, int]:
    tps, chars = cfg.tokens_per_s, cfg.token_chars
    if cfg.demo:
        tps = tps or 30.0
        chars = 2 if chars == 4 else chars
    return float(tps or 0), max(1, int(chars))


def reply_tokens(cfg: FakeLLMConfig, messages: Any) -> list[str]:
    """The exact tokens the server streams for ``messages`` under ``cfg`` (before max_tokens)."""
    _, chars = _effective(cfg)
    if cfg.reply is not None:
        text = cfg.reply
    elif cfg.demo:
        text = _demo_reply(_last_user(messages))
    else:
        text = _derived_reply(_last_user(messages), cfg.n_tokens, chars)
    return [text[i : i + chars] for i in range(0, len(text), chars)]


def prompt_tokens(messages: Any) -> int:
    """The fake's token count of a prompt: per message 4, plus one per non-ASCII character (a CJK character is
    about one token) and one per 4 ASCII characters (rounded up)."""
    n = 0
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                text = _text_of(m.get("content"))
                ascii_chars = len(text.encode("ascii", "ignore"))
                n += 4 + (ascii_chars + 3) // 4 + (len(text) - ascii_chars)
    return n


# --------------------------------------------------------------------------- handlers


def _error_body(status: int, message: str, *, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _http_error(status: int) -> web.Response:
    if status == 404:
        body = _error_body(404, NO_MODELS_MESSAGE, type_="invalid_request_error", code="model_not_found", param="model")
    elif status == 401:
        body = _error_body(401, "Invalid or missing API token.", type_="invalid_request_error", code="invalid_api_key")
    elif status == 400:
        body = _error_body(400, "Bad request (injected).", type_="invalid_request_error", code=None)
    else:
        body = _error_body(status, f"Injected server error (HTTP {status}).", type_="server_error", code="internal_error")
    return web.json_response(body, status=status)


def _check_key(request: web.Request, cfg: FakeLLMConfig) -> web.Response | None:
    if cfg.require_key is None:
        return None
    if request.headers.get("Authorization", "") == f"Bearer {cfg.require_key}":
        return None
    return _http_error(401)


def _client_gone(request: web.Request) -> bool:
    tr = request.transport
    return tr is None or tr.is_closing()


async def _sleep(request: web.Request, seconds: float) -> None:
    """Sleep, but notice a client disconnect within ~_POLL seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while True:
        if _client_gone(request):
            raise _ClientGone
        left = end - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, _POLL))


async def _handle_models(request: web.Request) -> web.Response:
    stats = request.app[STATS]
    cfg = request.app[CONFIG]
    stats.requests += 1
    stats.model_requests += 1
    denied = _check_key(request, cfg)
    if denied is not None:
        return denied
    models = [DEMO_MODEL] if cfg.demo and cfg.models == _DEFAULT_MODELS else cfg.models
    return web.json_response(
        {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "organization_owner"} for m in models]}
    )


async def _handle_chat(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    base = request.app[CONFIG]
    stats.requests += 1
    stats.chat_requests += 1
    stats.last_headers = dict(request.headers)
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("body is not an object")
    except ValueError as exc:
        stats.last_request = None
        return web.json_response(
            _error_body(400, f"Invalid JSON body: {exc}", type_="invalid_request_error", code=None), status=400
        )
    stats.last_request = body
    stats.recent_requests.append(body)
    cfg = base
    over = body.get("fake")
    if isinstance(over, dict) and over:
        cfg = dataclasses.replace(base, **{k: v for k, v in over.items() if k in _FIELDS})

    denied = _check_key(request, cfg)
    if denied is not None:
        stats.errors_injected += 1
        return denied
    if cfg.http_status is not None:
        stats.errors_injected += 1
        return _http_error(int(cfg.http_status))
    models = [DEMO_MODEL] if cfg.demo and cfg.models == _DEFAULT_MODELS else list(cfg.models)
    if not models:
        return _http_error(404)
    model = body.get("model")
    if model not in models:
        model = models[0]  # LM Studio answers with the loaded model when only one is loaded

    messages = body.get("messages")
    n_prompt = prompt_tokens(messages)
    if cfg.n_ctx is not None and n_prompt > cfg.n_ctx:
        stats.context_errors += 1
        stats.errors_injected += 1
        return await _context_error(request, cfg, n_prompt)
    tokens = reply_tokens(cfg, messages)
    finish = "stop"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and 0 <= max_tokens < len(tokens):
        tokens = tokens[:max_tokens]
        finish = "length"
    ctx_full_after = None  # the answer fills the context after this many tokens
    if cfg.n_ctx is not None and n_prompt + len(tokens) > cfg.n_ctx:
        stats.context_errors += 1
        if cfg.ctx_error == "stream":
            ctx_full_after = cfg.n_ctx - n_prompt
        else:
            tokens = tokens[: cfg.n_ctx - n_prompt]
            finish = "length"
    tps, _ = _effective(cfg)
    n = stats.chat_requests
    cid = f"chatcmpl-{zlib.crc32(str(n).encode()):08x}{n:06d}"
    created = int(time.time())
    usage = {
        "prompt_tokens": n_prompt,
        "completion_tokens": len(tokens),
        "total_tokens": n_prompt + len(tokens),
    }

    if not body.get("stream"):
        await asyncio.sleep(cfg.ttft + (len(tokens) / tps if tps > 0 else 0.0))
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": finish,
                        "message": {"role": "assistant", "content": "".join(tokens)},
                    }
                ],
                "usage": usage,
                "stats": {},
                "system_fingerprint": model,
            }
        )

    so = body.get("stream_options")
    want_usage = cfg.include_usage and isinstance(so, dict) and bool(so.get("include_usage"))
    return await _stream(request, cfg, stats, tokens, finish, usage if want_usage else None, cid, created, model, tps,
                         ctx_full_after)


async def _context_error(request: web.Request, cfg: FakeLLMConfig, n_prompt: int) -> web.StreamResponse:
    """A prompt over ``cfg.n_ctx``, refused the way ``cfg.ctx_error`` says (see the module docs)."""
    n_ctx = cfg.n_ctx
    if cfg.ctx_error == "http500":
        return web.json_response({"error": {"code": 500, "message": CTX_FULL_MESSAGE, "type": "server_error"}},
                                 status=500)
    if cfg.ctx_error not in ("empty", "done", "stream"):  # "http": llama.cpp's server
        return web.json_response({"error": {
            "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": n_prompt, "n_ctx": n_ctx,
            "message": f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), "
                       f"try increasing it"}}, status=400)
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await resp.prepare(request)
        if cfg.ctx_error == "done":
            await resp.write(b"data: [DONE]\n\n")
        elif cfg.ctx_error == "stream":  # LM Studio's wording
            msg = (f"Trying to keep the first {n_prompt} tokens when context the overflows. However, the model is "
                   f"loaded with context length of only {n_ctx} tokens, which is not enough. Try to load the model "
                   f"with a larger context length, or provide a shorter input")
            await resp.write(b"data: " + json.dumps({"error": {"message": msg}}).encode() + b"\n\n")
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


async def _paced(request: web.Request, resp: web.StreamResponse, stats: FakeLLMStats, frames: list[bytes],
                 t0: float, interval: float) -> None:
    """Write ``frames[i]`` at ``t0 + i * interval``. Paced streams are written from timer callbacks straight
    to the transport (chunked framing included), not by a coroutine waking per token: at 1000 streams the
    fake server would otherwise take as much CPU as the system it stands in front of (measured in the bench
    sweep: ~60 µs per token through ``resp.write`` and ``asyncio.sleep``, ~15 µs this way)."""
    if not frames:
        return
    await resp.write(frames[0])  # through aiohttp: it sends the headers with the first bytes
    stats.tokens_sent += 1
    if len(frames) == 1:
        return
    if not interval:
        for f in frames[1:]:
            await resp.write(f)
            stats.tokens_sent += 1
        return
    loop = asyncio.get_running_loop()
    chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
    done: asyncio.Future[None] = loop.create_future()
    i = 1
    handle: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal i, handle
        tr = request.transport
        if tr is None or tr.is_closing():
            if not done.done():
                done.set_exception(_ClientGone())
            return
        f = frames[i]
        tr.write(b"%x\r\n%b\r\n" % (len(f), f) if chunked else f)
        stats.tokens_sent += 1
        i += 1
        if i == len(frames):
            done.set_result(None)
        else:
            handle = loop.call_at(t0 + i * interval, tick)

    handle = loop.call_at(t0 + interval, tick)
    try:
        await done
    finally:
        handle.cancel()


async def _stream(
    request: web.Request,
    cfg: FakeLLMConfig,
    stats: FakeLLMStats,
    tokens: list[str],
    finish: str,
    usage: dict | None,
    cid: str,
    created: int,
    model: str,
    tps: float,
    ctx_full_after: int | None = None,
) -> web.StreamResponse:
    head = json.dumps(
        {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": model},
        ensure_ascii=False,
        separators=(",", ":"),
    )[:-1]  # without the closing brace
    pre = f'data: {head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":'.encode()
    post = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    pre_r = f'data: {head},"choices":[{{"index":0,"delta":{{"role":"assistant","reasoning":'.encode()

    resp = web.StreamResponse(status=200, headers={"Content-Type": cfg.content_type, "Cache-Control": "no-cache"})
    stats.streams_started += 1
    stats.active_streams += 1
    stats.max_active_streams = max(stats.max_active_streams, stats.active_streams)
    loop = asyncio.get_running_loop()
    n = len(tokens)
    try:
        await resp.prepare(request)
        await _sleep(request, cfg.ttft)
        interval = 1.0 / tps if tps > 0 else 0.0
        t0 = loop.time()
        if cfg.reasoning:
            await resp.write(pre_r + json.dumps(cfg.reasoning, ensure_ascii=False).encode() + post)
        faults = [x for x in (cfg.error_after, cfg.bad_json_after, cfg.drop_after, cfg.stall_after, cfg.done_after,
                              ctx_full_after) if x is not None]
        k = max(0, min([n, *faults]))  # tokens before the first injected fault (n: none)
        frames = [pre + json.dumps(t, ensure_ascii=False).encode() + post for t in tokens[:k]]
        await _paced(request, resp, stats, frames, t0, interval)
        if faults:  # the first one due (a fault past the last token never comes)
            i = k
            if i == cfg.error_after:
                stats.errors_injected += 1
                await resp.write(b'data: {"error":{"message":"Compute error."}}\n\n')
                await resp.write_eof()
                return resp
            if i == ctx_full_after:  # llama.cpp's server when the answer fills the context
                await resp.write(b"data: " + json.dumps({"error": {"code": 500, "message": CTX_FULL_MESSAGE,
                                                                   "type": "server_error"}}).encode() + b"\n\n")
                await resp.write_eof()
                return resp
            if i == cfg.done_after:  # llama-cpp-python's server when another request interrupts this one
                stats.errors_injected += 1
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            if i == cfg.bad_json_after:
                stats.errors_injected += 1
                await resp.write(b'data: {"id": "broken", "choices": [\n\n')
                await resp.write_eof()
                return resp
            if i == cfg.drop_after:
                stats.errors_injected += 1
                tr = request.transport
                if tr is not None:
                    tr.close()  # flushes what was written, then FIN without the terminating chunk
                return resp
            if i == cfg.stall_after:
                stats.errors_injected += 1
                while not _client_gone(request):
                    await asyncio.sleep(_POLL)
                raise _ClientGone
        await resp.write(
            f'data: {head},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{finish}"}}]}}\n\n'.encode()
        )
        if usage is not None:
            await resp.write(f'data: {head},"choices":[],"usage":{json.dumps(usage, separators=(",", ":"))}}}\n\n'.encode())
        if cfg.send_done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        stats.streams_completed += 1
        return resp
    except (_ClientGone, ConnectionError):
        stats.client_closed += 1
        return resp
    except asyncio.CancelledError:  # handler_cancellation=True: the client went away (or shutdown)
        stats.client_closed += 1
        raise
    finally:
        stats.active_streams -= 1


# --------------------------------------------------------------------------- app / runner


async def _not_found(request: web.Request) -> web.Response:
    request.app[STATS].requests += 1
    return web.json_response({"error": f"Unexpected endpoint or method. ({request.method} {request.path})"}, status=404)


def make_app(cfg: FakeLLMConfig) -> web.Application:
    """The aiohttp application.  Stats: ``app[STATS]``; config: ``app[CONFIG]`` (mutable)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CONFIG] = cfg
    app[STATS] = FakeLLMStats()
    app.router.add_get("/v1/models", _handle_models)
    app.router.add_post("/v1/chat/completions", _handle_chat)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


@dataclass
class FakeLLM:
    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL for clients, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def stats(self) -> FakeLLMStats:
        return self.app[STATS]

    @property
    def config(self) -> FakeLLMConfig:
        return self.app[CONFIG]

    async def wait_for(self, predicate: Any, timeout: float = 2.0) -> bool:
        """Poll ``predicate(stats)`` every 10 ms until true or ``timeout``; returns the last result."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            if predicate(self.stats):
                return True
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.01)


@asynccontextmanager
async def run_fake_llm(
    cfg: FakeLLMConfig | None = None, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 0.5
) -> AsyncIterator[FakeLLM]:
    """Serve the fake on ``host:port`` (0 = a free port) for the duration of the ``async with``."""
    app = make_app(cfg if cfg is not None else FakeLLMConfig())
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield FakeLLM(app=app, host=host, port=bound)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fakes.llm", description="Deterministic fake LM Studio server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1234)
    p.add_argument("--demo", action="store_true", help="built-in demo model (Chinese reply, ~30 tokens/s)")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    p.add_argument("--tps", type=float, default=0.0, help="tokens per second (0 = as fast as possible)")
    p.add_argument("--token-chars", type=int, default=4)
    p.add_argument("--n-tokens", type=int, default=20)
    p.add_argument("--reply", default=None, help="fixed reply text")
    p.add_argument("--model", action="append", dest="models", help="model id (repeatable)")
    p.add_argument("--require-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--n-ctx", type=int, default=None, help="context window in tokens (default: unlimited)")
    p.add_argument("--ctx-error", choices=CTX_ERRORS, default="http", help="how a prompt over --n-ctx is refused")
    a = p.parse_args(argv)
    cfg = FakeLLMConfig(
        ttft=a.ttft,
        tokens_per_s=a.tps,
        token_chars=a.token_chars,
        n_tokens=a.n_tokens,
        reply=a.reply,
        require_key=a.require_key,
        demo=a.demo,
        n_ctx=a.n_ctx,
        ctx_error=a.ctx_error,
    )
    if a.models:
        cfg.models = a.models
    from core.runtime import loop_factory

    factory = loop_factory()
    loop = factory() if factory is not None else None
    web.run_app(
        make_app(cfg),
        host=a.host,
        port=a.port,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=1.0,
        loop=loop,
        print=lambda *args: print(f"fake LM Studio on http://{a.host}:{a.port}/v1" + (" (demo)" if a.demo else "")),
    )


if __name__ == "__main__":
    main()
