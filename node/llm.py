"""LM Studio (OpenAI-compatible) streaming chat client: the API the node calls.

:func:`chat` POSTs ``{base_url}/chat/completions`` with ``stream: true`` and calls ``on_event(kind, text)``
for each text or reasoning delta, from the connection's read callback; it returns the final usage.
:func:`stream_chat` is the same as an async iterator of :class:`StreamEvent` objects; :func:`list_models`
reads ``GET {base_url}/models``. Every failure -- network, HTTP status, error chunk inside the stream, stall,
drop, empty or malformed output -- is raised as :class:`LLMError` with a stable ``code``, a Simplified Chinese
``user_message`` for the end user and an English operator detail as ``str()``. Only ``CancelledError`` (and
``GeneratorExit`` on ``aclose``) pass through unchanged, and in :func:`chat` an exception raised by
``on_event`` itself.

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
practice.

The parts: the errors (node/llm_errors.py), the pool of kept-alive connections (node/pool.py,
:class:`LLMClient`), one connection as an ``asyncio.Protocol`` (node/http1.py: the request's bytes, checked by
h11 once per header set, and a strict reader of the response head and the body's framing), one response read to its outcome in the read
callback (node/llm_response.py) and the SSE decoder (node/sse.py). This module builds the requests and runs
them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import msgspec

from .http1 import MAX_HEAD, request_bytes
from .llm_errors import (CONTEXT_PATTERNS, ERROR_CODES, LLM_BAD_RESPONSE, LLM_CONTEXT, LLM_DROPPED, LLM_EMPTY,
                         LLM_HTTP, LLM_NO_MODEL, LLM_STALL, LLM_STREAM_ERROR, LLM_UNREACHABLE, MAX_ERROR_BODY, USER_AUTH,
                         LLMError, is_context_error, status_error, trunc)
from .llm_response import OnEvent, Response, StaleConnection
from .pool import IDLE_S, MAX_IDLE, Key, LLMClient
from .sse import MAX_LINE as MAX_SSE_LINE

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
    "IDLE_S",
    "MAX_IDLE",
    "MAX_HEAD",
    "MAX_SSE_LINE",
    "QUEUE_PAUSE",
]

QUEUE_PAUSE = 256  # stream_chat(): events waiting for a slow consumer before reading is paused

_encode_json = msgspec.json.Encoder().encode


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


@functools.lru_cache(maxsize=64)
def _target(base_url: str, path: str) -> tuple[str, Key, str, str]:
    """(url, (host, port, tls), request target, Host header) of ``base_url`` + ``path``; raises LLMError."""
    url = base_url.rstrip("/") + path
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LLMError(LLM_UNREACHABLE, f"{url!r}: invalid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LLMError(LLM_UNREACHABLE, f"{trunc(url, 120)!r}: invalid URL (expected http://host:port/...)")
    tls = parts.scheme == "https"
    host = parts.hostname
    port = port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_hdr = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return url, (host, port, tls), target, host_hdr


async def _start(client: LLMClient, method: str, base_url: str, path: str, body: bytes | None, api_key: str, *,
                 on_event: OnEvent | None, first_token_timeout: float, stall_timeout: float,
                 connect_timeout: float, fresh: bool = False) -> Response:
    """Connect (or reuse a kept-alive connection unless ``fresh``), send the request, and return its exchange
    (running). Its future fails with ``StaleConnection`` when a reused connection turns out closed before any
    response byte: the caller sends again with ``fresh=True``."""
    loop = asyncio.get_running_loop()
    first_deadline = loop.time() + first_token_timeout
    url, key, target, host_hdr = _target(base_url, path)
    what = f"{method} {url}"
    headers = (("Host", host_hdr), ("Connection", "keep-alive"),
               ("Accept", "text/event-stream" if on_event is not None else "application/json"))
    if body is not None:
        headers += (("Content-Type", "application/json"),)
    if api_key:
        headers += (("Authorization", f"Bearer {api_key}"),)
    try:
        request = request_bytes(method, target, headers, body)
    except (UnicodeEncodeError, h11.LocalProtocolError):  # (the detail never shows the header: it may be the key)
        raise LLMError(LLM_HTTP, f"{what}: a request header is not Latin-1 text (check node.llm_url and "
                                 f"node.api_key)", user_message=USER_AUTH) from None
    conn = None if fresh else client.take(key, loop.time())
    reused = conn is not None
    if conn is None:
        try:
            conn = await client.connect(key, min(connect_timeout, first_token_timeout))
        except TimeoutError:
            raise LLMError(LLM_UNREACHABLE, f"{what}: cannot connect (timed out after "
                                            f"{min(connect_timeout, first_token_timeout)}s)") from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise LLMError(LLM_UNREACHABLE, f"{what}: cannot connect ({type(exc).__name__}: "
                                            f"{trunc(str(exc)) or type(exc).__name__})") from None
    ex = Response(client, key, conn, what, on_event=on_event, first_deadline=first_deadline,
                  stall_timeout=stall_timeout, first_token_timeout=first_token_timeout, reused=reused)
    if not conn.open():
        ex.lost(None)
    else:
        conn.send(request)
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
               connect_timeout: float) -> tuple[Response, Any]:
    """One request to its end: (the exchange, its result); a stale reused connection is replaced once."""
    for fresh in (False, True):
        ex = await _start(client, method, base_url, path, body, api_key, on_event=on_event,
                          first_token_timeout=first_token_timeout, stall_timeout=stall_timeout,
                          connect_timeout=connect_timeout, fresh=fresh)
        try:
            return ex, await ex.fut
        except StaleConnection:
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

    async def begin(fresh: bool) -> Response:
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
                if not fut.cancelled() and isinstance(fut.exception(), StaleConnection):
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
        raise status_error(status, raw[:MAX_ERROR_BODY], what=what, no_model_on_404=False)
    try:
        data = json.loads(raw)["data"]
        return [m["id"] for m in data]
    except (ValueError, TypeError, KeyError) as exc:
        raise LLMError(
            LLM_BAD_RESPONSE,
            f"{what}: unexpected body ({type(exc).__name__}): {trunc(raw.decode('utf-8', 'replace'), 120)!r}",
        ) from None
