"""node.coalescer.Coalescer on a real asyncio loop with a clock the test advances by hand (:class:`FakeClock`):
``send`` returns a future the test resolves (the acknowledgement) and time passes only when the test says so,
so every step of the rule (at once / gathered while in flight / the window / max_bytes / finish / failures /
the wire limit) is observed exactly, however slow the machine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from node.coalescer import Coalescer

pytestmark = pytest.mark.timeout(20)

BOUND = 5.0  # generous upper bound for anything that must "eventually" happen


class _Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """The coalescer's clock (node.coalescer.Clock), moved on by hand: :meth:`advance` runs the timers that come
    due, in time order, as the loop would. The wall clock and the performance counter move with it."""

    WALL0_US = 1_700_000_000_000_000

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_Timer] = []

    def time(self) -> float:
        return self.now

    def wall_us(self) -> int:
        return self.WALL0_US + round(self.now * 1e6)

    def perf_ns(self) -> int:
        return round(self.now * 1e9)

    def call_at(self, when: float, callback: Callable[[], object]) -> _Timer:
        timer = _Timer(when, callback)
        self.timers.append(timer)
        return timer

    @property
    def armed(self) -> list[_Timer]:
        return [t for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        self.advance_to(self.now + seconds)

    def advance_to(self, when: float) -> None:
        assert when >= self.now
        self.now = when
        while due := sorted((t for t in self.armed if t.when <= when), key=lambda t: t.when):
            self.timers.remove(due[0])
            due[0].callback()
        self.timers = self.armed


class Sender:
    """``send(text)``: records the chunk and its (fake) time, returns a future resolved by the test. Fails the
    test at once if a chunk is sent while the previous one is not acknowledged (two in flight)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.clock = FakeClock()
        self.texts: list[str] = []
        self.times: list[float] = []
        self.futs: list[asyncio.Future[None]] = []
        self.overlap = False

    def __call__(self, text: str) -> asyncio.Future[None]:
        if self.futs and not self.futs[-1].done():
            self.overlap = True
        fut: asyncio.Future[None] = self.loop.create_future()
        self.texts.append(text)
        self.times.append(self.clock.time())
        self.futs.append(fut)
        return fut

    @property
    def inflight(self) -> asyncio.Future[None]:
        assert self.futs and not self.futs[-1].done(), "nothing in flight"
        return self.futs[-1]

    async def ack(self) -> None:
        """Acknowledge the chunk in flight and let the callbacks run."""
        self.inflight.set_result(None)
        await settle()


async def settle() -> None:
    """Let done-callbacks (scheduled with call_soon) run: a few passes of the loop, no time passes."""
    for _ in range(5):
        await asyncio.sleep(0)


def acked_at_once(sent: list[str]) -> Callable[[str], asyncio.Future[None]]:
    """A send that records each chunk and acknowledges it as it leaves."""

    def send(text: str) -> asyncio.Future[None]:
        sent.append(text)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    return send


def make(send: Sender, *, window: float = 0.05, max_bytes: int = 1 << 20, max_chunk: int = 64 * 1024,
         acked: list | None = None) -> Coalescer:
    cb = (lambda n, ns: acked.append((n, ns))) if acked is not None else None
    return Coalescer(send, window=window, max_bytes=max_bytes, max_chunk=max_chunk, acked=cb, clock=send.clock)


async def ack_until(s: Sender, done: asyncio.Future[None], most: int) -> None:
    """Acknowledge chunk after chunk (``most`` at the most) until ``done`` (a finish future) is done."""
    for _ in range(most):
        if done.done():
            break
        await s.ack()


def pushed(*texts: str, **kw: Any) -> tuple[Sender, Coalescer]:
    """A new :class:`Sender` and a coalescer made for it by :func:`make` (``kw``), ``texts`` pushed in order."""
    s = Sender()
    co = make(s, **kw)
    for text in texts:
        co.push(text)
    return s, co


# --------------------------------------------------------------------------- the rule


async def test_first_text_goes_at_once() -> None:
    s = Sender()
    co = make(s, window=10.0)  # a long window: the first text must not wait for it
    co.push("hello")
    assert s.texts == ["hello"]  # synchronously, inside push()
    await s.ack()
    assert co.sent == 1 and not s.overlap


async def test_texts_pushed_while_in_flight_are_one_chunk_sent_after_the_ack() -> None:
    s, co = pushed("a", window=0.02)
    for t in ("b", "c", "d", "中文"):
        co.push(t)
    s.clock.advance(0.1)  # the window passed long ago: still nothing, a chunk is in flight
    await settle()
    assert s.texts == ["a"]
    await s.ack()
    assert s.texts == ["a", "bcd中文"]  # one chunk, sent right at the ack (the window had passed)
    co.push("e")
    s.clock.advance(0.1)
    await settle()
    assert s.texts == ["a", "bcd中文"]  # "bcd中文" still unacknowledged: "e" waits
    await s.ack()
    assert s.texts == ["a", "bcd中文", "e"]
    await s.ack()
    assert co.sent == 3 and not s.overlap


async def test_first_us_is_when_the_oldest_text_of_the_chunk_arrived() -> None:
    """What the node stamps as ``timing.n_tok``: the gathering is part of a chunk's latency."""
    seen: list[tuple[str, int]] = []
    s = Sender()
    clock = s.clock
    co = make(s, window=0.0)

    def send(text: str) -> asyncio.Future[None]:
        seen.append((text, co.first_us))
        return s(text)

    co._send = send  # the worker's send reads co.first_us the same way  # noqa: SLF001
    t_a = clock.wall_us()
    co.push("a")
    assert seen == [("a", t_a)]
    clock.advance(0.03)
    t_b = clock.wall_us()
    co.push("b")  # "a" is in flight: "b" waits ...
    clock.advance(0.03)
    co.push("c")  # ... and "c" joins it; the chunk's oldest text is still "b"
    clock.advance(0.03)
    await s.ack()
    assert seen[1] == ("bc", t_b)  # b's arrival, not c's (30 ms later) nor the send's (60 ms later)


async def test_after_an_ack_text_waits_for_the_window() -> None:
    s = Sender()
    window = 0.05
    co = make(s, window=window)
    co.push("a")
    await s.ack()  # acknowledged at once: nothing in flight, but the window since "a" has not passed
    co.push("b")
    co.push("c")
    assert s.texts == ["a"]  # not sent immediately
    s.clock.advance(window / 5)
    await settle()
    assert s.texts == ["a"]  # still waiting
    s.clock.advance_to(s.times[0] + window - 1e-6)
    await settle()
    assert s.texts == ["a"]  # still waiting, just before the window ends
    s.clock.advance_to(s.times[0] + window)
    assert s.texts == ["a", "bc"]  # joined, sent as the window ended
    assert s.times[1] == s.times[0] + window
    await s.ack()
    assert co.sent == 2 and not s.overlap


async def test_text_after_an_idle_window_goes_at_once() -> None:
    s, co = pushed("a", window=0.03)
    await s.ack()
    s.clock.advance(0.06)  # idle longer than the window
    co.push("b")
    assert s.texts == ["a", "b"]  # no delay on an idle path


async def test_an_ack_that_comes_after_the_window_sends_at_once() -> None:
    s, co = pushed("a", "b", window=0.03)
    s.clock.advance(0.06)  # the window ran out while "a" was in flight
    assert s.texts == ["a"]
    await s.ack()
    assert s.texts == ["a", "b"]  # by the ack's own callback, no further wait


async def test_max_bytes_waiting_is_sent_at_the_ack_without_the_window() -> None:
    s, co = pushed("first", window=10.0, max_bytes=10)
    co.push("0123456789")  # 10 bytes waiting, while "first" is in flight
    assert s.texts == ["first"]  # never two in flight, max_bytes or not
    await s.ack()
    assert s.texts == ["first", "0123456789"]  # at the ack, no 10 s window
    assert not s.overlap


async def test_max_bytes_reached_after_the_ack_sends_at_once_and_counts_utf8_bytes() -> None:
    s, co = pushed("x", window=10.0, max_bytes=10)
    await s.ack()
    co.push("中中中")  # 3 characters, 9 bytes: below max_bytes, waits for the (long) window
    s.clock.advance(0.02)
    await settle()
    assert s.texts == ["x"]
    co.push("中")  # 12 bytes (4 characters): max_bytes is in bytes of UTF-8
    assert s.texts == ["x", "中中中中"]


async def test_finish_flushes_waiting_text_at_once_and_resolves_after_the_last_ack() -> None:
    s, co = pushed("a", window=10.0)
    await s.ack()
    co.push("b")  # waits for the 10 s window
    assert s.texts == ["a"]
    done = co.finish()
    assert s.texts == ["a", "b"]  # at once
    await settle()
    assert not done.done()  # "b" not acknowledged yet
    await s.ack()
    assert done.done() and done.result() is None
    assert co.sent == 2


async def test_finish_while_in_flight_sends_the_rest_at_the_ack() -> None:
    s, co = pushed("a", "b", "c", window=10.0)
    done = co.finish()
    await settle()
    assert s.texts == ["a"] and not done.done()
    await s.ack()
    assert s.texts == ["a", "bc"] and not done.done()  # no window once finished
    await s.ack()
    assert done.done() and done.exception() is None and co.sent == 2 and not s.overlap


async def test_finish_with_nothing_sent_is_done_at_once() -> None:
    s = Sender()
    co = make(s)
    done = co.finish()
    assert done.done() and done.result() is None
    assert s.texts == [] and co.sent == 0


async def test_finish_drop_forgets_waiting_text() -> None:
    s, co = pushed("a", window=0.03)
    co.push("b")  # gathered while "a" is in flight
    done = co.finish(drop=True)
    await s.ack()
    assert s.texts == ["a"]  # "b" dropped
    assert done.done() and done.result() is None and co.sent == 1


async def test_finish_drop_cancels_the_window_timer() -> None:
    s, co = pushed("a", window=0.03)
    await s.ack()
    co.push("b")  # waiting for the window (a timer is armed)
    assert len(s.clock.armed) == 1
    done = co.finish(drop=True)
    assert done.done() and done.result() is None
    assert s.clock.armed == []  # the timer is cancelled ...
    s.clock.advance(0.08)  # ... so well past the window it does not send "b" after all
    await settle()
    assert s.texts == ["a"]


# --------------------------------------------------------------------------- failures


async def test_a_failed_send_is_raised_by_the_next_push_and_by_finish() -> None:
    s, co = pushed("a", window=0.01)
    co.push("b")  # waiting behind "a"
    boom = ConnectionError("broker gone")
    s.inflight.set_exception(boom)
    await settle()
    assert co.error is boom
    s.clock.advance(0.03)
    await settle()
    assert s.texts == ["a"]  # nothing more is sent after a failure
    with pytest.raises(ConnectionError) as ei:
        co.push("c")
    assert ei.value is boom
    with pytest.raises(ConnectionError):  # again: the error is kept
        co.push("d")
    done = co.finish()
    await settle()
    assert done.done() and done.exception() is boom
    assert co.sent == 0 and s.texts == ["a"]


async def test_a_failure_after_finish_fails_the_finish_future() -> None:
    s, co = pushed("a", "b", window=0.01)
    done = co.finish()
    await s.ack()
    assert s.texts == ["a", "b"] and not done.done()
    boom = RuntimeError("publish failed")
    s.inflight.set_exception(boom)
    await settle()
    assert done.done() and done.exception() is boom
    assert co.sent == 1


async def test_a_cancelled_send_cancels_the_finish_future() -> None:
    s, co = pushed("a", "b", window=0.01)
    done = co.finish()
    s.inflight.cancel()
    await settle()
    assert done.cancelled()
    assert s.texts == ["a"] and co.sent == 0
    with pytest.raises(asyncio.CancelledError):
        co.push("c")


async def test_a_cancelled_send_before_finish_cancels_the_finish_future() -> None:
    s, co = pushed("a", window=0.01)
    s.inflight.cancel()
    await settle()
    assert isinstance(co.error, asyncio.CancelledError)
    done = co.finish()
    await settle()
    assert done.cancelled()


# --------------------------------------------------------------------------- the wire limit


def _utf8(s: str) -> int:
    return len(s.encode("utf-8"))


@pytest.mark.parametrize("pieces", [False, True], ids=["one_push", "many_pushes"])
@pytest.mark.parametrize("max_chunk", [16, 17, 18, 19, 64])
async def test_text_longer_than_max_chunk_is_cut_at_character_boundaries(max_chunk: int, pieces: bool) -> None:
    s = Sender()
    co = make(s, window=0.0, max_chunk=max_chunk)
    text = ("ab中文字符cd€é😀xyz" * 20) + "末尾"  # 1-, 2-, 3- and 4-byte characters
    assert _utf8(text) > 4 * max_chunk
    if pieces:  # gathered behind a first chunk in flight, then joined past the limit
        co.push(text[:1])
        for i in range(1, len(text), 5):
            co.push(text[i:i + 5])
    else:
        co.push(text)
    done = co.finish()
    await ack_until(s, done, 1000)
    assert done.done() and done.result() is None
    assert "".join(s.texts) == text  # all of it, in order
    assert len(s.texts) >= _utf8(text) // max_chunk
    for chunk in s.texts:
        assert chunk and _utf8(chunk) <= max_chunk, (chunk, _utf8(chunk))
        assert chunk.encode("utf-8").decode("utf-8") == chunk  # whole characters only
    # each cut takes as much as fits: the next character would not have fitted
    cuts = s.texts[1:] if pieces else s.texts  # (the first of many pushes went alone, uncut)
    for chunk, nxt in zip(cuts, cuts[1:]):
        assert _utf8(chunk) + _utf8(nxt[0]) > max_chunk
    assert co.sent == len(s.texts) and not s.overlap


async def test_cut_remainder_keeps_its_place_before_later_text() -> None:
    s = Sender()
    co = make(s, window=0.01, max_chunk=12)
    co.push("一二三四五六七八")  # 24 bytes: "一二三四" now, "五六七八" left waiting
    assert s.texts == ["一二三四"]
    co.push("九十")  # after the remainder
    await s.ack()
    s.clock.advance(0.01)
    assert len(s.texts) == 2
    await s.ack()
    done = co.finish()
    await ack_until(s, done, 20)
    assert done.done() and done.exception() is None
    assert "".join(s.texts) == "一二三四五六七八九十"
    assert all(_utf8(t) <= 12 for t in s.texts)


async def test_max_bytes_counts_the_remainder_of_a_cut() -> None:
    s = Sender()
    co = make(s, window=10.0, max_bytes=8, max_chunk=8)
    co.push("a" * 30)  # 8 now, 22 bytes left over (≥ max_bytes): each ack sends the next at once
    assert s.texts == ["a" * 8]
    await s.ack()
    assert s.texts == ["a" * 8] * 2
    await s.ack()
    assert s.texts == ["a" * 8] * 3  # 14 bytes were left: sent at the ack
    await s.ack()
    s.clock.advance(0.02)
    await settle()
    assert s.texts == ["a" * 8] * 3  # 6 bytes left, under max_bytes: they wait for the (10 s) window
    done = co.finish()
    assert s.texts == ["a" * 8] * 3 + ["a" * 6]
    await s.ack()
    assert done.done() and co.sent == 4


# --------------------------------------------------------------------------- acked / sent


async def test_acked_is_called_with_1_2_3_in_order_and_sent_counts_acks() -> None:
    s = Sender()
    acked: list[tuple[int, int]] = []
    co = make(s, window=0.0, acked=acked)
    co.push("a")
    assert co.sent == 0 and acked == []
    s.clock.advance(0.02)
    await s.ack()
    assert co.sent == 1 and [n for n, _ in acked] == [1]
    assert acked[0][1] == 20_000_000  # ns since "a" was sent
    for i, t in enumerate(("b", "c", "d"), start=2):
        co.push(t)
        assert s.texts[-1] == t
        assert co.sent == i - 1
        await s.ack()
        assert co.sent == i
    assert [n for n, _ in acked] == [1, 2, 3, 4]
    assert all(isinstance(ns, int) and ns >= 0 for _, ns in acked)
    co.push("e")
    s.inflight.set_exception(ConnectionError("x"))  # a failure is not an ack
    await settle()
    assert co.sent == 4 and len(acked) == 4


async def test_many_tokens_one_chunk_per_window_in_flight() -> None:
    """A token stream faster than the acks: never two in flight, every token in order, fewer chunks."""
    s = Sender()
    co = make(s, window=0.005)
    tokens = [f"t{i}，" for i in range(300)]
    for i, t in enumerate(tokens):  # 10 tokens a millisecond; an acknowledgement every 3 ms
        co.push(t)
        if i % 10 == 9:
            s.clock.advance(0.001)
            if i % 30 == 29 and s.futs and not s.futs[-1].done():
                await s.ack()
    done = co.finish()
    for _ in range(len(tokens)):
        if done.done():
            break
        await s.ack()
    assert done.done() and done.exception() is None
    assert "".join(s.texts) == "".join(tokens)
    assert not s.overlap and co.sent == len(s.texts) <= len(tokens) // 30 + 1


async def test_a_max_chunk_below_one_character_still_makes_progress() -> None:
    """A limit smaller than one character's UTF-8 (never the case with the 64 KiB wire limit) sends one
    character per chunk rather than empty chunks for ever."""
    sent: list[str] = []

    co = Coalescer(acked_at_once(sent), window=0.0, max_bytes=1, max_chunk=3)
    co.push("😀a")
    await asyncio.wait_for(co.finish(), BOUND)
    assert sent == ["😀", "a"]


def test_the_window_timer_fires_once_per_window_on_uvloop() -> None:
    """uvloop runs a timer up to 1 ms early (its clock has ms resolution); the window's timer must send then,
    not re-arm itself for the same instant over and over until the millisecond ticks."""
    uvloop = pytest.importorskip("uvloop")
    fires = 0

    class Counting(Coalescer):
        __slots__ = ()

        def _on_timer(self) -> None:
            nonlocal fires
            fires += 1
            super()._on_timer()

    async def main() -> list[str]:
        sent: list[str] = []

        co = Counting(acked_at_once(sent), window=0.04, max_bytes=1 << 20, max_chunk=1 << 16)
        for i in range(20):  # a token every 10 ms: each window's timer sends what gathered
            co.push(str(i % 10))
            await asyncio.sleep(0.01)
        await co.finish()
        return sent

    loop = uvloop.new_event_loop()
    try:
        sent = loop.run_until_complete(main())
    finally:
        loop.close()
    assert "".join(sent) == "0123456789" * 2
    assert fires <= len(sent) + 1  # one timer per window, not hundreds


async def test_a_send_that_raises_is_kept_as_the_error_not_lost() -> None:
    calls = 0

    def send(text: str) -> asyncio.Future[None]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("batcher closed")
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, None)
        return fut

    co = Coalescer(send, window=0.0, max_bytes=1 << 20, max_chunk=1 << 16)
    co.push("a")  # sent at once
    co.push("b")  # waits for the ack, then its send raises inside the ack callback
    with pytest.raises(RuntimeError, match="batcher closed"):
        await asyncio.wait_for(co.finish(), BOUND)
    with pytest.raises(RuntimeError, match="batcher closed"):
        co.push("c")


async def test_abandon_sends_nothing_more_and_cancels_a_publish_task_in_flight() -> None:
    sends: list[str] = []
    started: list[str] = []
    gate = asyncio.Event()

    async def publish(text: str) -> None:
        started.append(text)
        await gate.wait()  # "waiting for the broker to come back"

    def send(text: str) -> asyncio.Future[None]:
        sends.append(text)
        return asyncio.ensure_future(publish(text))

    co = Coalescer(send, window=0.0, max_bytes=1 << 20, max_chunk=1 << 16)
    co.push("a")
    await settle()
    assert started == ["a"]  # the publish task runs (and waits at the gate)
    co.push("b")  # waiting behind "a"
    inflight = co._inflight
    co.finish()
    co.abandon()
    assert inflight is not None
    await asyncio.wait([inflight], timeout=BOUND)  # its done-callbacks (the coalescer's first) have run now
    assert inflight.cancelled()
    assert sends == ["a"]  # the cancelled chunk's callback sent nothing more
    gate.set()  # the link is back: still nothing more
    await settle()
    assert sends == ["a"] and started == ["a"]
