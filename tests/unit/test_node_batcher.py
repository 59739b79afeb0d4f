"""node.batcher.ReplyBatcher: one batch in flight, the rest gathered for the next; order kept; bounded size;
a failed publish fails exactly the items of its batch."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

import pytest

import wire
from node.batcher import BATCH_BYTES, ReplyBatcher
from tests.unit.test_coalescer import FakeClock

BOUND = 5.0  # generous upper bound for anything that must "eventually" happen

ID = os.urandom(16)


class FakeBroker:
    """Records each publish; each takes ``delay`` (a PUBACK round trip); ``fail`` makes the next one fail."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.sent: list[tuple[str, wire.Batch]] = []
        self.fail: Exception | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    async def publish(self, topic: str, payload: bytes) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail is not None:
                exc, self.fail = self.fail, None
                raise exc
            assert len(payload) <= wire.MAX_PAYLOAD
            msg = wire.decode(payload)
            assert isinstance(msg, wire.Batch)
            self.sent.append((topic, msg))
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def running(broker: FakeBroker) -> AsyncIterator[ReplyBatcher]:
    """A started batcher publishing to ``broker``, closed on the way out."""
    b = ReplyBatcher("n1", broker.publish)
    b.start()
    try:
        yield b
    finally:
        await b.close()


async def test_a_lone_reply_goes_at_once_and_a_burst_is_gathered_in_order() -> None:
    broker = FakeBroker()
    async with running(broker) as b:
        await b.send(wire.Delta(id=ID, seq=1, text="a"))
        assert [len(m.items) for _, m in broker.sent] == [1]
        assert broker.sent[0][0] == "claw/v1/batch/n1" and broker.sent[0][1].node == "n1"
        await asyncio.gather(*(b.send(wire.Delta(id=ID, seq=i, text=str(i))) for i in range(2, 202)))
        seqs = [it.seq for _, m in broker.sent for it in m.items]
        assert seqs == list(range(1, 202))  # every item once, in order
        assert len(broker.sent) <= 3  # the burst went in one or two batches, not 200 messages
        assert broker.max_in_flight == 1
        assert (b.batches, b.items) == (len(broker.sent), 201)


async def test_batches_stay_under_the_payload_limit() -> None:
    broker = FakeBroker(delay=0)
    async with running(broker) as b:
        big = "字" * 21000  # ~63 KB of UTF-8: ~3 fit in one batch
        await asyncio.gather(*(b.send(wire.Delta(id=ID, seq=i, text=big)) for i in range(1, 21)))
        assert sum(len(m.items) for _, m in broker.sent) == 20
        assert all(len(wire.encode(m)) <= BATCH_BYTES + 70_000 for _, m in broker.sent)
        assert len(broker.sent) >= 7


async def test_a_failed_publish_fails_its_items_and_the_next_batch_goes_on() -> None:
    broker = FakeBroker(delay=0.01)
    async with running(broker) as b:
        broker.fail = ConnectionError("link down")
        with pytest.raises(ConnectionError):
            await b.send(wire.Accept(id=ID, node="n1"))
        await b.send(wire.Done(id=ID, seq=0, status="ok"))
        assert [type(m.items[0]).__name__ for _, m in broker.sent] == ["Done"]


async def test_send_before_start_or_after_close_is_refused() -> None:
    b = ReplyBatcher("n1", FakeBroker().publish)
    with pytest.raises(RuntimeError):
        await b.send(wire.Accept(id=ID, node="n1"))


class StepClock(FakeClock):
    """node.coalescer's hand-moved test clock, telling the test when a timer is armed (the batcher waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.timer_armed = asyncio.Event()

    def call_at(self, when: float, callback: Callable[[], object]) -> object:
        self.timer_armed.set()
        return super().call_at(when, callback)


async def test_linger_spaces_batches_and_gathers_what_comes_meanwhile() -> None:
    """node.batch_linger_ms: a lone reply still goes at once; the next batch leaves exactly the linger after
    the previous one started (not after the reply that woke it), carrying everything produced in between.
    Time is the test's clock: it moves only when the test says so."""
    clock = StepClock()
    published_at: list[float] = []
    broker = FakeBroker(delay=0.0)

    async def publish(topic: str, payload: bytes) -> None:
        published_at.append(clock.time())
        await broker.publish(topic, payload)

    b = ReplyBatcher("n1", publish, linger=0.5, clock=clock)
    b.start()
    try:
        clock.advance_to(10.0)
        await asyncio.wait_for(b.send(wire.Delta(id=ID, seq=1, text="a")), BOUND)  # no clock move needed
        assert published_at == [10.0] and not clock.timer_armed.is_set()  # the first did not wait for the linger
        clock.advance_to(10.2)  # some time after batch 1 started, the next replies come
        futs = [b.enqueue(wire.Delta(id=ID, seq=i, text=str(i))) for i in range(2, 6)]
        await asyncio.wait_for(clock.timer_armed.wait(), BOUND)  # the batcher now waits for the linger
        (timer,) = clock.armed
        assert timer.when == 10.5  # the linger counts from the start of batch 1, not from reply 2
        assert published_at == [10.0] and not any(f.done() for f in futs)
        futs.append(b.enqueue(wire.Delta(id=ID, seq=6, text="6")))  # comes meanwhile: joins batch 2
        clock.advance_to(10.49)  # not yet (the timer is the batcher's only way on, and it is not due)
        assert clock.armed == [timer] and published_at == [10.0]
        clock.advance_to(10.5)  # the timer runs, batch 2 is cut
        await asyncio.wait_for(asyncio.gather(*futs), BOUND)
        assert published_at == [10.0, 10.5]
        assert [[it.seq for it in m.items] for _, m in broker.sent] == [[1], [2, 3, 4, 5, 6]]
        clock.timer_armed.clear()
        clock.advance_to(15.5)  # idle again: a lone reply goes at once
        await asyncio.wait_for(b.send(wire.Delta(id=ID, seq=7, text="7")), BOUND)
        assert published_at == [10.0, 10.5, 15.5] and not clock.timer_armed.is_set()
    finally:
        await b.close()


async def test_the_default_clock_is_the_loops() -> None:
    """Without a clock the batcher lingers on the running loop's time and timers."""
    broker = FakeBroker(delay=0.0)
    loop = asyncio.get_running_loop()
    published_at: list[float] = []

    async def publish(topic: str, payload: bytes) -> None:
        published_at.append(loop.time())
        await broker.publish(topic, payload)

    b = ReplyBatcher("n1", publish, linger=0.05)
    b.start()
    try:
        await b.send(wire.Delta(id=ID, seq=1, text="a"))
        await b.send(wire.Delta(id=ID, seq=2, text="b"))
        # batch 2 waited out the linger on the loop's clock (a lower bound holds on any machine; the slack
        # covers the encoding between the batcher's reading of the clock and the publish, and uvloop's 1 ms)
        assert published_at[1] - published_at[0] >= 0.04
        assert [[it.seq for it in m.items] for _, m in broker.sent] == [[1], [2]]
    finally:
        await b.close()


@pytest.mark.parametrize("bad", [-1, 1001])
def test_batch_linger_ms_is_bounded(bad: float) -> None:
    from core.config import ConfigError, load_settings

    with pytest.raises((ConfigError, ValueError), match="batch_linger_ms"):
        load_settings(env={}, overrides={"node": {"batch_linger_ms": bad}})
    assert load_settings(env={}, overrides={"node": {"batch_linger_ms": 5}}).node.batch_linger_ms == 5


async def test_a_reply_sent_from_an_acknowledgement_callback_joins_the_next_batch() -> None:
    """A coalescer sends its held text from the callback of its chunk's acknowledgement. That text must go in
    the batch cut right after, with what was already waiting, not one round trip later."""
    broker = FakeBroker(delay=0.0)
    publishing, acked = asyncio.Event(), asyncio.Event()  # batch 1 left / its PUBACK may come

    async def publish(topic: str, payload: bytes) -> None:
        publishing.set()
        await acked.wait()
        await broker.publish(topic, payload)

    b = ReplyBatcher("n1", publish)
    b.start()
    try:
        first = b.enqueue(wire.Delta(id=ID, seq=1, text="a"))  # batch 1, in flight at once
        await asyncio.wait_for(publishing.wait(), 5)  # cut and in flight: what comes now waits for batch 2
        other = os.urandom(16)
        b.enqueue(wire.Delta(id=other, seq=1, text="x"))  # waits for batch 2
        later: list[asyncio.Future[None]] = []
        first.add_done_callback(lambda _: later.append(b.enqueue(wire.Delta(id=ID, seq=2, text="b"))))
        acked.set()
        await first
        await asyncio.wait_for(later[0], 5)
        assert [[(it.id, it.seq) for it in m.items] for _, m in broker.sent] == [
            [(ID, 1)], [(other, 1), (ID, 2)]]
    finally:
        await b.close()
