"""The node's reply log: finished answers kept (bounded) so a task the edge sends again is replayed, not re-run."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cbor2
import lmdb
import pytest

import wire
from node import loglimit, replylog
from node.intake import recover_id
from node.loglimit import LogLimit
from node.replylog import ReplyLog


def _done(tid: bytes, seq: int) -> wire.Done:
    return wire.Done(id=tid, seq=seq, status="ok")


def test_reply_log_is_bounded_by_count_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replylog, "REPLY_LOG_MAX", 3)
    monkeypatch.setattr(replylog, "REPLY_LOG_BYTES", 100)
    log = ReplyLog(tmp_path, "n1")  # not opened: memory only
    ids = [("dev.lamp", bytes([i]) * 16) for i in range(5)]
    for key in ids[:4]:
        log.remember(key, ["ab", "cd"], _done(key[1], 2))
    assert list(log.recent) == ids[1:4] and log.recent_bytes == 12  # oldest evicted by count
    log.remember(ids[4], ["x" * 95], _done(ids[4][1], 1))
    assert list(log.recent) == ids[3:] and log.recent_bytes == 99  # evicted by size, oldest first


async def test_reply_log_is_kept_per_uid_across_a_restart(tmp_path: Path) -> None:
    """The same task id under two uids is two entries; one uid never finds the other's answer (memory or LMDB)."""
    tid = bytes(range(16))
    log = ReplyLog(tmp_path, "n1")
    log.open()
    log.remember(("dev.a", tid), ["A's answer"], _done(tid, 1))
    await log.flush()
    assert log.get(("dev.b", tid)) is None
    log.close()
    again = ReplyLog(tmp_path, "n1")  # a restarted node: nothing in memory, the LMDB log only
    again.open()
    try:
        assert not again.recent
        stored = again.get(("dev.a", tid))
        assert stored is not None and stored[0] == ["A's answer"]
        assert again.get(("dev.b", tid)) is None and again.get(("web.a", tid)) is None
    finally:
        again.close()


def test_the_reply_log_of_an_earlier_version_is_dropped_at_start(tmp_path: Path) -> None:
    """Entries keyed by the task id alone cannot tell users apart: they are dropped, never served."""
    from core.store import open_env

    tid = bytes(range(16))
    env = open_env(tmp_path / "node.lmdb", max_dbs=2)
    old = env.open_db(replylog.OLD_REPLY_DB)
    with env.begin(write=True, db=old) as txn:
        txn.put(tid, cbor2.dumps({"c": ["secret"], "d": wire.encode(_done(tid, 1)), "t": time.time()}))
    log = ReplyLog(tmp_path, "n1")
    log.open()
    try:
        for uid in ("dev.a", "web.a"):
            assert log.get((uid, tid)) is None
        with pytest.raises(lmdb.NotFoundError):
            env.open_db(replylog.OLD_REPLY_DB, create=False)
    finally:
        log.close()


def test_a_repeated_warning_is_logged_once_per_interval_with_the_count_left_out(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(loglimit.time, "monotonic", lambda: now[0])
    limit = LogLimit(logging.getLogger("node.worker"), every=10)
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
    assert recover_id(cbor2.dumps({"v": 9, "id": tid, "text": 1})) == tid
    for payload in (b"\xff", cbor2.dumps([tid]), cbor2.dumps({"id": b"short"}), cbor2.dumps({"id": tid.hex()}),
                    cbor2.dumps({"v": 1}), None, "text"):
        assert recover_id(payload) is None
