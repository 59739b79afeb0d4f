"""One answer: the prompt (system prompt, the conversation's history, the question) sent to the LLM, its
stream published as coalesced ``Delta`` chunks, and the turn remembered in the conversation.

Deltas from the LLM are coalesced (:class:`node.coalescer.Coalescer`): the first one goes out at once, later
ones are gathered for ``coalesce_ms`` (or until ``coalesce_bytes`` wait) while the previous chunk's QoS 1
PUBACK is awaited, so a task costs one MQTT message per window instead of one per token. A prompt that does
not fit the model's context is sent once more without the history; an answer the model ended at its length
limit ends with ``LENGTH_NOTE``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import wire
from core.config import NodeSettings
from core.metrics import Stages
from core.runtime import now_us

from .admission import Run
from .coalescer import Coalescer
from .history import Conversations, message_tokens
from .llm import LLM_CONTEXT, LLMError, chat
from .session import Link
from .upstream import Upstream

__all__ = ["CONTEXT_RESET_NOTE", "LENGTH_NOTE", "MAX_CHUNK_BYTES", "TOKEN_WAIT_US", "Generator"]

log = logging.getLogger(__name__)

TOKEN_WAIT_US = 1000  # a chunk whose text waited this long in the coalescer carries timing.n_tok too
MAX_CHUNK_BYTES = 64 * 1024  # one Delta's text at most (wire.MAX_PAYLOAD is 256 KiB for the whole message)
# The last chunk of an answer the model ended with finish_reason "length" (max_tokens, or its context full).
LENGTH_NOTE = "\n\n（回答已达到长度上限，可能不完整。）"
# Added to the message of an answer cut off because it filled the model's context (the history is dropped).
CONTEXT_RESET_NOTE = "之前的对话记录已清除，下一个问题将开始新的对话。"


class Counts(Protocol):
    """The node's counters an answer adds to."""

    chunks: int
    context_retries: int
    length_limited: int


class Generator:
    """Answers tasks with the LLM behind ``upstream``, publishing through ``link``. Stages observed:
    ``llm_first_token`` and ``publish`` (one Delta's publish until its acknowledgement)."""

    def __init__(self, node_id: str, cfg: NodeSettings, *, link: Link, upstream: Upstream,
                 conversations: Conversations, counts: Counts, stages: Stages) -> None:
        self.id = node_id
        self.cfg = cfg
        self.link = link
        self.upstream = upstream
        self.conversations = conversations
        self.counts = counts
        self.stages = stages

    def messages(self, task: wire.Task, history: list[dict[str, str]]) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        msgs += history
        msgs.append({"role": "user", "content": task.text})
        return msgs

    async def generate(self, run: Run, timing: dict[str, int]) -> tuple[int, dict[str, int] | None]:
        """Stream the LLM answer as coalesced Delta chunks; return (last seq, usage). ``run.last_seq`` follows
        the acknowledged chunks, also when this raises."""
        task, topic = run.task, run.topic
        model = await self.upstream.model()
        answer: list[str] = []
        usage: dict[str, int] | None = None
        run.last_seq = 0
        link = self.link
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
            return link.send(topic, wire.Delta(id=task.id, seq=seq, text=text, timing=extra))

        def acked(n: int, ns: int) -> None:
            run.last_seq = n
            self.counts.chunks += 1
            self.stages.observe("publish", ns // 1000)

        co = Coalescer(send, window=self.cfg.coalesce_ms / 1000.0, max_bytes=self.cfg.coalesce_bytes,
                       max_chunk=MAX_CHUNK_BYTES, acked=acked)
        http = self.upstream.http
        assert http is not None
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

        conv = task.conv or ""
        history = self.conversations.history(task.uid, conv)
        try:
            while True:
                try:
                    # Cancelling this (a stop, a stopping node) or an error closes the HTTP stream at once, which
                    # makes LM Studio stop generating and frees its slot.
                    raw_usage, finish = await chat(
                        http, self.cfg.llm_url, on_event=on_event, model=model,
                        messages=self.messages(task, history), api_key=self.cfg.api_key,
                        max_tokens=self.cfg.max_tokens, first_token_timeout=self.cfg.first_token_timeout_s,
                        stall_timeout=self.cfg.stall_timeout_s, connect_timeout=self.cfg.connect_timeout_s)
                    break
                except LLMError as exc:
                    if exc.code != LLM_CONTEXT:
                        raise
                    if answer:  # cut off mid-answer (text already sent): no retry; this history must not return
                        self.conversations.forget(task.uid, conv)
                        exc.user_message += CONTEXT_RESET_NOTE
                        raise
                    if not history:
                        raise  # the question alone does not fit: the user is told (llm_context)
                    # The prompt does not fit the model's context: once more without the history (the next
                    # question starts from this one, so the conversation never stays over the limit).
                    self.counts.context_retries += 1
                    log.warning("node %s: task %s: the prompt with %d previous turn(s) (~%d tokens estimated) "
                                "does not fit the model's context (%s); sending the question again without them "
                                "(lower node.history_tokens to avoid this)", self.id, task.id.hex()[:8],
                                len(history) // 2, sum(message_tokens(m) for m in history), exc)
                    history = []
            if finish == "length":  # max_tokens reached (or the context filled up): say so, in every channel
                self.counts.length_limited += 1
                log.info("node %s: task %s: the model stopped at its length limit (finish_reason length, "
                         "node.max_tokens = %d)", self.id, task.id.hex()[:8], self.cfg.max_tokens)
                co.push(LENGTH_NOTE)
            if raw_usage is not None:
                usage = {k: int(v) for k, v in raw_usage.items() if isinstance(v, int)}
        finally:
            # Let the last chunks go out (so Done.seq is exact); on cancellation the text not yet sent is
            # dropped, on an LLM error it is still flushed.
            drained = co.finish(drop=run.cancelled)
            if not drained.done() and link.stopping and not link.connected.is_set():
                co.abandon()  # stopping without a broker: nothing more goes out, not even after a reconnect
            else:
                await asyncio.shield(drained)
        self.conversations.remember(task.uid, conv, history, task.text, "".join(answer))
        return run.last_seq, usage
