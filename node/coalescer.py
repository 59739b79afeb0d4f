"""One task's LLM deltas → ``Delta`` chunks, driven by callbacks: no task, no event and no timer per token.

The rule: the first text goes out at once; while a chunk is in
flight (its QoS 1 PUBACK not back yet), or less than ``window`` seconds after the last chunk left, text is
gathered; it leaves when the window has passed and the previous chunk is acknowledged, at once when
``max_bytes`` are waiting (still one chunk in flight at a time), and at once when the LLM is done. So a
busy task costs one MQTT item per window instead of one per token, and an idle path adds no delay. A token
costs an append and at most one ``call_at``; the acknowledgement is a done-callback.

``send(text)`` publishes one chunk and returns a future that is done when it is acknowledged (or failed);
the coalescer never has two in flight. ``acked(n, ns)`` is called as chunk ``n`` (1, 2, …) is acknowledged,
``ns`` after it was sent. A failure is kept and raised by the next :meth:`push` or by the future
:meth:`finish` returns. ``first_us`` is when the oldest text of the chunk being sent arrived (wall clock,
µs): what ``send`` reads to say how long the chunk's text waited here (the gathering is latency too). The
remainder of a text cut at ``max_chunk`` keeps the time of the text it was cut from.

Time comes from a :class:`Clock`: by default the running loop's (:class:`LoopClock`); a test passes one it
advances by hand, to step through windows exactly instead of waiting for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Clock", "Coalescer", "LoopClock"]


class Clock(Protocol):
    """What a :class:`Coalescer` reads time from and arms its window's timer with."""

    def time(self) -> float:
        """Monotonic seconds (the window's clock)."""

    def call_at(self, when: float, callback: Callable[[], Any]) -> Any:
        """Run ``callback`` at ``time()`` ``when``; returns a handle with ``cancel()``."""

    def wall_us(self) -> int:
        """Wall-clock µs (``first_us``)."""

    def perf_ns(self) -> int:
        """A high-resolution counter in ns (how long an acknowledgement took, for ``acked``)."""


class LoopClock:
    """The real clock: the running loop's ``time()`` and timers, ``time.time_ns()``, ``time.perf_counter_ns()``."""

    __slots__ = ("time", "call_at")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        self.time = loop.time
        self.call_at = loop.call_at

    @staticmethod
    def wall_us() -> int:
        return time.time_ns() // 1000

    perf_ns = staticmethod(time.perf_counter_ns)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # a finish() nobody awaited (a stopping node) never warns "never retrieved"


class Coalescer:
    __slots__ = ("window", "max_bytes", "max_chunk", "sent", "error", "_send", "_loop", "_buf", "_size",
                 "_inflight", "_last", "_timer", "_closed", "_drained", "_acked", "_t_sent", "_abandoned",
                 "_clock", "first_us")

    def __init__(self, send: Callable[[str], asyncio.Future[None]], *, window: float, max_bytes: int,
                 max_chunk: int, acked: Callable[[int, int], None] | None = None,
                 clock: Clock | None = None) -> None:
        self.window = window
        self.max_bytes = max_bytes
        self.max_chunk = max_chunk  # bytes of UTF-8 in one chunk at most (the wire limit)
        self.sent = 0  # chunks acknowledged
        self.error: BaseException | None = None
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._clock = clock if clock is not None else LoopClock(self._loop)
        self._buf: list[str] = []
        self._size = 0  # bytes waiting (UTF-8)
        self._inflight: asyncio.Future[None] | None = None
        self._last = float("-inf")  # loop time the last chunk left
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._drained: asyncio.Future[None] | None = None
        self._acked = acked
        self._t_sent = 0
        self._abandoned = False
        self.first_us = 0  # wall-clock µs the oldest waiting text arrived (see the module docstring)

    def push(self, text: str) -> None:
        """More text from the LLM (raises the error of an earlier failed chunk)."""
        if self.error is not None:
            raise self.error
        if not self._buf:
            self.first_us = self._clock.wall_us()
        self._buf.append(text)
        self._size += len(text) if text.isascii() else len(text.encode())
        if self._inflight is None:
            self._kick()

    def finish(self, *, drop: bool = False) -> asyncio.Future[None]:
        """The LLM is done: send what is waiting at once (``drop``: forget it); the future is done when the
        last chunk is acknowledged, with the error if one failed."""
        self._closed = True
        if drop:
            self._buf.clear()
            self._size = 0
        if self._drained is None:
            self._drained = self._loop.create_future()
            self._drained.add_done_callback(_retrieve)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inflight is None:
            self._kick()
        return self._drained

    def abandon(self) -> None:
        """Send nothing more (a node stopping without a broker): waiting text is dropped, no later
        acknowledgement starts another chunk, and a chunk still in flight as its own task is cancelled."""
        self._abandoned = True
        self._closed = True
        self._buf.clear()
        self._size = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(self._inflight, asyncio.Task):
            self._inflight.cancel()

    # ---- internals
    def _kick(self) -> None:
        """Nothing in flight: send now, or arm the window's timer."""
        if self._abandoned:
            return
        if not self._buf or self.error is not None:
            self._settle()
            return
        if self._closed or self._size >= self.max_bytes or self._clock.time() - self._last >= self.window:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flush()
        elif self._timer is None:
            self._timer = self._clock.call_at(self._last + self.window, self._on_timer)

    def _on_timer(self) -> None:
        # The window is over: send. (Not _kick: uvloop runs a timer up to 1 ms early -- its clock has ms
        # resolution -- and re-checking the time re-armed it at once, over and over, until the ms ticked.)
        self._timer = None
        if self._inflight is None and self._buf and self.error is None and not self._abandoned:
            self._flush()

    def _flush(self) -> None:
        text = self._buf[0] if len(self._buf) == 1 else "".join(self._buf)
        self._buf.clear()
        self._size = 0
        if len(text) * 4 > self.max_chunk:  # maybe over the wire limit: cut at a character boundary
            raw = text.encode()
            if len(raw) > self.max_chunk:
                head = raw[: self.max_chunk].decode("utf-8", "ignore") or text[0]  # never an empty chunk
                self._buf.append(text[len(head):])
                self._size = len(raw) - len(head.encode())
                text = head
        self._last = self._clock.time()
        self._t_sent = self._clock.perf_ns()
        try:
            fut = self._send(text)
        except Exception as exc:  # noqa: BLE001 - kept, raised by the next push() and by finish()'s future
            self.error = exc
            self._settle()
            return
        self._inflight = fut
        fut.add_done_callback(self._on_ack)

    def _on_ack(self, fut: asyncio.Future[None]) -> None:
        self._inflight = None
        if fut.cancelled():
            self.error = asyncio.CancelledError()
        elif fut.exception() is not None:
            self.error = fut.exception()
        else:
            self.sent += 1
            if self._acked is not None:
                self._acked(self.sent, self._clock.perf_ns() - self._t_sent)
        self._kick()

    def _settle(self) -> None:
        """Nothing waiting and nothing in flight: a finish() is done."""
        d = self._drained
        if d is None or d.done() or self._inflight is not None or (self._buf and self.error is None):
            return
        if isinstance(self.error, asyncio.CancelledError):
            d.cancel()
        elif self.error is not None:
            d.set_exception(self.error)
        else:
            d.set_result(None)
