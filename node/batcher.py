"""Replies of many tasks in one MQTT message (node → edge): a group commit for publishes.

Every reply (``accept``/``delta``/``done``) for the edge goes through :meth:`ReplyBatcher.send`, which returns
once the :class:`wire.Batch` carrying it has been acknowledged (PUBACK) -- the same back-pressure a plain
QoS 1 publish gives. One batch is in flight at a time; whatever is sent meanwhile waits and goes out together
in the next one. An idle node therefore adds no delay (a lone reply goes at once, in a batch of one), and a
busy one sends one MQTT message where it would have sent hundreds: the broker's cost is per message, not per
byte (docs/performance.md).

Order: items leave in the order they were sent, so each task's replies stay in order. A failed publish fails
every item of that batch (the caller's publish fails as a plain one would); the edge repairs what is lost by
asking for a replay (``Task.replay``).

Time (the linger) comes from a :class:`node.coalescer.Clock`: by default the running loop's
(:class:`node.coalescer.LoopClock`); a test passes one it advances by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import wire
from node.coalescer import Clock, LoopClock

BATCH_BYTES = 192 * 1024  # a batch stays below this (+ one item of ≤ 64 KiB of text: under the 256 KiB limit)
Reply = wire.Accept | wire.Delta | wire.Done


def _size(msg: Reply) -> int:
    """An upper bound of the item's encoded size, without encoding it."""
    text = getattr(msg, "text", "")
    n = len(text) * 4 if len(text) < 16384 else len(text.encode())
    return 96 + n + (len(msg.timing) * 24 if getattr(msg, "timing", None) else 0) + (
        len(msg.err.msg) * 4 if getattr(msg, "err", None) else 0)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: an un-awaited enqueue never warns "exception was never retrieved"


class ReplyBatcher:
    def __init__(self, node_id: str, publish: Callable[[str, bytes], Awaitable[None]], linger: float = 0.0, *,
                 clock: Clock | None = None) -> None:
        self.node_id = node_id
        self.linger = linger  # seconds: a batch leaves at least this long after the previous one started
        self.topic = wire.batch_topic(node_id)
        self._publish = publish
        self._items: list[Reply] = []
        self._futs: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock  # None: the running loop's (LoopClock), bound in start()
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._clock = self._clock or LoopClock(self._loop)
            self._task = self._loop.create_task(self._run(), name=f"reply-batcher-{self.node_id}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for fut in self._futs:
            if not fut.done():
                fut.cancel()
        self._items.clear()
        self._futs.clear()

    async def send(self, msg: Reply) -> None:
        """Queue ``msg`` for the next batch; return when that batch is acknowledged (or raise its error)."""
        await self.enqueue(msg)

    def enqueue(self, msg: Reply) -> asyncio.Future[None]:
        """Queue ``msg`` now (its place in the order is taken at once) and return the future of its batch's
        acknowledgement; not awaiting it is fine (a failure is then only logged by nobody: the edge repairs)."""
        if self._task is None or self._loop is None:
            raise RuntimeError("reply batcher is not running")
        # self._loop, not asyncio.get_running_loop(): that one costs a getpid() system call each time
        fut = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        self._items.append(msg)
        self._futs.append(fut)
        self._wake.set()
        return fut

    async def _until(self, when: float) -> None:
        """Return at ``self._clock``'s time ``when`` (what ``asyncio.sleep`` does with the loop's clock)."""
        assert self._loop is not None and self._clock is not None
        fut: asyncio.Future[None] = self._loop.create_future()

        def due() -> None:
            if not fut.done():
                fut.set_result(None)

        handle = self._clock.call_at(when, due)
        try:
            await fut
        finally:
            handle.cancel()

    async def _run(self) -> None:
        clock = self._clock
        assert clock is not None
        last = float("-inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                until = last + self.linger
                if until > clock.time():  # busy: gather a little longer (an idle node's lone reply never waits)
                    await self._until(until)
                last = clock.time()
                n, size = 0, 0
                for m in self._items:
                    est = _size(m)
                    if n and (size + est > BATCH_BYTES or n >= wire.MAX_BATCH):
                        break
                    n += 1
                    size += est
                items, futs = self._items[:n], self._futs[:n]
                del self._items[:n], self._futs[:n]
                try:
                    await self._publish(self.topic, wire.encode(wire.Batch(node=self.node_id, items=items)))
                except asyncio.CancelledError:
                    for f in futs:
                        f.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - handed to every sender of this batch
                    for f in futs:
                        if not f.done():
                            f.set_exception(exc)
                else:
                    self.batches += 1
                    self.items += n
                    for f in futs:
                        if not f.done():
                            f.set_result(None)
                    # Let the acknowledgement callbacks run before the next batch is cut: a task's coalescer
                    # holds its text while its chunk is in flight and sends it from that callback; without
                    # this the text would miss the batch leaving now and wait a whole round trip more.
                    await asyncio.sleep(0)
