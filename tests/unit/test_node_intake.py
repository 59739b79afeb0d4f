"""node.intake.read: what arrives on the task topics, read without any state (the node acts on the result)."""

from __future__ import annotations

import os

import cbor2

import wire
from node.intake import Inbound, Malformed, Unroutable, read


def _task(uid: str, tid: bytes) -> wire.Task:
    return wire.Task(id=tid, uid=uid, ch="dev", text="开灯", ts=1)


def test_a_task_and_a_cancel_of_the_topics_uid_are_inbound() -> None:
    tid = os.urandom(16)
    got = read(wire.task_topic("dev.lamp"), wire.encode(_task("dev.lamp", tid)))
    assert isinstance(got, Inbound) and got.uid == "dev.lamp" and got.msg.id == tid
    got = read(wire.task_topic("dev.lamp"), wire.encode(wire.Cancel(id=tid)))
    assert got == Inbound("dev.lamp", wire.Cancel(id=tid))


def test_a_task_of_another_uid_is_malformed_for_the_publisher() -> None:
    tid = os.urandom(16)
    got = read(wire.task_topic("dev.fan"), wire.encode(_task("dev.lamp", tid)))
    assert isinstance(got, Malformed) and got.uid == "dev.fan" and got.tid == tid
    assert "is not its topic's uid" in got.hint


def test_an_undecodable_payload_keeps_its_id_when_one_can_be_read() -> None:
    tid = os.urandom(16)
    got = read(wire.task_topic("dev.fan"), cbor2.dumps({"v": 9, "id": tid}))
    assert isinstance(got, Malformed) and got.tid == tid
    got = read(wire.task_topic("dev.fan"), b"\xff")
    assert isinstance(got, Malformed) and got.tid is None


def test_a_reply_on_a_task_topic_is_malformed_and_other_topics_are_unroutable() -> None:
    tid = os.urandom(16)
    got = read(wire.task_topic("dev.fan"), wire.encode(wire.Done(id=tid, seq=0, status="ok")))
    assert isinstance(got, Malformed) and got.tid == tid and got.hint.startswith("a done message")
    got = read(wire.reply_topic("dev.fan"), b"")
    assert got == Unroutable(wire.reply_topic("dev.fan"), " (not a task topic)")
    assert isinstance(read("elsewhere/x", b""), Unroutable)
