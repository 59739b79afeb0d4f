"""``claw bench wecom``: WeCom callback acknowledgement latency under load, and exactly-once delivery.

Topology (three processes, as in production, all on 127.0.0.1):

* **this process = server A**: the edge with the embedded broker and the WeCom channel;
* **child "B"**: the node and a fake LM Studio (server B);
* **child "WeCom"**: a fake WeCom API (gettoken, message/send; records every send) and the load
  generator, which posts signed, encrypted callbacks (``WeComSim``) open-loop at ``--rate`` per
  second for ``--seconds``, re-sending ``--retry-share`` of them as WeCom's retries do.

Reported: callback → HTTP 200 latency (from the *scheduled* send time, so a stalled server cannot
hide queueing), callback → answer recorded by the fake ``message/send``, and the exactly-once
check: every distinct message got exactly one answer, none dropped by the (fake) rate limit,
none truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TOKEN, AES, CORP, AGENT = "BenchTok3n", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wwbench00000001", 1000002
SECRET = "bench-secret"


@dataclass
class WeComBenchConfig:
    rate: float = 200.0  # callbacks per second (distinct messages)
    seconds: float = 10.0
    users: int = 200
    retry_share: float = 0.1  # this share of messages is posted again (a WeCom retry)
    warmup: int = 20
    answer_timeout: float = 120.0
    loop: str = "uvloop"
    progress: bool = True


def _loop_factory(name: str) -> Any:
    from core.runtime import loop_factory

    return loop_factory(name)


# ---- child B: node + fake LM Studio -------------------------------------------------------------
def _child_b(settings_over: dict[str, Any], loop: str, stop: Any) -> None:
    from core.config import load_settings
    from fakes.llm import FakeLLMConfig, run_fake_llm
    from node.worker import Node

    async def main() -> None:
        async with run_fake_llm(FakeLLMConfig(reply="收到，这是基准测试的回答。", tokens_per_s=0)) as fake:
            over = dict(settings_over)
            over["node"] = {**over["node"], "llm_url": fake.url}
            node = Node(load_settings(env={}, overrides=over))
            task = asyncio.create_task(node.run())
            while not stop.is_set():
                await asyncio.sleep(0.1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as r:
        r.run(main())


# ---- child WeCom: fake API + load generator -----------------------------------------------------
def _child_wecom(cfg: WeComBenchConfig, conn: Any) -> None:
    from fakes.wecom import FakeWeComConfig, WeComSim, run_fake_wecom

    async def main() -> None:
        import aiohttp

        fw_cfg = FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=AGENT)
        async with run_fake_wecom(fw_cfg) as fw:
            conn.send({"api": fw.url})
            cmd = conn.recv()
            url = cmd["callback"]
            sim = WeComSim(TOKEN, AES, CORP, AGENT)
            rng = random.Random(7)
            n = int(cfg.rate * cfg.seconds)
            users = [f"bench{u:04d}" for u in range(cfg.users)]
            warm = [sim.text(users[i % len(users)], f"预热 {i}") for i in range(cfg.warmup)]
            cbs = [sim.text(users[i % len(users)], f"基准问题 {i}") for i in range(n)]
            retries = sorted(rng.sample(range(n), int(n * cfg.retry_share)))
            conn_limit = aiohttp.TCPConnector(limit=256)
            lat: list[float] = []
            sched_lat: list[float] = []
            statuses: dict[int, int] = {}
            async with aiohttp.ClientSession(connector=conn_limit) as s:
                for cb in warm:
                    await cb.post(s, url)

                async def fire(cb: Any, at: float) -> None:
                    delay = at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    t0 = time.perf_counter()
                    status, _ = await cb.post(s, url)
                    t1 = time.perf_counter()
                    lat.append((t1 - t0) * 1000)
                    sched_lat.append((t1 - at) * 1000)
                    statuses[status] = statuses.get(status, 0) + 1

                start = time.perf_counter() + 0.2
                jobs = [fire(cb, start + i / cfg.rate) for i, cb in enumerate(cbs)]
                # a retry arrives ~1 s after the original, with a fresh signature (as WeCom's may)
                jobs += [fire(cbs[i].again(fresh_signature=True), start + i / cfg.rate + 1.0) for i in retries]
                t_send0 = time.perf_counter()
                await asyncio.gather(*jobs)
                send_s = time.perf_counter() - t_send0
                expected = cfg.warmup + n
                t_wait = time.perf_counter()
                with contextlib.suppress(Exception):
                    await fw.wait_sends(expected, timeout=cfg.answer_timeout)
                await asyncio.sleep(1.0)  # would-be duplicates have time to show up
                delivered = fw.delivered()
                per_msg: dict[str, int] = {}
                for m in delivered:
                    per_msg[m.user] = per_msg.get(m.user, 0) + 1
                conn.send({
                    "lat": lat, "sched_lat": sched_lat, "statuses": statuses, "send_s": send_s,
                    "expected": expected, "delivered": len(delivered), "sends": len(fw.sends),
                    "dropped": sum(1 for m in fw.sends if m.dropped),
                    "truncated": sum(1 for m in fw.sends if m.truncated),
                    "per_user_max": max(per_msg.values()) if per_msg else 0,
                    "answer_wait_s": time.perf_counter() - t_wait, "retries": len(retries),
                    "gettoken": fw.stats.gettoken,
                })

    with asyncio.Runner(loop_factory=_loop_factory(cfg.loop)) as r:
        r.run(main())


# ---- server A (this process) --------------------------------------------------------------------
async def _run(cfg: WeComBenchConfig) -> dict[str, Any]:
    from broker.creds import CredentialStore
    from core.config import load_settings
    from core.pki import issue_server_cert
    from edge.app import INFO, run_edge
    from edge.keys import BRIDGE, STORE, WECOM

    from .tunnel import environment, percentiles

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="claw-bench-wecom-") as tmp:
        a_dir, b_dir = Path(tmp) / "a", Path(tmp) / "b"
        pki = issue_server_cert(a_dir / "pki", ["localhost", "127.0.0.1"])
        parent, child = ctx.Pipe()
        wc = ctx.Process(target=_child_wecom, args=(cfg, child), name="bench-wecom", daemon=True)
        wc.start()
        api = await asyncio.to_thread(parent.recv)
        settings = load_settings(env={}, overrides={
            "data_dir": str(a_dir), "log": {"level": "WARNING"},
            "broker": {"listen": "127.0.0.1:0", "local_listen": "127.0.0.1:0"},
            "edge": {"http": "127.0.0.1:0"},
            "wecom": {"corp_id": CORP, "agent_id": AGENT, "secret": SECRET, "token": TOKEN,
                      "encoding_aes_key": AES, "api_base": api["api"], "welcome": ""},
        })
        user, password = CredentialStore(settings.data_dir).add("node", "bench", replace=True)
        stop_b = ctx.Event()
        b: Any = None
        try:
            async with run_edge(settings) as app:
                b_over = {
                    "data_dir": str(b_dir), "log": {"level": "WARNING"},
                    "mqtt": {"host": "localhost", "port": app[INFO].mqtt_tls_port, "tls": True,
                             "ca_file": str(pki.ca_cert), "username": user, "password": password},
                    "node": {"id": "bench", "llm_url": "http://127.0.0.1:9/v1", "model": "fake-model",
                             "concurrency": 8},
                }
                b = ctx.Process(target=_child_b, args=(b_over, cfg.loop, stop_b), name="bench-b", daemon=True)
                b.start()
                t_end = time.monotonic() + 30
                while not app[BRIDGE].node_online:
                    if time.monotonic() > t_end:
                        raise RuntimeError("node did not come online")
                    await asyncio.sleep(0.05)
                cpu0, t0 = time.process_time(), time.monotonic()
                parent.send({"callback": f"http://127.0.0.1:{app[INFO].http_port}/wecom/callback"})
                res = await asyncio.to_thread(parent.recv)
                elapsed = time.monotonic() - t0
                cpu = time.process_time() - cpu0
                channel = app[WECOM]
                tasks = len(app[STORE].scan())
                stats = dict(channel.stats)
                outbox = {"sent": channel.outbox.sent, "failed": channel.outbox.failed,
                          "retries": channel.outbox.retries, "pending": channel.outbox.pending()}
                writer = {"batches": app[STORE].writer.batches, "ops": app[STORE].writer.ops}
        finally:
            stop_b.set()
            for p in (b, wc):
                if p is not None:
                    p.join(10)
                    if p.is_alive():
                        p.kill()
    n = int(cfg.rate * cfg.seconds)
    failures = []
    if res["delivered"] != res["expected"]:
        failures.append(f"{res['expected']} answers expected, {res['delivered']} delivered")
    if res["dropped"] or res["truncated"]:
        failures.append(f"{res['dropped']} dropped by the rate limit, {res['truncated']} truncated")
    if tasks != res["expected"]:
        failures.append(f"{tasks} tasks stored for {res['expected']} distinct messages")
    if set(res["statuses"]) != {200}:
        failures.append(f"HTTP statuses {res['statuses']}")
    return {
        "scenario": "wecom",
        "settings": asdict(cfg),
        "env": environment(cfg.loop),
        "counts": {"messages": n, "retries": res["retries"], "callbacks": n + res["retries"], "tasks": tasks,
                   "answers_delivered": res["delivered"], "sends": res["sends"], "dropped": res["dropped"],
                   "truncated": res["truncated"], "gettoken": res["gettoken"]},
        "offered_rate": (n + res["retries"]) / res["send_s"] if res["send_s"] else 0,
        "latency_ms": {"callback_ack": percentiles(res["lat"]), "callback_ack_from_schedule":
                       percentiles(res["sched_lat"])},
        "answers_all_delivered_after_s": res["answer_wait_s"],
        "edge": {"cpu_utilization": cpu / elapsed if elapsed else 0.0, "channel": stats, "outbox": outbox,
                 "lmdb_writer": writer},
        "failures": failures, "failures_total": len(failures),
    }


def run_wecom(cfg: WeComBenchConfig) -> dict[str, Any]:
    with asyncio.Runner(loop_factory=_loop_factory(cfg.loop)) as r:
        return r.run(_run(cfg))


def format_wecom(report: dict[str, Any]) -> str:
    c, lat = report["counts"], report["latency_ms"]
    s = report["settings"]
    lines = [
        f"claw bench wecom: {c['callbacks']} callbacks ({c['messages']} messages + {c['retries']} retries) "
        f"at {report['offered_rate']:.0f}/s over {s['seconds']:.0f} s, {s['users']} users",
        f"server A (edge+broker+WeCom channel) in this process, node + fake LM Studio and fake WeCom in two "
        f"others; CPU of A {report['edge']['cpu_utilization'] * 100:.0f}% of one core; "
        f"{os.cpu_count()} CPUs, commit {str(report['env'].get('git_commit'))[:10]}",
        "",
        f"{'latency (ms)':<44}{'n':>6}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}",
    ]
    for key, label in (("callback_ack", "callback → 200 (recorded in LMDB)"),
                       ("callback_ack_from_schedule", "  from the scheduled send time")):
        p = lat[key]
        lines.append(f"{label:<44}{p.get('n', 0):>6}" + "".join(f"{p.get(k, 0):>9.2f}" for k in
                                                                 ("p50", "p90", "p99", "max")))
    lines += [
        "",
        f"tasks stored {c['tasks']} for {c['messages'] + s['warmup']} distinct messages; answers delivered "
        f"{c['answers_delivered']} (dropped {c['dropped']}, truncated {c['truncated']}); all delivered "
        f"{report['answers_all_delivered_after_s']:.1f} s after the last callback; gettoken calls {c['gettoken']}",
        f"LMDB group commits: {report['edge']['lmdb_writer']['batches']} for {report['edge']['lmdb_writer']['ops']} "
        f"writes",
    ]
    if report["failures"]:
        lines += ["", "FAILURES:"] + [f"  {f}" for f in report["failures"]]
    return "\n".join(lines)
