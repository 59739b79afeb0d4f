"""The edge's durable task store (LMDB at ``<data_dir>/edge.lmdb``).

``tasks``: task id (16 bytes) -> CBOR record. ``by_user``: ``uid \\0 ts(8, big endian) id`` -> b"",
for per-user history in time order. A task is written here *before* anything acknowledges it.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from claw.store import open_env

FINAL = frozenset({"ok", "error", "cancelled"})


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
        return out


_FIELDS = TaskRecord.__slots__  # type: ignore[attr-defined]


def _pack(rec: TaskRecord) -> bytes:
    return cbor2.dumps({k: getattr(rec, k) for k in _FIELDS if k != "id" and getattr(rec, k) is not None})


def _unpack(tid: bytes, raw: bytes) -> TaskRecord:
    d = cbor2.loads(raw)
    return TaskRecord(id=tid, **{k: v for k, v in d.items() if k in _FIELDS})


class TaskStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.env = open_env(Path(data_dir) / "edge.lmdb")
        self.tasks = self.env.open_db(b"tasks")
        self.by_user = self.env.open_db(b"by_user")

    @staticmethod
    def _ukey(uid: str, ts: int, tid: bytes) -> bytes:
        return uid.encode() + b"\0" + struct.pack(">Q", ts) + tid

    def add(self, rec: TaskRecord) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(rec.id, _pack(rec), db=self.tasks)
            txn.put(self._ukey(rec.uid, rec.ts, rec.id), b"", db=self.by_user)

    def get(self, tid: bytes) -> TaskRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(tid, db=self.tasks)
        return None if raw is None else _unpack(tid, raw)

    def update(self, tid: bytes, **changes: Any) -> TaskRecord | None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(tid, db=self.tasks)
            if raw is None:
                return None
            rec = _unpack(tid, raw)
            d = {k: getattr(rec, k) for k in _FIELDS}
            d.update(changes)
            if d.get("status") in FINAL and not d.get("done_ts"):
                d["done_ts"] = int(time.time() * 1000)
            new = TaskRecord(**d)
            txn.put(tid, _pack(new), db=self.tasks)
        return new

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
                raw = txn.get(tid, db=self.tasks)
                if raw is not None:
                    out.append(_unpack(tid, raw))
                if not cur.prev():
                    break
        return out

    def unfinished(self) -> list[TaskRecord]:
        out = []
        with self.env.begin() as txn:
            for tid, raw in txn.cursor(db=self.tasks):
                rec = _unpack(tid, raw)
                if rec.status not in FINAL:
                    out.append(rec)
        return out
