"""What the fuzz tests share: the seed and the time budget, a canary (a well-behaved client that must keep
being served while the fuzzer runs), an ERROR-log counter and the process's resident memory.

Every case is made from its own ``random.Random(f"{seed}/{suite}/{index}")``: the same seed gives the same
cases in the same order whatever the timing, so a failure names (seed, suite, index) and the bytes, and
``CLAW_FUZZ_SEED=<seed>`` replays it. The budget only decides how many cases run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SEED = 20261203
DEFAULT_BUDGET_S = 10.0  # seconds of fuzzing per suite (three suites + findings: about a minute in all)
CANARY_STALL_S = 15.0  # the canary must finish a round at least this often while the fuzzer runs (generous)
RSS_GROWTH_MAX = 256 << 20  # the test process (system + fuzzer) may not grow more than this while fuzzing
MAX_ERROR_RECORDS = 0  # ERROR log records (tracebacks) the fuzz input may cause; see ErrorLog.allow


def seed() -> int:
    return int(os.environ.get("CLAW_FUZZ_SEED", DEFAULT_SEED))


def budget_s() -> float:
    return float(os.environ.get("CLAW_FUZZ_BUDGET_S", DEFAULT_BUDGET_S))


@dataclass
class Fuzz:
    """One suite's case stream: ``rng(i)`` is case i's generator; ``running()`` is False once the budget is
    spent."""

    suite: str
    seed: int = field(default_factory=seed)
    budget: float = field(default_factory=budget_s)
    started: float = field(default_factory=time.monotonic)
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    inflight: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # printed (shown by pytest with -s, and on failure): how to run these exact cases again
        print(f"\nfuzz {self.suite}: seed {self.seed} (CLAW_FUZZ_SEED), budget {self.budget:g} s "
              f"(CLAW_FUZZ_BUDGET_S)", file=sys.stderr)

    def begin(self) -> None:
        """The budget counts from here (after the system started)."""
        self.started = time.monotonic()

    def rng(self, i: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.suite}/{i}")

    def running(self) -> bool:
        return time.monotonic() - self.started < self.budget

    def indices(self) -> Iterator[int]:
        """Case numbers, shared by concurrent workers, until the budget is spent."""
        while self.running():
            i = self.cases
            self.cases += 1
            yield i

    def start(self, worker: int, what: str) -> str:
        """Note what ``worker`` is sending now (an ERROR log line names every case in flight); returns it."""
        self.inflight[worker] = what
        return what

    def in_flight(self) -> str:
        return "cases in flight (the culprit is one of them):\n" + "\n".join(
            f"  worker {k}: {v[:600]}" for k, v in sorted(self.inflight.items()))

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def where(self, i: int) -> str:
        return f"[{self.suite} case {i}, CLAW_FUZZ_SEED={self.seed}]"

    def summary(self) -> str:
        top = ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items(), key=lambda kv: -kv[1]))
        return f"fuzz {self.suite}: {self.cases} cases in {time.monotonic() - self.started:.1f} s; {top}"


class ErrorLog(logging.Handler):
    """Counts ERROR (and worse) log records of the whole process while installed; keeps the first few."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.allowed: list[str] = []
        self.known = 0  # allowed ERROR lines seen

    def allow(self, *markers: str) -> None:
        """Known ERROR lines without a traceback (one per offending connection, from a library we do not
        patch) are counted in ``known`` instead; the test bounds that count by the number of cases."""
        self.allowed.extend(markers)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.exc_info is None and any(m in msg for m in self.allowed):
            self.known += 1
            return
        self.records.append(record)

    def report(self, n: int = 5) -> str:
        fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n---\n".join(fmt.format(r) for r in self.records[:n])

    @contextlib.contextmanager
    def installed(self) -> Iterator[ErrorLog]:
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close a case's connection, waiting a second at most for it to go; errors on the way are ignored."""
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1)


async def send_and_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: list[bytes], *,
                        wait: float, read_size: int,
                        enough: Callable[[bytes], bool] | None = None) -> tuple[str, bytes]:
    """Write ``data`` piece by piece, then read the answer for ``wait`` seconds at most: how it ended and what
    came back. The end is "closed" (the peer closed), "enough" (``enough(got)`` said so), "open" (the time
    ran out) or "reset" (a connection error)."""
    got = b""
    try:
        for piece in data:
            writer.write(piece)
            await writer.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(wait):
                while True:
                    chunk = await reader.read(read_size)
                    if not chunk:
                        return "closed", got
                    got += chunk
                    if enough is not None and enough(got):
                        return "enough", got
    except (ConnectionError, OSError):
        return "reset", got
    return "open", got


def rss() -> int | None:
    """Resident memory of this process in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def assert_memory_settled(canary: Canary, rss0: int | None) -> None:
    """After fuzzing: ``canary`` finishes two more rounds, and this process has not grown by
    RSS_GROWTH_MAX or more since ``rss0`` (measured before)."""
    await canary.wait_rounds(2)
    rss1 = rss()
    print(canary.stats(), f"rss {rss0} -> {rss1}")
    if rss0 and rss1:
        assert rss1 - rss0 < RSS_GROWTH_MAX, (rss0, rss1)


class Canary:
    """Runs ``one_round`` (a well-behaved client's complete exchange, e.g. ask and get the answer) over and
    over in the background; ``check()`` fails when a round failed or none finished for ``stall`` seconds."""

    def __init__(self, name: str, one_round: Callable[[int], Awaitable[None]], stall: float = CANARY_STALL_S) -> None:
        self.name = name
        self.one_round = one_round
        self.stall = stall
        self.rounds = 0
        self.last_ok = time.monotonic()
        self.durations: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            await self.one_round(self.rounds)
            self.rounds += 1
            self.last_ok = time.monotonic()
            self.durations.append(self.last_ok - t0)
            await asyncio.sleep(0.05)  # a client that asks again soon, not a load generator

    def check(self, where: str = "") -> None:
        task = self._task
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            raise AssertionError(f"canary {self.name} stopped after {self.rounds} rounds {where}: {exc!r}") from exc
        quiet = time.monotonic() - self.last_ok
        assert quiet < self.stall, (f"canary {self.name}: no round finished for {quiet:.1f} s "
                                    f"(after {self.rounds} rounds) {where}")

    async def wait_rounds(self, n: int, timeout: float = 30.0) -> None:
        """Until ``n`` more rounds have finished (fails as check() does)."""
        goal = self.rounds + n
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.rounds < goal:
            self.check()
            assert loop.time() < end, f"canary {self.name}: {n} rounds not done in {timeout:g} s"
            await asyncio.sleep(0.02)

    def stats(self) -> str:
        d = sorted(self.durations) or [0.0]
        return (f"canary {self.name}: {self.rounds} rounds, median {d[len(d) // 2] * 1000:.0f} ms, "
                f"max {d[-1] * 1000:.0f} ms")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Canary]:
        self._task = asyncio.create_task(self._loop(), name=f"canary-{self.name}")
        try:
            await self.wait_rounds(1)
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def alive(sys_: Any, where: str = "") -> None:
    """The system's servers are still up: the node's task runs, the edge's broker link is connected and the
    embedded broker runs (all in this process)."""
    from edge.keys import BRIDGE

    task = sys_.node_task
    if task is not None and task.done():
        exc = None if task.cancelled() else task.exception()
        raise AssertionError(f"the node stopped {where}: {exc!r}")
    bridge = sys_.app[BRIDGE]
    assert bridge.connected, f"the edge lost its broker link {where}"
    broker = getattr(bridge.client, "_broker", None)
    assert broker is None or broker.running, f"the embedded broker stopped {where}"


async def run_workers(n: int, worker: Callable[[int], Awaitable[Any]]) -> None:
    """``n`` concurrent workers; the first failure cancels the others and is raised."""
    tasks = [asyncio.create_task(worker(k)) for k in range(n)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
