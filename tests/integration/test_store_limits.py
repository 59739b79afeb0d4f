"""edge.lmdb at its limits, through the running edge: a full store refuses new questions with a clear error
(WS `error` store_full, WeCom 503 so WeCom retries), nothing half-recorded, and history retention
(`edge.history_days`) deletes old finished tasks so the store never fills in normal operation."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from edge.keys import RETENTION, STORE
from edge.store import FULL_AT, TaskRecord
from tests.conftest import run_system
from tests.integration.test_e2e import collect
from tests.integration.test_wecom import sim, tasks_of, wecom_system

pytestmark = pytest.mark.integration


async def _fill(store: object) -> None:
    """Fill the store with old finished tasks of another user until it refuses more."""
    from edge.store import StoreFull
    with pytest.raises(StoreFull):
        for i in range(100_000):
            await store.add(TaskRecord(id=os.urandom(16), uid="web.filler", ch="web", text="字" * 600, ts=i,  # type: ignore[attr-defined]
                                       status="ok", done_ts=1))
    assert store.fill() >= FULL_AT  # type: ignore[attr-defined]


async def test_full_store_refuses_a_question_clearly_then_retention_makes_room(
        tmp_path: Path, pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge.app
    # No scheduled pass while the test runs: retention makes room when the test runs a pass (the one the
    # schedule runs), after the store was filled and the question refused. (A scheduled pass during the
    # filling used to delete the filler tasks as fast as they went in on a slow disk: the store never
    # filled and the test timed out.)
    monkeypatch.setattr(edge.app, "RETENTION_FIRST_S", 1e6)
    async with run_system(tmp_path, pki_dir, edge={"store_map_mb": 2, "history_days": 1.0}) as sys_, \
            aiohttp.ClientSession() as s:
        store, retention = sys_.app[STORE], sys_.app[RETENTION]
        assert retention.scheduled  # history_days > 0: passes are scheduled (not before 1e6 s here)
        await _fill(store)
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            assert (await ws.receive_json())["type"] == "node"
            await ws.send_json({"type": "ask", "text": "存储满了还能问吗"})
            err = await ws.receive_json()
            assert err["type"] == "error" and err["code"] == "store_full" and "存储已满" in err["message"]
            assert store.history("web.alice") == []  # nothing half-recorded, nothing acknowledged
            assert store.fill() >= FULL_AT  # still full: nothing has made room yet
            # retention (history_days = 1; the filler tasks ended in 1970) deletes them: room again
            assert retention.passes == 0
            assert await retention.run_once() > 0
            assert store.fill() < FULL_AT / 2
            await ws.send_json({"type": "ask", "text": "现在呢"})
            frames, done = await collect(ws)
            assert done["status"] == "ok"
        assert store.history("web.filler") == []
        assert [t.text for t in store.history("web.alice")] == ["现在呢"]  # a recent task: retention keeps it
        assert await retention.run_once() == 0


async def test_full_store_makes_wecom_callbacks_503_so_wecom_retries(tmp_path: Path, pki_dir: Path) -> None:
    async with wecom_system(tmp_path, pki_dir, edge={"store_map_mb": 2, "history_days": 0}) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        await _fill(sys_.app[STORE])
        status, _ = await sim().text("lisi", "你好").post(s, url)
        assert status == 503
        assert tasks_of(sys_, "lisi") == []


async def test_history_days_zero_keeps_everything(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, start_node=False, edge={"history_days": 0}) as sys_:
        store, retention = sys_.app[STORE], sys_.app[RETENTION]
        rec = TaskRecord(id=os.urandom(16), uid="web.old", ch="web", text="x", ts=1, status="ok", done_ts=1)
        await store.add(rec)
        assert not retention.scheduled  # no pass is ever scheduled ...
        assert await retention.run_once() == 0  # ... and one run by hand deletes nothing
        assert store.get(rec.id) is not None
