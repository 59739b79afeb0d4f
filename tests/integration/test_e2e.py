"""A streamed conversation over /api/ws through the real embedded broker, node and a fake LM Studio."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fakes.llm import FakeLLMConfig
from tests.conftest import run_system, wait_until

pytestmark = pytest.mark.integration


async def collect(ws: aiohttp.ClientWebSocketResponse, task: str | None = None,
                  timeout: float = 15) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Frames of one task until its done frame."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            f = await ws.receive_json()
            if f["type"] == "accepted" and task is None:
                task = f["task"]
            if f.get("task") == task:
                frames.append(f)
                if f["type"] == "done":
                    return frames, f


async def test_streamed_answer_in_order(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=60, tokens_per_s=400, token_chars=3)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            first = await ws.receive_json()
            assert first == {"type": "node", "online": True}
            await ws.send_json({"type": "ask", "text": "你好，介绍一下你自己"})
            frames, done = await collect(ws)
        deltas = [f for f in frames if f["type"] == "delta"]
        assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
        assert len(deltas) > 1, "answer should stream in several chunks"
        assert done["status"] == "ok"
        assert done["text"] == "".join(d["text"] for d in deltas)
        assert len(done["text"]) == 60 * 3
        assert done["usage"]["completion_tokens"] == 60
        # history through the HTTP API
        async with s.get(f"{sys_.http}/api/tasks", headers={"Authorization": f"Bearer {token}"}) as r:
            tasks = (await r.json())["tasks"]
        assert tasks[0]["status"] == "ok" and tasks[0]["answer"] == done["text"]
        async with s.get(f"{sys_.http}/api/tasks/{done['task']}", headers={"Authorization": f"Bearer {token}"}) as r:
            assert (await r.json())["answer"] == done["text"]


@pytest.mark.parametrize(
    "fake, code",
    [
        ({"http_status": 500}, "llm_http"),
        ({"http_status": 404}, "llm_no_model"),
        ({"error_after": 3}, "llm_stream_error"),
        ({"drop_after": 3}, "llm_dropped"),
        ({"stall_after": 3}, "llm_stall"),
    ],
)
async def test_llm_failures_reach_user_as_clear_errors(tmp_path: Path, pki_dir: Path, fake: dict[str, Any],
                                                      code: str) -> None:
    cfg = FakeLLMConfig(n_tokens=10, **fake)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            t0 = time.monotonic()
            await ws.send_json({"type": "ask", "text": "hi"})
            frames, done = await collect(ws, timeout=10)
        assert time.monotonic() - t0 < 8
        assert done["status"] == "error"
        assert done["error"]["code"] == code
        assert done["error"]["message"]  # readable Chinese message
        deltas = "".join(f["text"] for f in frames if f["type"] == "delta")
        assert done["text"] == deltas


async def test_refused_llm_connection(tmp_path: Path, pki_dir: Path) -> None:
    from tests.conftest import free_port
    async with run_system(tmp_path, pki_dir, node={"llm_url": f"http://127.0.0.1:{free_port()}/v1"}) as sys_, \
            aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            await ws.send_json({"type": "ask", "text": "hi"})
            _, done = await collect(ws, timeout=10)
        assert done["status"] == "error" and done["error"]["code"] == "llm_unreachable"


async def test_stop_cancels_end_to_end(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=400, tokens_per_s=50)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            await ws.send_json({"type": "ask", "text": "long"})
            task = None
            async with asyncio.timeout(10):
                while True:
                    f = await ws.receive_json()
                    task = f.get("task", task)
                    if f["type"] == "delta":
                        break
            await ws.send_json({"type": "stop", "task": task})
            frames, done = await collect(ws, task, timeout=10)
        assert done["status"] == "cancelled"
        assert len(done["text"]) < 400 * 4
        # the LM Studio stream was closed (GPU freed); the fake notices the closed connection a moment later
        await wait_until(lambda: sys_.fake.stats.client_closed >= 1, 10)


async def _ask_until_first_delta(ws: aiohttp.ClientWebSocketResponse, text: str) -> tuple[str, list[dict[str, Any]]]:
    """Ask ``text``; the task id of the first delta that comes, and every frame up to it."""
    await ws.send_json({"type": "ask", "text": text})
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while True:
            f = await ws.receive_json()
            frames.append(f)
            if f["type"] == "delta":
                return f["task"], frames


async def test_node_stop_cuts_long_answer_with_clear_error(tmp_path: Path, pki_dir: Path) -> None:
    """Stopping B mid-answer: the user gets what was streamed plus done error node_stopped, then the
    edge sees the node offline at once (explicit offline beat, not the keepalive-late last will)."""
    cfg = FakeLLMConfig(n_tokens=400, tokens_per_s=50)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"stop_grace_s": 0.3}) as sys_, \
            aiohttp.ClientSession() as s:
        from edge.keys import BRIDGE
        async with sys_.chat_ws(s) as ws:
            task, _ = await _ask_until_first_delta(ws, "long")
            t0 = time.monotonic()
            await sys_.node.shutdown()
            assert time.monotonic() - t0 < 3
            frames, done = await collect(ws, task, timeout=10)
            assert done["status"] == "error" and done["error"]["code"] == "node_stopped"
            assert "停止" in done["error"]["message"]
            assert 0 < len(done["text"]) < 400 * 4  # what was streamed is kept, the rest was not made
            assert not sys_.app[BRIDGE].node_online
        await wait_until(lambda: sys_.fake.stats.client_closed >= 1, 10)  # LM Studio's stream closed: its slot is free


async def test_node_stop_drains_then_new_node_takes_queued_task(tmp_path: Path, pki_dir: Path) -> None:
    """A running answer that ends within stop_grace_s ends ok; a question asked while B is down is
    not lost: it waits at the edge and the next node answers it."""
    from node.worker import Node
    cfg = FakeLLMConfig(n_tokens=20, tokens_per_s=40)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"stop_grace_s": 10}) as sys_, \
            aiohttp.ClientSession() as s:
        from edge.keys import BRIDGE
        async with sys_.chat_ws(s) as ws:
            task, _ = await _ask_until_first_delta(ws, "short")
            await sys_.node.shutdown()
            _, done = await collect(ws, task, timeout=10)
            assert done["status"] == "ok"  # drained, not cut
            assert sys_.node.stats.ok == 1
            assert sys_.node_task is not None
            sys_.node_task.cancel()
            await asyncio.gather(sys_.node_task, return_exceptions=True)
            await wait_until(lambda: not sys_.app[BRIDGE].node_online, 5)
            await ws.send_json({"type": "ask", "text": "while B is down"})
            async with asyncio.timeout(5):
                while (f := await ws.receive_json())["type"] != "accepted":
                    pass
            queued = f["task"]
            live = sys_.app[BRIDGE].get(bytes.fromhex(queued))
            assert live is not None and live.finished_at is None and live.rec.status == "pending"  # waits at the edge
            node2 = Node(sys_.node.s)
            sys_.node, sys_.node_task = node2, asyncio.create_task(node2.run())
            _, done2 = await collect(ws, queued, timeout=15)
            assert done2["status"] == "ok" and len(done2["text"]) > 0


async def test_node_cancelled_mid_answer_ends_promptly_and_leaves_nothing_running(tmp_path: Path,
                                                                                  pki_dir: Path) -> None:
    """B's process is torn down without a graceful stop (``run()`` cancelled, the connection gone):
    its running task must not wait forever for a broker that will not come back (it used to hang
    the event loop's shutdown)."""
    from node.worker import Node
    cfg = FakeLLMConfig(n_tokens=400, tokens_per_s=50)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            await _ask_until_first_delta(ws, "long")
            assert sys_.node_task is not None
            sys_.node_task.cancel()
            t0 = time.monotonic()
            done, _ = await asyncio.wait([sys_.node_task], timeout=8)
            assert done and time.monotonic() - t0 < 8
            runs = [t for t in asyncio.all_tasks() if t.get_name().startswith("task-")]  # the node's task runs
            if runs:  # cancelled with run(): they end (each may still be unwinding its cancellation)
                _, pending = await asyncio.wait(runs, timeout=5)
                assert not pending, pending
            await wait_until(lambda: sys_.fake.stats.active_streams == 0, 10)  # LM Studio's stream was closed
            sys_.node_task = None


async def test_stop_while_broker_link_is_down_is_sent_on_reconnect(tmp_path: Path, pki_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop asked while the edge's broker link is down is not lost: it goes out when the link is back
    (the edge's reconnect republishes pending work), and the answer ends cancelled."""
    import wire
    from edge.keys import BRIDGE
    cfg = FakeLLMConfig(n_tokens=400, tokens_per_s=50)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        bridge = sys_.app[BRIDGE]
        published: list[Any] = []  # everything the bridge publishes, decoded
        send, cancel = bridge.dispatch.send, bridge.cancel
        stopped = asyncio.Event()

        def spy_send(topic: str, payload: bytes) -> None:
            published.append(wire.decode(payload))
            send(topic, payload)

        def spy_cancel(tid: bytes, uid: str) -> bool:
            try:
                return cancel(tid, uid)
            finally:
                stopped.set()

        monkeypatch.setattr(bridge.dispatch, "send", spy_send)
        monkeypatch.setattr(bridge, "cancel", spy_cancel)
        async with sys_.chat_ws(s) as ws:
            task, _ = await _ask_until_first_delta(ws, "long")
            bridge.link_down()  # the edge sees its broker link as down: nothing can be published
            await ws.send_json({"type": "stop", "task": task})
            await asyncio.wait_for(stopped.wait(), 10)  # the edge handled the stop (and published what it could)
            live = bridge.get(bytes.fromhex(task))
            assert live is not None and live.cancel_requested and live.finished_at is None
            assert not [m for m in published if isinstance(m, wire.Cancel)]  # the stop could not go out ...
            assert sys_.fake.stats.client_closed == 0  # ... so the answer still streams
            bridge.link_up()  # link back: what the session start does
            assert [m.id for m in published if isinstance(m, wire.Cancel)] == [live.rec.id]  # sent now
            frames, done = await collect(ws, task, timeout=10)
        assert done["status"] == "cancelled"
        await wait_until(lambda: sys_.fake.stats.client_closed >= 1, 5)


async def test_restarted_node_replays_a_finished_answer_from_its_lmdb_log(tmp_path: Path, pki_dir: Path) -> None:
    """The reply log survives a node restart: a task sent again after the node restarted is answered from
    node.lmdb (accept, every delta, done), not generated a second time."""
    from edge.keys import BRIDGE
    from node.worker import Node
    cfg = FakeLLMConfig(n_tokens=30, tokens_per_s=300)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        bridge = sys_.app[BRIDGE]
        async with sys_.chat_ws(s) as ws:
            await ws.send_json({"type": "ask", "text": "记住我"})
            frames, done = await collect(ws)
        assert done["status"] == "ok"
        assert sys_.node_task is not None
        sys_.node_task.cancel()
        await asyncio.wait([sys_.node_task], timeout=8)
        requests = sys_.fake.stats.chat_requests
        sys_.node = Node(sys_.node.s)  # server B restarted: a new process on the same data dir
        sys_.node_task = asyncio.create_task(sys_.node.run())
        await wait_until(lambda: sys_.node.connected, 10)
        live = bridge.get(bytes.fromhex(done["task"]))
        assert live is not None
        bridge.dispatch.publish(live)  # the edge sends the finished task again (as after losing its stream)
        await wait_until(lambda: sys_.node.stats.replays == 1, 10)
        assert sys_.fake.stats.chat_requests == requests  # replayed, not generated again


async def test_llm_faster_than_the_publisher_never_makes_an_oversize_chunk(tmp_path: Path, pki_dir: Path) -> None:
    """Tokens of 500 characters as fast as possible: the coalescer used to join everything waiting into one
    Delta of ~400 KB, over the wire limit (256 KiB), and the answer died with an internal error."""
    cfg = FakeLLMConfig(n_tokens=4000, tokens_per_s=0, token_chars=500)  # 2 MB of text
    # (max_tokens 0: not sent, so the fake's 4000 "tokens" are not cut at the default 2048)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"max_tokens": 0}) as sys_, \
            aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}, max_msg_size=0) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "很长很长"})
            frames, done = await collect(ws, timeout=60)
        deltas = [f for f in frames if f["type"] == "delta"]
        assert done["status"] == "ok", done
        assert len(done["text"]) == 4000 * 500 and done["text"] == "".join(d["text"] for d in deltas)
        assert max(len(d["text"].encode()) for d in deltas) <= 64 * 1024


async def test_slow_websocket_client_is_cut_off_instead_of_growing_the_edge(tmp_path: Path, pki_dir: Path) -> None:
    """A client that stops reading while 10 M characters stream at it: the edge queues at most
    edge.api.WS_QUEUE frames / WS_QUEUE_CHARS characters for it, then closes it with 1013 ("try again
    later", resume) instead of buffering the answer; what it did receive is in order, with no gap."""
    from edge.api import WS_QUEUE_CHARS
    cfg = FakeLLMConfig(n_tokens=20000, tokens_per_s=0, token_chars=500)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"coalesce_ms": 1, "max_tokens": 0}) as sys_, \
            aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        ws = await s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}, max_msg_size=0)
        # A fixed, small receive buffer: loopback's autotuning (tcp_rmem up to 32 MB here) could otherwise take
        # the whole 10 MB answer into the kernel, and the edge would never see the client fall behind.
        ws.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await ws.receive_json()
        await ws.send_json({"type": "ask", "text": "很长很长的回答"})
        from edge.keys import STORE
        store = sys_.app[STORE]
        await wait_until(lambda: bool(store.history("web.alice")) and store.history("web.alice")[0].status == "ok",
                         60)  # the whole answer went through the edge while we read nothing
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            while True:
                m = await ws.receive()
                if m.type is not aiohttp.WSMsgType.TEXT:
                    break
                if m.json()["type"] == "delta":
                    seen.append(m.json())
        assert ws.close_code == 1013
        got = sum(len(f["text"]) for f in seen)
        assert 0 < got < 20000 * 500 - WS_QUEUE_CHARS  # cut off: far from the whole answer was buffered
        assert [d["seq"] for d in seen] == list(range(1, len(seen) + 1))
        task = store.history("web.alice")[0]
        assert task.status == "ok" and len(task.answer) == 20000 * 500  # the answer itself is complete


@pytest.mark.parametrize("when", ["mid_answer", "finished"])
async def test_resuming_a_huge_answer_is_paced_not_cut_off(tmp_path: Path, pki_dir: Path, when: str) -> None:
    """A resume of more text than the per-socket bound (2 M characters) used to overflow the queue and cut
    the client off with 1013. The replay is now paced by the client's reading, and the live chunks wait
    until it caught up: a slow reader gets every chunk once, in order, then the done."""
    from edge.api import WS_QUEUE_CHARS
    from edge.keys import BRIDGE
    n, size = 5000, 1000  # 5 M characters
    cfg = FakeLLMConfig(n_tokens=n, tokens_per_s=2500 if when == "mid_answer" else 0, token_chars=size)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"coalesce_ms": 5, "max_tokens": 0}) as sys_, \
            aiohttp.ClientSession() as s:
        token = await sys_.login(s)
        async with asyncio.timeout(10):
            ws = await s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}, max_msg_size=0)
            await ws.receive_json()
        task, _ = await _ask_until_first_delta(ws, "很长的回答")
        async with asyncio.timeout(15):
            await ws.close()
        live = sys_.app[BRIDGE].get(bytes.fromhex(task))
        assert live is not None
        await wait_until(lambda: sum(map(len, live.stream.parts)) > WS_QUEUE_CHARS, 20)
        if when == "finished":
            await wait_until(lambda: live.finished_at is not None, 20)
        async with asyncio.timeout(10):
            ws = await s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}, max_msg_size=0)
            await ws.receive_json()
        async with ws:
            await ws.send_json({"type": "resume", "task": task, "seq": 0})
            seqs: list[int] = []
            text: list[str] = []
            async with asyncio.timeout(40):
                while True:
                    m = await ws.receive()
                    assert m.type is aiohttp.WSMsgType.TEXT, (m, ws.close_code)
                    f = m.json()
                    if f["type"] == "delta":
                        seqs.append(f["seq"])
                        text.append(f["text"])
                        if len(seqs) % 50 == 0:
                            await asyncio.sleep(0.01)  # a slow reader
                    elif f["type"] == "done":
                        break
        assert seqs == list(range(1, len(seqs) + 1))
        assert f["status"] == "ok" and f["text"] == "".join(text) and len(f["text"]) == n * size


async def test_a_task_answered_before_its_commit_still_reaches_the_client_in_order(
        tmp_path: Path, pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A WS ask is sent to the node while its LMDB commit runs. Here the commit is held until the whole answer
    has come back (the edge finished the task): the client still gets the edge's `accepted` first (the task is durable),
    then the node's `accepted`, every delta once in order with its timing, and the `done`."""
    from edge.keys import BRIDGE, STORE
    cfg = FakeLLMConfig(n_tokens=10, tokens_per_s=0)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        store = sys_.app[STORE]
        add = store.add
        answered = asyncio.Event()
        sys_.app[BRIDGE].on_finished.append(lambda live: answered.set())

        async def slow_add(rec: Any, dedup: Any = None) -> Any:
            got = await add(rec, dedup=dedup)
            await asyncio.wait_for(answered.wait(), 15)  # the commit "ends" only once the whole answer is back
            return got

        monkeypatch.setattr(store, "add", slow_add)
        async with sys_.chat_ws(s) as ws:
            await ws.send_json({"type": "ask", "text": "快", "trace": True})
            frames, done = await collect(ws)
        kinds = [f["type"] for f in frames]
        assert kinds[:2] == ["accepted", "accepted"] and kinds[-1] == "done"
        deltas = [f for f in frames if f["type"] == "delta"]
        assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
        assert all("n_pub" in d["timing"] for d in deltas)
        assert done["status"] == "ok" and done["text"] == "".join(d["text"] for d in deltas)
        assert sys_.node.stats.ok == 1  # answered before it was acknowledged, and only once
