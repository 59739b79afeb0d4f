"""node.admission.Admission: the limits on taking a task, one answer at a time per user in arrival order, and
``concurrency`` answers at once."""

from __future__ import annotations

import asyncio
import os

import wire
from node.admission import Admission, Run


def _task(uid: str) -> wire.Task:
    return wire.Task(id=os.urandom(16), uid=uid, ch="dev", text="好", ts=1)


def _admit(adm: Admission, uid: str) -> Run:
    task = _task(uid)
    return adm.admit(task, wire.reply_topic(uid))


def test_limits_per_user_then_for_the_node() -> None:
    adm = Admission(concurrency=1, max_pending=3, max_pending_per_uid=2)
    _admit(adm, "dev.a")
    assert adm.over_limit("dev.a") is None
    _admit(adm, "dev.a")
    code, msg = adm.over_limit("dev.a") or ("", "")
    assert code == "rate_limited" and "最多 2 个" in msg
    _admit(adm, "dev.b")
    assert (adm.over_limit("dev.c") or ("",))[0] == "node_busy"
    assert len(adm) == 3 and adm.held_by("dev.a") == 2


async def test_a_users_tasks_run_in_arrival_order_and_slots_are_shared() -> None:
    adm = Admission(concurrency=1, max_pending=10, max_pending_per_uid=10)
    a1, a2, b1 = _admit(adm, "dev.a"), _admit(adm, "dev.a"), _admit(adm, "dev.b")
    assert [adm.queue_position(r) for r in (a1, a2, b1)] == [0, 2, 0]  # a2 waits for a1; slots are free
    order: list[Run] = []
    gate, entered = asyncio.Event(), asyncio.Event()

    async def job(run: Run) -> None:
        try:
            async with adm.slot(run):
                order.append(run)
                entered.set()
                await gate.wait()
        finally:
            adm.release(run)
            adm.drop(run.key)

    tasks = [asyncio.create_task(job(r)) for r in (a2, b1, a1)]
    await entered.wait()  # the one slot is taken (by b1: a1 came later, a2 waits for a1)
    assert order == [b1] and adm.position(a1.key) == 1 and adm.position(a2.key) == 2
    assert adm.queue_position(a1) == 1  # every slot taken: it would be announced as queued
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [b1, a1, a2] and not len(adm) and not adm.waiting


async def test_cancel_of_a_held_task_cancels_its_job_once() -> None:
    adm = Admission(concurrency=1, max_pending=10, max_pending_per_uid=10)
    run = _admit(adm, "dev.a")
    run.job = asyncio.create_task(asyncio.Event().wait())
    assert adm.cancel(run.key) and run.cancelled
    assert adm.cancel(run.key)  # held still: known, not cancelled twice
    assert not adm.cancel(("dev.b", run.task.id))  # another user's key is not found
    await asyncio.gather(run.job, return_exceptions=True)
    assert run.job.cancelled()
