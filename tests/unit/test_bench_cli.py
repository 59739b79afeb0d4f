"""``claw bench tunnel``: the tunnel bench runs end to end and writes a complete, sane JSON report.

No timing assertions: only that every latency is a positive number and the counts add up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.tunnel import ROWS, percentiles

pytestmark = pytest.mark.integration  # starts the whole system on 127.0.0.1


def test_tunnel_writes_sane_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tunnel.json"
    rc = main(["tunnel", "--asks", "10", "--concurrency", "2", "--tokens", "12", "--tps", "0",
               "--timeout", "90", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    assert "ask → first delta" in printed  # the table went to stdout

    assert report["scenario"] == "tunnel"
    for key in ("git_commit", "python", "cpu_count", "loop"):
        assert key in report["env"]
    s = report["settings"]
    assert (s["asks"], s["concurrency"], s["tokens"], s["tps"], s["ttft"]) == (10, 2, 12, 0.0, 0.0)
    assert report["fake_llm"]["ttft_ms"] == 0.0

    c = report["counts"]
    assert (c["asks"], c["finished"], c["ok"], c["failed"]) == (10, 10, 10, 0)
    assert c["warmup"] == 2  # one per client
    assert c["chunks"] >= 10 and c["chars_per_ask"] == 12 * 4
    assert report["failures_total"] == 0 and report["failures"] == []
    assert report["elapsed_s"] > 0 and report["throughput"]["asks_per_s"] > 0

    lat = report["latency_ms"]
    assert set(lat) == {key for key, _ in ROWS}
    assert lat["loop_lag"]["n"] >= 0  # a diagnostic; may be empty in so short a run
    assert report["cpu"]["seconds"] >= 0 and report["cpu"]["utilization"] >= 0
    per_ask = [k for k in lat if not k.startswith(("chunk", "loop"))]
    for key in per_ask:
        assert lat[key]["n"] == 10, key
    for key in ("chunk_relay", "chunk_node_to_edge", "chunk_edge_to_client"):
        assert lat[key]["n"] == c["chunks"], key
    for key in ("ask_to_accepted", "ask_to_node_accepted", "ask_to_first_delta", "ask_to_done", "chunk_relay"):
        st = lat[key]
        assert 0 < st["min"] <= st["p50"] <= st["p90"] <= st["p99"] <= st["max"], (key, st)
        assert st["min"] <= st["mean"] <= st["max"]
    # the whole answer takes longer than its first chunk, which takes longer than the edge's ack
    assert lat["ask_to_done"]["max"] >= lat["ask_to_first_delta"]["min"] > 0
    assert lat["ask_to_first_delta"]["p50"] > lat["ask_to_accepted"]["min"]
    assert report["node_stats"]["ok"] == 12 and report["edge_stats"]["finished"] == {"ok": 12}


def test_usage_errors() -> None:
    assert main([]) == 2
    assert main(["nope"]) == 2
    assert main(["tunnel", "--asks", "0"]) == 2
    assert main(["tunnel", "--help"]) == 0
    assert main(["latency", "--broker", "thin", "--quiet"]) == 2  # the thin relay is for sweep only


def test_percentiles_nearest_rank() -> None:
    st = percentiles([float(x) for x in range(100, 0, -1)])
    assert (st["n"], st["min"], st["p50"], st["p90"], st["p99"], st["max"]) == (100, 1, 50, 90, 99, 100)
    assert st["mean"] == 50.5
    assert percentiles([]) == {"n": 0}
    assert percentiles([3.0])["p99"] == 3.0


def test_stream_passes_delta_timing_through_held_chunks() -> None:
    """The tracing plumbing in wire: Text carries its Delta's timing, also after a gap is filled."""
    import wire

    tid = b"\x01" * 16
    s = wire.TaskStream(tid)
    assert s.feed(wire.Delta(id=tid, seq=2, text="b", timing={"n_pub": 2})) == [wire.Gap(1, 1)]
    assert s.feed(wire.Delta(id=tid, seq=1, text="a", timing={"n_pub": 1})) == [
        wire.Text(1, "a", {"n_pub": 1}), wire.Text(2, "b", {"n_pub": 2})]
    assert s.feed(wire.Delta(id=tid, seq=3, text="c")) == [wire.Text(3, "c")]
    assert not s.held and not s.held_timing


async def test_timing_only_for_clients_that_ask_for_it(tmp_path: Path) -> None:
    import asyncio

    import aiohttp

    from bench.system import run_system
    from fakes.llm import FakeLLMConfig

    async def ask(s: aiohttp.ClientSession, sys_: object, user: str, trace: bool) -> list[dict]:
        token = await sys_.login(s, user)  # type: ignore[attr-defined]
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"token": token}) as ws:  # type: ignore[attr-defined]
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "hi", **({"trace": True} if trace else {})})
            frames = []
            async with asyncio.timeout(15):
                while not frames or frames[-1]["type"] != "done":
                    frames.append(await ws.receive_json())
            return frames

    async with run_system(tmp_path, fake_cfg=FakeLLMConfig(n_tokens=10, tokens_per_s=200)) as sys_, \
            aiohttp.ClientSession() as s:
        plain, traced = await asyncio.gather(ask(s, sys_, "plain", False), ask(s, sys_, "traced", True))
    for f in plain:
        assert "timing" not in f
        if f["type"] == "delta":
            assert set(f) == {"type", "task", "seq", "text"}
    t_deltas = [f for f in traced if f["type"] == "delta"]
    assert t_deltas and all({"n_pub", "e_fwd"} <= set(f["timing"]) for f in t_deltas)
    assert {"n_rx", "n_ft"} <= set(t_deltas[0]["timing"])
    assert "n_done" in traced[-1]["timing"]
