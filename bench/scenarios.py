"""The scenarios of ``claw bench``, each a coroutine ``(Options, Progress) -> dict`` that deploys what it
needs (``bench/cluster.py``), drives the load (``bench/load.py``, ``bench/measure.py``) and returns its part of
``results.json``: :func:`sweep`, :func:`latency`, :func:`direct_only`, :func:`memory`, :func:`devices`,
:func:`floor` and :func:`smoke`. (``wecom`` runs ``bench/wecom.py``; ``bench/suite.py`` runs them in order.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

import wire

from .cluster import cluster, thin_cluster, tls_context
from .load import connect_all, login_all, run_device_level, run_direct_level, run_ws_level
from .measure import level, level_row, measured, offered_chars_per_s
from .options import Options
from .procs import Proc
from .progress import Progress
from .targets import KNEE_RULE, TARGET_STREAMS, knee_of, past_knee

__all__ = ["sweep", "latency", "direct_only", "memory", "devices", "floor", "smoke", "SMOKE_MAX_RATIO"]

SMOKE_MAX_RATIO = 50.0  # smoke fails if ours/direct first-delta p50 exceeds this (docs/performance.md)


async def sweep(o: Options, broker: str, p: Progress) -> dict[str, Any]:
    """The concurrency sweep over ``broker`` (amqtt | mosquitto), or over the thin relay (``thin``)."""
    rows: list[dict[str, Any]] = []
    async with (thin_cluster(o) if broker == "thin" else cluster(o, broker=broker)) as c:
        cache: dict[int, str] = {}
        passed = False
        for n in o.levels:
            row = await level(c, o, n, cache, p)
            rows.append(row)
            passed = passed or past_knee(row)
            if passed and o.stop_at_knee and n >= TARGET_STREAMS:
                break  # (a knee below the target level still measures the target level: its p99 is a target)
            await asyncio.sleep(1.0)  # let the previous level's stragglers drain
    exceeded = any(past_knee(r) for r in rows)
    return {"broker": broker, "levels": rows, "knee": knee_of(rows), "knee_exceeded": exceeded,
            "knee_rule": KNEE_RULE,
            "tps": o.tps, "tokens": o.tokens}


async def latency(o: Options, p: Progress, seconds: float = 10.0) -> dict[str, Any]:
    # short, fast answers: many asks in the window (the per-stream pace matters only for the sweep)
    lo = Options(**{**asdict(o), "level_s": seconds, "tokens": 50, "tps": 200.0})
    async with cluster(lo) as c:
        res = await run_ws_level(c.http, lo, 1, {}, p, "latency: one user")
        direct, _ = await run_direct_level(c.llm_url, lo, 1)
    out = {"streams": 1, "asks": res.asks, "errors": res.errors,
           # chunk_relay_ms from the text's arrival at the node: at 200 tokens/s it holds the coalescing
           # window (node.coalesce_ms); chunk_publish_to_client_ms leaves that wait out
           "ours": {"first_delta_ms": res.first.stats(), "chunk_relay_ms": res.chunk.stats(),
                    "chunk_publish_to_client_ms": res.chunk_pub.stats()},
           "direct": {"ttft_ms": direct.stats()},
           "added_ttft_ms": {"p50": round(res.first.q(50) - direct.q(50), 3),
                             "p99": round(res.first.q(99) - direct.q(99), 3)},
           "cdf": {"ours first delta": res.first.cdf(), "direct TTFT": direct.cdf(),
                   "chunk relay": res.chunk.cdf()}}
    p.line(f"latency: first delta p50 {res.first.q(50):.2f} / p99 {res.first.q(99):.2f} ms; direct TTFT p50 "
           f"{direct.q(50):.2f} / p99 {direct.q(99):.2f} ms; chunk relay p50 {res.chunk.q(50):.2f} / p99 "
           f"{res.chunk.q(99):.2f} ms (publish → client p50 {res.chunk_pub.q(50):.2f} / p99 "
           f"{res.chunk_pub.q(99):.2f} ms)")
    return out


async def direct_only(o: Options, p: Progress) -> dict[str, Any]:
    rows = []
    async with cluster(o, with_node=False) as c:
        for n in o.levels:
            h, errors = await run_direct_level(c.llm_url, o, n)
            rows.append({"streams": n, "ttft_ms": h.stats(), "errors": errors})
            p.line(f"direct {n:5} streams: TTFT p50 {h.q(50):.2f} p99 {h.q(99):.2f} ms")
    return {"levels": rows}


async def memory(o: Options, p: Progress) -> dict[str, Any]:
    """RSS of server A (edge + embedded broker) per idle WS client and per idle MQTT device."""
    import gc

    from broker.creds import CredentialStore
    from core.mqtt import make_client

    out: dict[str, Any] = {}
    async with cluster(o) as c:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            toks = await login_all(s, c.http, o.ws_idle, {})
            await asyncio.sleep(1.0)
            before = c.edge.rss_mb()
            socks = await connect_all(s, c.http, toks)
            await asyncio.sleep(2.0)
            after = c.edge.rss_mb()
            out["ws"] = _per_client(p, "idle WebSocket clients", len(socks), before, after)
            await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)
        gc.collect()
        creds = CredentialStore(str(c.data))
        devs = [creds.add("device", f"m{i}", replace=True) for i in range(o.mqtt_idle)]
        await asyncio.sleep(1.0)
        before = c.edge.rss_mb()
        stack = contextlib.AsyncExitStack()
        async with stack:
            sem = asyncio.Semaphore(16)

            async def dev(user: str, pw: str) -> None:
                async with sem:
                    cl = make_client(host="localhost", port=c.tls_port, username=user, password=pw,
                                     identifier=user, tls=tls_context(c.ca), keepalive=60, max_queued=100)
                    await stack.enter_async_context(cl)
                    await cl.subscribe(wire.reply_topic(user), qos=1)

            await asyncio.gather(*(dev(u, pw) for u, pw in devs))
            await asyncio.sleep(2.0)
            after = c.edge.rss_mb()
            out["mqtt"] = _per_client(p, "idle MQTT devices (TLS)", len(devs), before, after)
    return out


def _per_client(p: Progress, what: str, n: int, before: float, after: float) -> dict[str, Any]:
    row = {"clients": n, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
           "kb_per_client": round((after - before) * 1024 / max(1, n), 1)}
    p.line(f"memory: {n} {what}: {row['kb_per_client']} KB each (edge {before:.0f} → {after:.0f} MB)")
    return row


async def devices(o: Options, p: Progress) -> dict[str, Any]:
    """The sweep for MQTT devices (broker + node, no edge on the path); knee as for WebSocket users."""
    from broker.creds import CredentialStore

    rows: list[dict[str, Any]] = []
    async with cluster(o) as c:
        store = CredentialStore(str(c.data))
        creds = [store.add("device", f"bench{i}", replace=True) for i in range(max(o.levels))]
        for n in o.levels:
            res, cpu, rss = await measured(c, run_device_level(c, o, n, creds))
            row = level_row(res, None, o.level_s, cpu, rss, offered_chars_per_s(o, n))
            rows.append(row)
            cs = row["chunk_ms"]
            p.line(f"devices {n:5}: chunk relay p50 {cs.get('p50', float('nan')):7.2f} p99 "
                   f"{cs.get('p99', float('nan')):8.2f} ms · {row['chunks_per_s']:8.0f} chunks/s · errors "
                   f"{res.errors}/{res.asks} · broker (edge process) {row['rss_edge_mb']} MB · cpu {cpu}")
            if past_knee(row) and o.stop_at_knee:
                break
    return {"levels": rows, "knee": knee_of(rows), "knee_rule": KNEE_RULE}


async def floor(o: Options, p: Progress, seconds: float = 6.0,
                levels: tuple[int, ...] = (100, 500, 1000)) -> dict[str, Any]:
    """What one loopback TCP hop costs this machine, with no SmartClaw code on it: this process writes a
    150-byte message to each of ``streams`` connections ``tps`` times a second (timer callbacks, uvloop, as
    the fake LLM does) and a ``sink`` process reads them. CPU per message, sender and receiver, kernel time
    included. A token crosses two such per-token hops on our path (fake LLM → node, edge → client) and one on
    the direct baseline's; the rest (MQTT) is batched. This is the ceiling the sweep's knee is measured
    against: tokens/s at most ≈ cores / (2 × per-hop CPU)."""
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="claw-floor-"))
    sink = Proc("sink", {"log_level": o.log_level, "loop": o.loop}, tmp)
    try:
        loop = asyncio.get_running_loop()
        for n in levels:
            trs = []
            for _ in range(n):
                tr, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", sink.info["port"])
                trs.append(tr)
            msg = b"x" * 150
            interval = 1.0 / max(o.tps, 1e-9)
            sent = [0]
            t_stop = loop.time() + seconds + 0.5
            rng = random.Random(n)

            def tick(tr: asyncio.Transport, at: float) -> None:
                if at > t_stop:
                    return
                tr.write(msg)
                sent[0] += 1
                loop.call_at(at + interval, tick, tr, at + interval)

            t0 = loop.time()
            for tr in trs:
                first = t0 + rng.random() * interval
                loop.call_at(first, tick, tr, first)
            await asyncio.sleep(0.5)
            sink.cpu_mark()
            c0, s0, w0 = time.process_time(), sent[0], time.monotonic()
            await asyncio.sleep(seconds)
            secs = time.monotonic() - w0
            msgs = sent[0] - s0
            snd, rcv = (time.process_time() - c0) / msgs * 1e6, sink.cpu_pct() / 100 * secs / msgs * 1e6
            await asyncio.sleep(0.6)
            for tr in trs:
                tr.close()
            per_hop = snd + rcv
            row = {"streams": n, "msgs_per_s": round(msgs / secs), "sender_us": round(snd, 1),
                   "receiver_us": round(rcv, 1), "hop_us": round(per_hop, 1),
                   "ceiling_tokens_per_s_two_hops": round((os.cpu_count() or 1) * 1e6 / (2 * per_hop)),
                   "ceiling_streams": round((os.cpu_count() or 1) * 1e6 / (2 * per_hop) / max(o.tps, 1e-9))}
            rows.append(row)
            p.line(f"floor {n:5} streams: {row['msgs_per_s']} msgs/s · sender {row['sender_us']} µs + receiver "
                   f"{row['receiver_us']} µs per message · two-hop ceiling {row['ceiling_streams']} streams "
                   f"at {o.tps:g} tokens/s with nothing else running")
            await asyncio.sleep(0.3)
    finally:
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"levels": rows, "message_bytes": 150, "tps": o.tps}


async def smoke(o: Options, p: Progress) -> dict[str, Any]:
    """CI: one user and ten users for a few seconds each, compared with direct in the same run. Fails only on
    errors or when ours/direct exceeds SMOKE_MAX_RATIO (never on an absolute time)."""
    so = Options(**{**asdict(o), "level_s": 3.0, "warm_s": 1.0, "tokens": 20, "tps": 40.0})
    async with cluster(so) as c:
        cache: dict[int, str] = {}
        rows = [await level(c, so, n, cache, p) for n in (1, 10)]
    verdicts = []
    for r in rows:
        d = r.get("direct_ttft_ms", {})
        ratio = (r["first_delta_ms"].get("p50", float("inf")) / d["p50"]) if d.get("p50") else float("inf")
        verdicts.append({"streams": r["streams"], "first_delta_over_direct_p50": round(ratio, 2),
                         "ok": r["errors"] == 0 and r["asks"] > 0 and ratio <= SMOKE_MAX_RATIO})
    return {"levels": rows, "verdicts": verdicts, "max_ratio": SMOKE_MAX_RATIO,
            "ok": all(v["ok"] for v in verdicts)}
