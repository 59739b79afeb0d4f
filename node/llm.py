"""LM Studio (OpenAI-compatible) streaming chat client.

:func:`chat` POSTs ``{base_url}/chat/completions`` with ``stream: true`` and calls ``on_event(kind, text)``
for each text or reasoning delta, from the connection's read callback; it returns the final usage.
:func:`stream_chat` is the same as an async iterator of :class:`StreamEvent` objects. Every failure --
network, HTTP status, error chunk inside the stream, stall, drop, empty or malformed output -- is raised as
:class:`LLMError` with a stable ``code``, a Simplified Chinese ``user_message`` for the end user and an
English operator detail as ``str()``. Only ``CancelledError`` (and ``GeneratorExit`` on ``aclose``) pass
through unchanged, and in :func:`chat` an exception raised by ``on_event`` itself.

Facts this is built on (LM Studio's and llama.cpp's servers, as observed; docs/reliability.md):

* LM Studio streams OpenAI ``chat.completion.chunk`` objects as SSE ``data:`` lines and ends with
  ``data: [DONE]`` -- or with just a close.  An answer is complete only when a chunk carried a non-null
  ``finish_reason`` (the model said it ended): a stream that ends without one -- even with a clean
  ``[DONE]``, which llama-cpp-python's server sends when another request interrupts a running answer -- is
  ``LLM_DROPPED``. ``finish_reason: "length"`` (``max_tokens`` or the context filled up) is returned to the
  caller, who tells the user.
* Errors come either as an HTTP error before the stream (404 ``model_not_found`` /
  "No models loaded") or as ``data: {"error": {...}}`` inside a 200 stream.
* A request that does not fit the model's context window (``LLM_CONTEXT``) shows up in three shapes: an
  HTTP error whose body says so (llama.cpp: 400 "request (N tokens) exceeds the available context size",
  500 "Context size has been exceeded."), an ``error`` object inside a 200 stream saying so, or a 200 stream
  that ends with no chunk at all (some servers just close it). The message test is :func:`is_context_error`
  (a short list of case-insensitive phrases, ``CONTEXT_PATTERNS``).
* The first request may load the model, so the first token may take long
  (``first_token_timeout``); after that a gap of ``stall_timeout`` means the server is stuck.
* Closing the HTTP stream makes LM Studio stop generating: closing this generator (``aclose()``
  or cancellation) closes the HTTP response at once.

Stall detection: the wait for the response headers plus the first event is bounded by
``first_token_timeout`` (one deadline from the start of the request), every later wait for more of the
stream by ``stall_timeout`` (for :func:`stream_chat`, from when its consumer waits again: a slow consumer is
not a stall). LM Studio sends no SSE comments/keep-alives, so "no event" and "no bytes" are the same thing in
practice. The deadlines are one timer per stream, moved for free and re-armed only when it fires early.

HTTP is our own small HTTP/1.1 client (:class:`LLMClient`): one ``asyncio.Protocol`` per connection, the
response head, the body's framing (chunked, Content-Length or until close), the ``text/event-stream`` rules
LM Studio's stream uses (``data:`` lines joined by newlines, ``event:``, comments, a blank line ends an event)
and the chunk objects all handled in ``data_received``, so a token costs no task wake-up, no future and no
async-generator step; kept-alive connections are reused while idle less than ``IDLE_S``. Measured in the
bench sweep at 500 streams: the node went from ~78 to ~55 µs of CPU per chunk against aiohttp's client
(which had itself replaced httpx + httpx-sse at 27–33 µs of client CPU per event).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "LLMClient",
    "LLMError",
    "StreamEvent",
    "chat",
    "stream_chat",
    "list_models",
    "LLM_UNREACHABLE",
    "LLM_HTTP",
    "LLM_NO_MODEL",
    "LLM_STREAM_ERROR",
    "LLM_STALL",
    "LLM_DROPPED",
    "LLM_EMPTY",
    "LLM_BAD_RESPONSE",
    "LLM_CONTEXT",
    "ERROR_CODES",
    "CONTEXT_PATTERNS",
    "is_context_error",
]

LLM_UNREACHABLE = "llm_unreachable"
LLM_HTTP = "llm_http"
LLM_NO_MODEL = "llm_no_model"
LLM_STREAM_ERROR = "llm_stream_error"
LLM_STALL = "llm_stall"
LLM_DROPPED = "llm_dropped"
LLM_EMPTY = "llm_empty"
LLM_BAD_RESPONSE = "llm_bad_response"
LLM_CONTEXT = "llm_context"

#: Default user-facing messages (Simplified Chinese), by code.
USER_MESSAGES: dict[str, str] = {
    LLM_UNREACHABLE: "无法连接到服务器 B 上的 LM Studio，请确认 LM Studio 已启动并开启了本地服务（默认端口 1234）。",
    LLM_HTTP: "LM Studio 返回了错误，请稍后再试。",
    LLM_NO_MODEL: "服务器 B 上的 LM Studio 当前没有加载模型，请先在 LM Studio 中加载一个模型后再试。",
    LLM_STREAM_ERROR: "模型在生成回答时出错，请稍后再试。",
    LLM_STALL: "模型长时间没有响应，请稍后再试。",
    LLM_DROPPED: "与模型的连接意外中断，回答不完整，请重试。",
    LLM_EMPTY: "模型没有返回任何内容，请换个问法再试。",
    LLM_BAD_RESPONSE: "模型服务返回了无法识别的数据，请检查服务器 B 上的 LM Studio 配置。",
    LLM_CONTEXT: "问题太长，超出了模型一次能处理的长度（上下文长度），请缩短问题后再试。",
}
ERROR_CODES = frozenset(USER_MESSAGES)

_USER_AUTH = "LM Studio 拒绝了请求（认证失败），请检查服务器 B 上配置的 LM Studio API 密钥。"
_USER_FIRST_TOKEN = "模型响应超时（可能正在加载模型或服务器繁忙），请稍后再试。"
_USER_UNFINISHED = "模型服务中途结束了本次回答（没有说明回答已完成），回答不完整，请重试。"
_USER_CONTEXT_EMPTY = "模型没有返回任何内容，可能是问题太长、超出了模型的上下文长度，请缩短问题后再试。"
_USER_CONTEXT_MID = "回答超出了模型的上下文长度，已被中断，回答不完整。"

#: Case-insensitive phrases that mark an error message (HTTP error body or in-stream ``error`` object) as
#: "the request does not fit the model's context window": llama.cpp's server ("request (3892 tokens) exceeds
#: the available context size (2048 tokens)", type ``exceed_context_size_error``, "Context size has been
#: exceeded."), and the OpenAI / LM Studio wordings ("maximum context length", ``context_length_exceeded``,
#: ``n_ctx``, "context window").
CONTEXT_PATTERNS = (
    "exceeds the available context size",
    "exceed_context_size",
    "context size has been exceeded",
    "context length",
    "context_length_exceeded",
    "context window",
    "n_ctx",
)


def is_context_error(text: str) -> bool:
    """Whether a server's error text says the request does not fit the model's context window."""
    low = text.lower()
    return any(p in low for p in CONTEXT_PATTERNS)

_MAX_DETAIL = 300  # chars of a server-provided message kept in the operator detail
_MAX_ERROR_BODY = 64 * 1024  # bytes of a non-2xx body read to extract the error message


class LLMError(Exception):
    """A failed LLM call.

    ``code``: one of the ``LLM_*`` constants; ``user_message``: Simplified Chinese text for the
    end user; ``status``: HTTP status when one was received; ``str(err)``: English detail for the
    operator (never contains the API key).
    """

    def __init__(
        self, code: str, detail: str, *, user_message: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status
        self.user_message = user_message or USER_MESSAGES.get(code, USER_MESSAGES[LLM_BAD_RESPONSE])

    def __repr__(self) -> str:
        return f"LLMError(code={self.code!r}, detail={self.detail!r}, status={self.status!r})"


@dataclass(slots=True)
class StreamEvent:
    """One item of a chat stream.

    ``kind``: ``"text"`` (content delta in ``text``), ``"reasoning"`` (reasoning delta in
    ``text``) or ``"usage"`` (last event, only when the server sent usage; ``usage`` holds
    ``{prompt_tokens, completion_tokens, total_tokens, ...}`` and ``finish_reason`` the final
    finish reason, e.g. ``"stop"`` or ``"length"``).
    """

    kind: str
    text: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None


# --------------------------------------------------------------------------- helpers


def _trunc(s: str, n: int = _MAX_DETAIL) -> str:
    s = s.replace("\r", " ").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def _error_fields(obj: Any) -> tuple[str, str]:
    """(message, code) from an OpenAI-style error object/body; tolerant of odd shapes."""
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        msg = err.get("message") or err.get("detail") or err.get("error") or ""
        code = err.get("code") or err.get("type") or ""
        return (msg if isinstance(msg, str) else json.dumps(msg, ensure_ascii=False)), str(code or "")
    if isinstance(err, str):
        return err, ""
    return (json.dumps(err, ensure_ascii=False) if err is not None else ""), ""


def _status_error(status: int, body: bytes, *, what: str, no_model_on_404: bool = True) -> LLMError:
    msg, code = "", ""
    if body:
        try:
            msg, code = _error_fields(json.loads(body))
        except Exception:  # not JSON, or JSON too deep (RecursionError): the raw text is the message
            msg = body[:_MAX_DETAIL].decode("utf-8", "replace")
    detail = f"{what}: HTTP {status}"
    if code:
        detail += f" [{code}]"
    if msg:
        detail += f": {_trunc(msg)}"
    if status not in (401, 403) and is_context_error(body[:_MAX_ERROR_BODY].decode("utf-8", "replace")):
        return LLMError(LLM_CONTEXT, detail, status=status)
    if (
        (status == 404 and no_model_on_404)
        or code == "model_not_found"
        or "no models loaded" in msg.lower()
    ):
        return LLMError(LLM_NO_MODEL, detail, status=status)
    if status in (401, 403):
        return LLMError(LLM_HTTP, detail, status=status, user_message=_USER_AUTH)
    return LLMError(
        LLM_HTTP, detail, status=status, user_message=f"LM Studio 返回了错误（HTTP {status}），请稍后再试。"
    )


MAX_SSE_LINE = 1 << 20  # an SSE line longer than this (1 MiB) is not LM Studio's: the stream is refused
MAX_HEAD = 64 * 1024  # bytes of response status line + headers at most
IDLE_S = 2.0  # a kept-alive connection idle longer than this is closed, not reused (servers close at ~5 s)
MAX_IDLE = 1024  # kept-alive connections per server at most
QUEUE_PAUSE = 256  # stream_chat(): events waiting for a slow consumer before reading is paused

_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode


def _headers(api_key: str, *, json: bool = False) -> dict[str, str]:
    h = {"Content-Type": "application/json"} if json else {}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


# --------------------------------------------------------------------------- HTTP/1.1


class LLMClient:
    """The node's HTTP/1.1 client for LM Studio: keep-alive connections (``http`` or ``https``), reused while
    idle less than ``IDLE_S``. Create it in the running loop; :meth:`close` when done."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int, bool], deque[tuple[_Conn, float]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self.connects = 0  # new connections opened (the rest were reused)

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn, _ in idle:
                conn.close()
        self._idle.clear()

    def _take(self, key: tuple[str, int, bool], now: float) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn, since = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing() \
                    and now - since < IDLE_S:
                while idle and now - idle[0][1] >= IDLE_S:  # the oldest are stale too
                    idle.popleft()[0].close()
                return conn
            conn.close()
        return None

    def _put(self, key: tuple[str, int, bool], conn: _Conn, now: float) -> None:
        idle = self._idle.setdefault(key, deque())
        if len(idle) >= MAX_IDLE:
            idle.popleft()[0].close()
        idle.append((conn, now))

    async def _connect(self, host: str, port: int, tls: bool, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        ctx = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(_Conn, host, port, ssl=ctx,
                                                   server_hostname=host if tls else None)
        self.connects += 1
        return conn


class _Conn(asyncio.Protocol):
    """One connection; its bytes go to the exchange using it (at most one at a time)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ex: _Exchange | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # bytes on an idle connection: not a response to anything; do not reuse it
            self.close()
        else:
            ex.feed(data)

    def eof_received(self) -> bool:
        self.closed = True  # the server is done with this connection: never reuse it (connection_lost follows)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex, self.ex = self.ex, None
        if ex is not None:
            ex.lost(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _CallbackError(Exception):
    """Carries what ``on_event`` raised, to be raised as it is by chat()."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


class _StaleConnection(Exception):
    """A reused kept-alive connection closed before any byte of the response: send again on a new one."""


_HEAD, _BODY, _END = 0, 1, 2  # exchange states
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER = 0, 1, 2, 3  # chunked decoder states

OnEvent = Callable[[str, str], None]


class _Exchange:
    """One request on one connection, driven by ``data_received``: the response head, the body's framing
    (chunked, Content-Length or until close) and, for a stream, the SSE events and LM Studio's chunk objects,
    each delivered to ``on_event(kind, text)`` in the same callback. ``fut`` gets ``(usage, finish_reason)``
    or the error. One timer carries the deadlines (first token, then stall), moved for free at each event."""

    def __init__(self, client: LLMClient, key: tuple[str, int, bool], conn: _Conn, what: str, *,
                 on_event: OnEvent | None, first_deadline: float, stall_timeout: float,
                 first_token_timeout: float, reused: bool = False) -> None:
        self.client, self.key, self.conn, self.what = client, key, conn, what
        self.on_event = on_event  # None: a plain request (the body is collected, see ``body``)
        self.loop = asyncio.get_running_loop()
        self.fut: asyncio.Future[tuple[dict[str, Any] | None, str | None]] = self.loop.create_future()
        # the caller cancelled (its task was): stop at once, before another read can call on_event
        self.fut.add_done_callback(lambda f: f.cancelled() and self.close())
        self.reused = reused
        self.got_bytes = False
        self.stall_timeout = stall_timeout
        self.first_token_timeout = first_token_timeout
        self.state = _HEAD
        self.head = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.framing = "close"
        self.keep_alive = False
        self.left = 0  # Content-Length framing: bytes still to come
        self.cstate = _C_SIZE
        self.cbuf = b""
        self.body = bytearray()  # a plain request's body, or an error body
        self.body_cap = _MAX_ERROR_BODY
        self.collect = on_event is None
        self.paused = False
        self.busy = False  # stream_chat(): its consumer is handling an event (the stall clock waits)
        # SSE state
        self.data: list[bytes] = []
        self.event = b""
        self.rest = b""
        self.n_events = 0
        self.n_chunks = 0  # chunk objects read (every event but [DONE])
        self.done = False
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.text_seen = False
        self.reasoning_seen = False
        # the one timer
        self.at = first_deadline
        self._armed = first_deadline
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(first_deadline, self._fire)
        conn.ex = self

    # ---- the end ---------------------------------------------------------------------------
    def _settle(self, result: Any = None, exc: BaseException | None = None, *, reuse: bool = False,
                cancel: bool = False) -> None:
        if self.state == _END:
            return
        self.state = _END
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self.conn
        if conn.ex is self:
            conn.ex = None
        fut = self.fut
        if not fut.done():
            if cancel:
                fut.cancel()
            elif exc is not None:
                if isinstance(exc, StopIteration):  # a Future cannot hold one
                    exc = RuntimeError(f"on_event raised {exc!r}")
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        if reuse and self.keep_alive and not conn.closed and not self.paused and conn.transport is not None \
                and not conn.transport.is_closing():
            self.client._put(self.key, conn, self.loop.time())
        else:
            conn.close()  # an early end (error, cancel, aclose) closes the stream: LM Studio stops generating

    def close(self) -> None:
        """Stop here (the consumer is gone): the connection is closed, not reused."""
        if self.state != _END:
            self._settle(cancel=True)

    def fail(self, exc: BaseException) -> None:
        self._settle(exc=exc)

    def _fail_unexpected(self, err: BaseException) -> None:
        self.fail(err if isinstance(err, LLMError) else LLMError(
            LLM_BAD_RESPONSE, f"{self.what}: unreadable response ({type(err).__name__}: "
                              f"{_trunc(str(err)) or type(err).__name__})"))

    def _complete(self, *, reuse: bool) -> None:
        """The body ended (or the connection closed after it)."""
        if self.collect:
            self._settle(None, reuse=reuse)
        elif not 200 <= self.status < 300:
            self._settle(exc=_status_error(self.status, bytes(self.body), what=self.what), reuse=reuse)
        else:
            self._finished(reuse=reuse)

    def _finished(self, *, reuse: bool, how: str = "") -> None:
        """A 200 stream ended (``how``: why, when it was not a clean end of the body): the answer, or why not."""
        if self.n_chunks == 0:  # not one chunk: what some servers do with a request over the context size
            seen = "[DONE] only" if self.done else "no events"
            self._settle(exc=LLMError(
                LLM_CONTEXT, f"{self.what}: stream ended with no chunk at all ({seen}{how}); taken as a request "
                             f"over the model's context size", status=self.status, user_message=_USER_CONTEXT_EMPTY))
        elif self.finish is None:  # the model never said it ended: the answer is cut short
            if self.done:
                detail = (f"stream ended with [DONE] but no finish_reason after {self.n_chunks} chunks: the answer "
                          f"is incomplete (a server ending a running answer early, e.g. when another request "
                          f"arrives, does this)")
            else:
                detail = (f"stream ended ({how.lstrip('; ') or 'end of the body'}) without [DONE] or finish_reason "
                          f"after {self.n_chunks} chunks: the answer is incomplete")
            self._settle(exc=LLMError(LLM_DROPPED, f"{self.what}: {detail}", status=self.status,
                                      user_message=_USER_UNFINISHED if self.done else None))
        elif not self.text_seen:
            self._settle(exc=LLMError(
                LLM_EMPTY, f"{self.what}: stream ended with no content (finish_reason={self.finish!r}, "
                           f"reasoning={'yes' if self.reasoning_seen else 'no'}, events={self.n_events})"))
        else:
            self._settle((self.usage, self.finish), reuse=reuse)

    def lost(self, exc: Exception | None) -> None:
        try:
            self._lost(exc)
        except BaseException as err:  # never leave the future unsettled
            self._fail_unexpected(err)

    def _lost(self, exc: Exception | None) -> None:
        if self.state == _END:
            return
        if self.state == _HEAD and self.reused and not self.got_bytes:
            self.fail(_StaleConnection())
            return
        name = f" ({type(exc).__name__}: {_trunc(str(exc)) or type(exc).__name__})" if exc else ""
        if self.state == _HEAD:
            self.fail(LLMError(LLM_DROPPED, f"{self.what}: connection closed before the response{name}"))
        elif self.framing == "close":
            self._complete(reuse=False)
        elif not self.collect and 200 <= self.status < 300:
            # closed after the end of the answer: normal; before it, a drop (before any chunk: see _finished)
            cut = name or " (the response body was cut short)"
            self._finished(reuse=False, how=f"; connection closed mid-stream{cut}")
        elif self.collect:
            self.fail(LLMError(LLM_DROPPED, f"{self.what}: connection closed mid-body{name}"))
        else:
            self._complete(reuse=False)  # an error body cut short: the status is what counts

    # ---- deadlines -------------------------------------------------------------------------
    def _fire(self) -> None:
        self._timer = None
        try:
            self._fire_inner()
        except BaseException as err:  # never leave the future unsettled
            self._fail_unexpected(err)

    def _fire_inner(self) -> None:
        if self.state == _END:
            return
        now = self.loop.time()
        if now < self.at - 0.002:  # moved since armed (uvloop fires up to 1 ms early: that is "reached")
            self._arm(self.at)
        elif self.paused or self.busy:  # the consumer is behind: the deadline applies once it waits again
            self._arm(now + 0.05)
        elif self.state == _HEAD:
            self.fail(LLMError(LLM_STALL, f"{self.what}: no response within first_token_timeout="
                                          f"{self.first_token_timeout}s", user_message=_USER_FIRST_TOKEN))
        elif self.collect or not 200 <= self.status < 300:
            if self.collect and 200 <= self.status < 300:
                self.fail(LLMError(LLM_STALL, f"{self.what}: timed out reading the response"))
            else:
                self._complete(reuse=False)  # the error body as far as it came
        elif self.done:
            self._finished(reuse=False)  # [DONE] seen; the server just did not end the body: fine
        elif self.n_events == 0:
            self.fail(LLMError(LLM_STALL, f"{self.what}: no first token within first_token_timeout="
                                          f"{self.first_token_timeout}s", user_message=_USER_FIRST_TOKEN))
        else:
            self.fail(LLMError(LLM_STALL, f"{self.what}: stream stalled, nothing received for "
                                          f"{self.stall_timeout}s"))

    def _arm(self, at: float) -> None:
        self._armed = at
        self._timer = self.loop.call_at(at, self._fire)

    def _move(self, at: float) -> None:
        self.at = at
        if at < self._armed and self._timer is not None:
            self._timer.cancel()
            self._arm(at)

    def waiting(self, now: float) -> None:
        """stream_chat()'s consumer waits for more again: the stall deadline counts from now."""
        if self.n_events and self.state == _BODY:
            self._move(now + (min(self.stall_timeout, 1.0) if self.done else self.stall_timeout))

    def pause(self) -> None:
        if not self.paused and self.state != _END and self.conn.transport is not None:
            self.paused = True
            self.conn.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.state != _END and self.conn.transport is not None:
            self.paused = False
            self.conn.transport.resume_reading()

    # ---- bytes in --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            if self.state == _HEAD:
                data = self._head(data)
                if not data or self.state != _BODY:
                    return
            framing = self.framing
            if framing == "chunked":
                self._chunked(data)
            elif framing == "length":
                if len(data) >= self.left:
                    extra = len(data) > self.left  # bytes after the body: not a connection to reuse
                    piece, self.left = data[:self.left], 0
                    self._body(piece)
                    if self.state == _BODY:
                        self._complete(reuse=not extra)
                else:
                    self.left -= len(data)
                    self._body(data)
            else:
                self._body(data)
        except LLMError as exc:
            self.fail(exc)
        except _CallbackError as exc:  # the consumer's callback failed (e.g. a publish): its error, as it is
            self.fail(exc.exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # a bug, or a server's data we choke on (e.g. RecursionError): never a hang
            self._fail_unexpected(exc)

    def _head(self, data: bytes) -> bytes:
        buf = self.head + data if self.head else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: response head longer than {MAX_HEAD} bytes")
                self.head = buf
                return b""
            lines = buf[:end].decode("latin-1").split("\r\n")
            rest = buf[end + 4:]
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: not an HTTP/1.x response: {_trunc(lines[0], 80)!r}")
            status = int(parts[1])
            if 100 <= status < 200:  # an interim response (100 Continue): the real one follows
                buf = rest
                continue
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: malformed response header {_trunc(line, 80)!r}")
                headers[name.strip().lower()] = value.strip()
            break
        self.head = b""
        self.status, self.headers = status, headers
        conn_hdr = headers.get("connection", "").lower()
        self.keep_alive = parts[0] == "HTTP/1.1" and "close" not in conn_hdr
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.framing = "chunked"
        elif status in (204, 304):  # no body, whatever the headers say
            self.left = 0
            self.framing = "length"
        elif "content-length" in headers:
            try:
                self.left = int(headers["content-length"])
            except ValueError:
                raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: bad Content-Length") from None
            if self.left < 0:
                raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: bad Content-Length")
            self.framing = "length"
        else:
            self.framing = "close"
            self.keep_alive = False
        self.state = _BODY
        if 200 <= status < 300 and not self.collect:
            ctype = headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: expected Content-Type text/event-stream, got "
                                                 f"{_trunc(ctype, 80)!r}", status=status)
        elif self.collect and 200 <= status < 300:
            self.body_cap = _MAX_ERROR_BODY * 16
        else:  # an error: its body is read (bounded by time too) for the message
            self._move(self.loop.time() + min(self.stall_timeout, 10.0))
        if self.framing == "length" and self.left == 0:
            self._complete(reuse=not rest)
            return b""
        return rest

    def _chunked(self, data: bytes) -> None:
        if not self.cbuf and self.cstate == _C_SIZE:  # the usual read: exactly one whole chunk (one event)
            i = data.find(b"\r\n", 0, 18)
            if 0 < i < 17 and data[-2:] == b"\r\n":
                try:
                    size = int(data[:i], 16)
                except ValueError:
                    size = -1
                if size > 0 and len(data) == i + size + 4:
                    self._body(data[i + 2:i + 2 + size])
                    return
        buf = self.cbuf + data if self.cbuf else data
        pos, n = 0, len(buf)
        st = self.cstate
        while pos < n and self.state == _BODY:
            if st == _C_DATA:
                take = min(self.left, n - pos)
                piece = buf[pos:pos + take] if (pos or take != n) else buf
                pos += take
                self.left -= take
                if self.left == 0:
                    st = _C_CRLF
                self.cstate = st
                self._body(piece)
            elif st == _C_SIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    if n - pos > 1024:
                        raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: bad chunked encoding (size line)")
                    break
                try:
                    size = int(buf[pos:i].split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: bad chunked encoding "
                                                     f"({_trunc(buf[pos:i][:40].decode('latin-1'))!r})") from None
                if size < 0:
                    raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: bad chunked encoding (negative size)")
                pos = i + 2
                if size:
                    self.left, st = size, _C_DATA
                else:
                    st = _C_TRAILER
            elif st == _C_CRLF:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: bad chunked encoding (no CRLF after data)")
                pos += 2
                st = _C_SIZE
            else:  # trailers, then the blank line that ends the body
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    if n - pos > MAX_HEAD:
                        raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: chunked trailers too long")
                    break
                if i == pos:
                    self.cstate, self.cbuf = st, b""
                    if self.state == _BODY:
                        self._complete(reuse=pos + 2 == n)  # anything after the body: do not reuse
                    return
                pos = i + 2
        self.cstate = st
        self.cbuf = buf[pos:] if pos < n else b""

    def _body(self, data: bytes) -> None:
        if self.collect or not 200 <= self.status < 300:
            room = self.body_cap - len(self.body)
            if room > 0:
                self.body += data[:room]
            return
        lines = (self.rest + data if self.rest else data).split(b"\n")
        rest = self.rest = lines.pop()
        if len(rest) > MAX_SSE_LINE:
            raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: undecodable response (an SSE line longer than "
                                             f"{MAX_SSE_LINE} bytes)")
        got = False
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if line:
                if len(line) > MAX_SSE_LINE:
                    raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: undecodable response (an SSE line longer "
                                                     f"than {MAX_SSE_LINE} bytes)")
                if line.startswith(b"data:"):
                    v = line[5:]
                    self.data.append(v[1:] if v[:1] == b" " else v)
                elif line.startswith(b"event:"):
                    self.event = line[6:].strip()
                continue
            data_lines = self.data
            if data_lines:
                joined = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
                self.data = []
                if joined:  # an event with empty data (a proxy's keep-alive "data:") is not dispatched
                    got = True
                    self.n_events += 1
                    self._sse(self.event, joined)
                    if self.state != _BODY:
                        return
            self.event = b""
        if got:  # each wait for more is bounded by stall_timeout (1 s once [DONE] is in)
            self._move(self.loop.time() + (min(self.stall_timeout, 1.0) if self.done else self.stall_timeout))

    def _sse(self, event: bytes, data: bytes) -> None:
        if self.done:
            return
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = _decode_json(data)
            err = obj.get("error")
            if err is not None:
                msg, code = _error_fields(obj)
                detail = f"{self.what}: error in stream" + (f" [{code}]" if code else "") + f": {_trunc(msg)}"
                if is_context_error(data.decode("utf-8", "replace")):
                    raise LLMError(LLM_CONTEXT, detail + f" (after {self.n_chunks} chunks)", status=self.status,
                                   user_message=_USER_CONTEXT_MID if self.text_seen else None)
                raise LLMError(LLM_STREAM_ERROR, detail, status=self.status)
            self.n_chunks += 1
            content = reasoning = None
            choices = obj.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content")
                    reasoning = delta.get("reasoning") or delta.get("reasoning_content")
                fr = choice.get("finish_reason")
                if fr:
                    self.finish = fr
            u = obj.get("usage")
            if isinstance(u, dict) and u:
                self.usage = u
            if (content is not None and not isinstance(content, str)) or \
                    (reasoning is not None and not isinstance(reasoning, str)):
                raise TypeError("delta content is not a string")
        except LLMError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as exc:
            text = data.decode("utf-8", "replace")
            if event == b"error" and is_context_error(text):
                raise LLMError(LLM_CONTEXT, f"{self.what}: error event in stream: {_trunc(text)}",
                               user_message=_USER_CONTEXT_MID if self.text_seen else None) from None
            if event == b"error":
                raise LLMError(LLM_STREAM_ERROR, f"{self.what}: error event in stream: {_trunc(text)}") from None
            raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: unparseable stream chunk ({type(exc).__name__}): "
                                             f"{_trunc(text, 120)!r}") from None
        on_event = self.on_event
        assert on_event is not None
        try:
            if reasoning:
                self.reasoning_seen = True
                on_event("reasoning", reasoning)
            if content:
                self.text_seen = True
                on_event("text", content)
        except BaseException as exc:
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                raise
            raise _CallbackError(exc) from None


def _target(base_url: str, path: str) -> tuple[str, tuple[str, int, bool], str, str]:
    """(url, (host, port, tls), request target, Host header) of ``base_url`` + ``path``; raises LLMError."""
    url = base_url.rstrip("/") + path
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LLMError(LLM_UNREACHABLE, f"{url!r}: invalid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LLMError(LLM_UNREACHABLE, f"{_trunc(url, 120)!r}: invalid URL (expected http://host:port/...)")
    tls = parts.scheme == "https"
    host = parts.hostname
    port = port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_hdr = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return url, (host, port, tls), target, host_hdr


async def _start(client: LLMClient, method: str, base_url: str, path: str, body: bytes | None, api_key: str, *,
                 on_event: OnEvent | None, first_token_timeout: float, stall_timeout: float,
                 connect_timeout: float, fresh: bool = False) -> _Exchange:
    """Connect (or reuse a kept-alive connection unless ``fresh``), send the request, and return its exchange
    (running). Its future fails with ``_StaleConnection`` when a reused connection turns out closed before any
    response byte: the caller sends again with ``fresh=True``."""
    loop = asyncio.get_running_loop()
    first_deadline = loop.time() + first_token_timeout
    url, key, target, host_hdr = _target(base_url, path)
    what = f"{method} {url}"
    head = [f"{method} {target} HTTP/1.1", f"Host: {host_hdr}", "Connection: keep-alive",
            "Accept: text/event-stream" if on_event is not None else "Accept: application/json"]
    for k, v in _headers(api_key, json=body is not None).items():
        head.append(f"{k}: {v}")
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    try:
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")
    except UnicodeEncodeError:  # (the detail never shows the header: it may be the API key)
        raise LLMError(LLM_HTTP, f"{what}: a request header is not Latin-1 text (check node.llm_url and "
                                 f"node.api_key)", user_message=_USER_AUTH) from None
    conn = None if fresh else client._take(key, loop.time())
    reused = conn is not None
    if conn is None:
        try:
            conn = await client._connect(key[0], key[1], key[2], min(connect_timeout, first_token_timeout))
        except TimeoutError:
            raise LLMError(LLM_UNREACHABLE, f"{what}: cannot connect (timed out after "
                                            f"{min(connect_timeout, first_token_timeout)}s)") from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise LLMError(LLM_UNREACHABLE, f"{what}: cannot connect ({type(exc).__name__}: "
                                            f"{_trunc(str(exc)) or type(exc).__name__})") from None
    ex = _Exchange(client, key, conn, what, on_event=on_event, first_deadline=first_deadline,
                   stall_timeout=stall_timeout, first_token_timeout=first_token_timeout, reused=reused)
    if conn.closed or conn.transport is None or conn.transport.is_closing():
        ex.lost(None)
    else:
        conn.transport.write(request)
    return ex


def _request_body(model: str, messages: list[dict], max_tokens: int, extra: dict | None) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None and max_tokens > 0:  # 0 or less: not sent (the server's own limit applies)
        body["max_tokens"] = max_tokens
    if extra:
        body.update(extra)
    return _encode_json(body)


async def _run(client: LLMClient, method: str, base_url: str, path: str, body: bytes | None, api_key: str, *,
               on_event: OnEvent | None, first_token_timeout: float, stall_timeout: float,
               connect_timeout: float) -> tuple[_Exchange, Any]:
    """One request to its end: (the exchange, its result); a stale reused connection is replaced once."""
    for fresh in (False, True):
        ex = await _start(client, method, base_url, path, body, api_key, on_event=on_event,
                          first_token_timeout=first_token_timeout, stall_timeout=stall_timeout,
                          connect_timeout=connect_timeout, fresh=fresh)
        try:
            return ex, await ex.fut
        except _StaleConnection:
            continue  # nothing of the response came: send it again on a new connection
        finally:
            ex.close()
    raise AssertionError("unreachable")  # a fresh connection is never stale


# --------------------------------------------------------------------------- API


async def chat(
    client: LLMClient,
    base_url: str,
    *,
    on_event: OnEvent,
    model: str,
    messages: list[dict],
    api_key: str = "",
    max_tokens: int = -1,
    first_token_timeout: float = 300,
    stall_timeout: float = 60,
    connect_timeout: float = 5,
    extra: dict | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """Stream a chat completion, calling ``on_event(kind, text)`` (``"text"`` or ``"reasoning"``) from the
    connection's read callback for each delta, as it arrives; return ``(usage, finish_reason)`` (usage None
    when the server sent none). Raises LLMError; an exception from ``on_event`` ends the stream and is
    raised as it is. Cancelling the caller closes the HTTP stream at once (LM Studio stops generating).
    ``max_tokens`` > 0 is sent as the answer's token limit (0 or less: not sent). The call returns only when the
    model said the answer ended (``finish_reason``, e.g. ``"stop"`` or ``"length"``); see the module docs."""
    _, result = await _run(client, "POST", base_url, "/chat/completions",
                           _request_body(model, messages, max_tokens, extra), api_key, on_event=on_event,
                           first_token_timeout=first_token_timeout, stall_timeout=stall_timeout,
                           connect_timeout=connect_timeout)
    return result  # type: ignore[no-any-return]


async def stream_chat(
    client: LLMClient,
    base_url: str,
    *,
    model: str,
    messages: list[dict],
    api_key: str = "",
    max_tokens: int = -1,
    first_token_timeout: float = 300,
    stall_timeout: float = 60,
    connect_timeout: float = 5,
    extra: dict | None = None,
) -> AsyncIterator[StreamEvent]:
    """:func:`chat` as an async iterator of :class:`StreamEvent` (text and reasoning deltas, then one
    ``usage`` event when the server sent usage). A consumer slower than the stream pauses reading (after
    ``QUEUE_PAUSE`` events), and the stall deadline does not run meanwhile. Raises LLMError after the events
    that came before the failure; ``aclose()`` closes the HTTP stream at once."""
    loop = asyncio.get_running_loop()
    queue: deque[StreamEvent] = deque()
    wake: list[asyncio.Future[None] | None] = [None]

    def wake_up(_: object = None) -> None:
        w = wake[0]
        if w is not None and not w.done():
            w.set_result(None)

    def on_event(kind: str, text: str) -> None:
        queue.append(StreamEvent(kind, text))
        wake_up()
        if len(queue) >= QUEUE_PAUSE:
            ex.pause()

    body = _request_body(model, messages, max_tokens, extra)

    async def begin(fresh: bool) -> _Exchange:
        new = await _start(client, "POST", base_url, "/chat/completions", body, api_key, on_event=on_event,
                           first_token_timeout=first_token_timeout, stall_timeout=stall_timeout,
                           connect_timeout=connect_timeout, fresh=fresh)
        new.fut.add_done_callback(wake_up)
        return new

    ex = await begin(False)
    fut = ex.fut
    try:
        while True:
            if queue:
                ex.busy = True
                while queue:
                    yield queue.popleft()
                    if ex.paused and len(queue) < QUEUE_PAUSE // 2:
                        ex.resume()
                ex.busy = False
                ex.waiting(loop.time())
            if fut.done():
                if not fut.cancelled() and isinstance(fut.exception(), _StaleConnection):
                    ex = await begin(True)  # nothing of the answer came: send it again on a new connection
                    fut = ex.fut
                    continue
                break
            w = wake[0] = loop.create_future()
            await w
            wake[0] = None
        usage, finish = fut.result()
        if usage is not None:
            yield StreamEvent("usage", usage=usage, finish_reason=finish)
    finally:
        ex.close()
        if fut.done() and not fut.cancelled():
            fut.exception()  # retrieved (a consumer that stopped early never asked for it)


async def list_models(client: LLMClient, base_url: str, *, api_key: str = "", timeout: float = 2.0) -> list[str]:
    """``GET {base_url}/models`` → list of model ids.  Raises LLMError."""
    what = f"GET {base_url.rstrip('/')}/models"
    try:
        async with asyncio.timeout(timeout):
            ex, _ = await _run(client, "GET", base_url, "/models", None, api_key, on_event=None,
                               first_token_timeout=timeout + 1, stall_timeout=timeout + 1, connect_timeout=timeout)
    except TimeoutError:
        raise LLMError(LLM_STALL, f"{what}: no response within {timeout}s") from None
    status, raw = ex.status, bytes(ex.body)
    if not 200 <= status < 300:
        raise _status_error(status, raw[:_MAX_ERROR_BODY], what=what, no_model_on_404=False)
    try:
        data = json.loads(raw)["data"]
        return [m["id"] for m in data]
    except (ValueError, TypeError, KeyError) as exc:
        raise LLMError(
            LLM_BAD_RESPONSE,
            f"{what}: unexpected body ({type(exc).__name__}): {_trunc(raw.decode('utf-8', 'replace'), 120)!r}",
        ) from None
