"""Sending an answer again: the edge asks for a task it already has here (running or finished) when it lost
the stream or saw a gap; it gets an ``Accept``, every chunk from the seq it asks for, and the ``Done`` if the
answer is finished. The edge's stream drops what it has and fills its gaps (an edge that restarted mid-answer
starts from seq 1 again; one that saw a gap asks from the first missing seq)."""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt

import wire

from .admission import Key
from .session import Link

__all__ = ["Replayer"]


class Replayer:
    """One replay per task at a time: a request while one is being sent is dropped (the edge asks again if it
    still misses something)."""

    def __init__(self, node_id: str, link: Link) -> None:
        self.id = node_id
        self.link = link
        self.active: set[Key] = set()  # tasks whose replay is being sent

    def spawn(self, topic: str, key: Key, queue: int, chunks: list[str], done: wire.Done | None,
              first: int = 1) -> None:
        """Send, in a task of its own, the Accept (with ``queue``), chunks ``first``.. and ``done`` if given."""
        if key in self.active:
            return
        tid = key[1]
        msgs: list[wire.Message] = [wire.Accept(id=tid, node=self.id, queue=queue)]
        msgs += [wire.Delta(id=tid, seq=seq, text=chunks[seq - 1]) for seq in range(first, len(chunks) + 1)]
        if done is not None:
            msgs.append(done)
        link = self.link

        async def go() -> None:
            self.active.add(key)
            try:
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    if link.batched(topic):  # all queued at once (in order), one wait for the last batch
                        await asyncio.gather(*[link.batcher.enqueue(m) for m in msgs])  # type: ignore[union-attr]
                    else:
                        for m in msgs:
                            await link.publish(topic, m)
            finally:
                self.active.discard(key)
        asyncio.create_task(go())
