"""The load generator: the clients that ask, and what they record, for one level.

* :func:`run_ws_level` -- mini-program-style WebSocket users on ``/api/ws`` (``bench/wsload.py``), each
  asking again as soon as its answer is done; per-chunk relay, first delta, delivered text, errors;
* :func:`run_direct_level` -- the direct baseline: the same users reading the fake LLM's SSE themselves (TTFT);
* :func:`run_device_level` -- MQTT devices asking the node over the broker (no edge on their path).

A level runs for ``warm_s`` unmeasured seconds, then ``level_s`` measured ones; samples outside that window are
not recorded. :class:`LevelResult` holds one level's samples.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp

import wire
from core.runtime import now_us

from .cluster import Cluster, tls_context
from .hist import Hist
from .options import Options
from .progress import Progress, ticker

__all__ = ["LevelResult", "login_all", "connect_all", "run_ws_level", "run_direct_level", "run_device_level"]


@dataclass
class LevelResult:
    streams: int
    chunk: Hist = field(default_factory=Hist)  # from the text's arrival at the node (n_tok, else n_pub)
    chunk_pub: Hist = field(default_factory=Hist)  # from the node's publish (n_pub): without the coalescer's wait
    first: Hist = field(default_factory=Hist)
    asks: int = 0
    errors: int = 0
    chunks: int = 0
    chars: int = 0  # answer characters received in the measured window
    reasons: list[str] = field(default_factory=list)


async def login_all(s: aiohttp.ClientSession, http: str, n: int, cache: dict[int, str]) -> list[str]:
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        if i in cache:
            return
        async with sem, s.post(f"{http}/api/login", json={"dev_user": f"bench{i}"}) as r:
            if r.status != 200:
                raise RuntimeError(f"dev login failed: HTTP {r.status}")
            cache[i] = (await r.json())["token"]

    await asyncio.gather(*(one(i) for i in range(n)))
    return [cache[i] for i in range(n)]


async def run_ws_level(http: str, o: Options, streams: int, tokens_cache: dict[int, str],
                       progress: Progress | None = None, label: str = "") -> LevelResult:
    """``streams`` users, each asking again as soon as its answer is done, for warm_s + level_s; returns the
    samples of the measured window (``level_s`` long). Each user is a :class:`bench.wsload.WsUser` driven
    from its frames (no task per user, see there)."""
    from urllib.parse import urlsplit

    from .wsload import WsUser, connect

    res = LevelResult(streams)
    want = o.tokens * o.token_chars
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        toks = await login_all(s, http, streams, tokens_cache)
    url = urlsplit(http)
    host, port = url.hostname or "127.0.0.1", int(url.port or 80)
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    live = [0]
    t_window = [0, 0]  # measured window, wall clock µs
    t_end = [0.0, 0.0]  # (loop time asks stop, loop time the last answer must be done by)

    class _St:
        __slots__ = ("i", "t_ask", "first", "got", "measured", "asking", "until", "done")

        def __init__(self, i: int) -> None:
            self.i, self.t_ask, self.first, self.got, self.measured = i, 0, True, 0, False
            self.asking, self.until, self.done = False, 0.0, False

    def finish(u: WsUser) -> None:
        st = u.state
        if not st.done:
            st.done = True
            live[0] -= 1
            if not live[0] and not all_done.done():
                all_done.set_result(None)

    def fail(u: WsUser, why: str) -> None:
        st = u.state
        st.asking = False
        if st.measured:
            res.errors += 1
            if len(res.reasons) < 10:
                res.reasons.append(why[:200])

    def ask(u: WsUser) -> None:
        st = u.state
        now = loop.time()
        if u.closed or now >= t_end[0]:
            finish(u)
            return
        st.t_ask = now_us()
        st.first, st.got, st.asking = True, 0, True
        st.measured = t_window[0] <= st.t_ask < t_window[1]
        st.until = max(now + 1.0, t_end[1])
        if st.measured:
            res.asks += 1
        u.send_text(f'{{"type":"ask","text":"bench {st.i}","trace":true}}')

    def on_frame(u: WsUser, f: Any) -> None:
        st = u.state
        if st is None or not st.asking:
            return  # the greeting ("node"), or frames after a failed ask
        kind = f.get("type")
        if kind == "delta":
            r = now_us()
            st.got += len(f["text"])
            if st.first:
                st.first = False
                if st.measured:
                    res.first.add(r - st.t_ask)
            if t_window[0] <= r < t_window[1]:
                tm = f["timing"]
                pub = tm["n_pub"]
                res.chunk.add(r - tm.get("n_tok", pub))  # from the text's arrival at the node
                res.chunk_pub.add(r - pub)
                res.chunks += 1
                res.chars += len(f["text"])
        elif kind == "done":
            if f.get("status") != "ok" or st.got != want:
                fail(u, f"ValueError: done {f.get('status')} {f.get('error')} with {st.got}/{want} chars")
            st.asking = False
            ask(u)
        elif kind == "error":
            fail(u, f"ValueError: error frame {f.get('code')}")
            ask(u)

    def on_close(u: WsUser, why: str) -> None:
        if u.state is not None:
            if u.state.asking:
                fail(u, f"ConnectionError: {why}")
            finish(u)

    sem = asyncio.Semaphore(64)

    async def one(t: str) -> WsUser:
        async with sem:
            return await connect(host, port, f"/api/ws?token={t}", on_frame, on_close)

    users = list(await asyncio.gather(*(one(t) for t in toks)))
    t_start = loop.time()
    t_window[0] = now_us() + int(o.warm_s * 1e6)
    t_window[1] = t_window[0] + int(o.level_s * 1e6)
    t_end[0] = t_start + o.warm_s + o.level_s
    t_end[1] = t_end[0] + 30 + o.ttft + o.tokens / max(o.tps, 1e-9)
    rng = random.Random(streams)
    for i, u in enumerate(users):
        u.state = _St(i)
        live[0] += 1
        if u.closed:
            finish(u)
        else:  # spread the starts
            loop.call_later(rng.random() * min(1.0, o.tokens / max(o.tps, 1)), ask, u)

    async def watchdog() -> None:
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            for u in users:
                st = u.state
                if st.asking and now > st.until and not u.closed:
                    fail(u, "TimeoutError: no done before the deadline")
                    u.close()
                    finish(u)

    tick = None
    if progress is not None:
        tick = asyncio.create_task(ticker(progress, label, o.warm_s + o.level_s,
                                           lambda: f"{res.chunks} chunks, {res.errors} errors"))
    dog = asyncio.create_task(watchdog())
    try:
        if live[0]:
            await all_done
    finally:
        dog.cancel()
        if tick is not None:
            tick.cancel()
        for u in users:
            u.close()
    return res


async def connect_all(s: aiohttp.ClientSession, http: str, toks: list[str]) -> list[aiohttp.ClientWebSocketResponse]:
    sem = asyncio.Semaphore(64)

    async def one(t: str) -> aiohttp.ClientWebSocketResponse:
        async with sem:
            ws = await s.ws_connect(f"{http}/api/ws", params={"token": t}, max_msg_size=0, heartbeat=None)
            first = await ws.receive_json()
            if first.get("type") != "node":
                raise RuntimeError(f"unexpected first frame {first}")
            return ws

    return list(await asyncio.gather(*(one(t) for t in toks)))


async def run_direct_level(llm_url: str, o: Options, streams: int) -> tuple[Hist, int]:
    """Like a WS user, but straight to the fake LM Studio: TTFT (request → first content token)."""
    ttft = Hist()
    errors = 0
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "bench"}],
            "stream_options": {"include_usage": True}}
    conn = aiohttp.TCPConnector(limit=0)
    loop = asyncio.get_running_loop()
    end = loop.time() + o.warm_s + o.level_s
    w0 = now_us() + int(o.warm_s * 1e6)
    w1 = w0 + int(o.level_s * 1e6)
    rng = random.Random(streams + 1)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def user() -> None:
            nonlocal errors
            await asyncio.sleep(rng.random() * min(1.0, o.tokens / max(o.tps, 1)))
            while loop.time() < end:
                t0 = now_us()
                first = True
                try:
                    async with s.post(f"{llm_url}/chat/completions", json=body) as r:
                        async for line in r.content:
                            if first and line.startswith(b"data: {") and b'"content"' in line:
                                first = False
                                if w0 <= t0 < w1:
                                    ttft.add(now_us() - t0)
                except aiohttp.ClientError:
                    errors += 1

        await asyncio.gather(*(user() for _ in range(streams)))
    return ttft, errors


async def run_device_level(c: Cluster, o: Options, n: int, creds: list[tuple[str, str]]) -> LevelResult:
    """``n`` MQTT devices (an integrator's clients, TLS, their own credentials) each asking the node over the
    broker and reading the answer on its own reply topic — the edge is not on this path — again as soon as
    the answer is done. Same window and measures as the WebSocket users."""
    from core.mqtt import make_client

    res = LevelResult(n)
    want = o.tokens * o.token_chars
    loop = asyncio.get_running_loop()
    w0 = now_us() + int(o.warm_s * 1e6)
    w1 = w0 + int(o.level_s * 1e6)
    end = loop.time() + o.warm_s + o.level_s
    deadline = end + 30 + o.ttft + o.tokens / max(o.tps, 1e-9)
    rng = random.Random(n + 7)

    async def device(user: str, pw: str) -> None:
        cl = make_client(host="localhost", port=c.tls_port, username=user, password=pw, identifier=user,
                         tls=tls_context(c.ca), keepalive=60, max_queued=10000)
        async with cl:
            await cl.subscribe(wire.reply_topic(user), qos=1)
            await asyncio.sleep(rng.random() * min(1.0, o.tokens / max(o.tps, 1)))
            msgs = cl.messages
            while loop.time() < end:
                tid = os.urandom(16)
                t_ask = now_us()
                measured = w0 <= t_ask < w1
                res.asks += measured
                await cl.publish(wire.task_topic(user), wire.encode(wire.Task(
                    id=tid, uid=user, ch="dev", text=f"device {user}", ts=t_ask // 1000)), qos=1)
                got, first = 0, True
                try:
                    async with asyncio.timeout(max(1.0, deadline - loop.time())):
                        async for m in msgs:
                            msg = wire.decode(m.payload)  # type: ignore[arg-type]
                            if getattr(msg, "id", None) != tid:
                                continue
                            if isinstance(msg, wire.Delta):
                                r = now_us()
                                got += len(msg.text)
                                if first:
                                    first = False
                                    if measured:
                                        res.first.add(r - t_ask)
                                if w0 <= r < w1 and msg.timing and "n_pub" in msg.timing:
                                    pub = msg.timing["n_pub"]
                                    res.chunk.add(r - msg.timing.get("n_tok", pub))
                                    res.chunk_pub.add(r - pub)
                                    res.chunks += 1
                                    res.chars += len(msg.text)
                            elif isinstance(msg, wire.Done):
                                if msg.status != "ok" or got != want:
                                    raise ValueError(f"done {msg.status} with {got}/{want} chars")
                                break
                except (ValueError, TimeoutError, wire.WireError) as exc:
                    if measured:
                        res.errors += 1
                        if len(res.reasons) < 10:
                            res.reasons.append(f"{type(exc).__name__}: {exc}"[:200])

    await asyncio.gather(*(device(u, pw) for u, pw in creds[:n]))
    return res
