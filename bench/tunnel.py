"""``claw bench tunnel``: latency of the whole path, WebSocket client → edge → broker → node → back.

The real system runs in this process on free 127.0.0.1 ports (see :mod:`bench.system`): embedded
amqtt broker with TLS, edge, node and the fake LM Studio. ``concurrency`` WebSocket clients (one
dev-login user each) send ``ask`` frames with ``"trace": true`` one after another until ``asks``
answers are in. For every ask the client records, on its own wall clock (µs, ``time.time_ns``):

* ask sent → first ``accepted`` (the edge stored the task and acknowledged it),
* ask sent → second ``accepted`` (the node's Accept came back through the broker),
* ask sent → first ``delta``, and its parts from the first delta's ``timing``:
  ask → node received (n_rx), node received → first LLM token (n_ft), first token → published (n_pub),
  publish → client received,
* ask sent → ``done``, with last chunk published → node done (``timing.n_done``) → client,

and for every delta chunk: the arrival at the node of the chunk's oldest text (``timing.n_tok`` when it
waited in the coalescer ≥ 1 ms, else the publish time ``timing.n_pub``) → client receive, split into the
wait in the coalescer (n_tok → n_pub), node → edge at the edge's forward time ``timing.e_fwd`` (MQTT over
TLS through the broker) and edge → client (WebSocket). All processes share one host, hence one clock.

Every answer is checked (status ok, seqs 1..n without holes, text equal to what the fake model
sends, timing present); a wrong or missing answer is a failure, and any failure makes the exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from core.runtime import now_us

__all__ = ["TunnelConfig", "AskResult", "run_tunnel", "summarize", "format_table", "percentiles"]




@dataclass
class TunnelConfig:
    asks: int = 200  # measured asks (in all, across clients)
    concurrency: int = 1  # WebSocket clients asking at once, each one ask at a time
    tokens: int = 50  # tokens per fake answer
    tps: float = 200.0  # fake LLM tokens per second (0 = as fast as possible)
    ttft: float = 0.0  # fake LLM time to first token, seconds
    token_chars: int = 4  # characters per fake token
    coalesce_ms: float | None = None  # node.coalesce_ms (None = the product default)
    node_slots: int | None = None  # node.concurrency (None = max(2, concurrency): no queueing in the node)
    warmup: int = 1  # unmeasured asks per client before the measurement
    ask_timeout: float = 30.0  # seconds for one answer (+ ttft + generation time)
    timeout: float | None = None  # seconds for the whole run (None = derived from the settings)
    loop: str = "uvloop"  # event loop: uvloop or asyncio
    progress: bool = True  # progress on stderr
    raw: bool = False  # include every ask's timestamps in the report ("asks")

    def gen_s(self) -> float:
        """Generation time of one answer at the fake LLM (without TTFT)."""
        return (self.tokens - 1) / self.tps if self.tps > 0 and self.tokens > 1 else 0.0

    def total_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        per_ask = self.ttft + self.gen_s() + 1.0
        rounds = math.ceil((self.asks + self.warmup * self.concurrency) / max(1, self.concurrency))
        return 60.0 + 3.0 * rounds * per_ask


@dataclass
class AskResult:
    ok: bool
    error: str = ""
    t_ask: int = 0  # client wall clock, µs
    t_accepted: int | None = None  # edge's accepted frame
    t_node_accepted: int | None = None  # the node's Accept, relayed
    t_first: int | None = None  # first delta
    t_done: int | None = None
    first_timing: dict[str, int] = field(default_factory=dict)  # timing of the first delta (n_rx, n_ft, n_pub, e_fwd)
    done_timing: dict[str, int] = field(default_factory=dict)  # timing of the done frame (n_done, e_fwd, ...)
    # (client rx, n_pub, e_fwd, n_tok: when the chunk's oldest text reached the node) per delta
    chunks: list[tuple[int, int, int | None, int]] = field(default_factory=list)
    chunk_chars: int = 0


# ---- statistics ----------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | int]:
    """Exact nearest-rank percentiles (no binning: the sample counts here are small)."""
    if not values:
        return {"n": 0}
    v = sorted(values)
    n = len(v)

    def rank(p: float) -> float:
        return v[max(0, math.ceil(p / 100.0 * n) - 1)]

    return {"n": n, "min": v[0], "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": v[-1],
            "mean": sum(v) / n}


# (key, label) in table order; an indented label is a part of the row above it
ROWS: list[tuple[str, str]] = [
    ("ask_to_accepted", "ask → accepted (edge stored it)"),
    ("ask_to_node_accepted", "ask → accepted by the node"),
    ("ask_to_first_delta", "ask → first delta"),
    ("first.ask_to_node_rx", "  ask → node has the task"),
    ("first.node_rx_to_first_token", "  node → first LLM token (incl. TTFT)"),
    ("first.first_token_to_publish", "  first token → chunk published"),
    ("first.publish_to_client", "  chunk published → client"),
    ("ask_to_done", "ask → done"),
    ("done.last_publish_to_node_done", "  last chunk published → node done"),
    ("done.node_done_to_client", "  node done → client"),
    ("chunk_relay", "chunk relay node → client (every chunk, from its text's arrival at the node)"),
    ("chunk_wait_in_node", "  text waits in the node's coalescer"),
    ("chunk_node_to_edge", "  node → edge (MQTT/TLS via broker)"),
    ("chunk_edge_to_client", "  edge → client (WebSocket)"),
    ("loop_lag", "event-loop lag (10 ms timer, while measuring)"),
]


def summarize(results: list[AskResult]) -> dict[str, dict[str, float | int]]:
    """Latency statistics in milliseconds over the successful asks."""
    series: dict[str, list[float]] = {k: [] for k, _ in ROWS if k != "loop_lag"}

    def add(key: str, a: int | None, b: int | None) -> None:
        if a is not None and b is not None:
            series[key].append((b - a) / 1000.0)

    for r in results:
        if not r.ok:
            continue
        add("ask_to_accepted", r.t_ask, r.t_accepted)
        add("ask_to_node_accepted", r.t_ask, r.t_node_accepted)
        add("ask_to_first_delta", r.t_ask, r.t_first)
        add("ask_to_done", r.t_ask, r.t_done)
        ft = r.first_timing
        add("first.ask_to_node_rx", r.t_ask, ft.get("n_rx"))
        add("first.node_rx_to_first_token", ft.get("n_rx"), ft.get("n_ft"))
        add("first.first_token_to_publish", ft.get("n_ft"), ft.get("n_pub"))
        add("first.publish_to_client", ft.get("n_pub"), r.t_first)
        dt = r.done_timing
        add("done.last_publish_to_node_done", r.chunks[-1][1] if r.chunks else None, dt.get("n_done"))
        add("done.node_done_to_client", dt.get("n_done"), r.t_done)
        for rx, pub, fwd, tok in r.chunks:
            add("chunk_relay", tok, rx)
            add("chunk_wait_in_node", tok, pub)
            add("chunk_node_to_edge", pub, fwd)
            add("chunk_edge_to_client", fwd, rx)
    return {k: percentiles(v) for k, v in series.items()}


# ---- environment -----------------------------------------------------------------------------
def environment(loop_name: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loop": loop_name,
    }


# ---- one client ------------------------------------------------------------------------------
class _Client:
    def __init__(self, idx: int, cfg: TunnelConfig, system: Any, session: aiohttp.ClientSession,
                 expected: Any) -> None:
        self.idx = idx
        self.cfg = cfg
        self.system = system
        self.session = session
        self.expected = expected  # question -> expected answer text
        self.user = f"bench{idx}"
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.n = 0

    async def connect(self) -> None:
        token = await self.system.login(self.session, self.user)
        self.ws = await self.session.ws_connect(f"{self.system.http}/api/ws", params={"token": token},
                                                heartbeat=None, max_msg_size=1 << 20)
        first = await self.ws.receive_json(timeout=10)  # {"type": "node", "online": ...}
        if first.get("type") != "node":
            raise RuntimeError(f"bench: unexpected first frame {first!r}")

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def ask(self) -> AskResult:
        """One ask on this client's socket; never raises (a failure is an AskResult with ok=False)."""
        self.n += 1
        question = f"bench client {self.idx} ask {self.n}: 你好"
        limit = self.cfg.ask_timeout + self.cfg.ttft + self.cfg.gen_s()
        try:
            if self.ws is None or self.ws.closed:
                await self.connect()
            async with asyncio.timeout(limit):
                return await self._ask(question)
        except TimeoutError:
            await self._reset()
            return AskResult(False, f"no done within {limit:.0f} s")
        except Exception as exc:  # a socket error, a malformed frame...: this ask failed, the run goes on
            await self._reset()
            return AskResult(False, f"{type(exc).__name__}: {exc}")

    async def _reset(self) -> None:
        # a late frame of the failed ask must not be taken for the next one's: use a fresh socket
        await self.close()
        self.ws = None

    async def _ask(self, question: str) -> AskResult:
        ws = self.ws
        assert ws is not None
        conv = f"c{self.n}"  # a fresh conversation per ask: no history grows in the node
        r = AskResult(ok=False)
        r.t_ask = now_us()
        await ws.send_str(json.dumps({"type": "ask", "text": question, "conv": conv, "trace": True}))
        task: str | None = None
        texts: list[str] = []
        while True:
            msg = await ws.receive()
            t_rx = now_us()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"websocket {msg.type.name.lower()}")
            f = msgspec.json.decode(msg.data)
            kind = f.get("type")
            if kind == "error":
                r.error = f"error frame {f.get('code')}: {f.get('message')}"
                return r
            if kind == "node":
                continue
            if kind == "accepted" and task is None:
                task, r.t_accepted = f["task"], t_rx
                continue
            if f.get("task") != task:
                continue  # not ours
            if kind == "accepted":
                if r.t_node_accepted is None:
                    r.t_node_accepted = t_rx
            elif kind == "delta":
                if f["seq"] != len(texts) + 1:
                    r.error = f"delta seq {f['seq']} after {len(texts)}"
                    return r
                texts.append(f["text"])
                timing = f.get("timing") or {}
                if "n_pub" not in timing:
                    r.error = "delta without timing.n_pub (tracing not passed through)"
                    return r
                if r.t_first is None:
                    r.t_first = t_rx
                    r.first_timing = dict(timing)
                r.chunks.append((t_rx, timing["n_pub"], timing.get("e_fwd"), timing.get("n_tok", timing["n_pub"])))
            elif kind == "done":
                r.t_done = t_rx
                r.done_timing = dict(f.get("timing") or {})
                text = "".join(texts)
                r.chunk_chars = len(text)
                if f.get("status") != "ok":
                    r.error = f"status {f.get('status')}: {f.get('error')}"
                elif f.get("seq") != len(texts) or f.get("text") != text:
                    r.error = f"done seq {f.get('seq')} / text does not match the {len(texts)} deltas"
                elif text != self.expected(question):
                    r.error = "answer differs from what the fake model sent"
                elif r.t_node_accepted is None:
                    r.error = "no accepted frame from the node"
                else:
                    r.ok = True
                return r


# ---- the run ---------------------------------------------------------------------------------
async def _lag_probe(out: list[float], period: float = 0.01) -> None:
    """Event-loop lag: how late a ``sleep(period)`` wakes up, in ms (every component shares this loop)."""
    while True:  # perf_counter, not loop.time(): uvloop's clock has 1 ms steps
        t = time.perf_counter()
        await asyncio.sleep(period)
        out.append(max(0.0, (time.perf_counter() - t - period) * 1000.0))


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.phase = "starting"
        self.t0 = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()
        self._last_decile = -1

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        line = (f"[bench tunnel] {self.phase}: {self.done}/{self.total} asks, {self.failed} failed, "
                f"{time.monotonic() - self.t0:.1f} s")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(78) + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            decile = self.done * 10 // max(1, self.total)
            if final or decile != self._last_decile:
                self._last_decile = decile
                print(line, file=sys.stderr, flush=True)

    async def loop(self) -> None:
        while True:
            self.show()
            await asyncio.sleep(0.5)


async def _run(cfg: TunnelConfig) -> dict[str, Any]:
    from fakes.llm import FakeLLMConfig, reply_tokens

    from .system import run_system

    fake_cfg = FakeLLMConfig(ttft=cfg.ttft, tokens_per_s=cfg.tps, n_tokens=cfg.tokens, token_chars=cfg.token_chars)

    def expected(question: str) -> str:
        return "".join(reply_tokens(fake_cfg, [{"role": "user", "content": question}]))

    # max_tokens 0: not sent, so an answer of any --tokens is streamed whole (the fake honours max_tokens)
    node_over: dict[str, Any] = {"concurrency": cfg.node_slots or max(2, cfg.concurrency), "max_tokens": 0}
    if cfg.coalesce_ms is not None:
        node_over["coalesce_ms"] = cfg.coalesce_ms
    progress = _Progress(cfg.asks, cfg.progress)
    results: list[AskResult] = []
    warm: list[AskResult] = []
    timed_out = False
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    elapsed = 0.0
    with tempfile.TemporaryDirectory(prefix="claw-bench-") as tmp:
        async with run_system(Path(tmp), fake_cfg=fake_cfg, node=node_over) as system, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            node_settings = system.node_settings.node
            clients = [_Client(i, cfg, system, session, expected) for i in range(cfg.concurrency)]
            ticker = asyncio.create_task(progress.loop())
            remaining = cfg.asks
            t_start = time.monotonic()

            async def worker(c: _Client) -> None:
                nonlocal remaining
                for _ in range(cfg.warmup):
                    warm.append(await c.ask())
                await warmed.wait()
                while remaining > 0:
                    remaining -= 1
                    r = await c.ask()
                    results.append(r)
                    progress.done += 1
                    progress.failed += not r.ok

            warmed = asyncio.Event()
            workers: list[asyncio.Task[None]] = []
            lags: list[float] = []
            probe: asyncio.Task[None] | None = None
            cpu0 = time.process_time()
            try:
                async with asyncio.timeout(cfg.total_timeout()):
                    progress.phase = "connecting"
                    try:
                        await asyncio.gather(*(c.connect() for c in clients))
                    except (aiohttp.ClientError, OSError, ValueError) as exc:
                        raise RuntimeError(f"WebSocket clients could not connect: {exc!r}") from exc
                    progress.phase = "warm-up"
                    workers += [asyncio.create_task(worker(c)) for c in clients]
                    while len(warm) < cfg.warmup * cfg.concurrency and not any(w.done() for w in workers):
                        await asyncio.sleep(0.01)
                    progress.phase = "measuring"
                    t_start, cpu0 = time.monotonic(), time.process_time()
                    probe = asyncio.create_task(_lag_probe(lags))
                    warmed.set()
                    await asyncio.gather(*workers)
            except TimeoutError:
                timed_out = True
            finally:
                elapsed = time.monotonic() - t_start
                cpu = time.process_time() - cpu0
                ticker.cancel()
                if probe is not None:
                    probe.cancel()
                progress.show(final=True)
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            node_stats = asdict(system.node.stats)
            bridge_stats = asdict(system.app[_bridge_key()].stats)

    ok = [r for r in results if r.ok]
    failures = [r.error for r in results if not r.ok] + [f"warm-up: {r.error}" for r in warm if not r.ok]
    if timed_out:
        failures.append(f"run stopped after {cfg.total_timeout():.0f} s with {cfg.asks - len(results)} "
                        f"ask(s) not finished")
    n_chunks = sum(len(r.chunks) for r in ok)
    return {
        "scenario": "tunnel",
        "started_at": started_at,
        "settings": {**asdict(cfg), "node_concurrency": node_settings.concurrency,
                     "coalesce_ms": node_settings.coalesce_ms, "coalesce_bytes": node_settings.coalesce_bytes,
                     "total_timeout_s": cfg.total_timeout(), "transport": "MQTT over TLS on 127.0.0.1 (amqtt)"},
        "env": environment(cfg.loop),
        "fake_llm": {"ttft_ms": cfg.ttft * 1000.0, "tokens": cfg.tokens, "tokens_per_s": cfg.tps,
                     "token_chars": cfg.token_chars, "generation_ms": cfg.gen_s() * 1000.0},
        "counts": {"asks": cfg.asks, "finished": len(results), "ok": len(ok), "failed": cfg.asks - len(ok),
                   "warmup": len(warm), "chunks": n_chunks,
                   "chunks_per_ask": n_chunks / len(ok) if ok else 0.0,
                   "chars_per_ask": sum(r.chunk_chars for r in ok) / len(ok) if ok else 0.0},
        "elapsed_s": elapsed,
        "throughput": {"asks_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
                       "chunks_per_s": n_chunks / elapsed if elapsed > 0 else 0.0},
        # CPU seconds of this process (all components) per wall second while measuring: near 1.0
        # means the one event loop was saturated and the latencies measure the bench host.
        "cpu": {"seconds": cpu, "utilization": cpu / elapsed if elapsed > 0 else 0.0},
        "latency_ms": {**summarize(results), "loop_lag": percentiles(lags)},
        "failures": failures[:20],
        "failures_total": len(failures),
        "node_stats": node_stats,
        "edge_stats": bridge_stats,
        **({"asks": [asdict(r) for r in results]} if cfg.raw else {}),
    }


def _bridge_key() -> Any:
    from edge.keys import BRIDGE
    return BRIDGE


def run_tunnel(cfg: TunnelConfig) -> dict[str, Any]:
    """Run the scenario on a fresh event loop; return the report (see ``bench/README.md``)."""
    factory = None
    if cfg.loop == "uvloop":
        try:
            import uvloop
            factory = uvloop.new_event_loop
        except ImportError:
            cfg.loop = "asyncio"
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_run(cfg))


# ---- output ----------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.2f}" if x < 100 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def format_table(report: dict[str, Any]) -> str:
    s, env, c, fk = report["settings"], report["env"], report["counts"], report["fake_llm"]
    commit = (env.get("git_commit") or "?")[:10] + ("+dirty" if env.get("git_dirty") else "")
    lines = [
        f"claw bench {report['scenario']}: {c['ok']}/{c['asks']} asks ok, concurrency {s['concurrency']}, "
        f"{report['elapsed_s']:.1f} s ({report['throughput']['asks_per_s']:.1f} asks/s, "
        f"{report['throughput']['chunks_per_s']:.0f} chunks/s), "
        f"CPU {100 * report['cpu']['utilization']:.0f}% of one core",
        f"fake LLM: {fk['tokens']} tokens x {fk['token_chars']} chars at {_fmt(fk['tokens_per_s'])} tok/s "
        f"(generation {fk['generation_ms']:.0f} ms), TTFT {fk['ttft_ms']:.0f} ms -- subtract it from the "
        f"first-delta rows",
        f"node: coalesce {_fmt(s['coalesce_ms'])} ms, {s['node_concurrency']} slots; "
        f"{c['chunks_per_ask']:.1f} chunks/ask; {s['transport']}",
        f"{env['implementation']} {env['python']} ({env['loop']}), {env['cpu_count']} CPUs, commit {commit}; "
        f"everything in one process and one event loop",
        "",
        f"{'latency (ms)':44s} {'n':>6s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'max':>8s} {'mean':>8s}",
    ]
    for key, label in ROWS:
        st = report["latency_ms"].get(key, {"n": 0})
        lines.append(f"{label:44s} {st['n']:>6d} " + " ".join(
            f"{_fmt(st.get(p)):>8s}" for p in ("p50", "p90", "p99", "max", "mean")))
    if report["failures_total"]:
        lines += ["", f"FAILURES: {report['failures_total']}"] + [f"  - {e}" for e in report["failures"][:10]]
    return "\n".join(lines)
