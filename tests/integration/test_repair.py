"""Gaps and lost tails in reply streams are repaired by replay (issue "Nothing lost").

The real edge, embedded broker and node run; the loss is injected where a broker would cause it: the node's
publish of one chosen message silently does nothing (as amqtt does when it drops an unacknowledged QoS 1
message). The user must still get the whole answer once, in order, or one clear error — never a hole.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import wire
from fakes.llm import FakeLLMConfig
from tests.conftest import run_system, wait_until
from tests.integration.test_e2e import collect

pytestmark = pytest.mark.integration


def _acked() -> asyncio.Future[None]:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(None)  # "acknowledged": the broker took it and lost it
    return fut


def _lose(node: Any, pick: Any) -> list[Any]:
    """Make ``node`` lose the first reply ``pick(msg)`` selects; returns it (in a list). The loss is at the
    node's reply batcher, which every reply for the edge goes through (``node.batch_replies``)."""
    orig = node.link.batcher.enqueue
    lost: list[Any] = []

    def lossy(msg: Any) -> asyncio.Future[None]:
        if not lost and pick(msg):
            lost.append(msg)
            return _acked()
        return orig(msg)

    node.link.batcher.enqueue = lossy
    return lost


async def _ask(sys_: Any, s: aiohttp.ClientSession, text: str = "讲个故事",
               timeout: float = 20) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    token = await sys_.login(s)
    async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
        await ws.receive_json()
        await ws.send_json({"type": "ask", "text": text})
        return await collect(ws, timeout=timeout)


def _assert_whole(frames: list[dict[str, Any]], done: dict[str, Any], chars: int) -> None:
    deltas = [f for f in frames if f["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))  # no hole, no repeat
    assert done["status"] == "ok", done
    assert done["text"] == "".join(d["text"] for d in deltas)
    assert len(done["text"]) == chars


def _lose_last_chunk(node: Any) -> list[Any]:
    """Make ``node`` lose the last Delta of its next answer: each Delta is held until the next message of
    the task, and the one held when the Done comes is dropped (the Done then names a seq never seen)."""
    orig = node.link.batcher.enqueue
    held: list[Any] = []
    lost: list[Any] = []

    def lossy(msg: Any) -> asyncio.Future[None]:
        if lost:
            return orig(msg)
        if isinstance(msg, wire.Delta):
            if held:
                orig(held.pop())
            held.append(msg)
            return _acked()
        if isinstance(msg, wire.Done) and held:
            lost.append(held.pop())
        return orig(msg)

    node.link.batcher.enqueue = lossy
    return lost


async def test_a_lost_middle_chunk_is_replayed_and_the_user_never_sees_the_hole(tmp_path: Path,
                                                                                pki_dir: Path) -> None:
    from edge.keys import BRIDGE
    cfg = FakeLLMConfig(n_tokens=40, tokens_per_s=200, token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"coalesce_ms": 20}) as sys_, \
            aiohttp.ClientSession() as s:
        lost = _lose(sys_.node, lambda m: isinstance(m, wire.Delta) and m.seq == 2)
        frames, done = await _ask(sys_, s)
        _assert_whole(frames, done, 80)
        assert len(lost) == 1
        bridge = sys_.app[BRIDGE]
        assert bridge.stats.gaps >= 1 and bridge.stats.replay_asks >= 1
        assert sys_.node.stats.replays >= 1 and sys_.node.stats.unknown_replays == 0


async def test_a_lost_last_chunk_is_replayed_from_the_reply_log(tmp_path: Path, pki_dir: Path) -> None:
    """The Done reveals the missing tail; the task has finished on the node, so the replay comes from its
    reply log."""
    from edge.keys import BRIDGE
    cfg = FakeLLMConfig(n_tokens=40, tokens_per_s=200, token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"coalesce_ms": 20}) as sys_, \
            aiohttp.ClientSession() as s:
        lost = _lose_last_chunk(sys_.node)
        frames, done = await _ask(sys_, s)
        _assert_whole(frames, done, 80)
        assert len(lost) == 1 and frames[-2]["seq"] == lost[0].seq
        assert sys_.app[BRIDGE].stats.replay_asks >= 1


async def test_a_lost_done_is_recovered_by_asking_a_silent_task(tmp_path: Path, pki_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing reveals a lost Done; the edge asks a running task that has been silent for IDLE_ASK_S."""
    import edge.repair
    from edge.keys import BRIDGE
    monkeypatch.setattr(edge.repair, "IDLE_ASK_S", 1.0)
    cfg = FakeLLMConfig(n_tokens=20, tokens_per_s=200, token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        lost = _lose(sys_.node, lambda m: isinstance(m, wire.Done))
        frames, done = await _ask(sys_, s)
        _assert_whole(frames, done, 40)
        assert len(lost) == 1
        assert sys_.app[BRIDGE].stats.replay_asks >= 1


async def test_a_gap_the_node_cannot_replay_ends_with_one_clear_error(tmp_path: Path, pki_dir: Path) -> None:
    """The node no longer has the task (it ignores the replay requests): after REPAIR_ASKS requests the
    user gets the in-order text before the hole and one node_lost error, never text after a hole."""
    from edge.repair import REPAIR_ASKS
    from edge.replies import NODE_LOST_MSG
    from edge.keys import BRIDGE
    cfg = FakeLLMConfig(n_tokens=40, tokens_per_s=200, token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"coalesce_ms": 20}) as sys_, \
            aiohttp.ClientSession() as s:
        node = sys_.node
        _lose(node, lambda m: isinstance(m, wire.Delta) and m.seq == 2)
        on_task = node.on_task
        node.on_task = lambda t: None if t.replay else on_task(t)  # a node that forgot the task
        frames, done = await _ask(sys_, s, timeout=30)
        deltas = [f for f in frames if f["type"] == "delta"]
        assert [d["seq"] for d in deltas] == [1]
        assert done["status"] == "error" and done["error"] == {"code": "node_lost", "message": NODE_LOST_MSG}
        assert done["text"] == deltas[0]["text"]
        assert sys_.app[BRIDGE].stats.replay_asks == REPAIR_ASKS


async def test_a_replay_request_for_a_task_the_node_does_not_have_never_runs_it(tmp_path: Path,
                                                                               pki_dir: Path) -> None:
    """``Task.replay`` is not a dispatch: a node that does not know the task ignores it (it restarted and
    lost it; running it now would splice a second run into the first)."""
    import os
    async with run_system(tmp_path, pki_dir) as sys_:
        node = sys_.node
        task = wire.Task(id=os.urandom(16), uid="mp.alice", ch="mp", text="hi", ts=1, replay=3)
        node.on_task(task)  # handled at once: a run would be held (and counted) on return
        assert node.stats.unknown_replays == 1 and node.stats.tasks == 0
        assert sys_.fake.stats.chat_requests == 0 and not len(node.admission)
