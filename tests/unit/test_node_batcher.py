"""node.batcher.ReplyBatcher: one batch in flight, the rest gathered for the next; order kept; bounded size;
a failed publish fails exactly the items of its batch."""

from __future__ import annotations

import asyncio
import os

import pytest

import wire
from node.batcher import BATCH_BYTES, ReplyBatcher

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


async def test_a_lone_reply_goes_at_once_and_a_burst_is_gathered_in_order() -> None:
    broker = FakeBroker()
    b = ReplyBatcher("n1", broker.publish)
    b.start()
    try:
        await b.send(wire.Delta(id=ID, seq=1, text="a"))
        assert [len(m.items) for _, m in broker.sent] == [1]
        assert broker.sent[0][0] == "claw/v1/batch/n1" and broker.sent[0][1].node == "n1"
        await asyncio.gather(*(b.send(wire.Delta(id=ID, seq=i, text=str(i))) for i in range(2, 202)))
        seqs = [it.seq for _, m in broker.sent for it in m.items]
        assert seqs == list(range(1, 202))  # every item once, in order
        assert len(broker.sent) <= 3  # the burst went in one or two batches, not 200 messages
        assert broker.max_in_flight == 1
        assert (b.batches, b.items) == (len(broker.sent), 201)
    finally:
        await b.close()


async def test_batches_stay_under_the_payload_limit() -> None:
    broker = FakeBroker(delay=0)
    b = ReplyBatcher("n1", broker.publish)
    b.start()
    try:
        big = "字" * 21000  # ~63 KB of UTF-8: ~3 fit in one batch
        await asyncio.gather(*(b.send(wire.Delta(id=ID, seq=i, text=big)) for i in range(1, 21)))
        assert sum(len(m.items) for _, m in broker.sent) == 20
        assert all(len(wire.encode(m)) <= BATCH_BYTES + 70_000 for _, m in broker.sent)
        assert len(broker.sent) >= 7
    finally:
        await b.close()


async def test_a_failed_publish_fails_its_items_and_the_next_batch_goes_on() -> None:
    broker = FakeBroker(delay=0.01)
    b = ReplyBatcher("n1", broker.publish)
    b.start()
    try:
        broker.fail = ConnectionError("link down")
        with pytest.raises(ConnectionError):
            await b.send(wire.Accept(id=ID, node="n1"))
        await b.send(wire.Done(id=ID, seq=0, status="ok"))
        assert [type(m.items[0]).__name__ for _, m in broker.sent] == ["Done"]
    finally:
        await b.close()


async def test_send_before_start_or_after_close_is_refused() -> None:
    b = ReplyBatcher("n1", FakeBroker().publish)
    with pytest.raises(RuntimeError):
        await b.send(wire.Accept(id=ID, node="n1"))


async def test_linger_spaces_batches_and_gathers_what_comes_meanwhile() -> None:
    """node.batch_linger_ms: a lone reply still goes at once; the next batch leaves no earlier than the linger
    after the previous one started, carrying everything produced in between."""
    broker = FakeBroker(delay=0.0)
    b = ReplyBatcher("n1", broker.publish, linger=0.5)
    b.start()
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        await b.send(wire.Delta(id=ID, seq=1, text="a"))
        assert loop.time() - t0 < 0.4  # the first one did not wait for the linger
        futs = [b.enqueue(wire.Delta(id=ID, seq=i, text=str(i))) for i in range(2, 6)]
        await asyncio.sleep(0.05)
        futs.append(b.enqueue(wire.Delta(id=ID, seq=6, text="6")))
        await asyncio.gather(*futs)
        assert loop.time() - t0 >= 0.49  # waited out the linger
        assert [[it.seq for it in m.items] for _, m in broker.sent] == [[1], [2, 3, 4, 5, 6]]
    finally:
        await b.close()


@pytest.mark.parametrize("bad", [-1, 1001])
def test_batch_linger_ms_is_bounded(bad: float) -> None:
    from claw.config import ConfigError, load_settings

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
