"""Server B's worker: MQTT client (dials out over TLS), task runner, LM Studio streaming, chunk coalescing.

Per task: ``Accept`` at once (with the queue position), then the answer as ``Delta`` chunks and
one ``Done``. Deltas from the LLM are coalesced: the first one goes out at once, later ones are
gathered for ``coalesce_ms`` (or until ``coalesce_bytes`` wait) while the previous chunk's QoS 1
PUBACK is awaited, so a task costs one MQTT message per window instead of one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import lmdb
from aiohttp import web

import wire
from core import metrics
from core.config import Settings
from core.metrics import Stages
from core.mqtt import Backoff, client_from_settings, run_forever
from core.perms import secure_tree
from core.runtime import now_us, start_http
from core.store import Writer, open_db, open_env

from .batcher import ReplyBatcher
from .coalescer import Coalescer
from .history import message_tokens, trim_history
from .llm import LLM_CONTEXT, LLM_HTTP, LLM_STALL, LLM_UNREACHABLE, LLMClient, LLMError, chat, list_models

log = logging.getLogger(__name__)

TOKEN_WAIT_US = 1000  # a chunk whose text waited this long in the coalescer carries timing.n_tok too
MAX_CHUNK_BYTES = 64 * 1024  # one Delta's text at most (wire.MAX_PAYLOAD is 256 KiB for the whole message)
_REPLY_PREFIX = f"{wire.PREFIX}/reply/"
_DEVICE_REPLY = f"{wire.PREFIX}/reply/dev."  # a device reads its own reply topic: never batched
_DEVICE_UID = "dev."  # a device's uid; every other uid's tasks come from the edge (the broker's ACL)
REPLY_LOG_MAX = 10_000  # finished answers kept for replay (in memory and in node.lmdb) ...
REPLY_LOG_BYTES = 32 * 1024 * 1024  # ... in memory at most this much of their text (characters) ...
REPLY_LOG_AGE_S = 86_400  # ... and in node.lmdb for at most this long
# Stage latencies on the node's GET /metrics (node.metrics_listen), claw_node_stage_seconds{stage=...}:
# llm_first_token = n_ft - n_rx (task received -> first LLM token, queueing included), publish = one
# Delta's QoS 1 publish until its PUBACK, answer_total = n_done - n_rx (every task, whatever its status).
NODE_STAGES = ("llm_first_token", "publish", "answer_total")
# The last chunk of an answer the model ended with finish_reason "length" (max_tokens, or its context full).
LENGTH_NOTE = "\n\n（回答已达到长度上限，可能不完整。）"
# Added to the message of an answer cut off because it filled the model's context (the history is dropped).
CONTEXT_RESET_NOTE = "之前的对话记录已清除，下一个问题将开始新的对话。"
PROBE_TIMEOUT_S = 5.0  # the start-up check of the LLM server waits at most this long
# The reply log's LMDB table, keyed by uid + NUL + task id. The table of earlier versions ("replies", keyed by
# the task id alone, so one user's id found another's answer) is dropped when the node opens its data dir.
REPLY_DB = b"replies.uid"
OLD_REPLY_DB = b"replies"
LOG_EVERY_S = 10.0  # a warning about refused or malformed input is logged at most this often per kind
# Answers to tasks the node does not take (done, status error; nothing is kept). Chinese: shown to users.
RATE_LIMITED_MSG = "您进行中的问题过多（最多 {n} 个），请等前面的回答结束后再提问。"
NODE_BUSY_MSG = "服务器 B 繁忙（进行中的问题已达上限），请稍后重试。"
BAD_REQUEST_MSG = "请求格式不正确，未被处理。请按协议 claw/v1 检查消息（详见 hint）。"

Key = tuple[str, bytes]  # (uid, task id): a task id means something only together with its user




@dataclass
class _Run:
    task: wire.Task
    topic: str
    job: asyncio.Task[None] | None = None
    started: bool = False
    cancelled: bool = False
    chunks: list[str] = field(default_factory=list)  # text of every Delta published, seq = index + 1
    turn: asyncio.Event = field(default_factory=asyncio.Event)  # set when it is this user's turn

    @property
    def key(self) -> Key:
        return (self.task.uid, self.task.id)


class _LogLimit:
    """At most one record per ``every`` seconds per kind; the next one says how many were left out."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, fmt, *args)

    def info(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.INFO, kind, fmt, *args)

    def log(self, level: int, kind: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        last, skipped = self._last.get(kind, (float("-inf"), 0))
        if now - last < self.every:
            self._last[kind] = (last, skipped + 1)
            return
        self._last[kind] = (now, 0)
        if skipped:
            fmt += " (%d more like it in the last %.0f s not logged)"
            args = (*args, skipped, now - last)
        log.log(level, fmt, *args)


def _recover_id(payload: Any) -> bytes | None:
    """The task id of a payload ``wire.decode`` refused, if it is a CBOR map with a 16-byte ``id``."""
    if not isinstance(payload, (bytes, bytearray)):
        return None
    try:
        raw = cbor2.loads(bytes(payload))
    except Exception:  # noqa: BLE001 - not CBOR at all: no id
        return None
    tid = raw.get("id") if isinstance(raw, dict) else None
    return tid if isinstance(tid, bytes) and len(tid) == wire.ID_LEN else None


def _log_key(key: Key) -> bytes:
    return key[0].encode() + b"\0" + key[1]


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
    """One node process. ``await node.run()`` until cancelled or ``stop()``."""

    def __init__(self, settings: Settings, *, http: LLMClient | None = None) -> None:
        self.s = settings
        self.cfg = settings.node
        self.id = settings.node.id
        self.stats = NodeStats()
        self.stages = Stages(NODE_STAGES)
        self.metrics_port: int | None = None  # bound port of node.metrics_listen while run() runs
        self._metrics: web.AppRunner | None = None
        self._http = http
        self._own_http = http is None
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        # Every task is known by (uid, id): the uid is its topic's, which the broker's ACL binds to the
        # publisher, so a device naming another user's task id never reaches that task.
        self._runs: dict[Key, _Run] = {}
        # finished tasks: (uid, id) -> (chunks, Done), replayed when the edge sends the task again (it lost the
        # stream, e.g. restarted); bounded by REPLY_LOG_MAX entries and REPLY_LOG_BYTES of text
        self._recent: OrderedDict[Key, tuple[list[str], wire.Done]] = OrderedDict()
        self._recent_bytes = 0
        self._slots = asyncio.Semaphore(self.cfg.concurrency)
        self._turns: dict[str, deque[_Run]] = {}  # uid -> its tasks in arrival order; the first one runs
        self._waiting: list[Key] = []
        self._model: str | None = None
        self._model_at = 0.0
        self._models: list[str] = []
        self._history: dict[tuple[str, str], list[dict[str, str]]] = {}
        self._stopping = False
        self.state = "online"
        self._log_env: Any = None  # node.lmdb: the reply log, so a restarted node replays instead of re-running
        self._log_db: Any = None
        self._writer: Writer | None = None
        self._batcher: ReplyBatcher | None = None
        self._replaying: set[Key] = set()  # tasks whose replay is being sent (one at a time each)
        self._warn = _LogLimit()

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        if self._http is None:
            # Kept-alive connections to LM Studio, one per answer running at once (node/llm.py LLMClient).
            self._http = LLMClient()
        will = aiomqtt.Will(wire.node_topic(self.id), wire.encode(self._beat("offline")), qos=1)
        self._client = client_from_settings(self.s.mqtt, identifier=self.s.mqtt.username or f"node.{self.id}", data_dir=self.s.data_dir,
                                            will=will)
        log.info("node %s: starting; LLM at %s; broker %s:%s (tls=%s)", self.id, self.cfg.llm_url,
                 self.s.mqtt.host, self.s.mqtt.port, self.s.mqtt.tls)
        self._open_reply_log()
        pruner = asyncio.create_task(self._prune_loop())
        probe = asyncio.create_task(self._probe_llm(), name="llm-probe")
        if self.cfg.batch_replies:
            self._batcher = ReplyBatcher(self.id, self._publish_payload, linger=self.cfg.batch_linger_ms / 1000)
            self._batcher.start()
        try:
            if self.cfg.metrics_listen:
                await self._start_metrics(self.cfg.metrics_listen)
            await run_forever(self._client, self._session, name=f"node {self.id}",
                              backoff=Backoff(self.s.mqtt.reconnect_min, self.s.mqtt.reconnect_max),
                              on_disconnect=self._on_disconnect)
        finally:
            # The connection is gone for good: running tasks end now (their Done cannot be published,
            # the edge re-dispatches them) and nothing may wait for a reconnect that never comes.
            self._stopping = True
            jobs = [r.job for r in self._runs.values() if r.job is not None]
            for job in jobs:
                job.cancel()
            if jobs:
                await asyncio.wait(jobs, timeout=5)
            pruner.cancel()
            probe.cancel()
            if self._batcher is not None:
                await self._batcher.close()
                self._batcher = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._own_http and self._http is not None:
                await self._http.close()
                self._http = None
            if self._metrics is not None:
                await self._metrics.cleanup()
                self._metrics, self.metrics_port = None, None

    async def _probe_llm(self) -> None:
        """At start: ask the LLM server for its models and warn, naming the URL and what to do, when it cannot
        be reached or has no model loaded. Never stops the node (the server may come later)."""
        url = self.cfg.llm_url
        assert self._http is not None
        try:
            models = await list_models(self._http, url, api_key=self.cfg.api_key,
                                       timeout=min(self.cfg.connect_timeout_s, PROBE_TIMEOUT_S))
        except LLMError as exc:
            if exc.code in (LLM_UNREACHABLE, LLM_STALL):
                todo = ("start LM Studio and its local server (Developer -> Start Server; port 1234 by default) or "
                        "the llama.cpp server, or correct node.llm_url")
            elif exc.code == LLM_HTTP and exc.status in (401, 403):
                todo = "set node.api_key / node.api_key_file to the server's API token"
            else:
                todo = "check that node.llm_url is the server's OpenAI-compatible base URL (ending in /v1)"
            log.warning("node %s: the LLM server at %s cannot be used (%s: %s). To fix: %s. The node runs on; "
                        "questions fail with %s until the server answers.", self.id, url, exc.code, exc, todo,
                        exc.code)
            return
        except Exception as exc:  # noqa: BLE001 - a check must never take the node down
            log.warning("node %s: checking the LLM server at %s failed: %r", self.id, url, exc)
            return
        self._models = models
        if not models:
            log.warning("node %s: the LLM server at %s has no model loaded: load one (LM Studio: the model picker "
                        "or `lms load <model>`); until then questions fail with llm_no_model.", self.id, url)
        elif self.cfg.model and self.cfg.model not in models:
            log.warning("node %s: node.model %r is not among the models the LLM server at %s lists (%s): load it, "
                        "or set node.model to one of them (\"\" = the first).", self.id, self.cfg.model, url,
                        ", ".join(models[:8]))
        else:
            log.info("node %s: LLM server at %s lists %d model(s): %s", self.id, url, len(models),
                     ", ".join(models[:8]))

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
        if self._stopping:
            return
        self._stopping = True
        self.state = "draining"
        grace = self.cfg.stop_grace_s if grace is None else grace
        client = self._client if self._connected.is_set() else None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                async with asyncio.timeout(2):
                    await client.unsubscribe(wire.TASK_FILTER)
                    await self._publish_beat(client)
        jobs = [r.job for r in self._runs.values() if r.job is not None]
        if jobs:
            log.info("node %s: draining %d running task(s) for up to %.0f s", self.id, len(jobs), grace)
            _, late = await asyncio.wait(jobs, timeout=grace) if grace > 0 else (set(), set(jobs))
            for job in late:
                job.cancel()
            if late:  # their Done(node_stopped) is published while the connection is still up
                await asyncio.wait(late, timeout=3)
        self.state = "offline"
        if self._connected.is_set() and self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                async with asyncio.timeout(2):
                    await self._client.publish(wire.node_topic(self.id), wire.encode(self._beat("offline")), qos=1)

    def _on_disconnect(self) -> None:
        self._connected.clear()
        self.stats.reconnects += 1

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(wire.TASK_FILTER, qos=1)
        self._connected.set()
        await self._publish_beat(client)
        stop = asyncio.Event()
        beat = asyncio.create_task(self._beat_loop(client, stop))
        try:
            async for msg in client.messages:
                self._handle(msg)
        finally:
            # The flag as well as the cancel: Python 3.11's asyncio.wait_for (inside aiomqtt's publish) can
            # swallow a cancellation that lands as the publish completes; the loop then ends at its next
            # check instead of sleeping on for ever (seen as a hung node shutdown in the huge-resume test).
            stop.set()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    def _beat(self, state: str) -> wire.Beat:
        return wire.Beat(node=self.id, state=state, active=len(self._runs), capacity=self.cfg.concurrency,  # type: ignore[arg-type]
                         models=self._models[:8] or None)

    async def _publish_beat(self, client: aiomqtt.Client) -> None:
        await client.publish(wire.node_topic(self.id), wire.encode(self._beat(self.state)), qos=0)

    async def _beat_loop(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        while self.state != "offline" and not stop.is_set():
            await asyncio.sleep(self.cfg.beat_s)
            if stop.is_set():
                return
            with contextlib.suppress(aiomqtt.MqttError):
                await self._publish_beat(client)

    # ---- inbound ---------------------------------------------------------------------------
    def _handle(self, msg: aiomqtt.Message) -> None:
        try:
            info = wire.parse_topic(str(msg.topic))
        except wire.WireError as exc:
            self.stats.bad_messages += 1
            self._warn.warning("topic", "node %s: dropped a message on %s: %s", self.id, str(msg.topic)[:200], exc)
            return
        if info.kind != "task":
            self.stats.bad_messages += 1
            self._warn.warning("topic", "node %s: dropped a message on %s (not a task topic)", self.id, msg.topic)
            return
        uid = info.key  # the publisher's own uid (the ACL): the only user anything here may concern
        try:
            m = wire.decode(msg.payload)  # type: ignore[arg-type]
        except wire.WireError as exc:
            self._bad_request(uid, None if exc.hint == "too_large" else _recover_id(msg.payload), str(exc))
            return
        if isinstance(m, wire.Task):
            if m.uid != uid:
                self._bad_request(uid, m.id, f"task uid {m.uid!r} is not its topic's uid {uid!r}")
                return
            self._on_task(m)
        elif isinstance(m, wire.Cancel):
            run = self._runs.get((uid, m.id))  # only the uid's own task: another user's id is not found
            if run is None:
                self.stats.unknown_cancels += 1
            elif run.job is not None and not run.cancelled:
                run.cancelled = True
                run.job.cancel()
        else:
            self._bad_request(uid, getattr(m, "id", None),
                              f"a {type(m).__name__.lower()} message on a task topic (only task and cancel go there)")

    def _bad_request(self, uid: str, tid: bytes | None, hint: str) -> None:
        """A malformed message on ``uid``'s task topic: counted, logged (at most every LOG_EVERY_S), and, when
        its task id could be read, answered with ``done`` error ``bad_request`` on the uid's reply topic --
        unless that id is one of the uid's own tasks here (running or answered): those are never ended by it."""
        self.stats.bad_messages += 1
        key = (uid, tid) if tid is not None else None
        if key is None or key in self._runs or key in self._recent or self._stored_reply(key) is not None:
            self._warn.warning("bad", "node %s: malformed message from %s dropped: %s", self.id, uid, hint[:300])
            return
        self._warn.warning("bad", "node %s: malformed message from %s answered bad_request: %s", self.id, uid,
                           hint[:300])
        self.stats.bad_requests += 1
        self._refuse(uid, tid, "bad_request", BAD_REQUEST_MSG, hint)

    def _refuse(self, uid: str, tid: bytes, code: str, msg: str, hint: str | None = None) -> None:
        """End a task the node does not take with ``done`` error ``code``; nothing of it is kept."""
        err = wire.Err(code=code, msg=msg, hint=hint[:256] if hint else None)
        self._spawn_publish(wire.reply_topic(uid), wire.Done(id=tid, seq=0, status="error", err=err))

    def _over_limit(self, uid: str) -> tuple[str, str] | None:
        """(code, message) when a new task of ``uid`` would exceed node.max_pending_per_uid or node.max_pending."""
        if len(self._turns.get(uid, ())) >= self.cfg.max_pending_per_uid:
            return "rate_limited", RATE_LIMITED_MSG.format(n=self.cfg.max_pending_per_uid)
        if len(self._runs) >= self.cfg.max_pending:
            return "node_busy", NODE_BUSY_MSG
        return None

    def _on_task(self, task: wire.Task) -> None:
        key = (task.uid, task.id)
        topic = wire.reply_topic(task.uid)
        first = task.replay or 1
        run = self._runs.get(key)
        if run is not None:  # republished while we have it: re-confirm, replay what was sent
            self.stats.duplicates += 1
            queue = 0 if run.started else self._position(key)
            self._spawn_replay(topic, key, queue, list(run.chunks), None, first)
            return
        stored = self._recent.get(key) or self._stored_reply(key)
        if stored is not None:  # already answered (maybe before a restart): replay it, never run it twice
            self.stats.duplicates += 1
            chunks, done = stored
            self._spawn_replay(topic, key, 0, chunks, done, first)
            return
        if self._stopping:
            return  # a new task, not accepted: the edge re-sends it to a node that is up (replays still served)
        if task.replay is not None:  # a replay request for a task we do not have (we restarted): not a dispatch
            self.stats.unknown_replays += 1
            self._warn.info("replay", "node %s: replay of unknown task %s of %s asked; ignored", self.id,
                               task.id.hex()[:8], task.uid)
            return
        over = self._over_limit(task.uid)
        if over is not None:
            code, text = over
            if task.uid.startswith(_DEVICE_UID):  # a device is told at once; its question is not kept
                self.stats.rate_limited += 1
                self._refuse(task.uid, task.id, code, text)
            else:  # the edge's task is not accepted: the edge keeps it and sends it again every republish_s
                self.stats.deferred += 1
            self._warn.warning(code, "node %s: task of %s not taken (%s: %d of its tasks, %d in all held)", self.id,
                               task.uid, code, len(self._turns.get(task.uid, ())), len(self._runs))
            return
        self.stats.tasks += 1
        run = _Run(task, topic)
        self._runs[key] = run
        self._waiting.append(key)
        turns = self._turns.setdefault(task.uid, deque())
        turns.append(run)
        if len(turns) == 1:
            run.turn.set()
        run.job = asyncio.create_task(self._run_task(run), name=f"task-{task.id.hex()[:8]}")

    def _spawn_replay(self, topic: str, key: Key, queue: int, chunks: list[str], done: wire.Done | None,
                      first: int = 1) -> None:
        """Accept, then every chunk sent so far from seq ``first`` (and the Done if finished): the edge's
        stream drops what it has and fills its gaps (an edge that restarted mid-answer starts from seq 1
        again; one that saw a gap asks from the first missing seq)."""
        if chunks or done is not None:
            self.stats.replays += 1

        if key in self._replaying:
            return  # one replay per task at a time: the edge asks again if it still misses something
        tid = key[1]
        msgs: list[wire.Message] = [wire.Accept(id=tid, node=self.id, queue=queue)]
        msgs += [wire.Delta(id=tid, seq=seq, text=chunks[seq - 1]) for seq in range(first, len(chunks) + 1)]
        if done is not None:
            msgs.append(done)

        async def go() -> None:
            self._replaying.add(key)
            try:
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    if self._batched(topic):  # all queued at once (in order), one wait for the last batch
                        await asyncio.gather(*[self._batcher.enqueue(m) for m in msgs])  # type: ignore[union-attr]
                    else:
                        for m in msgs:
                            await self._publish(topic, m)
            finally:
                self._replaying.discard(key)
        asyncio.create_task(go())

    def _next_turn(self, run: _Run) -> None:
        """``run`` is over (done, failed or cancelled while waiting): the user's next task may start."""
        turns = self._turns.get(run.task.uid)
        if turns is None:
            return
        with contextlib.suppress(ValueError):
            turns.remove(run)
        if turns:
            turns[0].turn.set()
        else:
            del self._turns[run.task.uid]

    def _position(self, key: Key) -> int:
        try:
            return self._waiting.index(key) + 1
        except ValueError:
            return 0

    def _spawn_publish(self, topic: str, msg: wire.Message) -> None:
        async def go() -> None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await self._publish(topic, msg)
        asyncio.create_task(go())

    async def _publish(self, topic: str, msg: wire.Message) -> None:
        """Publish QoS 1, waiting for the connection and retrying across reconnects (seq dedups). Replies
        for the edge go in batches (``node.batch_replies``); a device's stay on its own reply topic."""
        if self._batched(topic):
            await self._batcher.send(msg)  # type: ignore[union-attr, arg-type]
            return
        await self._publish_payload(topic, wire.encode(msg))

    def _batched(self, topic: str) -> bool:
        return self._batcher is not None and topic.startswith(_REPLY_PREFIX) and not topic.startswith(_DEVICE_REPLY)

    async def _publish_payload(self, topic: str, payload: bytes) -> None:
        failures = 0
        while True:
            if not self._connected.is_set():
                if self._stopping:
                    raise aiomqtt.MqttError("not connected and the node is stopping")
                await self._connected.wait()
            assert self._client is not None
            try:
                await self._client.publish(topic, payload, qos=1)
                return
            except aiomqtt.MqttError as exc:
                # Retry (seq/id make a duplicate harmless). The connection flag is the session's to clear: a
                # PUBACK that merely took > 10 s ("Operation timed out") on a live link must not stop every
                # later publish while beats still say "online".
                log.debug("node %s: publish failed (%s); retrying", self.id, exc)
                failures += 1
                await asyncio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))

    # ---- one task --------------------------------------------------------------------------
    async def _run_task(self, run: _Run) -> None:
        task = run.task
        t_rx = now_us()
        status, err, seq, usage = "ok", None, 0, None
        timing: dict[str, int] = {"n_rx": t_rx}
        try:
            queued = self._position(run.key) if self._slots.locked() or not run.turn.is_set() else 0
            # Batched: queued now, not awaited — the LLM request starts at once instead of after a broker
            # round trip (the batcher keeps the order: this Accept leaves before the task's first Delta).
            accept = wire.Accept(id=task.id, node=self.id, queue=queued)
            if self._batched(run.topic):
                self._batcher.enqueue(accept)  # type: ignore[union-attr]
            else:
                await self._publish(run.topic, accept)
            # One answer at a time per user, in the order the tasks arrived (a user's answers never
            # overtake each other, and one user cannot take every slot); then a free slot.
            await run.turn.wait()
            async with self._slots:
                self._waiting.remove(run.key)
                run.started = True
                if queued:
                    self._spawn_publish(run.topic, wire.Accept(id=task.id, node=self.id, queue=0))
                seq, usage = await self._generate(run, timing)
        except asyncio.CancelledError:
            status = "cancelled"
            seq = getattr(run, "last_seq", 0)
            if not run.cancelled:  # node shutting down
                status, err = "error", wire.Err(code="node_stopped", msg="服务器 B 正在停止，本次回答已中断，请稍后重试。")
        except LLMError as exc:
            status, seq = "error", getattr(run, "last_seq", 0)
            err = wire.Err(code=exc.code, msg=exc.user_message)
            self.stats.by_code[exc.code] = self.stats.by_code.get(exc.code, 0) + 1
            log.warning("node %s: task %s failed: %s", self.id, task.id.hex()[:8], exc)
        except Exception as exc:  # a bug must still end the task with a clear error, never silence
            status, seq = "error", getattr(run, "last_seq", 0)
            err = wire.Err(code="node_internal", msg="服务器 B 内部错误，请稍后重试。")
            log.exception("node %s: task %s crashed: %s", self.id, task.id.hex()[:8], exc)
        finally:
            if run.key in self._waiting:
                self._waiting.remove(run.key)
            self._next_turn(run)
        timing["n_done"] = now_us()
        self.stages.observe("answer_total", timing["n_done"] - t_rx)
        done = wire.Done(id=task.id, seq=seq, status=status, err=err, usage=usage, timing=timing)  # type: ignore[arg-type]
        try:
            if self._stopping:  # never hang a shutdown on a broker that is gone
                with contextlib.suppress(asyncio.TimeoutError, aiomqtt.MqttError):
                    async with asyncio.timeout(3):
                        await self._publish(run.topic, done)
            else:
                await self._publish(run.topic, done)
        finally:
            self._remember_reply(run.key, run.chunks[:seq], done)  # first: a replay request never finds neither
            self._runs.pop(run.key, None)
            setattr(self.stats, status if status != "error" else "errors",
                    getattr(self.stats, status if status != "error" else "errors") + 1)

    # ---- reply log (memory + node.lmdb) -----------------------------------------------------
    def _open_reply_log(self) -> None:
        if self._writer is not None:
            return
        secure_tree(self.s.data_dir)  # files 0600, directories 0700 (core.perms)
        self._log_env = open_env(Path(self.s.data_dir) / "node.lmdb", max_dbs=2)
        self._log_db = open_db(self._log_env, REPLY_DB)
        try:
            old = open_db(self._log_env, OLD_REPLY_DB, create=False)
        except lmdb.NotFoundError:
            old = None
        if old is not None:  # keyed by the task id alone: it cannot tell users apart, so it goes
            with self._log_env.begin(write=True) as txn:
                n = txn.stat(old)["entries"]
                txn.drop(old, delete=True)
            log.info("node %s: dropped the reply log of an earlier version (%d answers, not kept per user)",
                     self.id, n)
        self._writer = Writer(self._log_env, name="node-lmdb-writer")

    def _stored_reply(self, key: Key) -> tuple[list[str], wire.Done] | None:
        if self._log_env is None:
            return None
        with self._log_env.begin(db=self._log_db) as txn:
            raw = txn.get(_log_key(key))
        if raw is None:
            return None
        try:
            d = cbor2.loads(raw)
            done = wire.decode(d["d"])
            assert isinstance(done, wire.Done)
            return [str(c) for c in d["c"]], done
        except Exception:  # noqa: BLE001 - a damaged entry is a miss (the task then runs again)
            return None

    async def _prune_loop(self) -> None:
        """At start and hourly: forget replies older than REPLY_LOG_AGE_S, and the oldest beyond
        REPLY_LOG_MAX (the edge gives up re-sending long before)."""
        while True:
            with contextlib.suppress(Exception):
                old = await asyncio.to_thread(self._prune_scan)
                if old and self._writer is not None:
                    db = self._log_db

                    def op(txn: Any) -> None:
                        for k in old:
                            txn.delete(k, db=db)

                    await self._writer.write(op)
            await asyncio.sleep(3600)

    def _prune_scan(self) -> list[bytes]:
        horizon = time.time() - REPLY_LOG_AGE_S
        entries: list[tuple[float, bytes]] = []
        with self._log_env.begin(db=self._log_db) as txn:
            for k, raw in txn.cursor():
                try:
                    entries.append((float(cbor2.loads(raw)["t"]), bytes(k)))
                except Exception:  # noqa: BLE001
                    entries.append((0.0, bytes(k)))
        entries.sort()
        excess = max(0, len(entries) - REPLY_LOG_MAX)
        return [k for i, (t, k) in enumerate(entries) if i < excess or t < horizon]

    def _remember_reply(self, key: Key, chunks: list[str], done: wire.Done) -> None:
        if self._writer is not None:
            k, db = _log_key(key), self._log_db
            raw = cbor2.dumps({"c": chunks, "d": wire.encode(done), "t": time.time()})
            self._writer.submit(lambda txn: txn.put(k, raw, db=db))
        self._recent[key] = (chunks, done)
        self._recent_bytes += sum(len(c) for c in chunks)
        while len(self._recent) > REPLY_LOG_MAX or self._recent_bytes > REPLY_LOG_BYTES:
            _, (old, _) = self._recent.popitem(last=False)
            self._recent_bytes -= sum(len(c) for c in old)

    async def _resolve_model(self) -> str:
        if self.cfg.model:
            return self.cfg.model
        loop = asyncio.get_running_loop()
        if self._model is None or loop.time() - self._model_at > 60:
            assert self._http is not None
            models = await list_models(self._http, self.cfg.llm_url, api_key=self.cfg.api_key,
                                       timeout=self.cfg.connect_timeout_s)
            self._models = models
            self._model = models[0] if models else ""
            self._model_at = loop.time()
        return self._model

    def _history_for(self, task: wire.Task) -> list[dict[str, str]]:
        """The conversation's previous turns to send: the newest that fit ``node.history_tokens`` (estimated)
        and ``node.history_turns``."""
        return trim_history(self._history.get((task.uid, task.conv or ""), []), self.cfg.history_tokens,
                            self.cfg.history_turns)

    def _messages(self, task: wire.Task, history: list[dict[str, str]]) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        msgs += history
        msgs.append({"role": "user", "content": task.text})
        return msgs

    def _remember(self, task: wire.Task, history: list[dict[str, str]], answer: str) -> None:
        """The conversation is now ``history`` (what was sent with the question: older turns that no longer fit,
        or all of them after a context-size error, are gone for good) plus this turn."""
        key = (task.uid, task.conv or "")
        self._history.pop(key, None)  # re-inserted last: the oldest conversations go first
        hist = history + [{"role": "user", "content": task.text}, {"role": "assistant", "content": answer}]
        self._history[key] = trim_history(hist, self.cfg.history_tokens, self.cfg.history_turns)
        if len(self._history) > 10000:
            self._history.pop(next(iter(self._history)))

    async def _generate(self, run: _Run, timing: dict[str, int]) -> tuple[int, dict[str, int] | None]:
        """Stream the LLM answer as coalesced Delta chunks; return (last seq, usage)."""
        task, topic = run.task, run.topic
        model = await self._resolve_model()
        answer: list[str] = []
        usage: dict[str, int] | None = None
        run.last_seq = 0  # type: ignore[attr-defined]
        batched = self._batched(topic)
        seq = 0

        def send(text: str) -> asyncio.Future[None]:
            nonlocal seq
            seq += 1
            # Every chunk carries its publish time (wall-clock µs) so a receiver can measure per-chunk relay
            # latency (``claw bench``); it adds 23 bytes of CBOR to a chunk. The first chunk also carries the
            # task's timing so far (n_rx, n_ft).
            extra = {"n_pub": now_us()}
            if extra["n_pub"] - co.first_us >= TOKEN_WAIT_US:
                # the chunk's oldest text waited in the coalescer (a chunk in flight, the window): the
                # receiver measures the relay from n_tok, when that text came from the LLM
                extra["n_tok"] = co.first_us
            if seq == 1:
                timing["n_pub1"] = extra["n_pub"]
                extra = {**timing, **extra}
            run.chunks.append(text)  # before the publish: a replay racing it must include it
            delta = wire.Delta(id=task.id, seq=seq, text=text, timing=extra)
            if batched:
                return self._batcher.enqueue(delta)  # type: ignore[union-attr]
            return asyncio.ensure_future(self._publish(topic, delta))

        def acked(n: int, ns: int) -> None:
            run.last_seq = n  # type: ignore[attr-defined]
            self.stats.chunks += 1
            self.stages.observe("publish", ns // 1000)

        co = Coalescer(send, window=self.cfg.coalesce_ms / 1000.0, max_bytes=self.cfg.coalesce_bytes,
                       max_chunk=MAX_CHUNK_BYTES, acked=acked)
        assert self._http is not None
        first = True

        def on_event(kind: str, text: str) -> None:  # from the LLM connection's read callback, per delta
            nonlocal first
            if kind == "text" and text:
                if first:
                    timing["n_ft"] = now_us()
                    self.stages.observe("llm_first_token", timing["n_ft"] - timing["n_rx"])
                    first = False
                co.push(text)  # raises a failed publish (which ends the stream and is raised by chat())
                answer.append(text)

        history = self._history_for(task)
        try:
            while True:
                try:
                    # Cancelling this (a stop, a stopping node) or an error closes the HTTP stream at once, which
                    # makes LM Studio stop generating and frees its slot.
                    raw_usage, finish = await chat(
                        self._http, self.cfg.llm_url, on_event=on_event, model=model,
                        messages=self._messages(task, history), api_key=self.cfg.api_key,
                        max_tokens=self.cfg.max_tokens, first_token_timeout=self.cfg.first_token_timeout_s,
                        stall_timeout=self.cfg.stall_timeout_s, connect_timeout=self.cfg.connect_timeout_s)
                    break
                except LLMError as exc:
                    if exc.code != LLM_CONTEXT:
                        raise
                    if answer:  # cut off mid-answer (text already sent): no retry; this history must not return
                        self._history.pop((task.uid, task.conv or ""), None)
                        exc.user_message += CONTEXT_RESET_NOTE
                        raise
                    if not history:
                        raise  # the question alone does not fit: the user is told (llm_context)
                    # The prompt does not fit the model's context: once more without the history (the next
                    # question starts from this one, so the conversation never stays over the limit).
                    self.stats.context_retries += 1
                    log.warning("node %s: task %s: the prompt with %d previous turn(s) (~%d tokens estimated) "
                                "does not fit the model's context (%s); sending the question again without them "
                                "(lower node.history_tokens to avoid this)", self.id, task.id.hex()[:8],
                                len(history) // 2, sum(message_tokens(m) for m in history), exc)
                    history = []
            if finish == "length":  # max_tokens reached (or the context filled up): say so, in every channel
                self.stats.length_limited += 1
                log.info("node %s: task %s: the model stopped at its length limit (finish_reason length, "
                         "node.max_tokens = %d)", self.id, task.id.hex()[:8], self.cfg.max_tokens)
                co.push(LENGTH_NOTE)
            if raw_usage is not None:
                usage = {k: int(v) for k, v in raw_usage.items() if isinstance(v, int)}
        finally:
            # Let the last chunks go out (so Done.seq is exact); on cancellation the text not yet sent is
            # dropped, on an LLM error it is still flushed.
            drained = co.finish(drop=run.cancelled)
            if not drained.done() and self._stopping and not self._connected.is_set():
                co.abandon()  # stopping without a broker: nothing more goes out, not even after a reconnect
            else:
                await asyncio.shield(drained)
        self._remember(task, history, "".join(answer))
        return run.last_seq, usage  # type: ignore[attr-defined]
