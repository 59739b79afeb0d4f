"""The LMDB group-commit writer and the edge task store (real LMDB files in a temp dir)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import lmdb
import pytest

from core.store import Writer, close_env, open_env
from edge.store import Retention, TaskRecord, TaskStore

BOUND = 10.0  # seconds: anything that must "eventually" happen does so well within this


@contextlib.asynccontextmanager
async def writer_held(st: TaskStore) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """Hold the store's writer thread inside one op until the block ends: the writes submitted meanwhile wait in
    its queue and are committed after it, together, in one batch. Yields ``queued(n)``, which returns once
    ``n`` writes were submitted since the hold began (an event: no sleeping, no polling)."""
    running, release = threading.Event(), threading.Event()
    submitted = 0
    more = asyncio.Event()
    submit = st.writer.submit

    def hold(txn: object) -> None:
        running.set()
        release.wait(BOUND)

    def counting(fn: Callable[..., object]) -> object:  # (ops are submitted from the event loop's thread)
        nonlocal submitted
        fut = submit(fn)
        submitted += 1
        more.set()
        return fut

    async def queued(n: int) -> None:
        async with asyncio.timeout(BOUND):
            while submitted < n:
                more.clear()
                await more.wait()

    held = submit(hold)
    assert await asyncio.to_thread(running.wait, BOUND)  # the writer is inside hold(): later ops queue up
    st.writer.submit = counting  # type: ignore[method-assign]
    try:
        yield queued
    finally:
        st.writer.submit = submit  # type: ignore[method-assign]
        release.set()
        await asyncio.wrap_future(held)


async def test_writer_batches_concurrent_writes_into_few_commits(tmp_path: Path) -> None:
    env = open_env(tmp_path / "w")
    db = env.open_db(b"x")
    w = Writer(env)
    try:
        await asyncio.gather(*[w.write(lambda t, i=i: t.put(b"%d" % i, b"v", db=db)) for i in range(1000)])
        assert w.ops == 1000 and w.batches < 100  # group commit: far fewer fsyncs than writes
        with env.begin() as txn:
            assert txn.stat(db)["entries"] == 1000
    finally:
        w.close()
        close_env(tmp_path / "w")


async def test_writer_failing_op_undoes_only_its_own_writes(tmp_path: Path) -> None:
    env = open_env(tmp_path / "w")
    db = env.open_db(b"x")
    w = Writer(env)

    def bad(txn: lmdb.Transaction) -> None:
        txn.put(b"bad", b"1", db=db)
        raise ValueError("boom")

    try:
        results = await asyncio.gather(w.write(lambda t: t.put(b"a", b"1", db=db)), w.write(bad),
                                       w.write(lambda t: t.put(b"b", b"1", db=db)), return_exceptions=True)
        assert results[0] is True and isinstance(results[1], ValueError) and results[2] is True
        with env.begin() as txn:
            assert txn.get(b"a", db=db) == b"1" and txn.get(b"b", db=db) == b"1"
            assert txn.get(b"bad", db=db) is None
    finally:
        w.close()
        close_env(tmp_path / "w")


async def test_writer_closed_refuses_new_work(tmp_path: Path) -> None:
    env = open_env(tmp_path / "w")
    w = Writer(env)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        await w.write(lambda t: None)
    close_env(tmp_path / "w")


def _rec(uid: str = "dev.alice", ts: int = 1000) -> TaskRecord:
    return TaskRecord(id=os.urandom(16), uid=uid, ch="dev", text="你好", ts=ts)


async def test_store_dedup_key_returns_first_task_across_reopen(tmp_path: Path) -> None:
    st = TaskStore(tmp_path)
    first = _rec()
    assert (await st.add(first, dedup=b"wc:m:42")).id == first.id
    again = await st.add(_rec(), dedup=b"wc:m:42")
    assert again.id == first.id  # the retry maps to the task already recorded
    st.close()
    close_env(tmp_path / "edge.lmdb")
    st2 = TaskStore(tmp_path)  # "restart"
    try:
        third = await st2.add(_rec(), dedup=b"wc:m:42")
        assert third.id == first.id
        assert [r.id for r in st2.history("dev.alice")] == [first.id]  # no second task stored
        assert await st2.mark_seen(b"wc:e:x", 1) is True
        assert await st2.mark_seen(b"wc:e:x", 1) is False
    finally:
        st2.close()
        close_env(tmp_path / "edge.lmdb")


async def test_store_update_visible_at_once_and_durable_after_flush(tmp_path: Path) -> None:
    st = TaskStore(tmp_path)
    rec = _rec()
    await st.add(rec)
    st.update(rec.id, status="accepted", node="n1")
    new = st.update(rec.id, status="ok", answer="答案")  # second update builds on the first, not on disk
    assert new is not None and new.node == "n1" and new.status == "ok" and new.done_ts
    assert st.get(rec.id) == new
    assert st.history("dev.alice")[0] == new
    await st.flush()
    assert not st._overlay
    st.close()
    close_env(tmp_path / "edge.lmdb")
    st2 = TaskStore(tmp_path)
    try:
        got = st2.get(rec.id)
        assert got is not None and got.status == "ok" and got.answer == "答案" and got.node == "n1"
        assert st2.unfinished() == []
    finally:
        st2.close()
        close_env(tmp_path / "edge.lmdb")


async def test_prune_history_deletes_only_finished_tasks_older_than_the_cutoff(tmp_path: Path) -> None:
    st = TaskStore(tmp_path)
    try:
        old_done, old_open, new_done = _rec(ts=1000), _rec(ts=1000), _rec(ts=5000)
        for r in (old_done, old_open, new_done):
            await st.add(r)
        st.update(old_done.id, status="ok", answer="a", done_ts=2000)
        st.update(new_done.id, status="error", answer="", done_ts=6000)
        st.update(old_open.id, status="accepted")  # unfinished: kept whatever its age
        await st.flush()
        assert await st.prune_history(3000) == 1
        assert st.get(old_done.id) is None
        assert {r.id for r in st.history("dev.alice")} == {old_open.id, new_done.id}  # index entry gone too
        assert await st.prune_history(3000) == 0
    finally:
        st.close()
        close_env(tmp_path / "edge.lmdb")


async def test_full_store_refuses_new_tasks_clearly_and_pruning_makes_room(tmp_path: Path) -> None:
    """edge.lmdb at its map size: add() raises StoreFull (nothing half-written, earlier tasks intact);
    after retention deleted old tasks, new ones fit again (LMDB reuses the freed pages)."""
    from edge.store import StoreFull
    st = TaskStore(tmp_path, map_size=1 << 20)
    try:
        kept: list[TaskRecord] = []
        with pytest.raises(StoreFull, match="edge.store_map_mb"):
            for i in range(10_000):
                r = TaskRecord(id=os.urandom(16), uid="dev.alice", ch="dev", text="字" * 3000, ts=i)
                await st.add(r)
                kept.append(r)
        assert 50 < len(kept) < 10_000
        assert all(st.get(r.id) is not None for r in kept)
        for r in kept[: len(kept) // 2]:  # the headroom: tasks in flight still get their answers stored
            got = await st.update_durable(r.id, status="ok", answer="答" * 500, done_ts=1)
            assert got is not None and st.get(r.id) == got
        assert await st.prune_history(2) == len(kept) // 2
        await st.add(_rec())  # room again
    finally:
        st.close()
        close_env(tmp_path / "edge.lmdb")


async def test_recently_committed_records_are_read_from_memory_and_stay_true_to_the_file(tmp_path: Path) -> None:
    """get() answers recent commits from memory (no read transaction); whatever it answers is what the
    file holds: a failed write drops the memory copy, an update of a task never stored creates nothing,
    and the cache is bounded."""
    import edge.store

    def on_disk(st: TaskStore, tid: bytes) -> TaskRecord | None:
        with st.env.begin() as txn:
            raw = txn.get(tid, db=st.tasks)
        return None if raw is None else edge.store._unpack(tid, raw)

    st = TaskStore(tmp_path)
    try:
        rec = _rec()
        await st.add(rec)
        assert st._recent[rec.id] == rec == on_disk(st, rec.id)
        new = await st.update_durable(rec.id, status="accepted", node="n1")
        assert st._recent[rec.id] == new == on_disk(st, rec.id) == st.get(rec.id)

        def boom(txn: object) -> None:
            raise ValueError("an also() that fails")

        with pytest.raises(ValueError):
            await st.update_durable(rec.id, also=boom, status="ok", answer="lost")
        assert rec.id not in st._recent and not st._overlay
        assert st.get(rec.id) == on_disk(st, rec.id) == new  # the failed update is not what get() says

        ghost = _rec()  # never added: an update must not make it exist, in memory or on disk
        st.update(ghost.id, status="ok")  # (no record to build on: nothing happens)
        st._overlay[ghost.id] = (ghost, -1)  # as if its add were still in flight (its write then fails)
        st.update(ghost.id, status="ok", answer="x")
        await st.flush()
        st._overlay.pop(ghost.id, None)
        assert ghost.id not in st._recent and st.get(ghost.id) is None and on_disk(st, ghost.id) is None

        for _ in range(edge.store.RECENT_MAX + 10):
            await st.add(_rec())
        assert len(st._recent) == edge.store.RECENT_MAX and rec.id not in st._recent
        assert st.get(rec.id) == new  # from the file
    finally:
        st.close()
        close_env(tmp_path / "edge.lmdb")


async def test_an_update_committed_with_the_prune_that_deletes_its_task_is_not_served_from_memory(
        tmp_path: Path) -> None:
    """An update and the prune deleting its task in one writer batch: get() says what the file says (gone)."""
    import time

    st = TaskStore(tmp_path)
    try:
        rec = _rec(ts=1000)
        await st.add(rec)
        st.update(rec.id, status="ok", answer="a", done_ts=2000)
        await st.flush()
        batches = st.writer.batches
        async with writer_held(st) as queued:  # the next two ops wait behind the hold and share one batch
            st.update(rec.id, delivery={"status": "sent"})
            prune = asyncio.ensure_future(st.prune_history(before_ms=int(time.time() * 1000)))
            await queued(2)  # the prune's delete is queued behind the update
        assert await prune == 1
        assert st.writer.batches == batches + 2  # the hold's batch, then update + prune in one
        await st.flush()
        assert st.get(rec.id) is None
    finally:
        st.close()
        close_env(tmp_path / "edge.lmdb")


async def test_the_record_cache_is_bounded_by_characters_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge.store
    monkeypatch.setattr(edge.store, "RECENT_CHARS", 10_000)
    st = TaskStore(tmp_path)
    try:
        big = _rec()
        await st.add(big)
        await st.update_durable(big.id, status="ok", answer="x" * (edge.store.RECENT_RECORD_MAX + 1))
        assert big.id not in st._recent and st.get(big.id).answer.startswith("x")  # never held; read from file
        recs = [_rec() for _ in range(20)]
        for r in recs:
            await st.add(r)
            await st.update_durable(r.id, status="ok", answer="y" * 1000)
        assert st._recent_chars <= 10_000 and len(st._recent) < 20
        assert st._recent_chars == sum(len(r.text) + len(r.answer or "") for r in st._recent.values())
    finally:
        st.close()
        close_env(tmp_path / "edge.lmdb")


async def test_a_cancelled_await_of_a_write_does_not_make_the_store_forget_it(tmp_path: Path) -> None:
    """The write goes on in the writer thread whatever the caller does: until it commits, get() still sees
    it (the overlay stays), and an update built on it keeps its changes."""
    st = TaskStore(tmp_path)
    try:
        rec = _rec()
        await st.add(rec)
        async with writer_held(st) as queued:  # nothing commits until the block ends
            task = asyncio.ensure_future(st.update_durable(rec.id, status="accepted", node="n1"))
            await queued(1)  # its write is submitted (and waits behind the hold)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            got = st.get(rec.id)
            assert got is not None and got.node == "n1"  # not the record on disk (pending, no node)
            new = st.update(rec.id, status="ok", answer="a")
            assert new is not None and new.node == "n1"
        await st.flush()
        st.close()
        close_env(tmp_path / "edge.lmdb")
        st = TaskStore(tmp_path)
        got = st.get(rec.id)
        assert got is not None and got.node == "n1" and got.status == "ok"
    finally:
        st.close()
        close_env(tmp_path / "edge.lmdb")


async def test_retention_passes_run_on_its_schedule_and_delete_only_finished_tasks_past_the_cutoff(
        tmp_path: Path) -> None:
    """edge.history_days through :class:`Retention` with its clock injected: the first pass ``first_s`` after
    start, then one every ``every_s``; each deletes the finished tasks that ended more than ``days`` before
    ``now()``; a failing pass does not end the schedule. The test decides when each nap ends."""
    loop = asyncio.get_running_loop()
    naps: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        fut = loop.create_future()
        naps.put_nowait((seconds, fut))
        await fut

    async def nap() -> tuple[float, asyncio.Future[None]]:
        return await asyncio.wait_for(naps.get(), BOUND)

    now = 100 * 86400.0
    cutoff_ms = int((now - 2 * 86400) * 1000)
    st = TaskStore(tmp_path)
    r = Retention(st, 2, first_s=60, every_s=3600, now=lambda: now, sleep=sleep)
    try:
        old, young, running = _rec(ts=1000), _rec(ts=1000), _rec(ts=1000)
        for rec in (old, young, running):
            await st.add(rec)
        st.update(old.id, status="ok", answer="a", done_ts=cutoff_ms - 1)
        st.update(young.id, status="error", done_ts=cutoff_ms + 1000)
        st.update(running.id, status="accepted")  # unfinished: kept whatever its age
        await st.flush()
        r.start()
        assert r.scheduled
        seconds, wake = await nap()
        assert (seconds, r.passes) == (60, 0)  # nothing deleted before the first pass
        assert st.get(old.id) is not None
        wake.set_result(None)
        seconds, wake = await nap()
        assert (seconds, r.passes) == (3600, 1)
        assert st.get(old.id) is None and st.get(young.id) is not None and st.get(running.id) is not None
        now += 3600  # an hour later: young is past the cutoff too
        wake.set_result(None)
        seconds, wake = await nap()
        assert (seconds, r.passes) == (3600, 2)
        assert st.get(young.id) is None and st.get(running.id) is not None

        async def broken(before_ms: int, batch: int = 2000) -> int:
            raise lmdb.Error("disk trouble")

        st.prune_history = broken  # type: ignore[method-assign]
        wake.set_result(None)
        seconds, wake = await nap()
        assert (seconds, r.passes) == (3600, 3) and r.scheduled  # logged, and the schedule goes on
    finally:
        await r.close()
        assert not r.scheduled
        st.close()
        close_env(tmp_path / "edge.lmdb")


async def test_retention_off_schedules_nothing_and_deletes_nothing(tmp_path: Path) -> None:
    st = TaskStore(tmp_path)
    r = Retention(st, 0, first_s=0, every_s=0)
    try:
        rec = _rec(ts=1)
        await st.add(rec)
        await st.update_durable(rec.id, status="ok", done_ts=1)
        r.start()
        assert not r.scheduled
        assert await r.run_once() == 0 and st.get(rec.id) is not None
    finally:
        await r.close()
        st.close()
        close_env(tmp_path / "edge.lmdb")
