"""Regressions from a review of the repair/batching/early-publish code, each against the running edge (real
broker connected; no node: the tests play the node by feeding the bridge what a node would publish)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import wire
from tests.conftest import run_system, wait_until

pytestmark = pytest.mark.integration


class Sink:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def push(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)


def batch(*items: Any) -> bytes:
    return wire.encode(wire.Batch(node="n1", items=list(items)))


def _node_online(bridge: Any) -> None:
    bridge.on_message("claw/v1/node/n1", wire.encode(wire.Beat(node="n1", state="online")))
    assert bridge.node_online


async def _task(bridge: Any, text: str = "hi") -> tuple[Any, Sink]:
    _node_online(bridge)
    live = await bridge.submit("web.alice", "web", text, hold=True)
    sink = Sink()
    bridge.attach(live, sink)
    bridge.release(live)
    return live, sink


async def test_replies_after_the_edge_ended_a_task_go_nowhere(tmp_path: Path, pki_dir: Path) -> None:
    """node_lost (beats stopped), then the link comes back and the node sends the rest: no frame after the
    done, no chunk row left behind."""
    from edge.keys import BRIDGE, STORE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        live, sink = await _task(bridge)
        tid = live.rec.id
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=tid, node="n1"), wire.Delta(id=tid, seq=1, text="A")))
        bridge.nodes["n1"].last_seen -= 1000
        bridge.check_nodes()
        assert sink.frames[-1]["type"] == "done" and sink.frames[-1]["error"]["code"] == "node_lost"
        n = len(sink.frames)
        bridge.on_message("claw/v1/batch/n1", batch(wire.Delta(id=tid, seq=2, text="B"),
                                                      wire.Done(id=tid, seq=2, status="ok")))
        assert len(sink.frames) == n and bridge.stats.late == 2
        await wait_until(lambda: store.chunk_texts(tid) == [], 10)  # dropped once the final record is committed


async def test_a_second_run_after_a_restart_is_never_spliced_after_the_done(tmp_path: Path, pki_dir: Path) -> None:
    from edge.keys import BRIDGE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge = sys_.app[BRIDGE]
        live, sink = await _task(bridge)
        tid = live.rec.id
        live.shown = ["A", "B"]  # what users saw before the edge restarted
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=tid, node="n1"), wire.Delta(id=tid, seq=1, text="X"),
                                                      wire.Delta(id=tid, seq=2, text="Y")))
        bridge.on_message("claw/v1/batch/n1", batch(wire.Delta(id=tid, seq=3, text="Z"),
                                                      wire.Done(id=tid, seq=3, status="ok")))
        done = [f for f in sink.frames if f["type"] == "done"]
        assert len(done) == 1 and done[0]["text"] == "AB" and sink.frames[-1] is done[0]
        assert live.stream.parts == ["A", "B"]  # a later resume replays what users saw, not the new run


async def test_a_streaming_task_with_a_stale_queue_number_is_still_asked(tmp_path: Path, pki_dir: Path) -> None:
    from edge.keys import BRIDGE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge = sys_.app[BRIDGE]
        live, _ = await _task(bridge)
        tid = live.rec.id
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=tid, node="n1", queue=1)))
        bridge.on_message("claw/v1/batch/n1", batch(wire.Delta(id=tid, seq=1, text="A")))  # its Accept(0) lost
        live.heard_at -= 60
        bridge.repair()
        assert bridge.stats.replay_asks == 1


async def test_store_full_after_a_fast_answer_counts_the_task_once(tmp_path: Path, pki_dir: Path) -> None:
    from edge.keys import BRIDGE, STORE
    from edge.store import StoreFull
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        first, _ = await _task(bridge, "first")
        gate = asyncio.Event()
        write = store.writer.write

        async def slow_write(op: Any) -> Any:
            await gate.wait()
            return await write(op)

        store.writer.write = slow_write
        store._fill = lambda txn: 1.0  # full
        sub = asyncio.create_task(bridge.submit("web.alice", "web", "second", hold=True))
        await asyncio.sleep(0)
        second = next(t for t in bridge.live.values() if t.rec.text == "second")
        tid = second.rec.id
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=tid, node="n1"), wire.Delta(id=tid, seq=1, text="x"),
                                                      wire.Done(id=tid, seq=1, status="ok")))
        gate.set()
        with pytest.raises(StoreFull):
            await sub
        assert first.finished_at is None and bridge.pending("web.alice") == 1
        assert store.chunk_texts(tid) == []
        store.writer.write = write


async def test_no_frame_of_a_batch_reaches_a_sink_before_its_chunks_are_stored(tmp_path: Path,
                                                                               pki_dir: Path) -> None:
    """A WebSocket session may write a frame to its socket the moment it is pushed. A batch's chunks are kept
    in edge-chunks.lmdb at the end of the batch's pass, so its frames are pushed only after that: after a
    kill -9 in between, the user never turns out to have seen text the restarted edge does not know (it
    could no longer tell a re-run from a replay: the answer was ended shorter than what was shown)."""
    from edge.keys import BRIDGE, STORE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        live, _ = await _task(bridge)
        tid = live.rec.id
        stored_at_push: list[tuple[int, list[str]]] = []

        class Checking(Sink):
            def push(self, frame: dict[str, Any]) -> None:
                if frame["type"] == "delta":
                    stored_at_push.append((frame["seq"], store.chunk_texts(tid)))
                super().push(frame)

        sink = Checking()
        bridge.attach(live, sink)
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=tid, node="n1"),
                                                      wire.Delta(id=tid, seq=1, text="一"),
                                                      wire.Delta(id=tid, seq=2, text="二")))
        assert [(seq, texts[:seq]) for seq, texts in stored_at_push] == [(1, ["一"]), (2, ["一", "二"])]
        assert [f["type"] for f in sink.frames] == ["accepted", "delta", "delta"]


async def test_finished_tasks_leave_the_scans_and_are_forgotten_after_the_keep_time(
        tmp_path: Path, pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished task is out of the housekeeping's scans at once (``unfinished()``), stays readable
    (``get``) for FINISHED_KEEP_S, then is forgotten, with its sinks detached; ``detach_all`` of a sink
    reaches exactly the tasks it was attached to."""
    import edge.tasks
    from edge.keys import BRIDGE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge = sys_.app[BRIDGE]
        done_live, done_sink = await _task(bridge, "finishes")
        open_live, open_sink = await _task(bridge, "stays open")
        other = Sink()
        bridge.attach(open_live, other)
        tid = done_live.rec.id
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=tid, node="n1"), wire.Delta(id=tid, seq=1, text="A"),
                                                      wire.Done(id=tid, seq=1, status="ok")))
        assert done_sink.frames[-1]["type"] == "done"
        assert bridge.unfinished() == [open_live] and bridge.get(tid) is done_live
        monkeypatch.setattr(edge.tasks, "FINISHED_KEEP_S", 0.0)
        await wait_until(lambda: bridge.get(tid) is None, 10)  # forgotten by a housekeeping tick (every 0.5 s)
        assert not done_live.sinks and not bridge.attached(done_sink)
        assert bridge.get(open_live.rec.id) is open_live  # an unfinished task is never forgotten
        bridge.detach_all(open_sink)
        assert open_live.sinks == {other} and not bridge.attached(open_sink)


async def test_a_batch_keeps_its_chunks_in_one_transaction_and_a_finished_tasks_go_after_its_commit(
        tmp_path: Path, pki_dir: Path) -> None:
    """A batch's chunks are kept in one transaction; those of a task the batch finished are dropped once its
    final record is committed (not before: see the test below), and another task's stay."""
    from edge.keys import BRIDGE, STORE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        a, _ = await _task(bridge, "a")
        b, _ = await _task(bridge, "b")
        ta, tb = a.rec.id, b.rec.id
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=ta, node="n1"), wire.Accept(id=tb, node="n1"),
                                                      wire.Delta(id=ta, seq=1, text="A1")))
        assert store.chunk_texts(ta) == ["A1"]
        commits = []
        add = store.add_chunks
        store.add_chunks = lambda chunks, drop=frozenset(): (commits.append((len(chunks), set(drop))),
                                                             add(chunks, drop))[1]
        bridge.on_message("claw/v1/batch/n1", batch(wire.Delta(id=ta, seq=2, text="A2"), wire.Delta(id=tb, seq=1, text="B1"),
                                                      wire.Done(id=ta, seq=2, status="ok")))
        assert commits == [(2, set())]  # one transaction for the batch
        await wait_until(lambda: store.chunk_texts(ta) == [], 10)
        assert store.chunk_texts(tb) == ["B1"]
        assert bridge.get(ta).rec.answer == "A1A2"


async def test_a_recorded_unfinished_task_that_is_not_live_is_sent_when_asked_again(tmp_path: Path,
                                                                                   pki_dir: Path) -> None:
    """A task in the store but not in memory and not finished (its submit was cancelled while the write went
    on): asked again by id, it is counted and sent to the nodes, not left pending for ever."""
    import os

    from edge.keys import BRIDGE, STORE
    from edge.store import TaskRecord
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        _node_online(bridge)
        tid = os.urandom(16)
        await store.add(TaskRecord(id=tid, uid="web.alice", ch="web", text="hi", ts=1000))
        published = bridge.stats.published
        live = await bridge.submit("web.alice", "web", "hi", task_id=tid)
        assert live.rec.id == tid and not live.created and live.finished_at is None
        assert bridge.pending("web.alice") == 1 and bridge.stats.published == published + 1
        assert live in bridge.unfinished()


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "reply"])
async def test_kept_chunks_outlive_the_task_until_its_final_record_is_committed(
        tmp_path: Path, pki_dir: Path, batched: bool) -> None:
    """The chunks kept for the restart check used to be dropped when the task finished, before its final
    record was committed: an edge killed in between (it happened in CI with A and B both killed) restarted
    with the task unfinished and no chunks, could not tell the new node's re-run from a replay, and spliced
    the two runs into one ``ok`` answer. Now they go only once the final record is durable."""
    import threading

    from edge.keys import BRIDGE, STORE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        live, _ = await _task(bridge, "q")
        tid = live.rec.id
        bridge.on_message("claw/v1/batch/n1", batch(wire.Accept(id=tid, node="n1"),
                                                     wire.Delta(id=tid, seq=1, text="shown")))
        assert store.chunk_texts(tid) == ["shown"]
        held, release = threading.Event(), threading.Event()
        store.writer.submit(lambda txn: (held.set(), release.wait(10)))  # the writer thread is busy
        assert await asyncio.to_thread(held.wait, 10)
        done = wire.Done(id=tid, seq=1, status="ok")
        if batched:
            bridge.on_message("claw/v1/batch/n1", batch(done))
        else:
            bridge.on_message("claw/v1/reply/web.alice", wire.encode(done))
        assert live.finished_at is not None
        await asyncio.sleep(0)  # one loop pass: nothing may drop them before the commit
        assert store.chunk_texts(tid) == ["shown"]  # the final record is not committed yet
        release.set()
        await wait_until(lambda: store.chunk_texts(tid) == [], 10)
        with store.env.begin() as txn:
            assert txn.get(tid, db=store.tasks) is not None
        assert store.get(tid).status == "ok"


async def test_chunks_of_finished_tasks_are_dropped_at_start(tmp_path: Path, pki_dir: Path) -> None:
    """Chunks left behind by an edge stopped between a final commit and the drop go at the next start; those of
    unfinished tasks stay (the restart check needs them)."""
    from edge.keys import BRIDGE, STORE
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        live, _ = await _task(bridge, "open")
        store.add_chunks([(live.rec.id, 1, "a"), (b"\x01" * 16, 1, "stale"), (b"\x01" * 16, 2, "stale")])
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        store = sys_.app[STORE]
        assert store.chunk_texts(live.rec.id) == ["a"]
        assert store.chunk_texts(b"\x01" * 16) == []
