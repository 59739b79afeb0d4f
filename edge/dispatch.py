"""Tasks out to the nodes: the per-user dispatch queue and every publish the bridge makes.

Per user, the tasks no node has accepted yet wait in order, oldest first. Only the oldest is sent to the nodes,
the next once a node has accepted it (or it ended): a user's tasks reach the node in the order asked whatever the
broker does with a burst (with amqtt, a 1000-task burst arrived partly rotated). The head of each queue is sent
again every ``edge.republish_s`` while no node has it, and at once when the broker link comes back or a node
comes online.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import aiomqtt

import wire
from broker.local import LocalLink
from core.config import Settings
from core.runtime import now_us

from .stats import BridgeStats
from .store import TaskRecord
from .tasks import LiveTask, TaskRegistry

log = logging.getLogger("edge.bridge")  # the bridge's log: one logger for all of its parts


class Dispatcher:
    def __init__(self, settings: Settings, client: aiomqtt.Client | LocalLink, tasks: TaskRegistry,
                 stats: BridgeStats, loop: asyncio.AbstractEventLoop) -> None:
        self.s = settings
        self.client = client
        self.tasks = tasks
        self.stats = stats
        self._loop = loop
        self.link = asyncio.Event()  # the broker link is up (set by the bridge's session, cleared when it drops)
        self._queues: dict[str, deque[LiveTask]] = {}

    # ---- the queues -------------------------------------------------------------------------
    def enqueue(self, live: LiveTask) -> None:
        """Queue a new task behind the user's others; send it if it is the head."""
        self._queues.setdefault(live.rec.uid, deque()).append(live)
        if self.head(live.rec.uid) is live:
            self.publish(live)

    def restore(self, live: LiveTask) -> None:
        """Queue a task found unfinished in the store at start (sent once the link is up)."""
        self._queues.setdefault(live.rec.uid, deque()).append(live)

    def requeue_first(self, live: LiveTask) -> None:
        """Put a task back at the front of its user's queue and send it (its node was lost before any text)."""
        self._queues.setdefault(live.rec.uid, deque()).appendleft(live)
        self.publish(live)

    def head(self, uid: str) -> LiveTask | None:
        """The user's oldest task no node has accepted yet (the only one of theirs being sent)."""
        q = self._queues.get(uid)
        while q and (q[0].finished_at is not None or q[0].stream.state is not wire.State.PENDING):
            q.popleft()
        if not q:
            self._queues.pop(uid, None)
            return None
        return q[0]

    def next(self, uid: str) -> None:
        """A task of ``uid`` left pending (accepted or finished): send the user's next one."""
        head = self.head(uid)
        if head is not None and head.published_at == 0.0:
            self.publish(head)

    def republish(self, force: bool = False, online: bool = True) -> None:
        """Send again the head of each queue not sent for ``edge.republish_s`` (``force``: all of them now, and
        the stops asked while the link was down). Nothing while no node is online, unless forced."""
        if not self.link.is_set() or (not force and not online):
            return  # while no node is online, re-sending is pointless load; a node coming online forces it
        now = self._loop.time()
        if force:
            for live in self.tasks.unfinished():
                if live.cancel_requested and live.finished_at is None:
                    self.publish_cancel(live)  # a stop asked while the broker link was down
        for uid in list(self._queues):
            live = self.head(uid)
            if live is not None and (force or now - live.published_at >= self.s.edge.republish_s):
                self.stats.republished += 1
                self.publish(live)

    # ---- messages ---------------------------------------------------------------------------
    def task_msg(self, rec: TaskRecord, opts: dict[str, Any] | None = None) -> wire.Task:
        return wire.Task(id=rec.id, uid=rec.uid, ch=rec.ch, text=rec.text, ts=rec.ts, conv=rec.conv,  # type: ignore[arg-type]
                         opts=opts, timing={"e_rx": rec.ts * 1000, "e_pub": now_us()})

    def publish(self, live: LiveTask) -> None:
        """Send the task to the nodes now (or, with the link down, once it is back)."""
        live.published_at = self._loop.time()
        if not self.link.is_set():
            return  # the housekeeping loop republishes once connected
        msg = self.task_msg(live.rec, live.opts)
        live.pub_us = msg.timing["e_pub"]  # type: ignore[index]
        payload = wire.encode(msg)
        self.send(wire.task_topic(live.rec.uid), payload)
        self.stats.published += 1

    def ask_replay(self, live: LiveTask, seq: int) -> None:
        """Ask the task's node to send its replies again from ``seq`` (``Task.replay``)."""
        msg = self.task_msg(live.rec, live.opts)
        payload = wire.encode(wire.Task(id=msg.id, uid=msg.uid, ch=msg.ch, text=msg.text, ts=msg.ts,
                                        conv=msg.conv, opts=msg.opts, replay=seq))
        self.send(wire.task_topic(live.rec.uid), payload)

    def publish_cancel(self, live: LiveTask) -> None:
        """Best effort now; if the broker link is down, ``republish(force=True)`` sends it on reconnect."""
        if self.link.is_set():
            self.send(wire.task_topic(live.rec.uid), wire.encode(wire.Cancel(id=live.rec.id)))

    def send(self, topic: str, payload: bytes) -> None:
        """Publish (QoS 1) without waiting: at once into the embedded broker, else from a task."""
        client = self.client
        if isinstance(client, LocalLink):
            try:
                client.publish_nowait(topic, payload)
            except aiomqtt.MqttError as exc:
                log.debug("edge: publish failed (%s); housekeeping will retry", exc)
            return
        self._spawn(client.publish(topic, payload, qos=1))

    def _spawn(self, coro: Any) -> None:
        async def go() -> None:
            try:
                await coro
            except aiomqtt.MqttError as exc:
                log.debug("edge: publish failed (%s); housekeeping will retry", exc)
        asyncio.ensure_future(go())
