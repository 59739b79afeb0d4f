"""Server B's node: one process that takes tasks over MQTT and answers them with the LLM. :class:`Node`
coordinates the parts, each in a module of its own:

- node/session.py: the MQTT link (session, heartbeats, publishes with retries, reply batching);
- node/intake.py: what arrives on the task topics, read;
- node/admission.py: which tasks are held, and when each may run;
- node/generate.py: one answer from the LLM, published as coalesced chunks;
- node/replylog.py and node/replay.py: finished answers kept, and sent again when the edge asks.

Per task: ``Accept`` at once (with the queue position), then the answer as ``Delta`` chunks and one ``Done``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiomqtt
from aiohttp import web

import wire
from core import metrics
from core.config import Settings
from core.metrics import Stages
from core.mqtt import Backoff, client_from_settings, run_forever
from core.runtime import now_us, start_http

from .admission import Admission, Run
from .generate import Generator
from .history import Conversations
from .intake import Inbound, Malformed, read
from .llm import LLMClient, LLMError
from .loglimit import LogLimit
from .replay import Replayer
from .replylog import ReplyLog
from .session import Link
from .upstream import Upstream

__all__ = ["NODE_STAGES", "Node", "NodeStats"]

log = logging.getLogger(__name__)

_DEVICE_UID = "dev."  # a device's uid; every other uid's tasks come from the edge (the broker's ACL)
# Stage latencies on the node's GET /metrics (node.metrics_listen), claw_node_stage_seconds{stage=...}:
# llm_first_token = n_ft - n_rx (task received -> first LLM token, queueing included), publish = one
# Delta's QoS 1 publish until its PUBACK, answer_total = n_done - n_rx (every task, whatever its status).
NODE_STAGES = ("llm_first_token", "publish", "answer_total")
# The answer to a malformed task whose id could be read (done, status error). Chinese: shown to users.
BAD_REQUEST_MSG = "请求格式不正确，未被处理。请按协议 claw/v1 检查消息（详见 hint）。"


@dataclass
class NodeStats:
    tasks: int = 0
    ok: int = 0
    errors: int = 0
    cancelled: int = 0
    chunks: int = 0
    duplicates: int = 0
    unknown_replays: int = 0  # replay requests for tasks this node does not have (for that uid; ignored)
    unknown_cancels: int = 0  # cancels of tasks the uid does not have running here (ignored)
    rate_limited: int = 0  # a device's tasks refused (done rate_limited / node_busy): over node.max_pending*
    deferred: int = 0  # the edge's tasks not taken (over node.max_pending*): the edge sends them again later
    bad_requests: int = 0  # malformed tasks answered with done bad_request (also counted in bad_messages)
    replays: int = 0  # tasks whose answer (so far) was sent again because the edge asked again
    bad_messages: int = 0
    reconnects: int = 0
    context_retries: int = 0  # questions sent again without history after a context-size error
    length_limited: int = 0  # answers the model ended with finish_reason "length" (sent with LENGTH_NOTE)
    by_code: dict[str, int] = field(default_factory=dict)


class Node:
    """One node process. ``await node.run()`` until cancelled; ``await node.shutdown()`` first to stop gracefully.

    Its parts are public for tests and tools: ``link`` (:class:`node.session.Link`), ``admission``
    (:class:`node.admission.Admission`), ``replies`` (:class:`node.replylog.ReplyLog`), ``upstream``
    (:class:`node.upstream.Upstream`), ``generator`` (:class:`node.generate.Generator`)."""

    def __init__(self, settings: Settings, *, http: LLMClient | None = None) -> None:
        self.s = settings
        self.cfg = settings.node
        self.id = settings.node.id
        self.stats = NodeStats()
        self.stages = Stages(NODE_STAGES)
        self.metrics_port: int | None = None  # bound port of node.metrics_listen while run() runs
        self._metrics: web.AppRunner | None = None
        self._own_http = http is None
        self.state = "online"
        self.link = Link(self.id, beat_s=self.cfg.beat_s, beat=self._beat, state=lambda: self.state,
                         on_message=self._handle)
        self.admission = Admission(self.cfg.concurrency, self.cfg.max_pending, self.cfg.max_pending_per_uid)
        self.replies = ReplyLog(settings.data_dir, self.id)
        self.replayer = Replayer(self.id, self.link)
        self.upstream = Upstream(self.cfg, http)
        self.generator = Generator(self.id, self.cfg, link=self.link, upstream=self.upstream,
                                   conversations=Conversations(self.cfg.history_tokens, self.cfg.history_turns),
                                   counts=self.stats, stages=self.stages)
        # What GET /metrics reads: the held tasks by (uid, id), those waiting for a slot, the connection flag.
        self._runs = self.admission.runs
        self._waiting = self.admission.waiting
        self._connected = self.link.connected
        self._warn = LogLimit(log)

    @property
    def connected(self) -> bool:
        """Whether the MQTT session is up."""
        return self._connected.is_set()

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        if self.upstream.http is None:
            # Kept-alive connections to LM Studio, one per answer running at once (node/llm.py LLMClient).
            self.upstream.http = LLMClient()
        will = aiomqtt.Will(wire.node_topic(self.id), wire.encode(self._beat("offline")), qos=1)
        self.link.client = client_from_settings(self.s.mqtt, identifier=self.s.mqtt.username or f"node.{self.id}",
                                                data_dir=self.s.data_dir, will=will)
        log.info("node %s: starting; LLM at %s; broker %s:%s (tls=%s)", self.id, self.cfg.llm_url,
                 self.s.mqtt.host, self.s.mqtt.port, self.s.mqtt.tls)
        self.replies.open()
        pruner = asyncio.create_task(self.replies.prune_loop())
        probe = asyncio.create_task(self.upstream.probe(self.id), name="llm-probe")
        if self.cfg.batch_replies:
            self.link.start_batching(self.cfg.batch_linger_ms / 1000)
        try:
            if self.cfg.metrics_listen:
                await self._start_metrics(self.cfg.metrics_listen)
            await run_forever(self.link.client, self.link.session, name=f"node {self.id}",
                              backoff=Backoff(self.s.mqtt.reconnect_min, self.s.mqtt.reconnect_max),
                              on_disconnect=self._on_disconnect)
        finally:
            # The connection is gone for good: running tasks end now (their Done cannot be published,
            # the edge re-dispatches them) and nothing may wait for a reconnect that never comes.
            self.link.stopping = True
            jobs = self.admission.jobs()
            for job in jobs:
                job.cancel()
            if jobs:
                await asyncio.wait(jobs, timeout=5)
            pruner.cancel()
            probe.cancel()
            await self.link.stop_batching()
            self.replies.close()
            if self._own_http and self.upstream.http is not None:
                await self.upstream.http.close()
                self.upstream.http = None
            if self._metrics is not None:
                await self._metrics.cleanup()
                self._metrics, self.metrics_port = None, None

    # ---- GET /metrics (node.metrics_listen) -------------------------------------------------
    async def _start_metrics(self, listen: str) -> None:
        reg = metrics.registry(metrics.Families(self.metric_families), metrics.StagesCollector(
            self.stages, "claw_node_stage_seconds", "Stage latency of answers on the node (seconds)"))

        async def scrape(request: web.Request) -> web.Response:
            return web.Response(body=metrics.exposition(reg), headers={"Content-Type": metrics.CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        self._metrics, self.metrics_port = await start_http(app, listen, "node.metrics_listen")
        log.info("node %s: Prometheus metrics on http://%s:%d/metrics", self.id, listen.rpartition(":")[0],
                 self.metrics_port)

    def metric_families(self) -> Iterator[metrics.Metric]:
        """The node's counters and gauges, built at a scrape: every int field of ``NodeStats`` as
        ``claw_node_<field>_total``, LLM errors by code, and the task gauges (docs/api.md "Node metrics")."""
        st = self.stats
        for f in dataclasses.fields(st):
            value = getattr(st, f.name)
            if isinstance(value, int):
                yield metrics.counter(f"claw_node_{f.name}_total", f"NodeStats.{f.name}", value)
        yield metrics.counters_by("claw_node_llm_errors_total", "Answers ended by an LLM error, by code", "code",
                                  st.by_code)
        yield metrics.gauge("claw_node_active_tasks", "Tasks accepted and not finished (running or queued)",
                            len(self._runs))
        yield metrics.gauge("claw_node_queued_tasks", "Tasks accepted and waiting for a slot", len(self._waiting))
        yield metrics.gauge("claw_node_capacity", "node.concurrency", self.cfg.concurrency)
        yield metrics.gauge("claw_node_connected", "1 while the broker link is up", int(self._connected.is_set()))
        yield metrics.gauge("claw_node_draining", "1 while stopping", int(self.state != "online"))

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully: announce ``draining``, take no new tasks, let running answers finish
        for up to ``grace`` seconds (``node.stop_grace_s``), end the rest with ``done`` error
        ``node_stopped`` (published, so users see why), then announce ``offline``.

        Tasks not yet accepted stay with the edge, which re-sends them when a node is back.
        Call before cancelling ``run()``; safe to call when not connected.
        """
        if self.link.stopping:
            return
        self.link.stopping = True
        self.state = "draining"
        grace = self.cfg.stop_grace_s if grace is None else grace
        await self.link.withdraw()
        jobs = self.admission.jobs()
        if jobs:
            log.info("node %s: draining %d running task(s) for up to %.0f s", self.id, len(jobs), grace)
            _, late = await asyncio.wait(jobs, timeout=grace) if grace > 0 else (set(), set(jobs))
            for job in late:
                job.cancel()
            if late:  # their Done(node_stopped) is published while the connection is still up
                await asyncio.wait(late, timeout=3)
        self.state = "offline"
        await self.link.say_offline()

    def _on_disconnect(self) -> None:
        self.link.disconnected()
        self.stats.reconnects += 1

    def _beat(self, state: str) -> wire.Beat:
        return wire.Beat(node=self.id, state=state, active=len(self.admission), capacity=self.cfg.concurrency,  # type: ignore[arg-type]
                         models=self.upstream.models[:8] or None)

    # ---- inbound ---------------------------------------------------------------------------
    def _handle(self, msg: aiomqtt.Message) -> None:
        got = read(str(msg.topic), msg.payload)
        if isinstance(got, Inbound):
            if isinstance(got.msg, wire.Task):
                self.on_task(got.msg)
            elif not self.admission.cancel((got.uid, got.msg.id)):  # only the uid's own task
                self.stats.unknown_cancels += 1
        elif isinstance(got, Malformed):
            self._bad_request(got.uid, got.tid, got.hint)
        else:
            self.stats.bad_messages += 1
            self._warn.warning("topic", "node %s: dropped a message on %s%s", self.id, got.topic, got.why)

    def _bad_request(self, uid: str, tid: bytes | None, hint: str) -> None:
        """A malformed message on ``uid``'s task topic: counted, logged (at most every LOG_EVERY_S), and, when
        its task id could be read, answered with ``done`` error ``bad_request`` on the uid's reply topic --
        unless that id is one of the uid's own tasks here (running or answered): those are never ended by it."""
        self.stats.bad_messages += 1
        key = (uid, tid) if tid is not None else None
        if key is None or key in self.admission or self.replies.get(key) is not None:
            self._warn.warning("bad", "node %s: malformed message from %s dropped: %s", self.id, uid, hint[:300])
            return
        self._warn.warning("bad", "node %s: malformed message from %s answered bad_request: %s", self.id, uid,
                           hint[:300])
        self.stats.bad_requests += 1
        self._refuse(uid, tid, "bad_request", BAD_REQUEST_MSG, hint)

    def _refuse(self, uid: str, tid: bytes, code: str, msg: str, hint: str | None = None) -> None:
        """End a task the node does not take with ``done`` error ``code``; nothing of it is kept."""
        err = wire.Err(code=code, msg=msg, hint=hint[:256] if hint else None)
        self.link.spawn_publish(wire.reply_topic(uid), wire.Done(id=tid, seq=0, status="error", err=err))

    def on_task(self, task: wire.Task) -> None:
        """A task from its uid's task topic: replayed when the node has it (running or answered), else taken
        (or refused, or left with the edge) and run in a job of its own. Handled before it returns."""
        key = (task.uid, task.id)
        topic = wire.reply_topic(task.uid)
        first = task.replay or 1
        run = self.admission.get(key)
        if run is not None:  # republished while we have it: re-confirm, replay what was sent
            self.stats.duplicates += 1
            queue = 0 if run.started else self.admission.position(key)
            self._replay(topic, key, queue, list(run.chunks), None, first)
            return
        stored = self.replies.get(key)
        if stored is not None:  # already answered (maybe before a restart): replay it, never run it twice
            self.stats.duplicates += 1
            chunks, done = stored
            self._replay(topic, key, 0, chunks, done, first)
            return
        if self.link.stopping:
            return  # a new task, not accepted: the edge re-sends it to a node that is up (replays still served)
        if task.replay is not None:  # a replay request for a task we do not have (we restarted): not a dispatch
            self.stats.unknown_replays += 1
            self._warn.info("replay", "node %s: replay of unknown task %s of %s asked; ignored", self.id,
                            task.id.hex()[:8], task.uid)
            return
        over = self.admission.over_limit(task.uid)
        if over is not None:
            code, text = over
            if task.uid.startswith(_DEVICE_UID):  # a device is told at once; its question is not kept
                self.stats.rate_limited += 1
                self._refuse(task.uid, task.id, code, text)
            else:  # the edge's task is not accepted: the edge keeps it and sends it again every republish_s
                self.stats.deferred += 1
            self._warn.warning(code, "node %s: task of %s not taken (%s: %d of its tasks, %d in all held)", self.id,
                               task.uid, code, self.admission.held_by(task.uid), len(self.admission))
            return
        self.stats.tasks += 1
        run = self.admission.admit(task, topic)
        run.job = asyncio.create_task(self._run_task(run), name=f"task-{task.id.hex()[:8]}")

    def _replay(self, topic: str, key: tuple[str, bytes], queue: int, chunks: list[str], done: wire.Done | None,
                first: int) -> None:
        if chunks or done is not None:
            self.stats.replays += 1
        self.replayer.spawn(topic, key, queue, chunks, done, first)

    # ---- one task --------------------------------------------------------------------------
    async def _run_task(self, run: Run) -> None:
        task = run.task
        t_rx = now_us()
        status, err, seq, usage = "ok", None, 0, None
        timing: dict[str, int] = {"n_rx": t_rx}
        try:
            queued = self.admission.queue_position(run)
            # Batched: queued now, not awaited — the LLM request starts at once instead of after a broker
            # round trip (the batcher keeps the order: this Accept leaves before the task's first Delta).
            await self.link.put(run.topic, wire.Accept(id=task.id, node=self.id, queue=queued))
            async with self.admission.slot(run):
                if queued:
                    self.link.spawn_publish(run.topic, wire.Accept(id=task.id, node=self.id, queue=0))
                seq, usage = await self.generator.generate(run, timing)
        except asyncio.CancelledError:
            status = "cancelled"
            seq = run.last_seq
            if not run.cancelled:  # node shutting down
                status, err = "error", wire.Err(code="node_stopped", msg="服务器 B 正在停止，本次回答已中断，请稍后重试。")
        except LLMError as exc:
            status, seq = "error", run.last_seq
            err = wire.Err(code=exc.code, msg=exc.user_message)
            self.stats.by_code[exc.code] = self.stats.by_code.get(exc.code, 0) + 1
            log.warning("node %s: task %s failed: %s", self.id, task.id.hex()[:8], exc)
        except Exception as exc:  # a bug must still end the task with a clear error, never silence
            status, seq = "error", run.last_seq
            err = wire.Err(code="node_internal", msg="服务器 B 内部错误，请稍后重试。")
            log.exception("node %s: task %s crashed: %s", self.id, task.id.hex()[:8], exc)
        finally:
            self.admission.release(run)
        timing["n_done"] = now_us()
        self.stages.observe("answer_total", timing["n_done"] - t_rx)
        done = wire.Done(id=task.id, seq=seq, status=status, err=err, usage=usage, timing=timing)  # type: ignore[arg-type]
        try:
            if self.link.stopping:  # never hang a shutdown on a broker that is gone
                with contextlib.suppress(asyncio.TimeoutError, aiomqtt.MqttError):
                    async with asyncio.timeout(3):
                        await self.link.publish(run.topic, done)
            else:
                await self.link.publish(run.topic, done)
        finally:
            self.replies.remember(run.key, run.chunks[:seq], done)  # first: a replay request never finds neither
            self.admission.drop(run.key)
            setattr(self.stats, status if status != "error" else "errors",
                    getattr(self.stats, status if status != "error" else "errors") + 1)
