"""The node's reply log: finished answers kept (bounded) so a task the edge sends again is replayed, not re-run."""

from __future__ import annotations

import time
from pathlib import Path

import cbor2
import lmdb
import pytest

import wire
from core.config import load_settings
from node import worker
from node.worker import Node


def _done(tid: bytes, seq: int) -> wire.Done:
    return wire.Done(id=tid, seq=seq, status="ok")


def test_reply_log_is_bounded_by_count_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "REPLY_LOG_MAX", 3)
    monkeypatch.setattr(worker, "REPLY_LOG_BYTES", 100)
    node = Node(load_settings(env={}, overrides={"data_dir": str(tmp_path)}))
    ids = [("dev.lamp", bytes([i]) * 16) for i in range(5)]
    for key in ids[:4]:
        node._remember_reply(key, ["ab", "cd"], _done(key[1], 2))
    assert list(node._recent) == ids[1:4] and node._recent_bytes == 12  # oldest evicted by count
    node._remember_reply(ids[4], ["x" * 95], _done(ids[4][1], 1))
    assert list(node._recent) == ids[3:] and node._recent_bytes == 99  # evicted by size, oldest first


async def test_reply_log_is_kept_per_uid_across_a_restart(tmp_path: Path) -> None:
    """The same task id under two uids is two entries; one uid never finds the other's answer (memory or LMDB)."""
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    tid = bytes(range(16))
    node = Node(settings)
    node._open_reply_log()
    node._remember_reply(("dev.a", tid), ["A's answer"], _done(tid, 1))
    assert node._writer is not None
    await node._writer.flush()
    assert node._recent.get(("dev.b", tid)) is None and node._stored_reply(("dev.b", tid)) is None
    node._writer.close()
    again = Node(settings)  # a restarted node: nothing in memory, the LMDB log only
    again._open_reply_log()
    try:
        stored = again._stored_reply(("dev.a", tid))
        assert stored is not None and stored[0] == ["A's answer"]
        assert again._stored_reply(("dev.b", tid)) is None and again._stored_reply(("web.a", tid)) is None
    finally:
        assert again._writer is not None
        again._writer.close()


def test_the_reply_log_of_an_earlier_version_is_dropped_at_start(tmp_path: Path) -> None:
    """Entries keyed by the task id alone cannot tell users apart: they are dropped, never served."""
    from core.store import open_env

    tid = bytes(range(16))
    env = open_env(tmp_path / "node.lmdb", max_dbs=2)
    old = env.open_db(worker.OLD_REPLY_DB)
    with env.begin(write=True, db=old) as txn:
        txn.put(tid, cbor2.dumps({"c": ["secret"], "d": wire.encode(_done(tid, 1)), "t": time.time()}))
    node = Node(load_settings(env={}, overrides={"data_dir": str(tmp_path)}))
    node._open_reply_log()
    try:
        for uid in ("dev.a", "web.a"):
            assert node._stored_reply((uid, tid)) is None
        with pytest.raises(lmdb.NotFoundError):
            env.open_db(worker.OLD_REPLY_DB, create=False)
    finally:
        assert node._writer is not None
        node._writer.close()


def test_a_repeated_warning_is_logged_once_per_interval_with_the_count_left_out(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: now[0])
    limit = worker._LogLimit(every=10)
    with caplog.at_level("WARNING", logger="node.worker"):
        for i in range(500):
            limit.warning("bad", "bad message %d", i)
        limit.warning("other", "another kind")
        now[0] += 10
        limit.warning("bad", "bad message %d", 500)
    assert [r.getMessage() for r in caplog.records] == [
        "bad message 0", "another kind", "bad message 500 (499 more like it in the last 10 s not logged)"]


def test_the_id_of_a_refused_payload_is_recovered_only_from_a_cbor_map() -> None:
    tid = bytes(range(16))
    assert worker._recover_id(cbor2.dumps({"v": 9, "id": tid, "text": 1})) == tid
    for payload in (b"\xff", cbor2.dumps([tid]), cbor2.dumps({"id": b"short"}), cbor2.dumps({"id": tid.hex()}),
                    cbor2.dumps({"v": 1}), None, "text"):
        assert worker._recover_id(payload) is None
