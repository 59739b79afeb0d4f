"""LM Studio (OpenAI-compatible) streaming chat client.

One function does the work: :func:`stream_chat` POSTs ``{base_url}/chat/completions`` with
``stream: true`` and yields :class:`StreamEvent` objects (text deltas, reasoning deltas and a
final usage event).  Every failure -- network, HTTP status, error chunk inside the stream, stall,
drop, empty or malformed output -- is raised as :class:`LLMError` with a stable ``code``, a
Simplified Chinese ``user_message`` for the end user and an English operator detail as ``str()``.
Only ``CancelledError`` (and ``GeneratorExit`` on ``aclose``) pass through unchanged.

Facts this is built on (DESIGN.md §4, platform-apis.md §5):

* LM Studio streams OpenAI ``chat.completion.chunk`` objects as SSE ``data:`` lines and ends with
  ``data: [DONE]`` -- or with just a close.  A close after a chunk with a non-null
  ``finish_reason`` (or after ``[DONE]``) is a normal end; a close before either is a drop.
* Errors come either as an HTTP error before the stream (404 ``model_not_found`` /
  "No models loaded") or as ``data: {"error": {...}}`` inside a 200 stream.
* The first request may load the model, so the first token may take long
  (``first_token_timeout``); after that a gap of ``stall_timeout`` means the server is stuck.
* Closing the HTTP stream makes LM Studio stop generating: closing this generator (``aclose()``
  or cancellation) closes the HTTP response at once.

Stall detection: the wait for the response headers plus the first event is bounded by
``first_token_timeout`` (one deadline from the start of the request), every later wait for more of the
stream by ``stall_timeout`` (the deadline starts when the read starts: a slow consumer is not a stall).
LM Studio sends no SSE comments/keep-alives, so "no event" and "no bytes" are the same thing in practice.
The deadline is one timer (``_Deadline``), moved for free and re-armed only when it fires early.

HTTP is aiohttp, with the small SSE parser below (the ``text/event-stream`` rules LM Studio's stream uses:
``data:`` lines joined by newlines, ``event:``, comments, a blank line ends an event), reading per network
read: all the events one read completes are handled in one pass. It replaced httpx + httpx-sse, measured:
27–33 µs of client CPU per event with httpx (its pool scan per request and an anyio cancel scope per read)
against ~10 µs with aiohttp's readline, and less again per read; the node is among the busiest processes of
the bench sweep.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp
import msgspec

__all__ = [
    "LLMError",
    "StreamEvent",
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
    "ERROR_CODES",
]

LLM_UNREACHABLE = "llm_unreachable"
LLM_HTTP = "llm_http"
LLM_NO_MODEL = "llm_no_model"
LLM_STREAM_ERROR = "llm_stream_error"
LLM_STALL = "llm_stall"
LLM_DROPPED = "llm_dropped"
LLM_EMPTY = "llm_empty"
LLM_BAD_RESPONSE = "llm_bad_response"

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
}
ERROR_CODES = frozenset(USER_MESSAGES)

_USER_AUTH = "LM Studio 拒绝了请求（认证失败），请检查服务器 B 上配置的 LM Studio API 密钥。"
_USER_FIRST_TOKEN = "模型响应超时（可能正在加载模型或服务器繁忙），请稍后再试。"

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
        except ValueError:
            msg = body[:_MAX_DETAIL].decode("utf-8", "replace")
    detail = f"{what}: HTTP {status}"
    if code:
        detail += f" [{code}]"
    if msg:
        detail += f": {_trunc(msg)}"
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


class _SSEError(ValueError):
    """A line of the event stream that cannot be read (not UTF-8, or longer than the reader allows)."""


def _map_transport(exc: BaseException, what: str, *, streaming: bool) -> LLMError:
    """Map an aiohttp / transport exception to an LLMError."""
    name = type(exc).__name__
    text = _trunc(str(exc)) or name
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.InvalidURL, aiohttp.ConnectionTimeoutError)):
        return LLMError(LLM_UNREACHABLE, f"{what}: cannot connect ({name}: {text})")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, ConnectionResetError,
                        aiohttp.ClientOSError)):
        where = "mid-stream" if streaming else "before the response"
        return LLMError(LLM_DROPPED, f"{what}: connection closed {where} ({name}: {text})")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return LLMError(LLM_STALL, f"{what}: timed out ({name})")
    if isinstance(exc, (_SSEError, aiohttp.ClientResponseError, UnicodeDecodeError)):
        return LLMError(LLM_BAD_RESPONSE, f"{what}: undecodable response ({name}: {text})")
    if isinstance(exc, aiohttp.ClientError):
        return LLMError(LLM_UNREACHABLE, f"{what}: transport error ({name}: {text})")
    return LLMError(LLM_BAD_RESPONSE, f"{what}: unexpected error ({name}: {text})")


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body up to ``cap`` bytes, however many reads it arrives in."""
    buf = bytearray()
    while len(buf) < cap:
        chunk = await resp.content.readany()
        if not chunk:
            break
        buf += chunk
    return bytes(buf[:cap])


async def _read_error_body(resp: aiohttp.ClientResponse, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await _read_capped(resp, _MAX_ERROR_BODY)
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        return b""


@dataclass(slots=True)
class _SSE:
    event: str
    data: bytes  # UTF-8 is checked by the JSON decoder (a non-UTF-8 event is an unparseable chunk)


MAX_SSE_LINE = 1 << 20  # an SSE line longer than this (1 MiB) is not LM Studio's: the stream is refused


async def _event_batches(reader: aiohttp.StreamReader) -> AsyncIterator[list[_SSE]]:
    """Server-sent events from ``reader``, as many as each network read completes (fields ``data`` and
    ``event``; ``id``/``retry`` and comments are ignored, as LM Studio sends none). An unterminated last
    event is dropped, as the SSE rules say. One read per batch, not one per line: under load a read often
    brings several events, and the caller pays its per-read costs once for all of them."""
    data: list[bytes] = []
    event = b""
    rest = b""  # an incomplete line
    while True:
        chunk = await reader.readany()
        if not chunk:
            return
        lines = (rest + chunk if rest else chunk).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_SSE_LINE:
            raise _SSEError(f"an SSE line longer than {MAX_SSE_LINE} bytes")
        out: list[_SSE] = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if line:
                if len(line) > MAX_SSE_LINE:
                    raise _SSEError(f"an SSE line longer than {MAX_SSE_LINE} bytes")
                if line.startswith(b"data:"):
                    v = line[5:]
                    data.append(v[1:] if v[:1] == b" " else v)
                elif line.startswith(b"event:"):
                    event = line[6:].strip()
                continue
            if data:
                joined = data[0] if len(data) == 1 else b"\n".join(data)
                if joined:  # an event with empty data (a proxy's keep-alive "data:") is not dispatched
                    out.append(_SSE(event.decode("utf-8", "replace"), joined))
                data = []
            event = b""
        if out:
            yield out


class _Deadline:
    """A deadline that moves at every event and costs nothing to move: one timer, re-armed only when it
    fires before the (moved) deadline. When it passes while the task waits in a read (``reading``), the task
    is cancelled and ``expired`` is set; the reader turns that cancellation into its timeout (like
    ``asyncio.timeout``, with ``uncancel``). A per-event ``asyncio.timeout`` cost ~4 µs of the node's CPU per
    token (measured with py-spy in the bench sweep)."""

    __slots__ = ("at", "expired", "reading", "_loop", "_task", "_handle", "_armed")

    def __init__(self, at: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.at = at
        self.expired = False
        self.reading = False
        self._arm(at)

    def _arm(self, at: float) -> None:
        self._armed = at
        self._handle = self._loop.call_at(at, self._fire)

    def move(self, at: float) -> None:
        """The new deadline (later: free; earlier than the armed timer: re-armed)."""
        self.at = at
        if at < self._armed:
            self._handle.cancel()
            self._arm(at)

    def _fire(self) -> None:
        now = self._loop.time()
        if now < self.at - 0.002:  # moved since armed (uvloop fires up to 1 ms early: that is "reached")
            self._arm(self.at)
        elif not self.reading:  # the consumer is busy between events: the deadline applies to the next read
            self._arm(now + 0.05)
        elif self._task is not None:
            self.expired = True
            self._task.cancel()

    def timed_out(self) -> bool:
        """After a CancelledError from a read: True if it was this deadline (and only it)."""
        return self.expired and self._task is not None and self._task.uncancel() == 0

    def close(self) -> None:
        self._handle.cancel()


_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode


def _headers(api_key: str, *, json: bool = False) -> dict[str, str]:
    h = {"Content-Type": "application/json"} if json else {}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


# --------------------------------------------------------------------------- API


async def stream_chat(
    client: aiohttp.ClientSession,
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
    """Stream a chat completion from an OpenAI-compatible server (LM Studio).

    ``base_url`` is like ``http://host:1234/v1``.  ``max_tokens < 0`` means "no limit" (the field
    is then omitted).  ``extra`` is merged into the request body last.  Yields ``StreamEvent``s;
    raises ``LLMError``.  Close the generator (``aclose()``) to stop generation early.

    Iterate it from one task (``async for``), not with ``anext`` wrapped in a new task per step
    (``wait_for(anext(...))`` on 3.11): its deadlines cancel the task that started the stream.
    """
    url = base_url.rstrip("/") + "/chat/completions"
    what = f"POST {url}"
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None and max_tokens >= 0:
        body["max_tokens"] = max_tokens
    if extra:
        body.update(extra)
    # connect bounded here; the asyncio deadlines below are the real limits of the rest.
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout, sock_read=None)
    loop = asyncio.get_running_loop()
    first_deadline = loop.time() + first_token_timeout

    text_seen = False
    reasoning_seen = False
    done = False
    finish: str | None = None
    usage: dict[str, Any] | None = None
    n_events = 0
    streaming = False

    try:
        async with AsyncExitStack() as stack:
            # ---- request + response headers, bounded by the first-token deadline
            try:
                async with asyncio.timeout_at(first_deadline):
                    resp = await stack.enter_async_context(
                        client.post(url, data=_encode_json(body), headers=_headers(api_key, json=True),
                                    timeout=timeout)
                    )
            except aiohttp.ConnectionTimeoutError as exc:  # a TimeoutError too: it must not read as a stall
                raise _map_transport(exc, what, streaming=False) from None
            except TimeoutError:
                raise LLMError(
                    LLM_STALL,
                    f"{what}: no response within first_token_timeout={first_token_timeout}s",
                    user_message=_USER_FIRST_TOKEN,
                ) from None
            if not 200 <= resp.status < 300:
                raw = await _read_error_body(resp, min(stall_timeout, 10.0))
                raise _status_error(resp.status, raw, what=what)
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                raise LLMError(
                    LLM_BAD_RESPONSE,
                    f"{what}: expected Content-Type text/event-stream, got {_trunc(ctype, 80)!r}",
                    status=resp.status,
                )

            # ---- the stream
            streaming = True
            batches = _event_batches(resp.content)
            stack.push_async_callback(batches.aclose)
            deadline = _Deadline(first_deadline)
            stack.callback(deadline.close)
            while True:
                if n_events:  # each wait for more is bounded by stall_timeout (1 s once [DONE] is in)
                    deadline.move(loop.time() + (min(stall_timeout, 1.0) if done else stall_timeout))
                deadline.reading = True
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if not deadline.timed_out():
                        raise
                    if done:
                        break  # [DONE] seen; the server just did not close: fine
                    if n_events == 0:
                        raise LLMError(
                            LLM_STALL,
                            f"{what}: no first token within first_token_timeout={first_token_timeout}s",
                            user_message=_USER_FIRST_TOKEN,
                        ) from None
                    raise LLMError(
                        LLM_STALL, f"{what}: stream stalled, nothing received for {stall_timeout}s"
                    ) from None
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        ConnectionResetError) as exc:
                    if done or finish is not None:
                        break  # closed after the end of the answer: normal
                    raise LLMError(
                        LLM_DROPPED,
                        f"{what}: connection closed mid-stream without [DONE] or finish_reason "
                        f"({type(exc).__name__}: {_trunc(str(exc))})",
                    ) from None
                finally:
                    deadline.reading = False
                n_events += len(batch)
                for sse in batch:
                    data = sse.data
                    if done:
                        continue
                    if data == b"[DONE]":
                        done = True
                        continue
                    try:
                        obj = _decode_json(data)
                        err = obj.get("error")
                        if err is not None:
                            msg, code = _error_fields(obj)
                            raise LLMError(
                                LLM_STREAM_ERROR,
                                f"{what}: error in stream" + (f" [{code}]" if code else "") + f": {_trunc(msg)}",
                                status=resp.status,
                            )
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
                                finish = fr
                        u = obj.get("usage")
                        if u:
                            usage = u
                    except LLMError:
                        raise
                    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
                        text = data.decode("utf-8", "replace")
                        if sse.event == "error":
                            raise LLMError(LLM_STREAM_ERROR, f"{what}: error event in stream: {_trunc(text)}") from None
                        raise LLMError(
                            LLM_BAD_RESPONSE,
                            f"{what}: unparseable stream chunk ({type(exc).__name__}): {_trunc(text, 120)!r}",
                        ) from None
                    if reasoning:
                        reasoning_seen = True
                        yield StreamEvent("reasoning", reasoning)
                    if content:
                        text_seen = True
                        yield StreamEvent("text", content)

            # ---- end of stream
            if not done and finish is None:
                raise LLMError(
                    LLM_DROPPED, f"{what}: stream ended without [DONE] or finish_reason after {n_events} events"
                )
            if not text_seen:
                raise LLMError(
                    LLM_EMPTY,
                    f"{what}: stream ended with no content (finish_reason={finish!r}, "
                    f"reasoning={'yes' if reasoning_seen else 'no'}, events={n_events})",
                )
        if usage is not None:
            yield StreamEvent("usage", usage=usage, finish_reason=finish)
    except LLMError:
        raise
    except TimeoutError:  # e.g. a timeout from the body reader; never our own deadlines (handled above)
        raise LLMError(LLM_STALL, f"{what}: timed out") from None
    except (aiohttp.ClientError, _SSEError, UnicodeDecodeError, ConnectionError) as exc:
        raise _map_transport(exc, what, streaming=streaming) from None
    except Exception as exc:  # nothing but LLMError escapes (CancelledError is a BaseException)
        raise LLMError(LLM_BAD_RESPONSE, f"{what}: unexpected {type(exc).__name__}: {_trunc(str(exc))}") from exc


async def list_models(
    client: aiohttp.ClientSession, base_url: str, *, api_key: str = "", timeout: float = 2.0
) -> list[str]:
    """``GET {base_url}/models`` → list of model ids.  Raises LLMError."""
    url = base_url.rstrip("/") + "/models"
    what = f"GET {url}"
    try:
        async with asyncio.timeout(timeout):
            async with client.get(url, headers=_headers(api_key)) as resp:
                status = resp.status
                raw = await _read_capped(resp, _MAX_ERROR_BODY * 16)
    except aiohttp.ConnectionTimeoutError as exc:
        raise _map_transport(exc, what, streaming=False) from None
    except TimeoutError:
        raise LLMError(LLM_STALL, f"{what}: no response within {timeout}s") from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise _map_transport(exc, what, streaming=False) from None
    except Exception as exc:
        raise LLMError(LLM_BAD_RESPONSE, f"{what}: unexpected {type(exc).__name__}: {_trunc(str(exc))}") from exc
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
