"""The edge's MQTT bridge: publishes tasks, routes ``claw/v1/reply/+`` to the right clients, tracks nodes.

Every task is in LMDB before it is published or acknowledged; a task no node has accepted is
republished with the same id every ``edge.republish_s`` (and at once when a node comes online),
so a node that was offline or missed the message still gets it. Replies run through
``wire.TaskStream`` (duplicates dropped, gaps held, ``Done`` trusted only when complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiomqtt
import lmdb

import wire
from broker.local import LocalLink
from core.config import Settings
from core.metrics import Stages
from core.mqtt import Backoff, run_forever
from core.runtime import now_us

from .store import FINAL, StoreFull, TaskRecord, TaskStore

log = logging.getLogger(__name__)

NODE_LOST_MSG = "与服务器 B 的连接中断，本次回答未能完成，请重新提问。"
GAP_WAIT_S = 1.0  # a gap in a reply stream held this long is asked to be replayed (then again, this often)
IDLE_ASK_S = 10.0  # a running task silent this long is asked to replay from its next seq (a lost tail or Done)
QUEUED_ASK_S = 60.0  # a task queued at its node, silent this long, is asked too (its replies may all be lost)
FINISHED_KEEP_S = 120.0  # a finished task stays in Bridge.live this long (late replies, resumes, retries)
REPAIR_ASKS = 5  # unanswered replay requests before the task ends with node_lost (the node no longer has it)
# Stage latencies observed from the replies' timing maps (wall-clock µs; stages that span both servers
# include their clock offset, and negative values are counted as skew): ``/metrics``
# ``claw_edge_stage_seconds{stage=...}``.
EDGE_STAGES = ("edge_to_node", "llm_first_token", "first_token_to_publish", "chunk_node_to_edge",
               "ask_to_first_chunk", "done_node_to_edge")




class Sink(Protocol):
    """A client connection that frames are pushed to (must not block; bounded by the sink)."""

    def push(self, frame: dict[str, Any]) -> None: ...


@dataclass(eq=False)
class LiveTask:
    rec: TaskRecord
    stream: wire.TaskStream
    sinks: set[Sink] = field(default_factory=set)
    trace: set[Sink] = field(default_factory=set)  # sinks that asked for timing on delta frames (ask "trace")
    published_at: float = 0.0
    pub_us: int = 0  # wall-clock µs of the last dispatch actually published (its Task.timing e_pub)
    finished_at: float | None = None
    opts: dict[str, Any] | None = None
    created: bool = True  # False when submit() found this task already recorded (a retry)
    cancel_requested: bool = False  # a stop was asked: (re)published until the task ends
    shown: list[str] | None = None  # after an edge restart: the chunks users may have seen before it
    stored: asyncio.Future[None] = field(default_factory=lambda: _done_future())
    heard_at: float = 0.0  # when a node last sent anything for this task
    gap_at: float = 0.0  # when the current gap in its stream was seen (0: no gap)
    asked_at: float = 0.0  # when a replay was last asked
    asks: int = 0  # replay requests since the node last answered one (see Bridge._repair)
    held: list[tuple[dict[str, Any], dict[str, Any]]] | None = None  # frames before the ack (submit(hold=True))

    @property
    def hex(self) -> str:
        return self.rec.id.hex()


def _done_future() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_event_loop().create_future()
    fut.set_result(None)
    return fut


@dataclass
class NodeInfo:
    state: str
    last_seen: float
    active: int = 0
    capacity: int = 0
    models: list[str] | None = None


@dataclass
class BridgeStats:
    published: int = 0
    republished: int = 0
    replies: int = 0
    batches: int = 0  # batch messages (each carrying many replies)
    duplicates: int = 0
    gaps: int = 0
    bad_messages: int = 0
    late: int = 0
    replay_asks: int = 0  # replay requests sent for gaps in reply streams
    redispatched: int = 0  # tasks sent again because their node was lost before any text
    finished: dict[str, int] = field(default_factory=dict)


class Bridge:
    def __init__(self, settings: Settings, store: TaskStore, client: aiomqtt.Client | LocalLink) -> None:
        self.s = settings
        self.store = store
        self.client = client
        self.stats = BridgeStats()
        self.stages = Stages(EDGE_STAGES)
        self.live: dict[bytes, LiveTask] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.presence: set[Sink] = set()
        self.on_finished: list[Callable[[LiveTask], None]] = []
        self._connected = asyncio.Event()
        self._online = False
        self._loop = asyncio.get_event_loop()
        self.started_at = self._loop.time()  # presence is unknown until nodes had time to beat
        self._lost: set[str] = set()  # nodes already handled as gone (until they beat online again)
        # Per user, the tasks not yet accepted, oldest first. Only the oldest is sent to the nodes, the next
        # once a node has accepted it: a user's tasks reach the node in the order asked whatever the broker
        # does with a burst (with amqtt, a 1000-task burst arrived partly rotated).
        self._queues: dict[str, deque[LiveTask]] = {}
        # The unfinished ones of ``live`` (what the housekeeping scans), and the finished ones by the time
        # they finished (kept FINISHED_KEEP_S, then forgotten): under load ``live`` holds tens of thousands
        # of finished tasks, and a scan of all of them every tick stalled every stream for ~20 ms.
        self._open: dict[bytes, LiveTask] = {}
        self._expiry: deque[tuple[float, bytes]] = deque()
        self._attached: dict[Sink, set[LiveTask]] = {}  # sink -> the tasks it is attached to (detach_all)
        self._pending: dict[str, int] = {}  # uid -> unfinished tasks (see pending())
        self._chunk_buf: list[tuple[bytes, int, str]] | None = None  # while a batch is handled (see _on_message)
        self._out_buf: list[tuple[Any, dict[str, Any]]] | None = None  # frames for sinks, ditto
        self._fin_buf: list[LiveTask] = []  # tasks finished in that batch: on_finished runs after its frames
        self._store_full = False  # the last add was refused (StoreFull): publish only after the commit then

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        for rec in sorted(self.store.unfinished(), key=lambda r: r.ts):  # after a restart: what was in flight
            live = LiveTask(rec, wire.TaskStream(rec.id), shown=self.store.chunk_texts(rec.id) or None)
            self._track(live)
            self._queues.setdefault(rec.uid, deque()).append(live)
            self._count(rec.uid, 1)
        if self.live:
            log.info("edge: %d unfinished task(s) from the store will be re-dispatched", len(self.live))
        if n := self.store.prune_chunks(frozenset(self.live)):
            log.info("edge: dropped the kept chunks of %d finished task(s)", n)
        backoff = Backoff(self.s.mqtt.reconnect_min, self.s.mqtt.reconnect_max)
        housekeeping = asyncio.create_task(self._housekeeping())
        try:
            await run_forever(self.client, self._session, name="edge bridge", backoff=backoff,
                              on_disconnect=self._connected.clear)
        finally:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping

    async def _session(self, client: aiomqtt.Client | LocalLink) -> None:
        await client.subscribe([(wire.REPLY_FILTER, 1), (wire.NODE_FILTER, 1), (wire.BATCH_FILTER, 1)])
        local = isinstance(client, LocalLink)
        if local:  # the embedded broker calls _on_message from its broadcast step
            client.on_message = self._on_message  # type: ignore[union-attr]
        self._connected.set()
        self._republish_pending(force=True)
        if local:
            await client.wait_closed()  # type: ignore[union-attr]
            return
        async for msg in client.messages:
            self._on_message(str(msg.topic), msg.payload)  # type: ignore[arg-type]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ---- presence --------------------------------------------------------------------------
    @property
    def node_online(self) -> bool:
        return self._online

    def node_state(self, node: NodeInfo) -> str:
        """The state the node's last beat gave, or ``silent`` when an ``online`` node's beats stopped for
        ``edge.node_timeout_s`` (it counts as offline; /healthz)."""
        if node.state == "online" and node.last_seen < self._loop.time() - self.s.edge.node_timeout_s:
            return "silent"
        return node.state

    def _compute_online(self) -> bool:
        horizon = self._loop.time() - self.s.edge.node_timeout_s
        return any(n.state == "online" and n.last_seen >= horizon for n in self.nodes.values())

    def _update_presence(self) -> None:
        self._check_lost_nodes()
        online = self._compute_online()
        if online != self._online:
            self._online = online
            log.info("edge: assistant node(s) %s", "online" if online else "OFFLINE")
            frame = {"type": "node", "online": online}
            for sink in list(self.presence):
                sink.push(frame)
            if online:
                self._republish_pending(force=True)

    def _check_lost_nodes(self) -> None:
        """A node is gone when it said so (offline beat, or its last will) or its beats stopped for
        ``edge.node_timeout_s`` (this also catches a half-open connection). Its unfinished tasks then
        end here instead of waiting forever (see ``_node_lost``)."""
        horizon = self._loop.time() - self.s.edge.node_timeout_s
        for nid, info in self.nodes.items():
            gone = info.state == "offline" or info.last_seen < horizon
            if gone and nid not in self._lost:
                self._lost.add(nid)
                self._node_lost(nid)
            elif not gone:
                self._lost.discard(nid)

    def _node_lost(self, nid: str) -> None:
        """Tasks the lost node had accepted: one that has shown no text yet goes back to pending and is
        re-dispatched (the user sees nothing twice); one that has streamed text ends with a clear
        ``node_lost`` error, keeping what was shown (re-running it would repeat that text)."""
        for live in list(self._open.values()):
            if live.finished_at is not None or live.rec.node != nid or live.stream.state is wire.State.PENDING:
                continue
            if live.stream.next_seq == 1 and live.stream.high == 0:
                log.info("edge: node %s lost before task %s produced text; re-dispatching it", nid, live.hex[:8])
                live.stream = wire.TaskStream(live.rec.id)
                live.rec = self.store.update(live.rec.id, status="pending", node=None) or live.rec
                self.stats.redispatched += 1
                self._queues.setdefault(live.rec.uid, deque()).appendleft(live)
                self._publish_task(live)
            else:
                log.warning("edge: node %s lost in the middle of task %s; ending it with an error", nid, live.hex[:8])
                self._finish(live, "error", {"code": "node_lost", "msg": NODE_LOST_MSG}, None)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._update_presence()
            self._republish_pending()
            self._repair()
            now = self._loop.time()
            expiry = self._expiry
            while expiry and now - expiry[0][0] > FINISHED_KEEP_S:
                tid = expiry.popleft()[1]
                live = self.live.get(tid)
                if live is not None and live.finished_at is not None and now - live.finished_at > FINISHED_KEEP_S:
                    del self.live[tid]
                    for sink in list(live.sinks):
                        self.detach(live, sink)

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
        wire.validate(self._task_msg(rec, opts))  # raises WireError before anything is stored
        live = LiveTask(rec, wire.TaskStream(tid), opts=opts)
        live.stored = self._loop.create_future()
        self._track(live)  # visible at once: a concurrent submit of the same id waits for `stored`
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
            self._untrack(tid)
            if not live.stored.done():
                live.stored.cancel()
            raise
        except BaseException as exc:
            self._untrack(tid)
            if isinstance(exc, StoreFull):
                self._store_full = True
            if early and live.finished_at is None:  # sent, but not recorded: take it back
                live.finished_at = self._loop.time()
                self._count(uid, -1)
                self._publish_cancel(live)
                self._next(uid)
            if early:
                self._drop_chunks(live.rec.id)
            if not live.stored.done():
                live.stored.set_exception(exc)
                live.stored.exception()  # retrieved: no "never retrieved" warning
            raise
        live.stored.set_result(None)
        self._store_full = False
        if stored.id != tid:  # dedup hit: this message was recorded before (maybe before a restart)
            self._untrack(tid)
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
        uid = live.rec.uid
        self._count(uid, 1)
        self._queues.setdefault(uid, deque()).append(live)
        if self._head(uid) is live:
            self._publish_task(live)

    def _head(self, uid: str) -> LiveTask | None:
        """The user's oldest task no node has accepted yet (the only one of theirs being sent)."""
        q = self._queues.get(uid)
        while q and (q[0].finished_at is not None or q[0].stream.state is not wire.State.PENDING):
            q.popleft()
        if not q:
            self._queues.pop(uid, None)
            return None
        return q[0]

    def _next(self, uid: str) -> None:
        """A task of ``uid`` left pending (accepted or finished): send the user's next one."""
        head = self._head(uid)
        if head is not None and head.published_at == 0.0:
            self._publish_task(head)

    def _revive(self, rec: TaskRecord) -> LiveTask:
        live = LiveTask(rec, wire.TaskStream(rec.id))
        live.stored = self._loop.create_future()
        live.stored.set_result(None)
        live.created = False
        if rec.status in FINAL:
            live.finished_at = self._loop.time()
            live.stream = wire.TaskStream(rec.id)
        self._track(live)
        if rec.status not in FINAL:  # recorded but not live (its submit was cancelled after the write began)
            self._enqueue(live)  # counted and sent like any task: the node answers it or replays its answer
        return live

    def _track(self, live: LiveTask) -> None:
        tid = live.rec.id
        self.live[tid] = live
        if live.finished_at is None:
            self._open[tid] = live
        else:
            self._expiry.append((live.finished_at, tid))

    @property
    def open_count(self) -> int:
        """How many tasks are not finished yet (queued at the edge or a node, or running)."""
        return len(self._open)

    def unfinished(self) -> list[LiveTask]:
        """The tasks not finished yet (a copy)."""
        return list(self._open.values())

    def _untrack(self, tid: bytes) -> None:
        self.live.pop(tid, None)
        self._open.pop(tid, None)

    def _finished_now(self, live: LiveTask) -> None:
        live.finished_at = now = self._loop.time()
        tid = live.rec.id
        if self._open.pop(tid, None) is not None:
            self._expiry.append((now, tid))

    def _task_msg(self, rec: TaskRecord, opts: dict[str, Any] | None = None) -> wire.Task:
        return wire.Task(id=rec.id, uid=rec.uid, ch=rec.ch, text=rec.text, ts=rec.ts, conv=rec.conv,  # type: ignore[arg-type]
                         opts=opts, timing={"e_rx": rec.ts * 1000, "e_pub": now_us()})

    def _publish_task(self, live: LiveTask) -> None:
        live.published_at = self._loop.time()
        if not self._connected.is_set():
            return  # the housekeeping loop republishes once connected
        msg = self._task_msg(live.rec, live.opts)
        live.pub_us = msg.timing["e_pub"]  # type: ignore[index]
        payload = wire.encode(msg)
        self._send(wire.task_topic(live.rec.uid), payload)
        self.stats.published += 1

    def _send(self, topic: str, payload: bytes) -> None:
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

    def _republish_pending(self, force: bool = False) -> None:
        if not self._connected.is_set() or (not force and not self._online):
            return  # while no node is online, re-sending is pointless load; a node coming online forces it
        now = self._loop.time()
        if force:
            for live in list(self._open.values()):
                if live.cancel_requested and live.finished_at is None:
                    self._publish_cancel(live)  # a stop asked while the broker link was down
        for uid in list(self._queues):
            live = self._head(uid)
            if live is not None and (force or now - live.published_at >= self.s.edge.republish_s):
                self.stats.republished += 1
                self._publish_task(live)

    def _repair(self) -> None:
        """Repair reply streams the broker broke (amqtt drops QoS 1 messages unacknowledged for 5 s, a
        broker may restart): ask the node to replay from the first missing seq (``Task.replay``)

        - when a gap (a later chunk, or a Done naming more chunks, arrived) is ``GAP_WAIT_S`` old, and
        - when a running task has been silent for ``IDLE_ASK_S`` (its last chunk or its Done was lost).

        A node that has the task re-sends Accept + the missing chunks (+ Done); one that no longer has it
        ignores the request: after ``REPAIR_ASKS`` unanswered requests the task ends with ``node_lost`` and
        the in-order text already shown, never with a hole in the middle. Queued tasks (Accept with
        queue > 0) are not asked: they have not started."""
        if not self._connected.is_set() or not self._online:
            return  # nobody to ask; a lost node is handled by _node_lost
        now = self._loop.time()
        for live in list(self._open.values()):
            st = live.stream
            if live.finished_at is not None or st.state is wire.State.PENDING:
                continue
            gap = bool(st.held) or st.pending_done is not None  # pending_done + unfinished: chunks missing
            if gap:
                if not live.gap_at:
                    live.gap_at = now
                due = now - max(live.gap_at, live.asked_at) >= GAP_WAIT_S
            else:
                live.gap_at = 0.0
                # running (streaming, or accepted with queue 0): after IDLE_ASK_S of silence; queued at the node:
                # far less often (it answers with its Accept, so this costs two small messages a minute)
                wait = IDLE_ASK_S if st.state is wire.State.STREAMING or not st.queue else QUEUED_ASK_S
                due = now - max(live.heard_at, live.asked_at) >= wait
            if not due:
                continue
            if live.asks >= REPAIR_ASKS:
                log.warning("edge: task %s: the node never replayed from seq %d; ending it", live.hex[:8],
                            st.next_seq)
                self._finish(live, "error", {"code": "node_lost", "msg": NODE_LOST_MSG}, None)
                continue
            live.asked_at = now
            live.asks += 1
            self.stats.replay_asks += 1
            log.info("edge: task %s: asking the node to replay from seq %d", live.hex[:8], st.next_seq)
            msg = self._task_msg(live.rec, live.opts)
            payload = wire.encode(wire.Task(id=msg.id, uid=msg.uid, ch=msg.ch, text=msg.text, ts=msg.ts,
                                            conv=msg.conv, opts=msg.opts, replay=st.next_seq))
            self._send(wire.task_topic(live.rec.uid), payload)

    def cancel(self, tid: bytes, uid: str) -> bool:
        live = self.live.get(tid)
        if live is None or live.rec.uid != uid or live.finished_at is not None:
            return False
        live.cancel_requested = True
        self._publish_cancel(live)
        if live.stream.state is wire.State.PENDING:  # no node has it: end it here
            self._finish(live, "cancelled", None, None)
        return True

    def _publish_cancel(self, live: LiveTask) -> None:
        """Best effort now; if the broker link is down, ``_republish_pending`` sends it on reconnect."""
        if self._connected.is_set():
            self._send(wire.task_topic(live.rec.uid), wire.encode(wire.Cancel(id=live.rec.id)))

    # ---- lookup / attach -------------------------------------------------------------------
    def pending(self, uid: str) -> int:
        """The user's unfinished tasks (``edge.max_pending_per_user`` bounds them); O(1)."""
        return self._pending.get(uid, 0)

    def _count(self, uid: str, delta: int) -> None:
        n = self._pending.get(uid, 0) + delta
        if n > 0:
            self._pending[uid] = n
        else:
            self._pending.pop(uid, None)

    def get(self, tid: bytes) -> LiveTask | None:
        return self.live.get(tid)

    def attach(self, live: LiveTask, sink: Sink, trace: bool = False) -> None:
        live.sinks.add(sink)
        if trace:
            live.trace.add(sink)
        self._attached.setdefault(sink, set()).add(live)

    def detach(self, live: LiveTask, sink: Sink) -> None:
        live.sinks.discard(sink)
        live.trace.discard(sink)
        tasks = self._attached.get(sink)
        if tasks is not None:
            tasks.discard(live)
            if not tasks:
                del self._attached[sink]

    def detach_all(self, sink: Sink) -> None:
        """A client connection is gone: detach it from every task it follows (not a scan of ``live``)."""
        self.presence.discard(sink)
        for live in self._attached.pop(sink, ()):
            live.sinks.discard(sink)
            live.trace.discard(sink)

    # ---- replies in ------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            info = wire.parse_topic(topic)
            msg = wire.decode(payload)
        except wire.WireError as exc:
            self.stats.bad_messages += 1
            log.warning("edge: dropped bad message on %s: %s", topic[:200], exc)
            return
        if info.kind == "node":
            if isinstance(msg, wire.Beat) and msg.node == info.key:
                self.nodes[msg.node] = NodeInfo(msg.state, self._loop.time(), msg.active, msg.capacity, msg.models)
                self._update_presence()
            else:
                self.stats.bad_messages += 1
            return
        if info.kind == "batch":  # the replies of many tasks from one node (node.batch_replies)
            if isinstance(msg, wire.Batch) and msg.node == info.key:
                self.stats.batches += 1
                # The batch's chunks are kept in one write, at the end of this synchronous pass, and only
                # then are its frames handed to the sinks (a WebSocket session may write a frame to its
                # socket at once): no user ever sees a chunk edge-chunks.lmdb does not have, so after a
                # kill -9 a re-run is still told from a replay. One LMDB transaction per batch.
                self._chunk_buf, self._out_buf = [], []
                try:
                    for item in msg.items:
                        self._on_reply(item, None)
                finally:
                    buf, self._chunk_buf = self._chunk_buf, None
                    out, self._out_buf = self._out_buf, None
                    fin, self._fin_buf = self._fin_buf, []
                    try:
                        if buf:
                            self.store.add_chunks(buf)
                    finally:
                        for sink, frame in out:
                            sink.push(frame)
                        # Only now are the finished tasks announced: every sink has had every frame of the
                        # batch, so a listener (the WeCom channel) sees the text before the end, as it does
                        # when the replies come one by one. A replayed answer arrives as one batch.
                        for live in fin:
                            self._announce_finished(live)
            else:
                self.stats.bad_messages += 1
            return
        if info.kind != "reply" or not isinstance(msg, (wire.Accept, wire.Delta, wire.Done)):
            return
        self._on_reply(msg, info.key)

    def _on_reply(self, msg: wire.Accept | wire.Delta | wire.Done, uid: str | None) -> None:
        """One reply, from its user's reply topic (``uid``) or from a node's batch (None: the broker's ACL
        lets a node publish replies for any user either way)."""
        self.stats.replies += 1
        live = self.live.get(msg.id)
        if live is None:
            return  # not ours (a device's own task) or long finished
        if live.finished_at is not None:  # ended here (node_lost, a second run, stop): nothing more goes out
            self.stats.late += 1
            return
        if uid is not None and live.rec.uid != uid:
            self.stats.bad_messages += 1
            log.warning("edge: reply for task %s arrived on another user's topic; dropped", live.hex[:8])
            return
        before = live.stream.next_seq
        try:
            events = live.stream.feed(msg)
        except wire.WireError as exc:
            self.stats.bad_messages += 1
            log.warning("edge: task %s: inconsistent reply stream: %s", live.hex[:8], exc)
            return
        live.heard_at = self._loop.time()
        if live.stream.next_seq != before or (isinstance(msg, wire.Accept) and not live.stream.held
                                              and live.stream.pending_done is None):
            live.asks = 0  # the stream moved, or the node confirmed it still runs the task
        for ev in events:
            if live.finished_at is not None and not isinstance(ev, wire.Finished):
                break  # ended by an earlier event of this message (a second run): drop the rest
            self._on_event(live, ev)

    def _on_event(self, live: LiveTask, ev: wire.Event) -> None:
        if isinstance(ev, wire.Text):
            if live.shown is not None and ev.seq <= len(live.shown):
                if ev.text != live.shown[ev.seq - 1]:
                    # Not a replay: another run of the task (its node restarted too). Its text differs from
                    # what users saw before the edge restarted; splicing the two would garble the answer.
                    log.warning("edge: task %s was run again after a restart; ending it with an error", live.hex[:8])
                    # the stream keeps exactly what users saw: a later resume replays that, not the new run
                    live.stream.parts = list(live.shown)
                    live.stream.next_seq = len(live.shown) + 1
                    self._finish(live, "error", {"code": "node_lost", "msg": NODE_LOST_MSG}, None,
                                 text="".join(live.shown))
                    return
                if ev.seq == len(live.shown):
                    live.shown = None  # the replay caught up: from here on it is one stream again
            elif self._chunk_buf is not None:
                self._chunk_buf.append((live.rec.id, ev.seq, ev.text))
            else:
                self.store.add_chunk(live.rec.id, ev.seq, ev.text)
            if ev.timing is not None:
                self._observe_chunk(live, ev.seq, ev.timing)
            frame = {"type": "delta", "task": live.hex, "seq": ev.seq, "text": ev.text}
            traced = frame
            if (live.trace or live.held is not None) and ev.timing is not None:
                # Tracing (``claw bench tunnel``): only sinks whose ask had "trace": true get the Delta's
                # timing (node publish time n_pub, ...) plus e_fwd, when the edge forwarded it; others
                # see the unchanged frame.
                traced = {**frame, "timing": {**ev.timing, "e_fwd": now_us()}}
            self._emit(live, frame, traced)
        elif isinstance(ev, wire.Accepted):
            if live.rec.status == "pending":
                live.rec = self.store.update(live.rec.id, status="accepted", node=ev.node) or live.rec
            self._next(live.rec.uid)
            frame = {"type": "accepted", "task": live.hex, "queue": ev.queue}
            self._emit(live, frame, frame)
        elif isinstance(ev, wire.Finished):
            if ev.timing is not None:
                n_done = ev.timing.get("n_done")
                # A Done generated before this edge's last dispatch of the task is a replay from the
                # node's reply log (e.g. after an edge restart): its latency would be the downtime.
                if n_done is not None and n_done >= live.pub_us:
                    self.stages.observe("done_node_to_edge", now_us() - n_done)
            err = {"code": ev.err.code, "msg": ev.err.msg} if ev.err else None
            self._finish(live, ev.status, err, ev.usage, ev.timing)
        elif isinstance(ev, wire.Duplicate):
            self.stats.duplicates += 1
        elif isinstance(ev, wire.Gap):
            self.stats.gaps += 1
            if not live.gap_at:
                live.gap_at = self._loop.time()
            log.info("edge: task %s: waiting for chunks %d..%d", live.hex[:8], ev.first, ev.last)
        elif isinstance(ev, wire.Late):
            self.stats.late += 1

    def _observe_chunk(self, live: LiveTask, seq: int, timing: dict[str, int]) -> None:
        """Stage latencies of one in-order chunk (called once per seq: duplicates are dropped before, and
        replayed chunks carry no timing). The hot path: a dict lookup and one histogram record per chunk.
        A chunk held behind a gap is observed when released, so its ``chunk_node_to_edge`` includes the
        wait for the gap, which is the delay its reader saw."""
        now = now_us()
        n_pub = timing.get("n_pub")
        stages = self.stages
        if n_pub is not None:
            stages.observe("chunk_node_to_edge", now - n_pub)
        if seq != 1:
            return
        stages.observe("ask_to_first_chunk", now - live.rec.ts * 1000)
        n_rx, n_ft, n_pub1 = timing.get("n_rx"), timing.get("n_ft"), timing.get("n_pub1")
        if n_rx is not None and live.pub_us:
            stages.observe("edge_to_node", n_rx - live.pub_us)
        if n_ft is not None:
            if n_rx is not None:
                stages.observe("llm_first_token", n_ft - n_rx)
            if n_pub1 is not None:
                stages.observe("first_token_to_publish", n_pub1 - n_ft)

    def _drop_chunks_soon(self, tid: bytes) -> None:
        """From the store's writer thread: drop the chunks on the loop (after any batch pass adding them)."""
        try:
            self._loop.call_soon_threadsafe(self._drop_chunks, tid)
        except RuntimeError:  # the loop is closed (shutdown): the next start's prune_chunks drops them
            pass

    def _drop_chunks(self, tid: bytes) -> None:
        try:
            self.store.drop_chunks(tid)
        except lmdb.Error as exc:  # never let a full edge-chunks.lmdb cost the user the done frame
            log.error("edge: chunks of task %s not dropped from edge-chunks.lmdb: %s", tid.hex()[:8], exc)

    def _emit(self, live: LiveTask, frame: dict[str, Any], traced: dict[str, Any]) -> None:
        """Push a frame to the task's sinks (``traced`` to those that asked for timing), or hold it while the
        task is not acknowledged yet (see ``submit(hold=True)``)."""
        if live.held is not None:
            live.held.append((frame, traced))
            return
        out = self._out_buf
        for sink in live.sinks:
            f = traced if sink in live.trace else frame
            if out is not None:
                out.append((sink, f))
            else:
                sink.push(f)

    def release(self, live: LiveTask) -> None:
        """Send the frames held since the task was submitted (in order) and stop holding."""
        held, live.held = live.held, None
        for frame, traced in held or ():
            for sink in live.sinks:
                sink.push(traced if sink in live.trace else frame)

    def _finish(self, live: LiveTask, status: str, err: dict[str, str] | None,
                usage: dict[str, int] | None, timing: dict[str, int] | None = None,
                text: str | None = None) -> None:
        if live.finished_at is not None:
            return
        self._finished_now(live)
        self._count(live.rec.uid, -1)
        if text is None:
            text = live.stream.text
        # The chunks kept for the restart check go only once the final record is committed: dropped before it,
        # an edge killed in between would find the task unfinished with no chunks, and could not tell a
        # re-run of it (different text) from a replay.
        tid = live.rec.id
        live.rec = self.store.update(tid, on_durable=lambda: self._drop_chunks_soon(tid), status=status,
                                     answer=text, err=err, usage=usage) or live.rec
        self._next(live.rec.uid)
        self.stats.finished[status] = self.stats.finished.get(status, 0) + 1
        frame: dict[str, Any] = {"type": "done", "task": live.hex, "seq": live.stream.next_seq - 1,
                                 "status": status, "text": text}
        if err:
            frame["error"] = {"code": err["code"], "message": err["msg"]}
        if usage:
            frame["usage"] = usage
        traced = frame
        if (live.trace or live.held is not None) and timing is not None:  # the Done's timing + e_fwd, as for deltas
            traced = {**frame, "timing": {**timing, "e_fwd": now_us()}}
        self._emit(live, frame, traced)
        if self._out_buf is not None:  # in a batch: after the batch's frames reached the sinks
            self._fin_buf.append(live)
        else:
            self._announce_finished(live)

    def _announce_finished(self, live: LiveTask) -> None:
        for cb in self.on_finished:
            try:
                cb(live)
            except Exception:  # noqa: BLE001 - one listener's bug must not cost the others (or the batch)
                log.exception("edge: on_finished callback failed for task %s", live.hex[:8])


def done_frame(rec: TaskRecord) -> dict[str, Any]:
    """The ``done`` frame for a finished task loaded from the store (resume after the fact)."""
    frame: dict[str, Any] = {"type": "done", "task": rec.id.hex(), "seq": None, "status": rec.status,
                             "text": rec.answer}
    if rec.err:
        frame["error"] = {"code": rec.err.get("code", ""), "message": rec.err.get("msg", "")}
    if rec.usage:
        frame["usage"] = rec.usage
    assert rec.status in FINAL
    return frame
