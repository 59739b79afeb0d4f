"""The tasks the node holds, and when each may run: the limits on taking a task, one answer at a time per user
in arrival order, and at most ``node.concurrency`` answers at once.

Every task is known by its key ``(uid, id)``: the uid is its topic's, which the broker's ACL binds to the
publisher, so a device naming another user's task id never reaches that task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import wire

__all__ = ["NODE_BUSY_MSG", "RATE_LIMITED_MSG", "Admission", "Key", "Run"]

# Answers to tasks the node does not take (done, status error; nothing is kept). Chinese: shown to users.
RATE_LIMITED_MSG = "您进行中的问题过多（最多 {n} 个），请等前面的回答结束后再提问。"
NODE_BUSY_MSG = "服务器 B 繁忙（进行中的问题已达上限），请稍后重试。"

Key = tuple[str, bytes]  # (uid, task id): a task id means something only together with its user


@dataclass
class Run:
    """One task the node holds, from the moment it is taken until its ``Done`` is published."""

    task: wire.Task
    topic: str
    job: asyncio.Task[None] | None = None
    started: bool = False
    cancelled: bool = False
    chunks: list[str] = field(default_factory=list)  # text of every Delta published, seq = index + 1
    turn: asyncio.Event = field(default_factory=asyncio.Event)  # set when it is this user's turn
    last_seq: int = 0  # the last Delta acknowledged: the Done's seq when the answer ends early

    @property
    def key(self) -> Key:
        return (self.task.uid, self.task.id)


class Admission:
    """The held tasks (``runs``), the ones still waiting for a slot (``waiting``, in arrival order) and each
    user's queue of turns."""

    def __init__(self, concurrency: int, max_pending: int, max_pending_per_uid: int) -> None:
        self.max_pending = max_pending
        self.max_pending_per_uid = max_pending_per_uid
        self.runs: dict[Key, Run] = {}
        self.waiting: list[Key] = []
        self._slots = asyncio.Semaphore(concurrency)
        self._turns: dict[str, deque[Run]] = {}  # uid -> its tasks in arrival order; the first one runs

    def __len__(self) -> int:
        return len(self.runs)

    def __contains__(self, key: Key) -> bool:
        return key in self.runs

    def get(self, key: Key) -> Run | None:
        return self.runs.get(key)

    def jobs(self) -> list[asyncio.Task[None]]:
        """The running jobs of every held task."""
        return [r.job for r in self.runs.values() if r.job is not None]

    def held_by(self, uid: str) -> int:
        """How many tasks of ``uid`` are held."""
        return len(self._turns.get(uid, ()))

    def over_limit(self, uid: str) -> tuple[str, str] | None:
        """(code, message) when a new task of ``uid`` would exceed node.max_pending_per_uid or node.max_pending."""
        if self.held_by(uid) >= self.max_pending_per_uid:
            return "rate_limited", RATE_LIMITED_MSG.format(n=self.max_pending_per_uid)
        if len(self.runs) >= self.max_pending:
            return "node_busy", NODE_BUSY_MSG
        return None

    def admit(self, task: wire.Task, topic: str) -> Run:
        """Hold ``task``: it waits for its user's turn, then for a slot."""
        run = Run(task, topic)
        self.runs[run.key] = run
        self.waiting.append(run.key)
        turns = self._turns.setdefault(task.uid, deque())
        turns.append(run)
        if len(turns) == 1:
            run.turn.set()
        return run

    def cancel(self, key: Key) -> bool:
        """Cancel the held task ``key`` (once); False when it is not held."""
        run = self.runs.get(key)
        if run is None:
            return False
        if run.job is not None and not run.cancelled:
            run.cancelled = True
            run.job.cancel()
        return True

    def position(self, key: Key) -> int:
        """1-based place of ``key`` among the tasks waiting for a slot; 0 when it is not waiting."""
        try:
            return self.waiting.index(key) + 1
        except ValueError:
            return 0

    def queue_position(self, run: Run) -> int:
        """The place to announce in ``run``'s Accept: 0 when it can start at once."""
        return self.position(run.key) if self._slots.locked() or not run.turn.is_set() else 0

    @contextlib.asynccontextmanager
    async def slot(self, run: Run) -> AsyncIterator[None]:
        """Wait for ``run``'s turn (its user's earlier tasks are over), then for a free slot; hold it inside.
        A user's answers never overtake each other, and one user cannot take every slot."""
        await run.turn.wait()
        async with self._slots:
            self.waiting.remove(run.key)
            run.started = True
            yield

    def release(self, run: Run) -> None:
        """``run`` is over (done, failed or cancelled while waiting): the user's next task may start. It stays
        held (``runs``) until :meth:`drop`."""
        if run.key in self.waiting:
            self.waiting.remove(run.key)
        turns = self._turns.get(run.task.uid)
        if turns is None:
            return
        with contextlib.suppress(ValueError):
            turns.remove(run)
        if turns:
            turns[0].turn.set()
        else:
            del self._turns[run.task.uid]

    def drop(self, key: Key) -> None:
        """No longer held (its Done has been published, or it could not be)."""
        self.runs.pop(key, None)
