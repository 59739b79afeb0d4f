"""The edge's MQTT bridge: the coordinator that owns the parts of the edge's side of the broker link.

It records and submits tasks (every task is in LMDB before it is published or acknowledged), runs the MQTT
session and the housekeeping tick, and ties together the parts that each do one job: the live-task registry
(``edge.tasks``), the per-user dispatch queue and every publish (``edge.dispatch``), node presence
(``edge.nodes``), stream repair (``edge.repair``) and the reply intake with its batch transaction
(``edge.replies``). A task no node has accepted is republished with the same id every ``edge.republish_s``
(and at once when a node comes online), so a node that was offline or missed the message still gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import aiomqtt

import wire
from broker.local import LocalLink
from core.config import Settings
from core.mqtt import Backoff, run_forever

from . import frames, repair
from .dispatch import Dispatcher
from .nodes import NodeInfo, NodeWatch
from .replies import ReplyIntake, node_lost
from .stats import BridgeStats
from .store import FINAL, StoreFull, TaskRecord, TaskStore
from .tasks import LiveTask, Sink, TaskRegistry

log = logging.getLogger(__name__)


class Bridge:
    """The edge's side of the broker link. Its parts are public: ``tasks`` (the registry; ``live`` is its dict
    by id), ``dispatch`` (queues and publishes), ``watch`` (node presence; ``nodes`` is its dict), ``intake``
    (replies in, frames out). ``stats``, ``stages``, ``presence`` and ``on_finished`` are what the API, the
    metrics and the WeCom channel read or register with."""

    def __init__(self, settings: Settings, store: TaskStore, client: aiomqtt.Client | LocalLink) -> None:
        self.s = settings
        self.store = store
        self.client = client
        self.stats = BridgeStats()
        self._loop = asyncio.get_event_loop()
        self.started_at = self._loop.time()  # presence is unknown until nodes had time to beat
        self.tasks = TaskRegistry(self._loop)
        self.live: dict[bytes, LiveTask] = self.tasks.live
        self.dispatch = Dispatcher(settings, client, self.tasks, self.stats, self._loop)
        self.watch = NodeWatch(settings.edge.node_timeout_s, self._loop)
        self.nodes: dict[str, NodeInfo] = self.watch.nodes
        self.presence: set[Sink] = set()  # sinks told when node presence changes (a ``node`` frame)
        self.intake = ReplyIntake(store, self.tasks, self.dispatch, self.stats, self._on_beat, self._loop)
        self.stages = self.intake.stages
        self.on_finished: list[Callable[[LiveTask], None]] = self.intake.on_finished
        self._store_full = False  # the last add was refused (StoreFull): publish only after the commit then

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        for rec in sorted(self.store.unfinished(), key=lambda r: r.ts):  # after a restart: what was in flight
            live = LiveTask(rec, wire.TaskStream(rec.id), shown=self.store.chunk_texts(rec.id) or None)
            self.tasks.track(live)
            self.dispatch.restore(live)
            self.tasks.count(rec.uid, 1)
        if self.live:
            log.info("edge: %d unfinished task(s) from the store will be re-dispatched", len(self.live))
        if n := self.store.prune_chunks(frozenset(self.live)):
            log.info("edge: dropped the kept chunks of %d finished task(s)", n)
        backoff = Backoff(self.s.mqtt.reconnect_min, self.s.mqtt.reconnect_max)
        housekeeping = asyncio.create_task(self._housekeeping())
        try:
            await run_forever(self.client, self._session, name="edge bridge", backoff=backoff,
                              on_disconnect=self.link_down)
        finally:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping

    async def _session(self, client: aiomqtt.Client | LocalLink) -> None:
        await client.subscribe([(wire.REPLY_FILTER, 1), (wire.NODE_FILTER, 1), (wire.BATCH_FILTER, 1)])
        local = isinstance(client, LocalLink)
        if local:  # the embedded broker calls on_message from its broadcast step
            client.on_message = self.intake.on_message  # type: ignore[union-attr]
        self.link_up()
        if local:
            await client.wait_closed()  # type: ignore[union-attr]
            return
        on_message = self.intake.on_message
        async for msg in client.messages:
            on_message(str(msg.topic), msg.payload)  # type: ignore[arg-type]

    def link_up(self) -> None:
        """The broker link is (back) up: what a session does once subscribed. Everything pending is sent now,
        with the stops asked while it was down."""
        self.dispatch.link.set()
        self.dispatch.republish(force=True)

    def link_down(self) -> None:
        """The broker link dropped: nothing is published until :meth:`link_up` (the housekeeping retries)."""
        self.dispatch.link.clear()

    @property
    def connected(self) -> bool:
        """The broker link is up."""
        return self.dispatch.link.is_set()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the broker link; whether it is up."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.dispatch.link.wait()), timeout)
        return self.connected

    def on_message(self, topic: str, payload: bytes) -> None:
        """Handle one MQTT message as the session does (a reply, a batch of replies, or a node's beat)."""
        self.intake.on_message(topic, payload)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.check_nodes()
            self.dispatch.republish(online=self.node_online)
            self.repair()
            self.tasks.expire(self._loop.time())

    # ---- presence --------------------------------------------------------------------------
    @property
    def node_online(self) -> bool:
        return self.watch.online

    def node_state(self, node: NodeInfo) -> str:
        """The state the node's last beat gave, or ``silent`` when an ``online`` node's beats stopped for
        ``edge.node_timeout_s`` (it counts as offline; /healthz)."""
        return self.watch.state(node)

    def _on_beat(self, msg: wire.Beat) -> None:
        self.watch.beat(msg)
        self.check_nodes()

    def check_nodes(self) -> None:
        """Handle the nodes lost since the last check (see ``_node_lost``), then tell the clients
        (``presence``) if whether any node is online changed; a node coming online gets what is pending."""
        for nid in self.watch.newly_lost():
            self._node_lost(nid)
        online = self.watch.changed()
        if online is not None:
            log.info("edge: assistant node(s) %s", "online" if online else "OFFLINE")
            frame = frames.node(online)
            for sink in list(self.presence):
                sink.push(frame)
            if online:
                self.dispatch.republish(force=True)

    def _node_lost(self, nid: str) -> None:
        """Tasks the lost node had accepted: one that has shown no text yet goes back to pending and is
        re-dispatched (the user sees nothing twice); one that has streamed text ends with a clear
        ``node_lost`` error, keeping what was shown (re-running it would repeat that text)."""
        for live in self.tasks.unfinished():
            if live.finished_at is not None or live.rec.node != nid or live.stream.state is wire.State.PENDING:
                continue
            if live.stream.untouched:
                log.info("edge: node %s lost before task %s produced text; re-dispatching it", nid, live.hex[:8])
                live.stream = wire.TaskStream(live.rec.id)
                live.rec = self.store.update(live.rec.id, status="pending", node=None) or live.rec
                self.stats.redispatched += 1
                self.dispatch.requeue_first(live)
            else:
                log.warning("edge: node %s lost in the middle of task %s; ending it with an error", nid, live.hex[:8])
                self.intake.finish(live, "error", node_lost(), None)

    # ---- repair ----------------------------------------------------------------------------
    def repair(self) -> None:
        """One pass of stream repair (``edge.repair``): replay requests for the tasks due one, ``node_lost`` for
        those asked in vain. Nothing while the link is down or no node is online (nobody to ask; a lost node
        is handled by ``_node_lost``)."""
        if not self.connected or not self.node_online:
            return
        repair.scan(self.tasks.unfinished(), self._loop.time(), self._ask_replay, self._give_up)

    def _ask_replay(self, live: LiveTask) -> None:
        self.stats.replay_asks += 1
        log.info("edge: task %s: asking the node to replay from seq %d", live.hex[:8], live.stream.next_seq)
        self.dispatch.ask_replay(live, live.stream.next_seq)

    def _give_up(self, live: LiveTask) -> None:
        log.warning("edge: task %s: the node never replayed from seq %d; ending it", live.hex[:8],
                    live.stream.next_seq)
        self.intake.finish(live, "error", node_lost(), None)

    # ---- tasks out -------------------------------------------------------------------------
    async def submit(self, uid: str, ch: str, text: str, conv: str | None = None,
                     task_id: bytes | None = None, opts: dict[str, Any] | None = None,
                     dedup: bytes | None = None, hold: bool = False) -> LiveTask:
        """Record the task durably (awaited: LMDB group commit), then publish it in the background.

        Without ``dedup`` the task is published while its commit runs. With ``hold`` (the caller acknowledges
        the task to a client, then attaches it) the frames its replies make before that are kept, for
        :meth:`release` to send after the acknowledgement, in order and with their timing.

        Idempotent on ``task_id`` and on ``dedup`` (an inbound message key such as WeCom's MsgId,
        checked in the same transaction as the insert, so it holds across restarts): a repeat
        returns the task already recorded, with ``live.created`` False (a key recorded without a task, as
        for a command, returns this new task untracked, finished and never sent, also with ``created`` False).
        """
        if task_id is not None:
            existing = self.get(task_id)
            if existing is None:
                rec = self.store.get(task_id)
                if rec is not None:  # finished and evicted from memory: answer from the store
                    if rec.uid != uid:
                        raise PermissionError("task id belongs to another user")
                    return self._revive(rec)
            else:
                if existing.rec.uid != uid:
                    raise PermissionError("task id belongs to another user")
                await asyncio.shield(existing.stored)
                existing.created = False
                return existing
        tid = task_id or os.urandom(wire.ID_LEN)
        rec = TaskRecord(id=tid, uid=uid, ch=ch, text=text, ts=int(time.time() * 1000), conv=conv)
        wire.validate(self.dispatch.task_msg(rec, opts))  # raises WireError before anything is stored
        live = LiveTask(rec, wire.TaskStream(tid), opts=opts)
        live.stored = self._loop.create_future()
        self.tasks.track(live)  # visible at once: a concurrent submit of the same id waits for `stored`
        # Without a dedup key there is nothing to wait for before sending: the task goes to the nodes while
        # its LMDB commit (fsync, ~0.6 ms, more under load) runs, off the first-token path. It is still
        # acknowledged to no one before the commit; a crash in between only wastes the node's answer.
        early = dedup is None and not self._store_full  # (a full store refuses it: do not start the node)
        if early:
            live.held = []
            self._enqueue(live)
        try:
            stored = await self.store.add(rec, dedup=dedup)
        except asyncio.CancelledError:
            if early:  # the write goes on in the writer thread: the task stays, published and (soon) recorded
                live.stored.set_result(None)
                self.release(live)
                raise
            self.tasks.untrack(tid)
            if not live.stored.done():
                live.stored.cancel()
            raise
        except BaseException as exc:
            self.tasks.untrack(tid)
            if isinstance(exc, StoreFull):
                self._store_full = True
            if early and live.finished_at is None:  # sent, but not recorded: take it back
                live.finished_at = self._loop.time()
                self.tasks.count(uid, -1)
                self.dispatch.publish_cancel(live)
                self.dispatch.next(uid)
            if early:
                self.intake.drop_chunks(live.rec.id)
            if not live.stored.done():
                live.stored.set_exception(exc)
                live.stored.exception()  # retrieved: no "never retrieved" warning
            raise
        live.stored.set_result(None)
        self._store_full = False
        if stored.id != tid:  # dedup hit: this message was recorded before (maybe before a restart)
            self.tasks.untrack(tid)
            if not stored.id:  # ... but with no task (e.g. a command): nothing to return, nothing created
                live.created = False
                live.finished_at = self._loop.time()
                return live
            old = self.get(stored.id) or self._revive(stored)
            old.created = False
            return old
        if not early:
            self._enqueue(live)
        elif not hold:
            self.release(live)
        return live

    def _enqueue(self, live: LiveTask) -> None:
        self.tasks.count(live.rec.uid, 1)
        self.dispatch.enqueue(live)

    def _revive(self, rec: TaskRecord) -> LiveTask:
        live = LiveTask(rec, wire.TaskStream(rec.id))
        live.stored = self._loop.create_future()
        live.stored.set_result(None)
        live.created = False
        if rec.status in FINAL:
            live.finished_at = self._loop.time()
            live.stream = wire.TaskStream(rec.id)
        self.tasks.track(live)
        if rec.status not in FINAL:  # recorded but not live (its submit was cancelled after the write began)
            self._enqueue(live)  # counted and sent like any task: the node answers it or replays its answer
        return live

    def cancel(self, tid: bytes, uid: str) -> bool:
        live = self.live.get(tid)
        if live is None or live.rec.uid != uid or live.finished_at is not None:
            return False
        live.cancel_requested = True
        self.dispatch.publish_cancel(live)
        if live.stream.state is wire.State.PENDING:  # no node has it: end it here
            self.intake.finish(live, "cancelled", None, None)
        return True

    # ---- lookup / attach -------------------------------------------------------------------
    @property
    def open_count(self) -> int:
        """How many tasks are not finished yet (queued at the edge or a node, or running)."""
        return self.tasks.open_count

    def unfinished(self) -> list[LiveTask]:
        """The tasks not finished yet (a copy)."""
        return self.tasks.unfinished()

    def pending(self, uid: str) -> int:
        """The user's unfinished tasks (``edge.max_pending_per_user`` bounds them); O(1)."""
        return self.tasks.pending(uid)

    def get(self, tid: bytes) -> LiveTask | None:
        return self.live.get(tid)

    def attach(self, live: LiveTask, sink: Sink, trace: bool = False) -> None:
        self.tasks.attach(live, sink, trace)

    def detach(self, live: LiveTask, sink: Sink) -> None:
        self.tasks.detach(live, sink)

    def detach_all(self, sink: Sink) -> None:
        """A client connection is gone: detach it from every task it follows (not a scan of ``live``)."""
        self.presence.discard(sink)
        self.tasks.detach_all(sink)

    def attached(self, sink: Sink) -> frozenset[LiveTask]:
        """The tasks ``sink`` is attached to."""
        return self.tasks.attached(sink)

    def release(self, live: LiveTask) -> None:
        """Send the frames held since the task was submitted (in order) and stop holding."""
        self.intake.release(live)
