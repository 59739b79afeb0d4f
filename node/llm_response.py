"""One request's response from LM Studio, read to its outcome from the connection's read callback.

:class:`Response` reads the head (node/http1.py), checks it, cuts the body by its framing
(node/http1.py ``BodyReader``), collects a plain or error body, and for a stream decodes the SSE events
(node/sse.py) and LM Studio's ``chat.completion.chunk`` objects, calling ``on_event(kind, text)`` for each
text or reasoning delta in the same callback. Its ``fut`` gets ``(usage, finish_reason)`` or the
:class:`LLMError` saying why not: an answer is complete only when a chunk carried a ``finish_reason``; a
stream with no chunk at all is taken as a request over the context size. One timer carries the deadlines (the
first token, then a stall), moved for free at each event and re-armed only when it fires early. When the
response ends cleanly on a connection the server keeps alive, the connection goes back to the pool; any other
end closes it (LM Studio stops generating).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec

from .http1 import CHUNKED, CLOSE, LENGTH, BodyReader, Conn, FramingError, Head, read_head
from .llm_errors import (
    LLM_BAD_RESPONSE,
    LLM_CONTEXT,
    LLM_DROPPED,
    LLM_EMPTY,
    LLM_STALL,
    LLM_STREAM_ERROR,
    MAX_ERROR_BODY,
    USER_CONTEXT_EMPTY,
    USER_CONTEXT_MID,
    USER_FIRST_TOKEN,
    USER_UNFINISHED,
    LLMError,
    error_fields,
    is_context_error,
    status_error,
    trunc,
)
from .pool import Key, LLMClient
from .sse import MAX_LINE, SSEDecoder, SSEError

__all__ = ["CallbackError", "OnEvent", "Response", "StaleConnection"]

OnEvent = Callable[[str, str], None]

_decode_json = msgspec.json.Decoder().decode

_HEAD, _BODY, _END = 0, 1, 2  # states


class CallbackError(Exception):
    """Carries what ``on_event`` raised, to be raised as it is by chat()."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


class StaleConnection(Exception):
    """A reused kept-alive connection closed before any byte of the response: send again on a new one."""


class Response:
    """One request on one connection, driven by ``data_received`` (see the module docs). ``on_event`` None:
    a plain request, whose body is collected in ``body``."""

    def __init__(self, client: LLMClient, key: Key, conn: Conn, what: str, *,
                 on_event: OnEvent | None, first_deadline: float, stall_timeout: float,
                 first_token_timeout: float, reused: bool = False) -> None:
        self.client, self.key, self.conn, self.what = client, key, conn, what
        self.on_event = on_event
        self.loop = asyncio.get_running_loop()
        self.fut: asyncio.Future[tuple[dict[str, Any] | None, str | None]] = self.loop.create_future()
        # the caller cancelled (its task was): stop at once, before another read can call on_event
        self.fut.add_done_callback(lambda f: f.cancelled() and self.close())
        self.reused = reused
        self.got_bytes = False
        self.stall_timeout = stall_timeout
        self.first_token_timeout = first_token_timeout
        self.state = _HEAD
        self.head = b""  # the response head so far
        self.status = 0
        self.reader = BodyReader(CLOSE)
        self._sink = self._body
        self.plain = True  # the body is collected, not read as a stream (a plain request, or an error status)
        self.keep_alive = False
        self.body = bytearray()  # a plain request's body, or an error body
        self.body_cap = MAX_ERROR_BODY
        self.collect = on_event is None
        self.fast = False  # a 200 stream, chunked: feed() tries the one-chunk-one-event read first
        self.paused = False
        self.busy = False  # stream_chat(): its consumer is handling an event (the stall clock waits)
        self.sse = SSEDecoder(MAX_LINE)
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
        self.fast = False
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
        if reuse and self.keep_alive and not self.paused and conn.open():
            self.client.put(self.key, conn, self.loop.time())
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
                              f"{trunc(str(err)) or type(err).__name__})"))

    def _complete(self, *, reuse: bool) -> None:
        """The body ended (or the connection closed after it)."""
        if self.collect:
            self._settle(None, reuse=reuse)
        elif not 200 <= self.status < 300:
            self._settle(exc=status_error(self.status, bytes(self.body), what=self.what), reuse=reuse)
        else:
            self._finished(reuse=reuse)

    def _finished(self, *, reuse: bool, how: str = "") -> None:
        """A 200 stream ended (``how``: why, when it was not a clean end of the body): the answer, or why not."""
        if self.n_chunks == 0:  # not one chunk: what some servers do with a request over the context size
            seen = "[DONE] only" if self.done else "no events"
            self._settle(exc=LLMError(
                LLM_CONTEXT, f"{self.what}: stream ended with no chunk at all ({seen}{how}); taken as a request "
                             f"over the model's context size", status=self.status, user_message=USER_CONTEXT_EMPTY))
        elif self.finish is None:  # the model never said it ended: the answer is cut short
            if self.done:
                detail = (f"stream ended with [DONE] but no finish_reason after {self.n_chunks} chunks: the answer "
                          f"is incomplete (a server ending a running answer early, e.g. when another request "
                          f"arrives, does this)")
            else:
                detail = (f"stream ended ({how.lstrip('; ') or 'end of the body'}) without [DONE] or finish_reason "
                          f"after {self.n_chunks} chunks: the answer is incomplete")
            self._settle(exc=LLMError(LLM_DROPPED, f"{self.what}: {detail}", status=self.status,
                                      user_message=USER_UNFINISHED if self.done else None))
        elif not self.text_seen:
            self._settle(exc=LLMError(
                LLM_EMPTY, f"{self.what}: stream ended with no content (finish_reason={self.finish!r}, "
                           f"reasoning={'yes' if self.reasoning_seen else 'no'}, events={self.n_events})"))
        else:
            self._settle((self.usage, self.finish), reuse=reuse)

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone (``connection_lost``)."""
        try:
            self._lost(exc)
        except BaseException as err:  # never leave the future unsettled
            self._fail_unexpected(err)

    def _lost(self, exc: Exception | None) -> None:
        if self.state == _END:
            return
        if self.state == _HEAD and self.reused and not self.got_bytes:
            self.fail(StaleConnection())
            return
        name = f" ({type(exc).__name__}: {trunc(str(exc)) or type(exc).__name__})" if exc else ""
        if self.state == _HEAD:
            self.fail(LLMError(LLM_DROPPED, f"{self.what}: connection closed before the response{name}"))
            return
        if self.reader.framing == CLOSE:  # the body ends with the close
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
                                          f"{self.first_token_timeout}s", user_message=USER_FIRST_TOKEN))
        elif self.collect or not 200 <= self.status < 300:
            if self.collect and 200 <= self.status < 300:
                self.fail(LLMError(LLM_STALL, f"{self.what}: timed out reading the response"))
            else:
                self._complete(reuse=False)  # the error body as far as it came
        elif self.done:
            self._finished(reuse=False)  # [DONE] seen; the server just did not end the body: fine
        elif self.n_events == 0:
            self.fail(LLMError(LLM_STALL, f"{self.what}: no first token within first_token_timeout="
                                          f"{self.first_token_timeout}s", user_message=USER_FIRST_TOKEN))
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
        """Bytes read from the connection, handled at once: the head, then the body's pieces."""
        self.got_bytes = True
        try:
            if self.fast:  # the usual read of a stream: one whole chunk holding one data event
                start = self.reader.whole(data)
                if start:
                    payload = self.sse.one(data, start, len(data) - 2)
                    if payload is None:
                        self._body(data[start:-2])
                    elif payload:
                        self.n_events += 1
                        self._sse(b"", payload)
                        if self.state == _BODY:  # each wait for more is bounded as in _body()
                            self._move(self.loop.time() + (min(self.stall_timeout, 1.0) if self.done
                                                           else self.stall_timeout))
                    return
            elif self.state == _HEAD:
                buf = self.head + data if self.head else data
                got = read_head(buf)
                if got is None:
                    self.head = buf
                    return
                self.head = b""
                data = self._head(*got)
                if not data or self.state != _BODY:
                    return
            extra = self.reader.feed(data, self._sink)
            if extra is not None and self.state == _BODY:
                self._complete(reuse=not extra)  # bytes after the body: not a connection to reuse
        except FramingError as exc:
            self.fail(LLMError(LLM_BAD_RESPONSE, f"{self.what}: malformed HTTP response ({trunc(str(exc), 120)})"))
        except LLMError as exc:
            self.fail(exc)
        except CallbackError as exc:  # the consumer's callback failed (e.g. a publish): its error, as it is
            self.fail(exc.exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # a bug, or a server's data we choke on (e.g. RecursionError): never a hang
            self._fail_unexpected(exc)

    def _head(self, head: Head, rest: bytes) -> bytes:
        """The response head: check it, set up the body; returns the body bytes that came with it."""
        status = self.status = head.status
        self.keep_alive = head.keep_alive
        self.reader = BodyReader(head.framing, head.length)
        self.plain = self.collect or not 200 <= status < 300
        self.fast = not self.plain and head.framing == CHUNKED
        self.state = _BODY
        if 200 <= status < 300 and not self.collect:
            ctypes = [v.decode("latin-1") for v in head.values(b"content-type")]
            if not ctypes or not all("text/event-stream" in c for c in ctypes):  # a repeated one too
                raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: expected Content-Type text/event-stream, got "
                                                 f"{trunc(', '.join(ctypes), 80)!r}", status=status)
        elif self.collect and 200 <= status < 300:
            self.body_cap = MAX_ERROR_BODY * 16
        else:  # an error: its body is read (bounded by time too) for the message
            self._move(self.loop.time() + min(self.stall_timeout, 10.0))
        if head.framing == LENGTH and head.length == 0:
            self._complete(reuse=not rest)
            return b""
        return rest

    def _body(self, data: bytes) -> None:
        if self.state != _BODY:
            return
        if self.plain:
            room = self.body_cap - len(self.body)
            if room > 0:
                self.body += data[:room]
            return
        fault = None
        try:
            events = self.sse.feed(data)
        except SSEError as exc:
            events, fault = exc.events, exc
        for event, payload in events:
            self.n_events += 1
            self._sse(event, payload)
            if self.state != _BODY:
                return
        if fault is not None:
            raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: undecodable response ({fault})")
        if events:  # each wait for more is bounded by stall_timeout (1 s once [DONE] is in)
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
                msg, code = error_fields(obj)
                detail = f"{self.what}: error in stream" + (f" [{code}]" if code else "") + f": {trunc(msg)}"
                if is_context_error(data.decode("utf-8", "replace")):
                    raise LLMError(LLM_CONTEXT, detail + f" (after {self.n_chunks} chunks)", status=self.status,
                                   user_message=USER_CONTEXT_MID if self.text_seen else None)
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
                raise LLMError(LLM_CONTEXT, f"{self.what}: error event in stream: {trunc(text)}",
                               user_message=USER_CONTEXT_MID if self.text_seen else None) from None
            if event == b"error":
                raise LLMError(LLM_STREAM_ERROR, f"{self.what}: error event in stream: {trunc(text)}") from None
            raise LLMError(LLM_BAD_RESPONSE, f"{self.what}: unparseable stream chunk ({type(exc).__name__}): "
                                             f"{trunc(text, 120)!r}") from None
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
            raise CallbackError(exc) from None
