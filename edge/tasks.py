"""The edge's live tasks: what one task is while it runs, and the registry that holds them until they expire.

``TaskRegistry`` keeps every task by id (``live``), the unfinished ones apart (what the housekeeping scans), the
finished ones by the time they finished (forgotten ``FINISHED_KEEP_S`` later), which sinks follow which task, and
how many unfinished tasks each user has.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import wire

from .frames import Frame
from .store import TaskRecord

FINISHED_KEEP_S = 120.0  # a finished task stays in the registry this long (late replies, resumes, retries)


class Sink(Protocol):
    """A client connection that frames are pushed to (must not block; bounded by the sink)."""

    def push(self, frame: Frame) -> None: ...


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
    asks: int = 0  # replay requests since the node last answered one (see edge.repair)
    held: list[tuple[Frame, Frame]] | None = None  # frames before the ack (Bridge.submit(hold=True))

    @property
    def hex(self) -> str:
        return self.rec.id.hex()


def _done_future() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_event_loop().create_future()
    fut.set_result(None)
    return fut


class TaskRegistry:
    """Every task the edge knows by id, with the indexes the hot paths need (no scan of all of them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.live: dict[bytes, LiveTask] = {}
        # The unfinished ones of ``live`` (what the housekeeping scans), and the finished ones by the time
        # they finished (kept FINISHED_KEEP_S, then forgotten): under load ``live`` holds tens of thousands
        # of finished tasks, and a scan of all of them every tick stalled every stream for ~20 ms.
        self._open: dict[bytes, LiveTask] = {}
        self._expiry: deque[tuple[float, bytes]] = deque()
        self._attached: dict[Sink, set[LiveTask]] = {}  # sink -> the tasks it is attached to (detach_all)
        self._pending: dict[str, int] = {}  # uid -> unfinished tasks (see pending())

    # ---- the tasks --------------------------------------------------------------------------
    def get(self, tid: bytes) -> LiveTask | None:
        return self.live.get(tid)

    def track(self, live: LiveTask) -> None:
        tid = live.rec.id
        self.live[tid] = live
        if live.finished_at is None:
            self._open[tid] = live
        else:
            self._expiry.append((live.finished_at, tid))

    def untrack(self, tid: bytes) -> None:
        self.live.pop(tid, None)
        self._open.pop(tid, None)

    def finished(self, live: LiveTask) -> None:
        """Mark the task finished now: out of the scans, forgotten after FINISHED_KEEP_S."""
        live.finished_at = now = self._loop.time()
        tid = live.rec.id
        if self._open.pop(tid, None) is not None:
            self._expiry.append((now, tid))

    @property
    def open_count(self) -> int:
        return len(self._open)

    def unfinished(self) -> list[LiveTask]:
        """The tasks not finished yet (a copy)."""
        return list(self._open.values())

    def expire(self, now: float) -> None:
        """Forget the tasks finished more than FINISHED_KEEP_S ago, detaching their sinks."""
        expiry = self._expiry
        while expiry and now - expiry[0][0] > FINISHED_KEEP_S:
            tid = expiry.popleft()[1]
            live = self.live.get(tid)
            if live is not None and live.finished_at is not None and now - live.finished_at > FINISHED_KEEP_S:
                del self.live[tid]
                for sink in list(live.sinks):
                    self.detach(live, sink)

    # ---- per-user counts --------------------------------------------------------------------
    def pending(self, uid: str) -> int:
        """The user's unfinished tasks; O(1)."""
        return self._pending.get(uid, 0)

    def count(self, uid: str, delta: int) -> None:
        n = self._pending.get(uid, 0) + delta
        if n > 0:
            self._pending[uid] = n
        else:
            self._pending.pop(uid, None)

    # ---- sinks ------------------------------------------------------------------------------
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
        """Detach ``sink`` from every task it follows (not a scan of ``live``)."""
        for live in self._attached.pop(sink, ()):
            live.sinks.discard(sink)
            live.trace.discard(sink)

    def attached(self, sink: Sink) -> frozenset[LiveTask]:
        """The tasks ``sink`` is attached to."""
        return frozenset(self._attached.get(sink, ()))
