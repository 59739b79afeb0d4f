"""The bench suite's run: ``run(names, options)`` runs the named scenarios in order and returns the one
results dict ``results.json`` holds (environment, settings, every scenario's part, the comparison with the
thin relay and the targets); ``environment(loop)`` describes the machine and the commit.

The scenarios are in ``bench/scenarios.py``, the deployment in ``bench/cluster.py``, the clients in
``bench/load.py``, a measured level in ``bench/measure.py``, the knee rule and the targets in
``bench/targets.py``, the options of a run in ``bench/options.py``.

Topology of every scenario (``bench/procs.py``): **llm** (the fake LM Studio) · **edge** (server A: edge +
embedded amqtt, or edge + an external Mosquitto) · **node** (server B) · and this process, the **load
generator** (mini-program-style WebSocket users on ``/api/ws``, SSE clients for the direct baseline, idle
MQTT devices). Four processes share the machine's cores; each one's CPU is reported.

Scenarios (``claw bench NAME``):

1. ``latency``  -- one user: ask → first delta and per-chunk relay, against the direct baseline (CDFs).
2. ``sweep``    -- concurrent streams 1 → 2000 at ``--tps`` (20) tokens/s each; per level the per-chunk
   relay latency (the chunk's oldest text reaching the node → client receive), the added time to first
   token over direct, the delivered share of the offered text, RSS, CPU. The knee is the largest level
   whose p99 chunk relay is ≤ 100 ms, with < 1 % errors and ≥ 90 % of the offered text delivered.
   ``--broker thin``: the same through the thin relay (``bench/thin.py``), the ceiling.
3. ``brokers``  -- the sweep over the embedded amqtt, over Mosquitto and over the thin relay in one run;
   knee ratio (Mosquitto / amqtt), and the two targets relative to the thin relay (:func:`vs_thin`):
   SmartClaw's CPU per delivered chunk ≤ 1.5× the thin relay's, its knee ≥ 70 % of the thin relay's.
4. ``direct``   -- the client reads the fake LLM's SSE itself: the floor (run inside 1–3 as well).
5. ``wecom``    -- WeCom callback storm (``bench/wecom.py``), ack latency.
6. ``memory``   -- RSS of server A per idle WebSocket client and per idle MQTT device.
``devices``      -- MQTT devices asking over the broker (no edge on their path): their own sweep.
``smoke`` (CI, < 60 s) and ``all``.

Latencies are recorded in HdrHistograms (µs, 3 significant digits). Clocks: every process uses
``time.time_ns()`` on this one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .options import Options
from .progress import Progress
from .scenarios import devices, direct_only, floor, latency, memory, smoke, sweep
from .targets import checks, compared_sweeps, vs_thin

__all__ = ["run", "environment"]


def environment(loop: str) -> dict[str, Any]:
    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        return ""

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain")),
            "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "loop": loop}


async def run(names: list[str], o: Options) -> dict[str, Any]:
    p = Progress(o.progress)
    t0 = time.monotonic()
    results: dict[str, Any] = {"suite": "claw-bench", "version": 1,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "env": environment(o.loop), "settings": asdict(o), "scenarios": {}}
    sc = results["scenarios"]
    for name in names:
        p.line(f"== {name}")
        if name == "latency":
            sc["latency"] = await latency(o, p)
        elif name == "sweep":
            sc["sweep"] = await sweep(o, o.broker, p)
        elif name == "brokers":
            a = await sweep(o, "amqtt", p)
            m = await sweep(o, "mosquitto", p)
            t = await sweep(o, "thin", p)
            ratio = share = None
            if a.get("knee") and m.get("knee"):
                ratio = round(m["knee"] / a["knee"], 2)
            if t.get("knee"):
                share = round((a.get("knee") or 0) / t["knee"], 2)
            # thin: the same sweep through bench/thin.py, the thinnest relay on this stack (the ceiling)
            sc["brokers"] = {"amqtt": a, "mosquitto": m, "thin": t, "knee_ratio": ratio,
                             "knee_share_of_thin": share}
        elif name == "direct":
            sc["direct"] = await direct_only(o, p)
        elif name == "memory":
            sc["memory"] = await memory(o, p)
        elif name == "devices":
            sc["devices"] = await devices(o, p)
        elif name == "wecom":
            from .wecom import WeComBenchConfig, run_wecom

            rep = await asyncio.to_thread(run_wecom, WeComBenchConfig(progress=o.progress, loop=o.loop))
            sc["wecom"] = {**rep, "ack_ms": (rep.get("latency_ms") or {}).get("callback_ack")}
        elif name == "smoke":
            sc["smoke"] = await smoke(o, p)
        elif name == "floor":
            sc["floor"] = await floor(o, p)
        else:
            raise ValueError(name)
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    ours, thin = compared_sweeps(results)
    if ours or thin:
        results["vs_thin"] = vs_thin(ours, thin)
    results["checks"] = checks(results)
    return results
