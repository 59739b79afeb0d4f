"""WeCom error classification and the outbox's pacing arithmetic (real LMDB in a temp dir)."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import pytest

from core.config import WecomSettings
from core.store import close_env
from edge.store import TaskStore
from edge.wecom.client import classify
from edge.wecom.outbox import Outbox

AES = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"


@pytest.mark.parametrize("code, kind", [(40014, "token"), (42001, "token"), (41001, "token"), (-1, "retry"),
                                        (45009, "retry"), (60020, "config"), (40001, "config"),
                                        (81013, "permanent"), (44004, "permanent"), (123456, "unknown")])
def test_classify(code: int, kind: str) -> None:
    assert classify(code, "x").kind == kind


def test_60020_hint_names_the_ip_and_errors_never_echo_tokens() -> None:
    e = classify(60020, "not allow to access from your ip, hint: [1], from ip: 203.0.113.9, more info at "
                        "https://open.work.weixin.qq.com/devtool/query?e=60020&access_token=SECRETTOKEN")
    assert "203.0.113.9" in e.hint and "企业可信IP" in e.hint
    assert "SECRETTOKEN" not in str(e)


@pytest.fixture
def outbox(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = TaskStore(tmp_path)
    cfg = WecomSettings(corp_id="ww1", token="t", encoding_aes_key=AES, per_user_per_min=20,
                        per_user_per_hour=600)
    yield Outbox(cfg, None, store)  # type: ignore[arg-type]
    store.close()
    close_env(tmp_path / "edge.lmdb")


def test_pace_per_minute(outbox: Outbox) -> None:
    now = 10_000.0
    outbox.sent_log["u"] = deque(now - 30 + i for i in range(19))  # 19 in the last 30 s
    assert outbox.wait_time("u", now) == 0
    outbox.sent_log["u"].append(now - 1)  # the 20th: the next waits until the oldest is 60 s old
    assert outbox.wait_time("u", now) == pytest.approx(30.0)
    assert outbox.wait_time("u", now + 30.0) == 0


def test_pace_per_hour(outbox: Outbox) -> None:
    now = 100_000.0
    outbox.sent_log["u"] = deque(now - 3000 + i * 4 for i in range(600))  # 600 in the last 50 min, spread out
    assert outbox.wait_time("u", now) == pytest.approx(600.0)


async def test_send_log_persists_across_restart(tmp_path: Path) -> None:
    store = TaskStore(tmp_path)
    cfg = WecomSettings(corp_id="ww1", token="t", encoding_aes_key=AES, per_user_per_min=2)
    ob = Outbox(cfg, None, store)  # type: ignore[arg-type]
    msgs = await ob.put("u", ["a", "b"])
    assert [m.part for m in msgs] == [1, 2] and ob.pending("u") == 2
    for w in list(ob.workers.values()):
        w.cancel()
    # pretend both were sent now: the worker writes the log like this
    import cbor2
    now = time.time()
    await store.writer.write(lambda txn: txn.put(b"rate:u", cbor2.dumps([now, now]), db=ob.db_kv))
    store.close()
    close_env(tmp_path / "edge.lmdb")
    store2 = TaskStore(tmp_path)
    try:
        ob2 = Outbox(cfg, None, store2)  # type: ignore[arg-type]
        assert ob2.wait_time("u") > 55  # the pace survived the restart
        ob2._closing = True  # load() must not start workers here (no API)
        assert ob2.load() == 2 and [m.text for m in ob2.queues["u"]] == ["a", "b"]  # unsent ones come back
    finally:
        store2.close()
        close_env(tmp_path / "edge.lmdb")


class _FlakyApi:
    """Stands in for the HTTP client only to raise a non-WeCom error (a bug) on the first send."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def send_text(self, user: str, text: str) -> str:
        self.calls.append(text)
        if len(self.calls) == 1:
            raise RuntimeError("unexpected")
        return "msgid"


async def test_unexpected_send_error_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    import asyncio

    store = TaskStore(tmp_path)
    cfg = WecomSettings(corp_id="ww1", token="t", encoding_aes_key=AES)
    api = _FlakyApi()
    ob = Outbox(cfg, api, store)  # type: ignore[arg-type]
    try:
        sent = asyncio.Event()
        ob.on_sent.append(lambda msg: sent.set())
        await ob.put("u", ["答案"])
        await asyncio.wait_for(sent.wait(), 15)  # after one retry, ~1 s of backoff
        assert ob.sent == 1 and api.calls == ["答案", "答案"] and ob.retries == 1
    finally:
        await ob.close()
        store.close()
        close_env(tmp_path / "edge.lmdb")


def test_queue_keys_stay_ordered_when_the_clock_steps_back(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    first = outbox._keyfor("u")
    monkeypatch.setattr(time, "time_ns", lambda: 1)  # wall clock far in the past
    assert outbox._keyfor("u") > first
