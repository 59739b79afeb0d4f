"""One measured level: the load run while the processes' CPU and the edge's RSS are sampled, and its row.

:func:`level` runs one WebSocket level (and the direct baseline at the same concurrency) and prints its
line; :func:`measured` wraps any level's load with the sampling; :func:`level_row` turns the samples into the
row ``results.json`` stores; :func:`offered_chars_per_s` is the text the fake LLM's pace offers, against
which the delivered share is taken.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .cluster import Cluster
from .hist import Hist
from .load import LevelResult, run_direct_level, run_ws_level
from .options import Options
from .procs import Proc
from .progress import Progress

__all__ = ["offered_chars_per_s", "level_row", "measured", "level"]


def offered_chars_per_s(o: Options, streams: int) -> float:
    """What ``streams`` users would receive if every answer took only the fake LLM's own time (its TTFT,
    then a token every 1/tps: the last one (tokens − 1)/tps after the first) and the next ask left at
    once: the pace the relay is offered. 0 when the fake LLM is not paced (tps 0)."""
    if o.tps <= 0:
        return 0.0
    cycle = o.ttft + max(o.tokens - 1, 1) / o.tps
    return streams * o.tokens * o.token_chars / cycle


def level_row(res: LevelResult, direct: Hist | None, secs: float, cpu: dict[str, float],
               rss: float, offered: float = 0.0) -> dict[str, Any]:
    row: dict[str, Any] = {"streams": res.streams, "asks": res.asks, "errors": res.errors,
                           "chunk_ms": res.chunk.stats(), "chunk_pub_ms": res.chunk_pub.stats(),
                           "first_delta_ms": res.first.stats(),
                           "chunks_per_s": round(res.chunks / secs, 1) if secs else 0,
                           "chars_per_s": round(res.chars / secs, 1) if secs else 0, "cpu": cpu,
                           "rss_edge_mb": round(rss, 1)}
    if offered > 0 and secs:
        # share of the offered text that arrived in the window (the gap between one answer and the next ask
        # costs a few %: 1.0 means the relay keeps the fake LLM's pace)
        row["delivered"] = round(res.chars / secs / offered, 3)
    if direct is not None and direct.n:
        row["direct_ttft_ms"] = direct.stats()
        row["added_ttft_ms"] = {k: round(res.first.q(p) - direct.q(p), 3) for k, p in
                                (("p50", 50), ("p90", 90), ("p99", 99))} if res.first.n else {}
    if res.reasons:
        row["failures"] = res.reasons
    if res.chunk.negative:
        row["negative_samples"] = res.chunk.negative
    return row


async def _rss_sampler(proc: Proc, box: list[float]) -> None:
    while True:
        box[0] = max(box[0], proc.rss_mb())
        await asyncio.sleep(0.2)


async def measured(c: Cluster, load: Any) -> tuple[LevelResult, dict[str, float], float]:
    """Run one level's load (a coroutine) while sampling: (its result, CPU % of every process incl. this
    load generator, the edge process's peak RSS in MB)."""
    box = [c.edge.rss_mb()]
    sampler = asyncio.create_task(_rss_sampler(c.edge, box))
    c.mark()
    t_cpu, t0 = time.process_time(), time.monotonic()
    try:
        res = await load
    finally:
        sampler.cancel()
    cpu = c.cpu()
    cpu["load"] = round(100 * (time.process_time() - t_cpu) / max(1e-9, time.monotonic() - t0), 1)
    return res, cpu, box[0]


async def level(c: Cluster, o: Options, streams: int, tokens_cache: dict[int, str], p: Progress,
                with_direct: bool = True) -> dict[str, Any]:
    res, cpu, rss = await measured(c, run_ws_level(c.http, o, streams, tokens_cache, p,
                                                    f"{c.broker} {streams} streams"))
    direct = None
    if with_direct:
        direct, _ = await run_direct_level(c.llm_url, o, streams)
    row = level_row(res, direct, o.level_s, cpu, rss, offered_chars_per_s(o, streams))
    cs, fd = row["chunk_ms"], row["first_delta_ms"]
    p.line(f"{c.broker:9} {streams:5} streams: chunk relay p50 {cs.get('p50', float('nan')):7.2f} "
           f"p99 {cs.get('p99', float('nan')):8.2f} ms · first delta p99 {fd.get('p99', float('nan')):8.2f} ms · "
           f"{row['chunks_per_s']:8.0f} chunks/s · delivered {row.get('delivered', 0):.0%} · "
           f"errors {res.errors}/{res.asks} · edge {row['rss_edge_mb']} MB · "
           f"cpu {cpu}")
    return row
