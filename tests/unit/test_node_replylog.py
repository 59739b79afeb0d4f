"""The node's reply log: finished answers kept (bounded) so a task the edge sends again is replayed, not re-run."""

from __future__ import annotations

from pathlib import Path

import pytest

import wire
from claw.config import load_settings
from node import worker
from node.worker import Node


def _done(tid: bytes, seq: int) -> wire.Done:
    return wire.Done(id=tid, seq=seq, status="ok")


def test_reply_log_is_bounded_by_count_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "REPLY_LOG_MAX", 3)
    monkeypatch.setattr(worker, "REPLY_LOG_BYTES", 100)
    node = Node(load_settings(env={}, overrides={"data_dir": str(tmp_path)}))
    ids = [bytes([i]) * 16 for i in range(5)]
    for tid in ids[:4]:
        node._remember_reply(tid, ["ab", "cd"], _done(tid, 2))
    assert list(node._recent) == ids[1:4] and node._recent_bytes == 12  # oldest evicted by count
    node._remember_reply(ids[4], ["x" * 95], _done(ids[4], 1))
    assert list(node._recent) == ids[3:] and node._recent_bytes == 99  # evicted by size, oldest first
