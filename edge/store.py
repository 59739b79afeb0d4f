"""The edge's durable task store (LMDB at ``<data_dir>/edge.lmdb``).

``tasks``: task id (16 bytes) -> CBOR record. ``by_user``: ``uid \\0 ts(8, big endian) id`` -> b"",
for per-user history in time order. ``seen``: an inbound message's dedup key (e.g. WeCom
``MsgId``) -> ``ts(8) + task id``, written in the same transaction as the task.

Writes go through one :class:`core.store.Writer` thread (group commit, never on the event loop).
``add`` is awaited: a task is durable *before* anything acknowledges it. ``update`` (status
changes, final answers) returns at once with the new record; the write follows in order, and
until it is committed reads see it through an in-memory overlay.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import lmdb

from core.store import DEFAULT_MAP_SIZE, Writer, open_db, open_env

log = logging.getLogger(__name__)

FINAL = frozenset({"ok", "error", "cancelled"})
STORE_FULL_HINT = "raise edge.store_map_mb or lower edge.history_days"
FULL_AT = 0.9  # new tasks are refused once edge.lmdb's pages fill this share of the map: the rest is headroom
               # for what must still be written (answers of tasks in flight, deliveries, acknowledgements)


class StoreFull(RuntimeError):
    """edge.lmdb reached its map size: nothing new can be recorded (so nothing new is acknowledged)."""

    def __init__(self) -> None:
        super().__init__(f"edge.lmdb is full ({STORE_FULL_HINT})")


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: bytes
    uid: str
    ch: str
    text: str
    ts: int  # ms
    conv: str | None = None
    status: str = "pending"  # pending | accepted | ok | error | cancelled
    answer: str = ""
    err: dict[str, str] | None = None
    node: str | None = None
    usage: dict[str, int] | None = None
    done_ts: int | None = None
    delivery: dict[str, Any] | None = None  # channel delivery state (WeCom: queued/sent/failed, parts, error)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.id.hex(), "text": self.text, "status": self.status,
                               "ts": self.ts, "answer": self.answer, "ch": self.ch}
        if self.conv:
            out["conv"] = self.conv
        if self.err:
            out["error"] = {"code": self.err.get("code", ""), "message": self.err.get("msg", "")}
        if self.usage:
            out["usage"] = self.usage
        if self.done_ts:
            out["done_ts"] = self.done_ts
        if self.delivery:
            out["delivery"] = self.delivery
        return out


_FIELDS = TaskRecord.__slots__  # type: ignore[attr-defined]


def _pack(rec: TaskRecord) -> bytes:
    return cbor2.dumps({k: getattr(rec, k) for k in _FIELDS if k != "id" and getattr(rec, k) is not None})


def _unpack(tid: bytes, raw: bytes) -> TaskRecord:
    d = cbor2.loads(raw)
    return TaskRecord(id=tid, **{k: v for k, v in d.items() if k in _FIELDS})


RECENT_MAX = 8192  # committed task records TaskStore.get() answers from memory, at most
RECENT_CHARS = 8 * 1024 * 1024  # ... holding at most this many characters of questions and answers
RECENT_RECORD_MAX = 64 * 1024  # a record with more is never held


class TaskStore:
    def __init__(self, data_dir: str | Path, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.env = open_env(Path(data_dir) / "edge.lmdb", map_size=map_size)
        self.tasks = open_db(self.env, b"tasks")
        self.by_user = open_db(self.env, b"by_user")
        self.seen = open_db(self.env, b"seen")
        self._dbs: dict[bytes, Any] = {}
        self._psize = self.env.stat()["psize"]
        self._map_size = self.env.info()["map_size"]
        # Chunks of unfinished tasks (id + seq -> text), written synchronously before a chunk is forwarded,
        # in an environment of their own without fsync: a write survives a crash or kill -9 of the process
        # (the OS has the pages), not a power loss. Never contends with the writer thread. writemap: a commit
        # writes into the shared map instead of pwrite() calls (docs/performance.md has the figures).
        self.chunk_env = open_env(Path(data_dir) / "edge-chunks.lmdb", max_dbs=2, sync=False, writemap=True)
        self.chunks = open_db(self.chunk_env, b"chunks")
        self.writer = Writer(self.env, name="edge-lmdb-writer")
        self._overlay: dict[bytes, tuple[TaskRecord, int]] = {}  # updates not yet committed
        # The last RECENT_MAX records committed, as committed (insertion order = age): a task's updates
        # come soon after it was written, and get() from here saves a read transaction and a CBOR decode
        # per status update. Kept true by the writer thread:
        # set after a commit, dropped on a failed write and by pruning.
        self._recent: dict[bytes, TaskRecord] = {}
        self._recent_chars = 0  # characters of question + answer held in _recent
        self._gen = 0
        self._olock = threading.Lock()

    def close(self) -> None:
        self.writer.close()
        self.chunk_env.sync(True)

    @staticmethod
    def _ukey(uid: str, ts: int, tid: bytes) -> bytes:
        return uid.encode() + b"\0" + struct.pack(">Q", ts) + tid

    async def add(self, rec: TaskRecord, dedup: bytes | None = None) -> TaskRecord:
        """Store a new task durably. With ``dedup``: if that key was seen before, store nothing and
        return the task recorded under it (check and insert are one transaction); if the key was recorded
        without a task (:meth:`mark_seen`, :meth:`seen_op`: a command, an event, an unsupported message), a
        finished record with an empty ``id`` (there is no task to return)."""
        tasks, by_user, seen = self.tasks, self.by_user, self.seen

        def op(txn: Any) -> bytes | None:
            if self._fill(txn) >= FULL_AT:
                raise StoreFull()
            if dedup is not None:
                old = txn.get(dedup, db=seen)
                if old is not None:
                    return bytes(old[8:])
                txn.put(dedup, struct.pack(">Q", rec.ts) + rec.id, db=seen)
            txn.put(rec.id, _pack(rec), db=tasks)
            txn.put(self._ukey(rec.uid, rec.ts, rec.id), b"", db=by_user)
            return None

        def committed(f: Any) -> None:  # runs in the writer thread
            if not f.cancelled() and f.exception() is None and f.result() is None:
                self._remember(rec.id, rec)

        gen = None
        if dedup is None:  # visible to get()/update() before the commit: its replies may come back first
            with self._olock:
                self._gen += 1
                gen = self._gen
                self._overlay[rec.id] = (rec, gen)
        try:
            fut = self.writer.submit(op)
            fut.add_done_callback(committed)
            old_id = await asyncio.wrap_future(fut)
        except (StoreFull, lmdb.MapFullError):
            log.error("edge: new task refused: edge.lmdb is %.0f%% full (%s)", 100 * self.fill(), STORE_FULL_HINT)
            raise StoreFull() from None
        finally:
            if gen is not None:
                with self._olock:
                    cur = self._overlay.get(rec.id)
                    if cur is not None and cur[1] == gen:
                        del self._overlay[rec.id]
        if old_id is None:
            return rec
        if not old_id:  # the key holds a bare timestamp: seen, with no task (get(b"") would raise)
            return TaskRecord(id=b"", uid=rec.uid, ch=rec.ch, text="", ts=0, status="ok")
        # The key outlived its task (history_days shorter than the key's retention): a finished duplicate.
        return self.get(old_id) or TaskRecord(id=old_id, uid=rec.uid, ch=rec.ch, text="", ts=0, status="ok")

    def _fill(self, txn: Any) -> float:
        """Share of the map the B-trees use (pages of every named database; freed pages are not counted,
        LMDB reuses them). A few µs: it reads each database's header only."""
        pages = 0
        for name, _ in txn.cursor():
            db = self._dbs.get(bytes(name))
            if db is None:
                db = self._dbs[bytes(name)] = self.env.open_db(bytes(name), txn=txn, create=False)
            st = txn.stat(db)
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return (pages + 4) * self._psize / self._map_size

    def fill(self) -> float:
        with self.env.begin() as txn:
            return self._fill(txn)

    def seen_op(self, key: bytes, ts: int) -> Callable[[Any], bool]:
        """An op recording an inbound dedup key (``ts`` in ms, as a task's) inside a bigger write
        transaction; it returns False if the key was already seen (and writes nothing)."""
        seen, stamp = self.seen, struct.pack(">Q", ts)
        return lambda txn: bool(txn.put(key, stamp, db=seen, overwrite=False))

    async def mark_seen(self, key: bytes, ts: int) -> bool:
        """Record an inbound dedup key with no task (e.g. an event); False if it was already seen."""
        return await self.writer.write(self.seen_op(key, ts))

    async def prune_seen(self, before_ms: int, batch: int = 5000) -> int:
        """Forget inbound dedup keys recorded before ``before_ms`` (their senders no longer retry).
        The scan runs in a read transaction off the event loop; deletes go in small write batches so
        callbacks never wait long behind them. Returns how many went."""
        seen, env = self.seen, self.env

        def scan() -> list[bytes]:
            with env.begin() as txn:
                return [bytes(k) for k, v in txn.cursor(db=seen) if struct.unpack_from(">Q", v)[0] < before_ms]

        old = await asyncio.to_thread(scan)
        for i in range(0, len(old), batch):
            chunk = old[i:i + batch]

            def op(txn: Any, chunk: list[bytes] = chunk) -> None:
                for k in chunk:
                    txn.delete(k, db=seen)

            await self.writer.write(op)
        return len(old)

    async def prune_history(self, before_ms: int, batch: int = 2000) -> int:
        """Delete finished tasks that ended before ``before_ms`` (the ``edge.history_days`` retention): the
        record and its per-user index entry (a finished task has no chunks left in edge-chunks.lmdb). Scanned off the event loop; deleted in small write
        batches (each a group commit) so new tasks never wait long behind them. Freed pages are reused by
        LMDB (the file does not shrink). Returns how many went."""
        env, tasks, by_user = self.env, self.tasks, self.by_user

        def scan() -> list[tuple[bytes, bytes]]:
            out = []
            with env.begin() as txn:
                for tid, raw in txn.cursor(db=tasks):
                    d = cbor2.loads(raw)
                    if d.get("status") in FINAL and (d.get("done_ts") or d.get("ts", 0)) < before_ms:
                        out.append((bytes(tid), self._ukey(d["uid"], d["ts"], bytes(tid))))
            return out

        old = await asyncio.to_thread(scan)
        for i in range(0, len(old), batch):
            part = old[i:i + batch]

            def op(txn: Any, part: list[tuple[bytes, bytes]] = part) -> None:
                for tid, ukey in part:
                    txn.delete(tid, db=tasks)
                    txn.delete(ukey, db=by_user)

            def forget(f: Any, part: list[tuple[bytes, bytes]] = part) -> None:
                # after the commit, in commit order (an update committed in the same batch, before this op,
                # has put its record in _recent already: it must go too)
                with self._olock:
                    for tid, _ in part:
                        self._forget_locked(tid)

            fut = self.writer.submit(op)
            fut.add_done_callback(forget)
            await asyncio.wrap_future(fut)
        return len(old)

    def _remember(self, tid: bytes, rec: TaskRecord) -> None:
        with self._olock:
            self._remember_locked(tid, rec)

    def _remember_locked(self, tid: bytes, rec: TaskRecord) -> None:
        self._forget_locked(tid)
        size = len(rec.text) + len(rec.answer or "")
        if size > RECENT_RECORD_MAX:
            return  # a huge answer is not worth holding twice
        recent = self._recent
        recent[tid] = rec
        self._recent_chars += size
        while len(recent) > RECENT_MAX or self._recent_chars > RECENT_CHARS:
            self._forget_locked(next(iter(recent)))

    def _forget_locked(self, tid: bytes) -> None:
        old = self._recent.pop(tid, None)
        if old is not None:
            self._recent_chars -= len(old.text) + len(old.answer or "")

    def get(self, tid: bytes) -> TaskRecord | None:
        pending = self._overlay.get(tid)
        if pending is not None:
            return pending[0]
        rec = self._recent.get(tid)
        if rec is not None:
            return rec
        with self.env.begin() as txn:
            raw = txn.get(tid, db=self.tasks)
        return None if raw is None else _unpack(tid, raw)

    def update(self, tid: bytes, *, on_durable: Callable[[], None] | None = None,
               **changes: Any) -> TaskRecord | None:
        """Change a task; the new record is returned (and readable) at once, the write follows.
        ``on_durable()`` is called (in the writer thread) once the change is committed, never if it fails."""
        res = self._update(tid, None, changes, on_durable)
        return None if res is None else res[0]

    async def update_durable(self, tid: bytes, also: Callable[[Any], Any] | None = None,
                             **changes: Any) -> TaskRecord | None:
        """Change a task and run ``also(txn)`` in the same transaction; return once committed."""
        res = self._update(tid, also, changes)
        if res is None:
            return None
        await asyncio.wrap_future(res[1])
        return res[0]

    def _update(self, tid: bytes, also: Callable[[Any], Any] | None, changes: dict[str, Any],
                on_durable: Callable[[], None] | None = None) -> tuple[TaskRecord, Any] | None:
        rec = self.get(tid)
        if rec is None:
            return None
        d = {k: getattr(rec, k) for k in _FIELDS}
        d.update(changes)
        if d.get("status") in FINAL and not d.get("done_ts"):
            d["done_ts"] = int(time.time() * 1000)
        new = TaskRecord(**d)
        with self._olock:
            self._gen += 1
            gen = self._gen
            self._overlay[tid] = (new, gen)
        packed, tasks = _pack(new), self.tasks

        def op(txn: Any) -> bool:
            if txn.get(tid, db=tasks) is None:
                return False  # its add failed (e.g. a full store): an update never creates a task
            txn.put(tid, packed, db=tasks)
            if also is not None:
                also(txn)
            return True

        fut = self.writer.submit(op)

        def committed(f: Any) -> None:  # runs in the writer thread
            ok = not f.cancelled() and f.exception() is None
            if not f.cancelled() and f.exception() is not None:
                log.error("edge: task %s: an update could not be stored (%r; %s)", tid.hex()[:8], f.exception(),
                          STORE_FULL_HINT)
            with self._olock:
                if ok and f.result():
                    self._remember_locked(tid, new)
                else:
                    self._forget_locked(tid)  # what is stored is not known here: read it
                cur = self._overlay.get(tid)
                if cur is not None and cur[1] == gen:
                    del self._overlay[tid]
            if ok and f.result() and on_durable is not None:
                on_durable()

        fut.add_done_callback(committed)
        return new, fut

    def scan(self) -> list[TaskRecord]:
        """Every task (start-up recovery scans)."""
        with self.env.begin() as txn:
            return [self._overlay.get(tid, (None,))[0] or _unpack(tid, raw)
                    for tid, raw in txn.cursor(db=self.tasks)]

    async def flush(self) -> None:
        await self.writer.flush()

    def history(self, uid: str, limit: int = 50, before_ts: int | None = None) -> list[TaskRecord]:
        """The user's tasks, newest first."""
        prefix = uid.encode() + b"\0"
        end = prefix + struct.pack(">Q", before_ts if before_ts is not None else 2**63)
        out: list[TaskRecord] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.by_user)
            if not cur.set_range(end):
                if not cur.last():
                    return out
            else:
                if not cur.prev():
                    return out
            while len(out) < limit:
                key = cur.key()
                if not key.startswith(prefix):
                    break
                tid = key[-16:]
                pending = self._overlay.get(tid)
                raw = txn.get(tid, db=self.tasks) if pending is None else None
                if pending is not None:
                    out.append(pending[0])
                elif raw is not None:
                    out.append(_unpack(tid, raw))
                if not cur.prev():
                    break
        return out

    def add_chunk(self, tid: bytes, seq: int, text: str) -> None:
        """Keep a chunk before users see it; after a restart it tells a replay (same text) from a re-run
        (other text). Dropped when the task finishes. A failed write (edge-chunks.lmdb full: 1 GiB of
        unfinished answers) is logged and the chunk still forwarded: only the restart check loses it."""
        try:
            with self.chunk_env.begin(write=True, db=self.chunks) as txn:
                txn.put(tid + struct.pack(">I", seq), text.encode())
        except lmdb.Error as exc:
            log.error("edge: chunk %d of task %s not kept in edge-chunks.lmdb: %s", seq, tid.hex()[:8], exc)

    def add_chunks(self, chunks: list[tuple[bytes, int, str]], drop: set[bytes] | frozenset[bytes] = frozenset()
                   ) -> None:
        """:meth:`add_chunk` for many chunks (task id, seq, text) in one transaction, which also drops the
        chunks of the tasks in ``drop`` (finished: their chunks are neither added nor kept)."""
        try:
            with self.chunk_env.begin(write=True, db=self.chunks) as txn:
                for tid, seq, text in chunks:
                    if tid not in drop:
                        txn.put(tid + struct.pack(">I", seq), text.encode())
                for tid in drop:
                    self._drop(txn, tid)
        except lmdb.Error as exc:
            log.error("edge: %d chunk(s) not kept (or %d task(s) not dropped) in edge-chunks.lmdb: %s",
                      len(chunks), len(drop), exc)
            for tid in drop:  # the finished tasks' chunks must not stay for ever: one small transaction each
                try:
                    self.drop_chunks(tid)
                except lmdb.Error as exc2:
                    log.error("edge: chunks of task %s not dropped from edge-chunks.lmdb: %s", tid.hex()[:8], exc2)

    def drop_chunks(self, tid: bytes) -> None:
        with self.chunk_env.begin(write=True, db=self.chunks) as txn:
            self._drop(txn, tid)

    @staticmethod
    def _drop(txn: Any, tid: bytes) -> None:
        cur = txn.cursor()
        if cur.set_range(tid):
            while cur.key()[:len(tid)] == tid and cur.delete():
                pass

    def prune_chunks(self, keep: set[bytes] | frozenset[bytes]) -> int:
        """Drop the chunks of every task not in ``keep`` (at start: the unfinished ones); returns how many
        tasks had some. Chunks outlive their task only when the edge stopped between the task's final record
        being committed and the drop that follows it."""
        with self.chunk_env.begin(db=self.chunks) as txn:
            stale = {bytes(key[:-4]) for key in txn.cursor().iternext(values=False)} - set(keep)  # id + 4-byte seq
        if stale:
            with self.chunk_env.begin(write=True, db=self.chunks) as txn:
                for tid in stale:
                    self._drop(txn, tid)
        return len(stale)

    def chunk_texts(self, tid: bytes) -> list[str]:
        """The stored chunks of a task, seq 1… in order (stops at the first missing seq)."""
        out: list[str] = []
        with self.chunk_env.begin(db=self.chunks) as txn:
            cur = txn.cursor()
            if cur.set_range(tid):
                for key, raw in cur:
                    if key[:len(tid)] != tid or struct.unpack(">I", key[len(tid):])[0] != len(out) + 1:
                        break
                    out.append(bytes(raw).decode())
        return out

    def unfinished(self) -> list[TaskRecord]:
        out = []
        with self.env.begin() as txn:
            for tid, raw in txn.cursor(db=self.tasks):
                rec = self._overlay.get(tid, (None,))[0] or _unpack(tid, raw)
                if rec.status not in FINAL:
                    out.append(rec)
        return out


class Retention:
    """``edge.history_days``: finished tasks that ended more than ``days`` ago are deleted from the store,
    ``first_s`` after :meth:`start` and then every ``every_s`` (the edge: 60 s, then hourly).

    :meth:`run_once` is one such pass, the one the schedule runs, for a caller that wants it now instead of
    at the next tick (a test that filled the store and must decide when room is made). ``now`` (wall
    clock, seconds) and ``sleep`` are the clock the cutoff and the schedule read: a caller may pass its
    own to step through the schedule without waiting. ``days`` <= 0 keeps everything: no pass is
    scheduled and :meth:`run_once` deletes nothing."""

    def __init__(self, store: TaskStore, days: float, *, first_s: float = 60.0, every_s: float = 3600.0,
                 now: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.store = store
        self.days = days
        self.first_s = first_s
        self.every_s = every_s
        self.passes = 0  # passes completed (scheduled or run_once), failed ones included
        self._now = now
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.days > 0

    @property
    def scheduled(self) -> bool:
        """The periodic passes are running (started, retention on, not closed)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Schedule the periodic passes (nothing when retention is off)."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="edge-retention")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run_once(self) -> int:
        """One pass now: delete the finished tasks that ended before ``now() - days``; returns how many."""
        if not self.enabled:
            return 0
        try:
            n = await self.store.prune_history(int((self._now() - self.days * 86400) * 1000))
        finally:
            self.passes += 1
        if n:
            log.info("edge: deleted %d task(s) older than edge.history_days = %g", n, self.days)
        return n

    async def _run(self) -> None:
        await self._sleep(self.first_s)
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - housekeeping must not die
                log.error("edge: history retention failed: %r", exc)
            await self._sleep(self.every_s)
