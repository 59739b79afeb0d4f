"""What one user (a device, a web page) can do to another user's tasks on server B: nothing.

The real edge, embedded broker (TLS, device credentials from the credential store, its ACL) and node run; the
devices are real MQTT clients. A task id is an id only together with its uid (the task topic's, which the broker
binds to the publisher): another user's id replays, cancels or re-asks nothing of theirs. One device cannot hold
more than ``node.max_pending_per_uid`` tasks (nor everyone more than ``node.max_pending``), and a malformed task
is answered with ``done`` error ``bad_request`` whenever its id can be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import cbor2
import pytest

import wire
from fakes.llm import FakeLLMConfig, reply_tokens
from tests.conftest import System, run_system, wait_until
from tests.integration.test_e2e import collect

pytestmark = pytest.mark.integration


def expected(cfg: FakeLLMConfig, question: str) -> str:
    """The fake LLM's answer to ``question`` (derived from the last user message)."""
    return "".join(reply_tokens(cfg, [{"role": "user", "content": question}]))


class Device:
    """A device with its own credential: publishes on its task topic, records everything on its reply topic."""

    def __init__(self, client: aiomqtt.Client, uid: str) -> None:
        self.client = client
        self.uid = uid
        self.got: list[tuple[str, wire.Message]] = []

    def of(self, tid: bytes) -> list[wire.Message]:
        return [m for _, m in self.got if getattr(m, "id", None) == tid]

    def text(self, tid: bytes) -> str:
        return "".join(m.text for m in self.of(tid) if isinstance(m, wire.Delta))

    def done(self, tid: bytes) -> wire.Done | None:
        return next((m for m in self.of(tid) if isinstance(m, wire.Done)), None)

    async def wait_done(self, tid: bytes, timeout: float = 15) -> wire.Done:
        await wait_until(lambda: self.done(tid) is not None, timeout)
        done = self.done(tid)
        assert done is not None
        return done

    async def ask(self, tid: bytes, text: str, *, uid: str | None = None, replay: int | None = None) -> None:
        await self.send(wire.encode(wire.Task(id=tid, uid=uid or self.uid, ch="dev", text=text, ts=1, replay=replay)))

    async def send(self, payload: bytes) -> None:
        await self.client.publish(wire.task_topic(self.uid), payload, qos=1)


@contextlib.asynccontextmanager
async def device(sys_: System, pki: Path, name: str) -> AsyncIterator[Device]:
    from broker.creds import CredentialStore
    from core.mqtt import make_client

    user, password = CredentialStore(sys_.settings.data_dir).add("device", name)
    tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    client = make_client(host="localhost", port=sys_.settings.mqtt.port, username=user, password=password,
                         identifier=user, tls=tls)
    async with client:
        await client.subscribe(wire.reply_topic(user), qos=1)
        dev = Device(client, user)

        async def read() -> None:
            async for m in client.messages:
                assert str(m.topic) == wire.reply_topic(user)
                dev.got.append((str(m.topic), wire.decode(m.payload)))  # type: ignore[arg-type]

        reader = asyncio.create_task(read())
        try:
            yield dev
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_a_device_cannot_replay_cancel_or_reask_another_devices_task(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=60, tokens_per_s=20, token_chars=3)  # 3 s per answer
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, device(sys_, pki_dir, "lamp") as a, \
            device(sys_, pki_dir, "fan") as b, device(sys_, pki_dir, "door") as c:
        node, x = sys_.node, os.urandom(16)
        await a.ask(x, "开灯")
        await wait_until(lambda: any(isinstance(m, wire.Delta) for m in a.of(x)), 10)  # A's task is running
        # B asks for A's answer with A's id (a replay request), then cancels it
        await b.ask(x, "随便", replay=1)
        await b.send(wire.encode(wire.Cancel(id=x)))
        await wait_until(lambda: node.stats.unknown_replays == 1 and node.stats.unknown_cancels == 1, 10)
        run = node.admission.get((a.uid, x))
        assert run is not None and not run.cancelled  # A's task runs on
        # B asks a question of its own under A's id: its own task, answered to B only
        await b.ask(x, "关风扇")
        b_done, a_done = await b.wait_done(x), await a.wait_done(x)
        assert b_done.status == "ok" and b.text(x) == expected(cfg, "关风扇")
        assert a_done.status == "ok" and a.text(x) == expected(cfg, "开灯")  # whole, and nothing of B's in it
        assert [m.seq for m in a.of(x) if isinstance(m, wire.Delta)] == list(range(1, a_done.seq + 1))
        # both finished: a replay request is answered from the asker's own reply log entry only
        n_b = len(b.of(x))
        await b.ask(x, "随便", replay=1)
        await wait_until(lambda: len(b.of(x)) > n_b and isinstance(b.of(x)[-1], wire.Done), 10)
        assert "".join(m.text for m in b.of(x)[n_b:] if isinstance(m, wire.Delta)) == expected(cfg, "关风扇")
        # a device that never asked x gets nothing, replay or cancel
        await c.ask(x, "随便", replay=1)
        await c.send(wire.encode(wire.Cancel(id=x)))
        await wait_until(lambda: node.stats.unknown_replays == 2 and node.stats.unknown_cancels == 2, 10)
        y = os.urandom(16)
        await c.ask(y, "开门")  # after the above, on the same connection: its answer comes after theirs would
        assert (await c.wait_done(y)).status == "ok"
        assert c.of(x) == []
        assert [type(m) for m in a.of(x)] == [wire.Accept] + [wire.Delta] * a_done.seq + [wire.Done]  # A's own only


async def test_web_users_and_devices_never_see_each_others_answers_by_task_id(tmp_path: Path,
                                                                              pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=20, tokens_per_s=0, token_chars=3)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, device(sys_, pki_dir, "lamp") as a, \
            aiohttp.ClientSession() as s:
        x = os.urandom(16)
        await a.ask(x, "开灯")
        assert (await a.wait_done(x)).status == "ok"
        # a web user asking with the device's task id gets an answer to their own question, not the device's
        alice = await sys_.login(s, "alice")
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": alice}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "你好", "id": x.hex()})
            frames, done = await collect(ws)
        assert frames[0]["type"] == "accepted" and frames[0]["task"] == x.hex()
        assert done["status"] == "ok" and done["text"] == expected(cfg, "你好") != expected(cfg, "开灯")
        # another web user asking with alice's id is refused by the edge's store, clearly
        bob = await sys_.login(s, "bob")
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": bob}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "偷看", "id": x.hex()})
            err = await asyncio.wait_for(ws.receive_json(), 10)
        assert err["type"] == "error" and err["code"] == "forbidden" and "其他用户" in err["message"]
        # a device replaying, then re-asking, a web user's task id: nothing of alice's, its own answer
        n = len(a.of(x))
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": alice}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "早上好"})
            frames, done = await collect(ws)
        y = bytes.fromhex(frames[0]["task"])
        await a.ask(y, "随便", replay=1)
        await wait_until(lambda: sys_.node.stats.unknown_replays == 1, 10)
        await a.ask(y, "关灯")
        assert (await a.wait_done(y)).status == "ok" and a.text(y) == expected(cfg, "关灯")
        assert len(a.of(x)) == n  # and nothing more for x either
        assert [type(m) for m in a.of(y)].count(wire.Accept) == 1  # its own run only: no replay of alice's


async def test_a_flooding_device_is_refused_over_its_bound_and_others_still_run(tmp_path: Path,
                                                                               pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=2000, tokens_per_s=20, token_chars=3)  # the first answer outlasts the flood
    bound, sent = 5, 30
    # the broker's device publish rate is off here: this is the node's own bound, for a device on an external
    # broker (or a burst within the rate)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"max_pending_per_uid": bound},
                          broker={"device_publish_rate": 0}) as sys_, \
            device(sys_, pki_dir, "flood") as a, aiohttp.ClientSession() as s:
        node = sys_.node
        ids = [os.urandom(16) for _ in range(sent)]
        text = "问" * 60_000
        for tid in ids:
            await a.ask(tid, text)
        await wait_until(lambda: all(a.of(t) for t in ids), 20)  # every task answered one way or the other
        assert all(isinstance(a.of(t)[0], wire.Accept) and a.done(t) is None for t in ids[:bound])
        for t in ids[bound:]:
            done = a.done(t)
            assert done is not None and done.status == "error" and done.seq == 0 and a.of(t) == [done]
            assert done.err is not None and done.err.code == "rate_limited" and f"最多 {bound} 个" in done.err.msg
        assert len(node.admission) == bound and node.stats.tasks == bound and node.stats.rate_limited == sent - bound
        # another user is answered meanwhile (a free slot: node.concurrency is 2)
        cfg.n_tokens, cfg.tokens_per_s = 10, 0
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "你好"})
            _, done = await collect(ws)
        assert done["status"] == "ok" and done["text"] == expected(cfg, "你好")
        # the refused questions were not kept: once the device's tasks are gone, the same id is a new task
        for tid in ids[:bound]:
            await a.send(wire.encode(wire.Cancel(id=tid)))
        await wait_until(lambda: not len(node.admission), 20)
        last = ids[-1]
        await a.ask(last, "再问一次")
        await wait_until(lambda: isinstance(a.of(last)[-1], wire.Done) and a.of(last)[-1].status == "ok", 10)  # type: ignore[union-attr]
        assert a.text(last) == expected(cfg, "再问一次")


async def test_a_full_node_refuses_devices_and_leaves_edge_tasks_with_the_edge(tmp_path: Path,
                                                                             pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=2000, tokens_per_s=20, token_chars=3)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"max_pending": 2},
                          broker={"device_publish_rate": 0}) as sys_, \
            device(sys_, pki_dir, "a") as a, device(sys_, pki_dir, "b") as b, device(sys_, pki_dir, "c") as c, \
            aiohttp.ClientSession() as s:
        node = sys_.node
        ta, tb, tc = os.urandom(16), os.urandom(16), os.urandom(16)
        await a.ask(ta, "一")
        await b.ask(tb, "二")
        await wait_until(lambda: len(node.admission) == 2, 10)
        await c.ask(tc, "三")
        done = await c.wait_done(tc)
        assert done.status == "error" and done.err is not None and done.err.code == "node_busy"
        assert c.of(tc) == [done] and node.stats.rate_limited == 1
        token = await sys_.login(s)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "你好"})
            accepted = await ws.receive_json()
            assert accepted["type"] == "accepted"  # the edge has it ...
            await wait_until(lambda: node.stats.deferred >= 1, 10)  # ... the node does not take it yet
            assert len(node.admission) == 2
            cfg.n_tokens, cfg.tokens_per_s = 10, 0
            await a.send(wire.encode(wire.Cancel(id=ta)))  # room again: the edge's next republish gets in
            _, done_web = await collect(ws, accepted["task"])
        assert done_web["status"] == "ok" and done_web["text"] == expected(cfg, "你好")
        assert (await a.wait_done(ta)).status == "cancelled"


async def test_malformed_device_tasks_are_answered_when_their_id_can_be_read(tmp_path: Path,
                                                                           pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=2000, tokens_per_s=20, token_chars=3)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, device(sys_, pki_dir, "lamp") as d:
        node = sys_.node
        running = os.urandom(16)
        await d.ask(running, "长回答")
        await wait_until(lambda: bool(d.of(running)), 10)

        def raw(**fields: Any) -> bytes:
            return cbor2.dumps({"v": 1, "t": "task", "uid": d.uid, "ch": "dev", "text": "hi", "ts": 1, **fields})

        answered = {  # id -> what the hint must mention
            os.urandom(16): ("ts", lambda tid: cbor2.dumps({"v": 1, "t": "task", "id": tid, "uid": d.uid,
                                                             "ch": "dev", "text": "hi"})),  # a field missing
            os.urandom(16): ("65536", lambda tid: raw(id=tid, text="x" * 70_000)),  # text too long
            os.urandom(16): ("dev.other", lambda tid: raw(id=tid, uid="dev.other")),  # not its own uid
            os.urandom(16): ("major version", lambda tid: raw(id=tid, v=2)),  # an unknown major version
            os.urandom(16): ("delta", lambda tid: wire.encode(wire.Delta(id=tid, seq=1, text="x"))),  # wrong type
        }
        for tid, (_, make) in answered.items():
            await d.send(make(tid))
        unanswered = [
            b"\xff\x00 not cbor",
            cbor2.dumps({"v": 1, "t": "task", "text": "no id"}),
            raw(id=b"short"),  # an id that is not 16 bytes
            raw(id=os.urandom(16), text="x" * (300 * 1024)),  # over 256 KiB: not parsed at all
            raw(id=running, ts="bad"),  # the id of the device's own running task: that task is never ended by it
        ]
        for payload in unanswered:
            await d.send(payload)
        await wait_until(lambda: node.stats.bad_messages == len(answered) + len(unanswered), 10)
        for tid, (word, _) in answered.items():
            done = await d.wait_done(tid)
            assert done.status == "error" and done.seq == 0 and d.of(tid) == [done]
            assert done.err is not None and done.err.code == "bad_request" and "请求格式不正确" in done.err.msg
            assert done.err.hint is not None and word in done.err.hint, done.err.hint
        assert node.stats.bad_requests == len(answered)
        run = node.admission.get((d.uid, running))
        assert run is not None and not run.cancelled and d.done(running) is None  # untouched, still running
        # nothing else came: after its own running task, a valid task is answered; every reply is for a known id
        await d.send(wire.encode(wire.Cancel(id=running)))
        assert (await d.wait_done(running)).status == "cancelled"
        later = os.urandom(16)
        cfg.n_tokens, cfg.tokens_per_s = 5, 0
        await d.ask(later, "好")
        assert (await d.wait_done(later)).status == "ok"
        assert {getattr(m, "id", None) for _, m in d.got} == {running, later, *answered}
