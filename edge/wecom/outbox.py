"""Durable, paced, ordered delivery of text messages to WeCom users.

WeCom drops (silently, with errcode 0) app messages beyond 30 per minute or 1000 per hour per
member, so every message to a user goes through this outbox:

- ``put`` writes the messages to LMDB (``wc_out``, key ``user \\0 seq``) before anything is sent,
  optionally in the same transaction as the task's ``delivery`` state, so a restart loses nothing
  and re-sends nothing whose send was recorded. Delivery is *at least once*: a crash between WeCom's
  answer and that record, or a timeout on a send WeCom did accept, sends that one message again
  (the ``(i/n)`` numbers let the user see it is a repeat);
- one worker per user sends that user's messages in order, waiting for a slot in a sliding window
  of ``wecom.per_user_per_min`` / ``per_user_per_hour`` (the send log is persisted with each send,
  so a restart does not reset the pace);
- retryable errors (-1, 45009, network, HTTP 5xx) back off 1 s, 2 s … 60 s with jitter;
  operator errors (60020 untrusted IP, wrong secret …) keep the message and retry every 60 s with
  a clear hint in the log; permanent errors (81013 …) drop that message. A message that could not
  be delivered for ``send_max_age_s`` goes to ``wc_dead``. Either way the task records why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from core.config import WecomSettings
from core.store import open_db
from edge.store import TaskStore

from .client import WeComApi, WeComError

log = logging.getLogger(__name__)

UNKNOWN_TRIES = 5  # an errcode we do not know is retried this many times, then the message is given up


@dataclass(slots=True)
class OutMsg:
    key: bytes
    user: str
    text: str
    task: bytes | None
    part: int
    parts: int
    created: float


class Outbox:
    def __init__(self, cfg: WecomSettings, api: WeComApi, store: TaskStore) -> None:
        self.cfg = cfg
        self.api = api
        self.store = store
        env = store.env
        self.db_out = open_db(env, b"wc_out")
        self.db_kv = open_db(env, b"wc_kv")
        self.db_dead = open_db(env, b"wc_dead")
        self.queues: dict[str, deque[OutMsg]] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.sent_log: dict[str, deque[float]] = {}
        self._counter = 0
        self._last_ns = 0  # the newest key's time, at least the newest stored one's (see load)
        self._closing = False
        self._sending: set[str] = set()
        self._hint_at: dict[int, float] = {}
        self.sent = 0
        self.failed = 0
        self.retries = 0
        self.on_sent: list[Callable[[OutMsg], None]] = []

    # ---- start / stop ----------------------------------------------------------------------
    def load(self) -> int:
        """Queue what a previous run left unsent (in order) and start its workers."""
        n = 0
        with self.store.env.begin() as txn:
            for key, raw in txn.cursor(db=self.db_out):
                msg = self._unpack(bytes(key), bytes(raw))
                self.queues.setdefault(msg.user, deque()).append(msg)
                self._last_ns = max(self._last_ns, struct.unpack_from(">Q", key, len(key) - 12)[0])
                n += 1
        for user in self.queues:
            self._ensure_worker(user)
        if n:
            log.info("wecom: %d unsent message(s) from the last run queued again", n)
        return n

    async def close(self, timeout: float = 12.0) -> None:
        """Stop workers; a send in flight is allowed to finish (so it is not sent twice)."""
        self._closing = True
        for user, task in list(self.workers.items()):
            if user not in self._sending:
                task.cancel()
        if self.workers:
            await asyncio.wait(list(self.workers.values()), timeout=timeout)
        for task in self.workers.values():
            task.cancel()

    # ---- enqueue ---------------------------------------------------------------------------
    def _keyfor(self, user: str) -> bytes:
        # strictly increasing even if the wall clock steps back (a user's order must survive restarts)
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return user.encode() + b"\0" + struct.pack(">QI", self._last_ns, self._counter)

    def prepare(self, user: str, texts: list[str], task: bytes | None = None,
                first_part: int = 1, parts: int | None = None) -> tuple[list[OutMsg], Callable[[Any], None]]:
        """Build messages and the LMDB op that stores them (to run inside a bigger transaction)."""
        now = time.time()
        total = parts if parts is not None else first_part - 1 + len(texts)
        msgs = [OutMsg(self._keyfor(user), user, t, task, first_part + i, total, now) for i, t in enumerate(texts)]
        rows = [(m.key, self._pack(m)) for m in msgs]
        db = self.db_out

        def op(txn: Any) -> None:
            for k, v in rows:
                txn.put(k, v, db=db)

        return msgs, op

    def commit(self, msgs: list[OutMsg]) -> None:
        """After ``prepare``'s op is durable: hand the messages to the user's worker."""
        for m in msgs:
            self.queues.setdefault(m.user, deque()).append(m)
        if msgs:
            self._ensure_worker(msgs[0].user)

    async def put(self, user: str, texts: list[str], task: bytes | None = None) -> list[OutMsg]:
        msgs, op = self.prepare(user, texts, task)
        await self.store.writer.write(op)
        self.commit(msgs)
        return msgs

    def pending(self, user: str | None = None) -> int:
        if user is not None:
            return len(self.queues.get(user, ()))
        return sum(len(q) for q in self.queues.values())

    # ---- workers ---------------------------------------------------------------------------
    def _ensure_worker(self, user: str) -> None:
        if self._closing:
            return
        w = self.workers.get(user)
        if w is None or w.done():
            self.workers[user] = asyncio.create_task(self._worker(user), name=f"wecom-out-{user[:16]}")

    async def _worker(self, user: str) -> None:
        q = self.queues.setdefault(user, deque())
        backoff = 1.0
        unknown_tries = 0
        crashed = False
        try:
            while q and not self._closing:
                msg = q[0]
                await self._pace(user)
                if self._closing:
                    return
                if time.time() - msg.created > self.cfg.send_max_age_s:
                    await self._give_up(msg, "expired", f"not delivered within {self.cfg.send_max_age_s} s")
                    q.popleft()
                    continue
                self._sending.add(user)
                try:
                    await self.api.send_text(user, msg.text)
                except WeComError as exc:
                    self._sending.discard(user)
                    unknown_tries += exc.kind == "unknown"
                    if exc.kind == "permanent" or unknown_tries >= UNKNOWN_TRIES:
                        await self._give_up(msg, exc.errcode, f"{exc.errmsg} -- {exc.hint}" if exc.kind == "unknown"
                                            else exc.hint or exc.errmsg)
                        q.popleft()
                        backoff, unknown_tries = 1.0, 0
                        continue
                    self.retries += 1
                    if exc.kind == "config":
                        self._hint(exc)
                        await self._record(msg, {"status": "retrying", "code": exc.errcode, "hint": exc.hint})
                        delay = 60.0
                    else:
                        log.info("wecom: send to %s failed (%s); retrying in %.0f s", user, exc.errcode, backoff)
                        delay, backoff = backoff * random.uniform(0.8, 1.2), min(60.0, backoff * 2)
                    await asyncio.sleep(delay)
                    continue
                except Exception as exc:  # noqa: BLE001 - a bug or odd failure: retry slowly, never spin
                    self._sending.discard(user)
                    self.retries += 1
                    log.warning("wecom: send to %s failed unexpectedly (%r); retrying in %.0f s", user, exc, backoff)
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(60.0, backoff * 2)
                    continue
                unknown_tries = 0
                # Sent: forget the message and log the send time in one commit (pace survives restarts).
                backoff = 1.0
                now = time.time()
                times = self.sent_log.setdefault(user, deque())
                times.append(now)
                self._trim(times, now)
                log_raw = cbor2.dumps(list(times))
                key, db_out, db_kv, rkey = msg.key, self.db_out, self.db_kv, b"rate:" + user.encode()

                def op(txn: Any) -> None:
                    txn.delete(key, db=db_out)
                    txn.put(rkey, log_raw, db=db_kv)

                try:
                    await asyncio.shield(self.store.writer.write(op))
                except Exception as exc:  # noqa: BLE001 - it was sent: never send it again from memory
                    log.error("wecom: message to %s was sent but recording that failed (%r); it may be sent "
                              "again after a restart", user, exc)
                finally:
                    self._sending.discard(user)
                q.popleft()
                self.sent += 1
                if msg.task is not None and msg.part == msg.parts:  # the last part (parts 0 = not yet known)
                    self._set_delivery(msg.task, sent_ok=True)
                for cb in self.on_sent:
                    cb(msg)
        except Exception:  # noqa: BLE001 - e.g. LMDB full while giving a message up: log, restart later
            log.exception("wecom: outbox worker for %s failed; restarting it in 5 s", user)
            crashed = True
        finally:
            if self.workers.get(user) is asyncio.current_task():
                del self.workers[user]
            if q and not self._closing:  # raced with a put (or crashed): keep going
                if crashed:
                    asyncio.get_running_loop().call_later(5.0, self._ensure_worker, user)
                else:
                    self._ensure_worker(user)

    def _trim(self, times: deque[float], now: float) -> None:
        while times and now - times[0] > 3600:
            times.popleft()

    def _load_log(self, user: str) -> deque[float]:
        times = self.sent_log.get(user)
        if times is None:
            with self.store.env.begin() as txn:
                raw = txn.get(b"rate:" + user.encode(), db=self.db_kv)
            times = deque(sorted(float(t) for t in cbor2.loads(raw))) if raw else deque()
            self.sent_log[user] = times
        return times

    def wait_time(self, user: str, now: float | None = None) -> float:
        """Seconds until the next message to ``user`` may go without exceeding the pace."""
        now = time.time() if now is None else now
        times = self._load_log(user)
        self._trim(times, now)
        wait = 0.0
        minute = [t for t in times if now - t < 60]
        if len(minute) >= self.cfg.per_user_per_min:
            wait = max(wait, minute[-self.cfg.per_user_per_min] + 60 - now)
        if len(times) >= self.cfg.per_user_per_hour:
            wait = max(wait, times[-self.cfg.per_user_per_hour] + 3600 - now)
        return max(0.0, wait)

    async def _pace(self, user: str) -> None:
        while (wait := self.wait_time(user)) > 0 and not self._closing:
            await asyncio.sleep(min(wait + 0.01, 5.0))

    # ---- failures --------------------------------------------------------------------------
    def _hint(self, exc: WeComError) -> None:
        now = time.monotonic()
        if now - self._hint_at.get(exc.errcode, -1e9) > 300:
            self._hint_at[exc.errcode] = now
            log.error("wecom: cannot send messages: %s. Messages stay queued and are retried every 60 s.", exc)

    async def _record(self, msg: OutMsg, delivery: dict[str, Any]) -> None:
        if msg.task is not None:
            self._set_delivery(msg.task, **delivery)

    def _set_delivery(self, task: bytes, *, sent_ok: bool = False, **changes: Any) -> None:
        """Merge a send outcome into the task's ``delivery`` (the channel's keys, e.g. ``final``, stay).
        ``sent_ok``: the last part went out; a part that failed for good keeps the status ``failed``."""
        rec = self.store.get(task)
        if rec is None:
            return
        old = dict(rec.delivery or {})
        if sent_ok:
            if old.get("status") == "failed":
                return
            new = {k: v for k, v in old.items() if k not in ("code", "hint")} | {"status": "sent"}
        else:
            new = old | changes
        if new != old:
            self.store.update(task, delivery=new)

    async def _give_up(self, msg: OutMsg, code: int | str, why: str) -> None:
        self.failed += 1
        log.warning("wecom: message to %s (part %d/%d) not delivered: %s %s", msg.user, msg.part, msg.parts,
                    code, why)
        raw, key, db_out, db_dead = self._pack(msg), msg.key, self.db_out, self.db_dead
        dead = cbor2.dumps({"msg": raw, "code": code, "why": why, "ts": time.time()})

        def op(txn: Any) -> None:
            txn.delete(key, db=db_out)
            txn.put(key, dead, db=db_dead)

        await self.store.writer.write(op)
        await self._record(msg, {"status": "failed", "code": code, "hint": why})

    # ---- (de)serialisation -----------------------------------------------------------------
    @staticmethod
    def _pack(m: OutMsg) -> bytes:
        return cbor2.dumps({"u": m.user, "t": m.text, "k": m.task, "p": m.part, "n": m.parts, "c": m.created})

    @staticmethod
    def _unpack(key: bytes, raw: bytes) -> OutMsg:
        d = cbor2.loads(raw)
        return OutMsg(key, d["u"], d["t"], d.get("k"), int(d.get("p", 1)), int(d.get("n", 1)), float(d["c"]))


async def aclose_quietly(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
