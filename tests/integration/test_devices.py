"""An MQTT device (an integrator's client) asks the real node through the real broker and reads the answer on
its own reply topic, while the edge's users get theirs in batches (node.batch_replies): one system, both paths."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
import pytest

import wire
from fakes.llm import FakeLLMConfig
from tests.conftest import run_system, wait_until
from tests.integration.test_e2e import collect

pytestmark = pytest.mark.integration


async def test_device_gets_its_answer_on_its_own_topic_and_web_users_get_batches(tmp_path: Path,
                                                                                  pki_dir: Path) -> None:
    from broker.creds import CredentialStore
    from core.mqtt import make_client
    from edge.keys import BRIDGE

    cfg = FakeLLMConfig(n_tokens=30, tokens_per_s=300, token_chars=3)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        user, password = CredentialStore(sys_.settings.data_dir).add("device", "lamp")
        tls = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        dev = make_client(host="localhost", port=sys_.settings.mqtt.port, username=user, password=password,
                          identifier=user, tls=tls)
        async with dev:
            await dev.subscribe(wire.reply_topic(user), qos=1)
            tid = os.urandom(16)
            await dev.publish(wire.task_topic(user), wire.encode(wire.Task(id=tid, uid=user, ch="dev", text="开灯",
                                                                           ts=1)), qos=1)
            got: list[wire.Message] = []
            async with asyncio.timeout(10):
                async for m in dev.messages:
                    msg = wire.decode(m.payload)  # type: ignore[arg-type]
                    assert str(m.topic) == wire.reply_topic(user)  # never a batch topic
                    got.append(msg)
                    if isinstance(msg, wire.Done):
                        break
        deltas = [m for m in got if isinstance(m, wire.Delta)]
        assert isinstance(got[0], wire.Accept) and got[-1].status == "ok"  # type: ignore[union-attr]
        assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))
        assert len("".join(d.text for d in deltas)) == 90
        # a web user in the same system: answered through batches
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "你好"})
            frames, done = await collect(ws)
        assert done["status"] == "ok" and len(done["text"]) == 90
        bridge = sys_.app[BRIDGE]
        assert bridge.stats.batches >= 1
        assert bridge.get(tid) is None  # the device's task is not the edge's
        n_deltas = len([f for f in frames if f["type"] == "delta"])
        assert sys_.node.link.batcher is not None and sys_.node.link.batcher.items >= n_deltas + 2  # + accept, done


async def test_a_batch_on_another_nodes_topic_is_dropped(tmp_path: Path, pki_dir: Path) -> None:
    from edge.keys import BRIDGE

    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge = sys_.app[BRIDGE]
        batch = wire.encode(wire.Batch(node="n2", items=[wire.Accept(id=os.urandom(16), node="n2")]))
        bridge.on_message("claw/v1/batch/n1", batch)
        bridge.on_message("claw/v1/batch/n1", b"\xa0")  # not a message at all
        assert bridge.stats.bad_messages == 2 and bridge.stats.batches == 0


async def test_a_batchs_chunks_are_kept_in_one_write_and_a_task_ending_in_it_leaves_none(tmp_path: Path,
                                                                                       pki_dir: Path) -> None:
    from edge.keys import BRIDGE, STORE

    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        bridge, store = sys_.app[BRIDGE], sys_.app[STORE]
        a = await bridge.submit("web.alice", "web", "一")
        b = await bridge.submit("web.bob", "web", "二")
        tid_a, tid_b = a.rec.id, b.rec.id
        bridge.on_message("claw/v1/batch/n1", wire.encode(wire.Batch(node="n1", items=[
            wire.Accept(id=tid_a, node="n1"), wire.Accept(id=tid_b, node="n1"),
            wire.Delta(id=tid_a, seq=1, text="A1"), wire.Delta(id=tid_b, seq=1, text="B1"),
            wire.Delta(id=tid_a, seq=2, text="A2")])))
        assert store.chunk_texts(tid_a) == ["A1", "A2"] and store.chunk_texts(tid_b) == ["B1"]
        bridge.on_message("claw/v1/batch/n1", wire.encode(wire.Batch(node="n1", items=[
            wire.Delta(id=tid_a, seq=3, text="A3"), wire.Done(id=tid_a, seq=3, status="ok"),
            wire.Delta(id=tid_b, seq=2, text="B2")])))
        # finished in the batch: nothing left behind once its final record is committed (not before)
        await wait_until(lambda: store.chunk_texts(tid_a) == [], 10)
        assert store.chunk_texts(tid_b) == ["B1", "B2"]
        rec = store.get(tid_a)
        assert rec is not None and rec.status == "ok" and rec.answer == "A1A2A3"
