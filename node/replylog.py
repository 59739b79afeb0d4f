"""The node's reply log: the finished answers it keeps, so a task the edge sends again (it lost the stream,
e.g. it restarted) is replayed instead of run twice, also after the node restarted.

Each answer is kept as ``(chunks, Done)`` under its key ``(uid, task id)``: in memory (the newest
``REPLY_LOG_MAX`` answers, at most ``REPLY_LOG_BYTES`` characters of text) and in ``node.lmdb`` in the data
dir (group-committed by a :class:`core.store.Writer`, pruned at start and hourly to ``REPLY_LOG_MAX`` entries
of at most ``REPLY_LOG_AGE_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cbor2
import lmdb

import wire
from core.perms import secure_tree
from core.store import Writer, open_db, open_env

from .admission import Key

__all__ = ["OLD_REPLY_DB", "REPLY_DB", "REPLY_LOG_AGE_S", "REPLY_LOG_BYTES", "REPLY_LOG_MAX", "ReplyLog"]

log = logging.getLogger(__name__)

REPLY_LOG_MAX = 10_000  # finished answers kept for replay (in memory and in node.lmdb) ...
REPLY_LOG_BYTES = 32 * 1024 * 1024  # ... in memory at most this much of their text (characters) ...
REPLY_LOG_AGE_S = 86_400  # ... and in node.lmdb for at most this long
# The reply log's LMDB table, keyed by uid + NUL + task id. The table of earlier versions ("replies", keyed by
# the task id alone, so one user's id found another's answer) is dropped when the node opens its data dir.
REPLY_DB = b"replies.uid"
OLD_REPLY_DB = b"replies"

Reply = tuple[list[str], wire.Done]


def _log_key(key: Key) -> bytes:
    return key[0].encode() + b"\0" + key[1]


class ReplyLog:
    """Finished answers by key. Memory only until :meth:`open`; :meth:`close` stops the LMDB writer."""

    def __init__(self, data_dir: str | Path, node_id: str) -> None:
        self.data_dir = data_dir
        self.node_id = node_id
        self.recent: OrderedDict[Key, Reply] = OrderedDict()  # oldest first
        self.recent_bytes = 0  # characters of text in ``recent``
        self._env: Any = None
        self._db: Any = None
        self._writer: Writer | None = None

    def open(self) -> None:
        """Open ``node.lmdb`` (dropping the table of an earlier version) and start its writer."""
        if self._writer is not None:
            return
        secure_tree(self.data_dir)  # files 0600, directories 0700 (core.perms)
        self._env = open_env(Path(self.data_dir) / "node.lmdb", max_dbs=2)
        self._db = open_db(self._env, REPLY_DB)
        try:
            old = open_db(self._env, OLD_REPLY_DB, create=False)
        except lmdb.NotFoundError:
            old = None
        if old is not None:  # keyed by the task id alone: it cannot tell users apart, so it goes
            with self._env.begin(write=True) as txn:
                n = txn.stat(old)["entries"]
                txn.drop(old, delete=True)
            log.info("node %s: dropped the reply log of an earlier version (%d answers, not kept per user)",
                     self.node_id, n)
        self._writer = Writer(self._env, name="node-lmdb-writer")

    async def flush(self) -> None:
        """Return when every answer remembered so far is committed to ``node.lmdb``."""
        if self._writer is not None:
            await self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def get(self, key: Key) -> Reply | None:
        """The answer kept for ``key`` (memory first, then ``node.lmdb``), or None."""
        return self.recent.get(key) or self.stored(key)

    def stored(self, key: Key) -> Reply | None:
        """The answer ``node.lmdb`` holds for ``key``, or None (also for a damaged entry)."""
        if self._env is None:
            return None
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(_log_key(key))
        if raw is None:
            return None
        try:
            d = cbor2.loads(raw)
            done = wire.decode(d["d"])
            assert isinstance(done, wire.Done)
            return [str(c) for c in d["c"]], done
        except Exception:  # noqa: BLE001 - a damaged entry is a miss (the task then runs again)
            return None

    def remember(self, key: Key, chunks: list[str], done: wire.Done) -> None:
        """Keep a finished answer: at once in memory (evicting the oldest beyond the bounds), and queued for
        ``node.lmdb``'s next group commit."""
        if self._writer is not None:
            k, db = _log_key(key), self._db
            raw = cbor2.dumps({"c": chunks, "d": wire.encode(done), "t": time.time()})
            self._writer.submit(lambda txn: txn.put(k, raw, db=db))
        self.recent[key] = (chunks, done)
        self.recent_bytes += sum(len(c) for c in chunks)
        while len(self.recent) > REPLY_LOG_MAX or self.recent_bytes > REPLY_LOG_BYTES:
            _, (old, _) = self.recent.popitem(last=False)
            self.recent_bytes -= sum(len(c) for c in old)

    async def prune_loop(self) -> None:
        """At start and hourly: forget replies older than REPLY_LOG_AGE_S, and the oldest beyond
        REPLY_LOG_MAX (the edge gives up re-sending long before)."""
        while True:
            with contextlib.suppress(Exception):
                old = await asyncio.to_thread(self._prune_scan)
                if old and self._writer is not None:
                    db = self._db

                    def op(txn: Any) -> None:
                        for k in old:
                            txn.delete(k, db=db)

                    await self._writer.write(op)
            await asyncio.sleep(3600)

    def _prune_scan(self) -> list[bytes]:
        horizon = time.time() - REPLY_LOG_AGE_S
        entries: list[tuple[float, bytes]] = []
        with self._env.begin(db=self._db) as txn:
            for k, raw in txn.cursor():
                try:
                    entries.append((float(cbor2.loads(raw)["t"]), bytes(k)))
                except Exception:  # noqa: BLE001
                    entries.append((0.0, bytes(k)))
        entries.sort()
        excess = max(0, len(entries) - REPLY_LOG_MAX)
        return [k for i, (t, k) in enumerate(entries) if i < excess or t < horizon]
