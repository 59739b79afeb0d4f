"""WeCom parts leave in order in every path: live, progressive, and a replayed answer after an edge restart.

A scripted node (a real MQTT client with a node credential, on the real embedded broker) sends each answer
in the shape that broke the order: its text and its ``done`` in one ``batch`` message, as a node does when
its coalescer flushes the last paragraph together with the end, and as it always does when it replays an
answer from its reply log. The edge, its WeCom channel, the outbox and a fake WeCom API are the real ones.
Nothing here depends on timing: the batch is one MQTT message, handled in one pass of the edge.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

import wire
from broker.creds import CredentialStore
from core.mqtt import make_client, tls_context
from edge.keys import STORE
from fakes.wecom import FakeWeComConfig, run_fake_wecom
from edge.wecom.shape import to_plain
from tests.conftest import run_system, wait_until
from tests.integration.test_wecom import AGENT, CORP, SECRET, sim, wecom_over

pytestmark = pytest.mark.integration

NODE = "scripted"
PARAS = [f"第{i}段：" + "这一段讲述一个要点，并给出解释。" * 12 for i in range(1, 9)]
ANSWER = "\n\n".join(PARAS)
PART = re.compile(r"^\((\d+)(?:/(\d+))?\) ")


class ScriptedNode:
    """Plays server B by hand: receives the edge's tasks, sends beats and batches of replies."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    async def beat(self) -> None:
        await self.client.publish(wire.node_topic(NODE), wire.encode(wire.Beat(
            node=NODE, state="online", active=0, capacity=4)), qos=1)

    async def next_task(self) -> wire.Task:
        async for msg in self.client.messages:
            task = wire.decode(msg.payload)  # type: ignore[arg-type]
            if isinstance(task, wire.Task):
                return task
        raise AssertionError("the broker connection ended")

    async def batch(self, items: list[Any]) -> None:
        await self.client.publish(wire.batch_topic(NODE), wire.encode(wire.Batch(node=NODE, items=items)), qos=1)


def chunks(text: str, size: int = 40) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def deltas(tid: bytes, parts: list[str], first: int = 1) -> list[wire.Delta]:
    return [wire.Delta(id=tid, seq=first + i, text=t) for i, t in enumerate(parts)]


@contextlib.asynccontextmanager
async def scripted_node(settings: Any) -> AsyncIterator[ScriptedNode]:
    user, password = CredentialStore(settings.data_dir).add("node", NODE, replace=True)
    client = make_client(host="localhost", port=settings.mqtt.port, username=user, password=password,
                         identifier=user, tls=tls_context(Path(settings.data_dir) / "pki" / "ca.crt"))
    async with client:
        await client.subscribe(wire.TASK_FILTER, qos=1)
        node = ScriptedNode(client)
        await node.beat()
        yield node


def parts_in_order(msgs: list[str]) -> tuple[list[str], str]:
    """The numbers of the parts as they arrived, and their text joined."""
    numbers, body = [], []
    for m in msgs:
        head, _, rest = m.partition(" ")
        numbers.append(head)
        body.append(rest)
    return numbers, "".join(body)


def expected_numbers(n: int, progressive: bool = True) -> list[str]:
    """Progressive parts go out before the total is known: ``(1) (2) … (n/n)``; a whole answer: ``(i/n)``."""
    if not progressive:
        return [f"({i}/{n})" for i in range(1, n + 1)]
    return [f"({i})" for i in range(1, n)] + [f"({n}/{n})"]


async def wait_final(fw: Any, user: str) -> list[str]:
    """Wait until the part that carries the total has come and then every part up to it."""

    def total() -> int:
        for m in fw.delivered(user):
            mm = PART.match(m.content)
            if mm and mm.group(2):
                return int(mm.group(2))
        return 0

    await wait_until(lambda: total() > 0 and len(fw.delivered(user)) >= total(), 30)
    return [m.content for m in fw.delivered(user)]


def fw_config() -> FakeWeComConfig:
    return FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=AGENT)


WECOM = {"progressive_min_bytes": 400, "offline_notice": "", "per_user_per_min": 30, "per_user_per_hour": 1000}


@pytest.mark.parametrize("progressive", [True, False], ids=["progressive", "whole"])
async def test_answer_and_done_in_one_batch_leave_in_order(tmp_path: Path, pki_dir: Path, progressive: bool) -> None:
    """The whole answer and its ``done`` arrive in one batch. The final part ``(n/n)`` used to be queued
    before the progressive paragraphs of the same batch (the channel heard of the end before its text)."""
    async with run_fake_wecom(fw_config()) as fw, \
            run_system(tmp_path, pki_dir, start_node=False,
                       **wecom_over(fw.url, progressive=progressive, **WECOM)) as sys_, \
            scripted_node(sys_.settings) as node, aiohttp.ClientSession() as s:
        status, _ = await sim().text("zhaoliu", "分几段讲讲").post(s, f"{sys_.http}/wecom/callback")
        assert status == 200
        task = await node.next_task()
        await node.batch([wire.Accept(id=task.id, node=NODE), *deltas(task.id, texts := chunks(ANSWER)),
                          wire.Done(id=task.id, seq=len(texts), status="ok")])
        msgs = await wait_final(fw, "zhaoliu")
    numbers, body = parts_in_order(msgs)
    assert numbers == expected_numbers(len(msgs), progressive), numbers
    assert "".join(body.split()) == "".join(to_plain(ANSWER).split())
    if progressive:
        assert len(msgs) > 2


async def test_last_paragraph_and_done_in_one_batch_after_live_parts(tmp_path: Path, pki_dir: Path) -> None:
    """Live progressive delivery: the first paragraphs come in batches of their own (and go out), then the
    last paragraphs and the end come together."""
    half = ANSWER.index(PARAS[4])
    async with run_fake_wecom(fw_config()) as fw, \
            run_system(tmp_path, pki_dir, start_node=False, **wecom_over(fw.url, progressive=True, **WECOM)) as sys_, \
            scripted_node(sys_.settings) as node, aiohttp.ClientSession() as s:
        status, _ = await sim().text("zhaoliu", "分几段讲讲").post(s, f"{sys_.http}/wecom/callback")
        assert status == 200
        task = await node.next_task()
        head, tail = chunks(ANSWER[:half]), chunks(ANSWER[half:])
        await node.batch([wire.Accept(id=task.id, node=NODE), *deltas(task.id, head)])
        await fw.wait_sends(1, user="zhaoliu", timeout=15)
        await node.batch([*deltas(task.id, tail, first=len(head) + 1),
                          wire.Done(id=task.id, seq=len(head) + len(tail), status="ok")])
        msgs = await wait_final(fw, "zhaoliu")
    numbers, body = parts_in_order(msgs)
    assert numbers == expected_numbers(len(msgs)), numbers
    assert "".join(body.split()) == "".join(to_plain(ANSWER).split())


async def test_replayed_answer_after_edge_restart_sends_the_rest_in_order(tmp_path: Path, pki_dir: Path) -> None:
    """Server A stops after the first paragraphs went out; the restarted edge asks again and the node replays
    the whole answer (text and end) in one batch. The rest goes out once, in order, after what was sent."""
    half = ANSWER.index(PARAS[4])
    async with run_fake_wecom(fw_config()) as fw, aiohttp.ClientSession() as s:
        over = wecom_over(fw.url, progressive=True, **WECOM)
        async with run_system(tmp_path, pki_dir, start_node=False, **over) as sys_, \
                scripted_node(sys_.settings) as node:
            status, _ = await sim().text("zhaoliu", "分几段讲讲").post(s, f"{sys_.http}/wecom/callback")
            assert status == 200
            task = await node.next_task()
            head = chunks(ANSWER[:half])
            await node.batch([wire.Accept(id=task.id, node=NODE), *deltas(task.id, head)])
            sent = await fw.wait_sends(1, user="zhaoliu", timeout=15)
            store = sys_.app[STORE]
            await wait_until(lambda: ((store.get(task.id).delivery or {}).get("sent") or 0) >= len(sent), 10)
        before = len(fw.delivered("zhaoliu"))
        async with run_system(tmp_path, pki_dir, start_node=False, **over) as sys_, \
                scripted_node(sys_.settings) as node:
            again = await node.next_task()  # the restarted edge dispatches the unfinished task again
            assert again.id == task.id
            everything = head + chunks(ANSWER[half:])  # the same chunks as the first run (a replay)
            await node.batch([wire.Accept(id=task.id, node=NODE), *deltas(task.id, everything),
                              wire.Done(id=task.id, seq=len(everything), status="ok")])
            msgs = await wait_final(fw, "zhaoliu")
    assert len(msgs) > before
    numbers, body = parts_in_order(msgs)
    assert numbers == expected_numbers(len(msgs)), numbers
    assert "".join(body.split()) == "".join(to_plain(ANSWER).split())  # every paragraph once, in order
