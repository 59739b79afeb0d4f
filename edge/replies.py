"""Reply intake: the nodes' MQTT messages in, stream events applied, frames out to the tasks' sinks, the end of
a task.

Replies run through each task's ``wire.TaskStream`` (duplicates dropped, gaps held, ``Done`` trusted only when
complete). A batch (the replies of many tasks from one node) is one transaction: its chunks are kept in one LMDB
write at the end of the pass, and only then are its frames handed to the sinks and its finished tasks announced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import lmdb

import wire
from core.metrics import Stages
from core.runtime import now_us

from . import frames
from .dispatch import Dispatcher
from .frames import Frame
from .stats import BridgeStats
from .store import TaskStore
from .tasks import LiveTask, TaskRegistry

log = logging.getLogger("edge.bridge")  # the bridge's log: one logger for all of its parts

NODE_LOST_MSG = "与服务器 B 的连接中断，本次回答未能完成，请重新提问。"
# Stage latencies observed from the replies' timing maps (wall-clock µs; stages that span both servers
# include their clock offset, and negative values are counted as skew): ``/metrics``
# ``claw_edge_stage_seconds{stage=...}``.
EDGE_STAGES = ("edge_to_node", "llm_first_token", "first_token_to_publish", "chunk_node_to_edge",
               "ask_to_first_chunk", "done_node_to_edge")


def node_lost() -> dict[str, str]:
    """The error a task ends with when its node is gone (or ran it a second time)."""
    return {"code": "node_lost", "msg": NODE_LOST_MSG}


class ReplyIntake:
    def __init__(self, store: TaskStore, tasks: TaskRegistry, dispatch: Dispatcher, stats: BridgeStats,
                 on_beat: Callable[[wire.Beat], None], loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.tasks = tasks
        self.dispatch = dispatch
        self.stats = stats
        self.stages = Stages(EDGE_STAGES)
        self.on_finished: list[Callable[[LiveTask], None]] = []
        self._on_beat = on_beat
        self._loop = loop
        self._live = tasks.live
        self._chunk_buf: list[tuple[bytes, int, str]] | None = None  # while a batch is handled (see on_message)
        self._out_buf: list[tuple[Any, Frame]] | None = None  # frames for sinks, ditto
        self._fin_buf: list[LiveTask] = []  # tasks finished in that batch: on_finished runs after its frames

    # ---- messages in ------------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes) -> None:
        """One MQTT message from the bridge's subscriptions (replies, batches, node beats)."""
        try:
            info = wire.parse_topic(topic)
            msg = wire.decode(payload)
        except wire.WireError as exc:
            self.stats.bad_messages += 1
            log.warning("edge: dropped bad message on %s: %s", topic[:200], exc)
            return
        if info.kind == "node":
            if isinstance(msg, wire.Beat) and msg.node == info.key:
                self._on_beat(msg)
            else:
                self.stats.bad_messages += 1
            return
        if info.kind == "batch":  # the replies of many tasks from one node (node.batch_replies)
            if isinstance(msg, wire.Batch) and msg.node == info.key:
                self.stats.batches += 1
                self._on_batch(msg)
            else:
                self.stats.bad_messages += 1
            return
        if info.kind != "reply" or not isinstance(msg, (wire.Accept, wire.Delta, wire.Done)):
            return
        self._on_reply(msg, info.key)

    def _on_batch(self, msg: wire.Batch) -> None:
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

    def _on_reply(self, msg: wire.Accept | wire.Delta | wire.Done, uid: str | None) -> None:
        """One reply, from its user's reply topic (``uid``) or from a node's batch (None: the broker's ACL
        lets a node publish replies for any user either way)."""
        self.stats.replies += 1
        live = self._live.get(msg.id)
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
        if live.stream.next_seq != before or (isinstance(msg, wire.Accept) and not live.stream.missing):
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
                    live.stream.keep_only(live.shown)
                    self.finish(live, "error", node_lost(), None, text="".join(live.shown))
                    return
                if ev.seq == len(live.shown):
                    live.shown = None  # the replay caught up: from here on it is one stream again
            elif self._chunk_buf is not None:
                self._chunk_buf.append((live.rec.id, ev.seq, ev.text))
            else:
                self.store.add_chunk(live.rec.id, ev.seq, ev.text)
            if ev.timing is not None:
                self._observe_chunk(live, ev.seq, ev.timing)
            frame = frames.delta(live.hex, ev.seq, ev.text)
            traced: Frame = frame
            if (live.trace or live.held is not None) and ev.timing is not None:
                # Tracing (``claw bench tunnel``): only sinks whose ask had "trace": true get the Delta's
                # timing (node publish time n_pub, ...) plus e_fwd, when the edge forwarded it; others
                # see the unchanged frame.
                traced = frames.traced(frame, ev.timing, now_us())
            self.emit(live, frame, traced)
        elif isinstance(ev, wire.Accepted):
            if live.rec.status == "pending":
                live.rec = self.store.update(live.rec.id, status="accepted", node=ev.node) or live.rec
            self.dispatch.next(live.rec.uid)
            accepted = frames.accepted(live.hex, ev.queue)
            self.emit(live, accepted, accepted)
        elif isinstance(ev, wire.Finished):
            if ev.timing is not None:
                n_done = ev.timing.get("n_done")
                # A Done generated before this edge's last dispatch of the task is a replay from the
                # node's reply log (e.g. after an edge restart): its latency would be the downtime.
                if n_done is not None and n_done >= live.pub_us:
                    self.stages.observe("done_node_to_edge", now_us() - n_done)
            err = {"code": ev.err.code, "msg": ev.err.msg} if ev.err else None
            self.finish(live, ev.status, err, ev.usage, ev.timing)
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

    # ---- frames out -------------------------------------------------------------------------
    def emit(self, live: LiveTask, frame: Frame, traced: Frame) -> None:
        """Push a frame to the task's sinks (``traced`` to those that asked for timing), or hold it while the
        task is not acknowledged yet (see ``Bridge.submit(hold=True)``)."""
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

    @staticmethod
    def release(live: LiveTask) -> None:
        """Send the frames held since the task was submitted (in order) and stop holding."""
        held, live.held = live.held, None
        for frame, traced in held or ():
            for sink in live.sinks:
                sink.push(traced if sink in live.trace else frame)

    # ---- the end of a task ------------------------------------------------------------------
    def finish(self, live: LiveTask, status: str, err: dict[str, str] | None,
               usage: dict[str, int] | None, timing: dict[str, int] | None = None,
               text: str | None = None) -> None:
        """End the task (once): its final record, the user's next task sent, the ``done`` frame, then the
        ``on_finished`` listeners (after the frames of the batch in hand, if any)."""
        if live.finished_at is not None:
            return
        self.tasks.finished(live)
        self.tasks.count(live.rec.uid, -1)
        if text is None:
            text = live.stream.text
        # The chunks kept for the restart check go only once the final record is committed: dropped before it,
        # an edge killed in between would find the task unfinished with no chunks, and could not tell a
        # re-run of it (different text) from a replay.
        tid = live.rec.id
        live.rec = self.store.update(tid, on_durable=lambda: self._drop_chunks_soon(tid), status=status,
                                     answer=text, err=err, usage=usage) or live.rec
        self.dispatch.next(live.rec.uid)
        self.stats.finished[status] = self.stats.finished.get(status, 0) + 1
        frame = frames.done(live.hex, live.stream.next_seq - 1, status, text, err, usage)
        traced: Frame = frame
        if (live.trace or live.held is not None) and timing is not None:  # the Done's timing + e_fwd, as for deltas
            traced = frames.traced(frame, timing, now_us())
        self.emit(live, frame, traced)
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

    def _drop_chunks_soon(self, tid: bytes) -> None:
        """From the store's writer thread: drop the chunks on the loop (after any batch pass adding them)."""
        try:
            self._loop.call_soon_threadsafe(self.drop_chunks, tid)
        except RuntimeError:  # the loop is closed (shutdown): the next start's prune_chunks drops them
            pass

    def drop_chunks(self, tid: bytes) -> None:
        try:
            self.store.drop_chunks(tid)
        except lmdb.Error as exc:  # never let a full edge-chunks.lmdb cost the user the done frame
            log.error("edge: chunks of task %s not dropped from edge-chunks.lmdb: %s", tid.hex()[:8], exc)
