"""The WeCom callback endpoint and what happens to each message.

``GET /wecom/callback``: URL verification (signature check, timestamp within ``wecom.replay_window_s``, decrypt
echostr; answered in < 1 ms).
``POST /wecom/callback``: an encrypted message. Order of checks, each with nothing processed on
failure: body over 64 KiB → 413; envelope not XML / no ``Encrypt`` → 400; bad signature → 403;
stale timestamp (signed, so not forgeable) → 403; not decryptable / wrong CorpID / bad inner XML
→ 400. A valid message is recorded in LMDB (deduplicated on ``MsgId``, events on
``FromUserName + CreateTime``, in the same transaction) and only then answered ``200`` with an
empty body; the answer goes out later through the outbox (``message/send``), so WeCom's 5 s
window and its 3 retries never produce a second answer, also across an edge restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

import lmdb
import xmltodict
from aiohttp import web
from wechatpy.enterprise import parse_message
from wechatpy.enterprise.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidSignatureException

from core.guard import LogBudget
from core.config import Settings
from edge.bridge import Bridge
from edge.frames import Frame, text_of
from edge.tasks import LiveTask
from edge.store import FINAL, STORE_FULL_HINT, StoreFull, TaskStore

from .outbox import Outbox
from .shape import LIMIT, Progressive, hard_cut, number_parts, shape_answer

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
OFFLINE_GRACE_S = 6.0  # after an edge start, how long nodes get to report before "offline" is said
SEEN_KEEP_S = 7 * 86400  # dedup keys are kept this long when wecom.replay_window_s = 0
CN = timezone(timedelta(hours=8))
CH = "wc"

HELP = (
    "“智控未来”智能助手用法：\n"
    "• 直接发送文字问题，我会尽快回答；较长的回答会分成几条按顺序发送，标有 (1/3) 这样的序号。\n"
    "• /new 开始新的对话（不再参考之前的上下文）\n"
    "• /stop 停止正在生成的回答\n"
    "• /help 显示本说明\n"
    "目前只支持文字消息。"
)
UNSUPPORTED = {
    "image": "图片", "voice": "语音", "video": "视频", "file": "文件", "location": "位置", "link": "链接",
}


def _uid(user: str) -> str:
    return f"{CH}.{user}"


class WeComChannel:
    def __init__(self, settings: Settings, store: TaskStore, bridge: Bridge, outbox: Outbox) -> None:
        self.s = settings
        self.cfg = settings.wecom
        self.store = store
        self.bridge = bridge
        self.outbox = outbox
        self.crypto = WeChatCrypto(self.cfg.token, self.cfg.encoding_aes_key, self.cfg.corp_id)
        self.db_kv = outbox.db_kv
        self.progressive: dict[bytes, _ProgressiveSink] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._delivering: set[bytes] = set()
        self._chains: dict[bytes, asyncio.Task[Any]] = {}  # per task, its last ordered step (_spawn_in_order)
        self._reject_log = LogBudget(log)
        self.stats: dict[str, int] = {}
        bridge.on_finished.append(self._on_finished)

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        task.add_done_callback(_log_failure)
        return task

    def _spawn_in_order(self, tid: bytes, coro: Any) -> None:
        """Run ``coro`` after every step spawned before it for task ``tid`` has ended: a task's parts are
        prepared (numbered, keyed in the outbox) and committed in the order its text came, whatever the
        scheduling of the steps (progressive paragraphs, then the final delivery)."""
        prev = self._chains.get(tid)

        async def step() -> None:
            started = False
            try:
                if prev is not None:
                    await asyncio.wait([prev])  # never raises: a failed step is logged by its own callback
                started = True
                await coro
            finally:
                if not started:
                    coro.close()  # cancelled while waiting (shutdown): the step never ran
                if self._chains.get(tid) is task:
                    del self._chains[tid]

        task = self._chains[tid] = self._spawn(step())

    def start(self) -> None:
        self._housekeeper = asyncio.create_task(self._housekeeping(), name="wecom-housekeeping")

    async def _housekeeping(self) -> None:
        """Hourly: forget dedup keys older than the replay window (a replay that old is refused on its
        signed timestamp anyway; with the window off, keys are kept for SEEN_KEEP_S)."""
        while True:
            keep = max(self.cfg.replay_window_s, 3600) + 3600 if self.cfg.replay_window_s else SEEN_KEEP_S
            try:
                n = await self.store.prune_seen(int((time.time() - keep) * 1000))
                if n:
                    log.info("wecom: forgot %d message dedup key(s) older than %d s", n, keep)
            except Exception as exc:  # noqa: BLE001 - housekeeping must not die
                log.warning("wecom: pruning dedup keys failed: %r", exc)
            await asyncio.sleep(3600)

    async def close(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=5)

    # ---- HTTP ------------------------------------------------------------------------------
    @staticmethod
    def _query(request: web.Request) -> dict[str, str]:
        # yarl decodes a literal "+" as a space; WeCom sends %2B, but parse the raw query to be safe.
        out: dict[str, str] = {}
        for pair in request.query_string.split("&"):
            k, _, v = pair.partition("=")
            if k:
                out[unquote(k)] = unquote(v)
        return out

    def _reject(self, status: int, why: str, request: web.Request) -> web.Response:
        self._count(f"http_{status}")
        # anyone can post junk here: a log budget (20 lines a minute), not one line per request
        self._reject_log.log(logging.WARNING, "wecom: callback rejected (%d): %s [from %s]", status, why,
                             request.remote)
        return web.Response(status=status, text=why)

    def _fresh(self, ts: str) -> bool:
        """The (signed) timestamp is within wecom.replay_window_s of our clock, either way (0: no check)."""
        window = self.cfg.replay_window_s
        return (ts.isascii() and ts.isdigit() and len(ts) <= 12  # isdigit() alone accepts "²"
                and (not window or abs(time.time() - int(ts)) <= window))

    async def handle_get(self, request: web.Request) -> web.Response:
        q = self._query(request)
        sig, ts, nonce, echo = (q.get(k, "") for k in ("msg_signature", "timestamp", "nonce", "echostr"))
        if not (sig and ts and nonce and echo):
            return self._reject(400, "missing msg_signature/timestamp/nonce/echostr", request)
        try:
            plain = self.crypto.check_signature(sig, ts, nonce, echo)
        except InvalidSignatureException:
            return self._reject(403, "bad signature (check wecom.token)", request)
        except Exception as exc:  # noqa: BLE001 - undecryptable echostr
            return self._reject(400, f"cannot decrypt echostr ({type(exc).__name__}; check encoding_aes_key "
                                     "and corp_id)", request)
        if not self._fresh(ts):
            return self._reject(403, "stale or bad timestamp (check server A's clock; wecom.replay_window_s)", request)
        self._count("url_verified")
        log.info("wecom: callback URL verified")
        return web.Response(text=plain if isinstance(plain, str) else plain.decode())

    async def handle_post(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            return self._reject(413, f"body over {MAX_BODY} bytes", request)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.s.edge.body_timeout_s):  # a slow sender is cut off
                while size <= MAX_BODY:  # read() returns what has arrived so far: loop until EOF (or too much)
                    chunk = await request.content.read(MAX_BODY + 1 - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
        except TimeoutError:
            resp = self._reject(408, f"body not received within {self.s.edge.body_timeout_s:g} s", request)
            resp.force_close()
            return resp
        if size > MAX_BODY:
            return self._reject(413, f"body over {MAX_BODY} bytes", request)
        body = b"".join(chunks)
        q = self._query(request)
        sig, ts, nonce = (q.get(k, "") for k in ("msg_signature", "timestamp", "nonce"))
        if not (sig and ts and nonce):
            return self._reject(400, "missing msg_signature/timestamp/nonce", request)
        try:
            env = xmltodict.parse(body, disable_entities=True)["xml"]
            encrypt = env["Encrypt"]
            if not isinstance(encrypt, str) or not encrypt:
                raise ValueError("empty Encrypt")
        except Exception as exc:  # noqa: BLE001 - anything that is not the envelope
            return self._reject(400, f"body is not a WeCom envelope ({type(exc).__name__})", request)
        expected = _signature(self.cfg.token, ts, nonce, encrypt)
        if not hmac.compare_digest(expected.encode(), sig.lower().encode("utf-8", "replace")):
            return self._reject(403, "bad signature (check wecom.token)", request)
        if not self._fresh(ts):
            return self._reject(403, "stale or bad timestamp (replayed callback?)", request)
        try:
            xml = self.crypto.decrypt_message({"Encrypt": encrypt}, sig, ts, nonce)
            msg = parse_message(xml)
        except InvalidSignatureException:
            return self._reject(403, "bad signature (check wecom.token)", request)
        except Exception as exc:  # noqa: BLE001 - bad AES, wrong CorpID, broken inner XML
            return self._reject(400, f"cannot decrypt or parse the message ({type(exc).__name__}; check "
                                     "encoding_aes_key and corp_id)", request)
        try:
            await self._on_message(msg)
        except _Bad as exc:
            return self._reject(400, str(exc), request)
        except (StoreFull, lmdb.MapFullError):
            # Not recorded, so not acknowledged: WeCom retries (3 times over ~15 s) and the operator is told.
            log.error("wecom: callback refused with 503: edge.lmdb is full (%s)", STORE_FULL_HINT)
            return web.Response(status=503, text="")
        return web.Response(text="")

    # ---- messages --------------------------------------------------------------------------
    async def _on_message(self, msg: Any) -> None:
        user = str(getattr(msg, "source", "") or "")
        if not user or len(user) > 64:
            raise _Bad("message without a valid FromUserName")
        try:
            uid = _uid(user)
            import wire

            wire.check_uid(uid)
        except Exception:  # noqa: BLE001
            raise _Bad("FromUserName has characters WeCom UserIDs do not have") from None
        try:
            agent = getattr(msg, "agent", None)  # wechatpy converts on access: int("abc") raises
        except (TypeError, ValueError):
            raise _Bad("message with a non-numeric AgentID") from None
        if self.cfg.agent_id and agent not in (None, "") and str(agent) != str(self.cfg.agent_id):
            raise _Bad(f"message for another app (AgentID {str(agent)[:12]})")
        mtype = msg.type
        if mtype == "unknown":  # wechatpy has no class for some types (file, ...): use the raw MsgType
            mtype = str((getattr(msg, "_data", None) or {}).get("MsgType") or "unknown").lower()
        if mtype == "event":
            await self._on_event(user, msg)
            return
        try:
            msg_id = int(getattr(msg, "id", 0) or 0)
            ts_ms = _ts_ms(msg.time)
        except (TypeError, ValueError):
            raise _Bad("message with a non-numeric MsgId or CreateTime") from None
        key = f"wc:m:{msg_id}".encode() if msg_id else f"wc:m:{user}:{ts_ms}".encode()
        if mtype == "text":
            text = (msg.content or "").strip()
            cmd = text.replace("／", "/").split(maxsplit=1)[0].lower() if text.startswith(("/", "／")) else ""
            if cmd in ("/help", "/new", "/stop", "/帮助"):
                await self._command(user, cmd, key, ts_ms)
                return
            if not text:
                return
            await self._ask(user, text, key, ts_ms)
            return
        kind = UNSUPPORTED.get(mtype)
        if kind is None:
            self._count("ignored")
            return
        if await self._reply_once(key, ts_ms, user, [f"抱歉，目前还不支持{kind}消息。请直接用文字描述您的问题，我会尽快回答。"]):
            self._count("unsupported")

    async def _reply_once(self, key: bytes, ts_ms: int, user: str, texts: list[str],
                          also: Any = None) -> bool:
        """Record the inbound key and queue the reply (and ``also(txn)``) in one transaction: a crash
        cannot lose the reply while keeping the key, and a retry gets nothing. False = a duplicate."""
        msgs, put_op = self.outbox.prepare(user, texts)
        first_time = self.store.seen_op(key, ts_ms)

        def op(txn: Any) -> bool:
            if not first_time(txn):
                return False
            put_op(txn)
            if also is not None:
                also(txn)
            return True

        if await self.store.writer.write(op):
            self.outbox.commit(msgs)
            return True
        self._count("duplicates")
        return False

    async def _ask(self, user: str, text: str, key: bytes, ts_ms: int) -> None:
        uid = _uid(user)
        conv = self._conv(user)
        limit = self.s.edge.max_pending_per_user
        if self.bridge.pending(uid) >= limit:  # bounded per user: a clear answer instead of an endless queue
            if await self._reply_once(key, ts_ms, user, [f"您进行中的问题过多（最多 {limit} 个），这条消息未处理。"
                                                         "请等前面的回答完成后再发送。"]):
                self._count("rate_limited")
            return
        live = await self.bridge.submit(uid, CH, text, conv or None, dedup=key)
        if not live.created:
            self._count("duplicates")
            return
        self._count("tasks")
        if self.cfg.progressive:
            sink = _ProgressiveSink(self, live, user)
            self.progressive[live.rec.id] = sink
            self.bridge.attach(live, sink)
        if not self.bridge.node_online and self.cfg.offline_notice:
            self._spawn(self._offline_notice(live, user))

    async def _offline_notice(self, live: LiveTask, user: str) -> None:
        """Tell the user at once that no node is online (the task stays queued). Just after the edge
        started, presence is not known yet: give nodes up to ``OFFLINE_GRACE_S`` to report first."""
        loop = asyncio.get_running_loop()
        grace = min(OFFLINE_GRACE_S, self.s.edge.node_timeout_s)
        while not self.bridge.node_online and loop.time() - self.bridge.started_at < grace:
            await asyncio.sleep(0.1)
        if self.bridge.node_online or live.finished_at is not None or live.rec.status != "pending":
            return
        self._count("offline_notices")
        await self.outbox.put(user, [self.cfg.offline_notice])

    async def _on_event(self, user: str, msg: Any) -> None:
        event = str(getattr(msg, "event", "") or "").lower()
        try:
            ts_ms = _ts_ms(msg.time)
        except (TypeError, ValueError):
            raise _Bad("event without a numeric CreateTime") from None
        key = f"wc:e:{user}:{ts_ms}".encode()
        welcome = event in ("enter_agent", "subscribe") and bool(self.cfg.welcome)
        if not welcome:
            if await self.store.mark_seen(key, ts_ms):
                self._count(f"event_{event}"[:40])
            else:
                self._count("duplicates")
            return
        # the welcome: at most once per user per day (China time), recorded with the event key
        today = datetime.now(CN).strftime("%Y-%m-%d").encode()
        wkey, db, first_time = b"welcome:" + user.encode(), self.db_kv, self.store.seen_op(key, ts_ms)
        msgs, put_op = self.outbox.prepare(user, [self.cfg.welcome])

        def op(txn: Any) -> str:
            if not first_time(txn):
                return "duplicate"
            if txn.get(wkey, db=db) == today:
                return "welcomed"
            txn.put(wkey, today, db=db)
            put_op(txn)
            return "sent"

        outcome = await self.store.writer.write(op)
        if outcome == "sent":
            self.outbox.commit(msgs)
        self._count("duplicates" if outcome == "duplicate" else f"event_{event}"[:40])

    async def _command(self, user: str, cmd: str, key: bytes, ts_ms: int) -> None:
        uid = _uid(user)
        if cmd in ("/help", "/帮助"):
            done = await self._reply_once(key, ts_ms, user, [HELP])
        elif cmd == "/new":
            conv, db = os.urandom(6).hex().encode(), self.db_kv
            ckey = b"conv:" + user.encode()
            done = await self._reply_once(key, ts_ms, user, ["已开始新的对话，之前的内容不再作为上下文。"],
                                          also=lambda txn: txn.put(ckey, conv, db=db))
        else:  # /stop
            running = [t for t in self.bridge.unfinished() if t.rec.uid == uid and t.finished_at is None]
            done = await self._reply_once(key, ts_ms, user,
                                          ["已停止当前的回答。" if running else "当前没有正在进行的回答。"])
            if done:
                for live in running:
                    self.bridge.cancel(live.rec.id, uid)
        if done:
            self._count(f"cmd_{cmd[1:]}")

    def _conv(self, user: str) -> str:
        with self.store.env.begin() as txn:
            raw = txn.get(b"conv:" + user.encode(), db=self.db_kv)
        return bytes(raw).decode() if raw else ""

    # ---- answers out -----------------------------------------------------------------------
    def _on_finished(self, live: LiveTask) -> None:
        if live.rec.ch != CH:
            return
        self._spawn_in_order(live.rec.id, self.deliver(live.rec.id))

    async def deliver(self, tid: bytes) -> None:
        """Queue a finished task's answer for its user (once: the task's delivery state says so)."""
        rec = self.store.get(tid)
        if rec is None or rec.status not in FINAL or rec.ch != CH:
            return
        if (rec.delivery or {}).get("final") or tid in self._delivering:
            return  # already queued (or sent) by an earlier run, or being queued now
        self._delivering.add(tid)
        try:
            await self._deliver(rec)
        finally:
            self._delivering.discard(tid)

    async def _deliver(self, rec: Any) -> None:
        tid = rec.id
        user = rec.uid.partition(".")[2]
        sink = self.progressive.pop(tid, None)
        done = (rec.delivery or {})
        if sink is None and done.get("sent"):  # progressive parts went out before an edge restart: the rest
            sink = _ProgressiveSink(self, None, user, sent=done["sent"], skip=done.get("chars", 0))
        sent_before = sink.prog.sent if sink is not None else 0
        if rec.status == "cancelled":
            texts: list[str] = []
        elif sink is not None:
            texts = sink.rest(rec.answer)
        elif rec.answer.strip():  # normal case
            try:  # off the event loop: shaping a long answer takes milliseconds
                texts = await asyncio.to_thread(shape_answer, rec.answer)
            except Exception:  # noqa: BLE001 - a shaping bug must not cost the user the answer
                log.exception("wecom: shaping the answer of task %s failed; sending it unshaped", tid.hex()[:8])
                texts = number_parts(hard_cut(rec.answer, LIMIT - 16))
        else:
            texts = []
        if rec.status == "error":
            msg = (rec.err or {}).get("msg") or "处理失败"
            texts.append(f"抱歉，这次没能完成回答：{msg}"[:600])
        elif rec.status == "ok" and not texts and sent_before == 0:
            texts = ["（助手没有给出内容）"]
        first = sent_before + 1
        msgs, op = self.outbox.prepare(user, texts, tid, first_part=first)
        parts = first - 1 + len(texts)
        old = (self.store.get(tid) or rec).delivery or {}  # re-read: progressive parts may have changed it
        status = "failed" if old.get("status") == "failed" else "queued" if texts else "sent"
        await self.store.update_durable(tid, also=op, delivery={**old, "status": status, "parts": parts,
                                                                "final": True})
        self.outbox.commit(msgs)

    async def _progressive_out(self, tid: bytes, user: str, texts: list[str], sent: int, chars: int) -> None:
        # parts=0: the total is not known yet (the outbox marks the task sent only after its last part).
        # chars: how much of the answer these parts cover, so a restarted edge goes on from there.
        msgs, op = self.outbox.prepare(user, texts, tid, first_part=sent - len(texts) + 1, parts=0)
        rec = self.store.get(tid)
        old = (rec.delivery if rec is not None else None) or {}
        await self.store.update_durable(tid, also=op, delivery={**old, "status": old.get("status", "progressive"),
                                                                "sent": sent, "chars": chars})
        self.outbox.commit(msgs)

    def recover(self) -> int:
        """After a restart: answers that finished but never reached the outbox are queued now."""
        n = 0
        horizon = (time.time() - self.cfg.send_max_age_s) * 1000
        for rec in self.store.scan():
            if rec.ch == CH and rec.status in FINAL and (rec.done_ts or 0) >= horizon and (
                    not (rec.delivery or {}).get("final")):
                self._spawn_in_order(rec.id, self.deliver(rec.id))
                n += 1
            elif self.cfg.progressive and rec.ch == CH and rec.status not in FINAL and rec.id not in self.progressive:
                live = self.bridge.get(rec.id)  # still being answered: go on sending its paragraphs
                if live is not None:
                    d = rec.delivery or {}
                    sink = _ProgressiveSink(self, live, rec.uid.partition(".")[2], sent=d.get("sent", 0),
                                            skip=d.get("chars", 0))
                    self.progressive[rec.id] = sink
                    for part in live.stream.parts:  # chunks that came in before this attach (none, usually)
                        sink.add(part)
                    self.bridge.attach(live, sink)
        if n:
            log.info("wecom: %d finished answer(s) from the last run queued for delivery", n)
        return n


class _ProgressiveSink:
    """Receives a task's delta frames; sends finished paragraphs while the answer is generated.

    After an edge restart it resumes: ``sent`` parts covering the first ``skip`` characters went out
    before, and the node's replay starts from the first chunk again, so those characters are skipped."""

    def __init__(self, ch: WeComChannel, live: LiveTask | None, user: str, sent: int = 0, skip: int = 0) -> None:
        self.ch, self.live, self.user = ch, live, user
        self.prog = Progressive(LIMIT, min_bytes=ch.cfg.progressive_min_bytes, sent=sent)
        self.base = skip  # answer characters covered before this sink: consumed counts from here
        self.skip = skip
        self.seen = 0  # answer characters received (skipped ones included)

    def _feed(self, text: str) -> list[str]:
        self.seen += len(text)
        if self.skip:
            drop = min(self.skip, len(text))
            text, self.skip = text[drop:], self.skip - drop
        return self.prog.feed(text) if text else []

    def push(self, frame: Frame) -> None:
        text = text_of(frame)
        if text is not None:
            self.add(text)

    def add(self, text: str) -> None:
        """The next chunk of the answer: the paragraphs it completes are sent."""
        if self.live is None:
            return
        ready = self._feed(text)
        if ready:
            tid = self.live.rec.id
            self.ch._spawn_in_order(tid, self.ch._progressive_out(tid, self.user, ready, self.prog.sent,
                                                                  self.base + self.prog.consumed))

    def rest(self, answer: str) -> list[str]:
        """The parts still to send once the answer is final (``answer`` may hold text this sink never
        got as deltas: the edge restarted, or the task ended with the text shown before a restart)."""
        ready = self._feed(answer[self.seen:]) if len(answer) > self.seen else []
        return ready + self.prog.finish()


class _Bad(Exception):
    pass


def _ts_ms(create_time: Any) -> int:
    """CreateTime (seconds) in ms; ValueError unless it fits the store's unsigned 64-bit stamp."""
    ts_ms = int(create_time) * 1000
    if not 0 <= ts_ms < 1 << 64:
        raise ValueError("CreateTime out of range")
    return ts_ms


def _signature(token: str, ts: str, nonce: str, encrypt: str) -> str:
    import hashlib

    return hashlib.sha1("".join(sorted([token, ts, nonce, encrypt])).encode()).hexdigest()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("wecom: background step failed: %r", task.exception())
