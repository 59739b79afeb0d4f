"""The bench suite's parts: HdrHistogram stats (bench/hist.py), the knee rule and the targets (bench/targets.py),
the offered pace (bench/measure.py), the floor and thin-relay scenarios (bench/scenarios.py), CLI levels."""

from __future__ import annotations

import argparse
import random

import pytest

from bench.cli import parse_levels
from bench.hist import Hist
from bench.targets import KNEE_MS, checks, past_knee


def test_hist_stats_are_close_to_exact_percentiles() -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(7, 1.2) for _ in range(20000)]  # µs, a long tail
    h = Hist()
    for v in values:
        h.add(v)
    values.sort()
    st = h.stats()
    assert st["n"] == 20000
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        exact = values[int(q * len(values)) - 1] / 1000
        assert abs(st[key] - exact) / exact < 0.01, (key, st[key], exact)
    assert st["min"] <= st["p50"] <= st["p99"] <= st["max"]
    cdf = h.cdf()
    assert cdf[0][1] == 0.0 and cdf[-1][1] > 0.9998  # out to p99.99
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(cdf, cdf[1:]))


def test_hist_counts_negative_samples_instead_of_hiding_them() -> None:
    h = Hist()
    h.add(-5)
    h.add(1000)
    assert h.negative == 1 and h.n == 2
    assert Hist().stats() == {"n": 0} and Hist().cdf() == []


def _row(streams: int, p99: float, asks: int = 100, errors: int = 0) -> dict:
    return {"streams": streams, "asks": asks, "errors": errors, "chunk_ms": {"p99": p99},
            "rss_edge_mb": 100.0, "added_ttft_ms": {"p50": 3.0, "p99": 30.0}}


def test_knee_rule() -> None:
    assert not past_knee(_row(10, KNEE_MS))
    assert past_knee(_row(10, KNEE_MS + 0.1))
    assert past_knee(_row(10, 5.0, asks=100, errors=2))  # > 1 % errors
    assert not past_knee(_row(10, 5.0, asks=100, errors=1))
    assert past_knee(_row(10, 5.0, asks=0))  # nothing measured is not a pass
    assert past_knee({"streams": 1, "asks": 3, "errors": 0, "chunk_ms": {"n": 0}})


def test_knee_rule_also_needs_the_offered_pace_delivered() -> None:
    from bench.targets import KNEE_DELIVERED

    # a relay that cannot keep up makes tokens late before they are stamped: the chunk latency stays low
    assert past_knee({**_row(1000, 6.0), "delivered": KNEE_DELIVERED - 0.01})
    assert not past_knee({**_row(1000, 6.0), "delivered": KNEE_DELIVERED})
    assert not past_knee(_row(1000, 6.0))  # no offered pace known (e.g. tps 0): latency and errors decide


def test_offered_pace_is_the_fake_llms_own_answer_cycle() -> None:
    from bench.measure import offered_chars_per_s
    from bench.options import Options

    # 40 tokens of 4 chars, the last 39/20 s after the first: 160 chars per 1.95 s per stream
    assert offered_chars_per_s(Options(tokens=40, tps=20.0, token_chars=4), 10) == pytest.approx(10 * 160 / 1.95)
    # a time to first token is part of every answer's cycle
    assert offered_chars_per_s(Options(tokens=40, tps=20.0, token_chars=4, ttft=0.5), 1) == pytest.approx(160 / 2.45)
    assert offered_chars_per_s(Options(tps=0.0), 10) == 0.0  # unpaced: no delivered share
    assert offered_chars_per_s(Options(tokens=1, tps=20.0, token_chars=4), 1) == pytest.approx(4 / 0.05)


def test_checks_evaluate_the_issue_targets() -> None:
    levels = [_row(100, 8.0), _row(500, 30.0), _row(1000, 150.0)]
    results = {"scenarios": {
        "sweep": {"levels": levels, "knee": 500},
        "brokers": {"knee_ratio": 1.5},
        "wecom": {"ack_ms": {"p99": 12.0}},
    }}
    got = {c["name"]: c for c in checks(results)}
    assert got["added TTFT p50 at 100 streams"]["ok"] and not got["added TTFT p99 at 100 streams"]["ok"]
    assert not got["per-chunk relay p99 at 500 streams"]["ok"]
    assert "knee (amqtt)" not in got  # the absolute ">= 1000 streams" knee target is withdrawn
    # a SmartClaw sweep without the thin relay's: the two ratio targets are "not measured", neither pass nor miss
    for name in ("CPU per chunk vs the thin relay (same run)", "knee vs the thin relay's (same run)"):
        assert got[name]["ok"] is None and got[name]["status"] == "not measured" and got[name]["value"] is None
        assert "thin relay was not swept" in got[name]["detail"]
    assert got["edge+broker RSS up to the knee"]["ok"]
    assert got["amqtt knee within 2x of Mosquitto's"]["ok"]
    assert got["WeCom ack p99 at ~200/s"]["ok"]
    assert checks({"scenarios": {}}) == []


def test_levels_option() -> None:
    assert parse_levels("100,1,10,10") == [1, 10, 100]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)


def test_knee_is_the_last_level_before_the_first_bad_one() -> None:
    from bench.targets import knee_of
    assert knee_of([_row(1, 5), _row(10, 50), _row(100, 150), _row(200, 20)]) == 10  # later recovery ignored
    assert knee_of([_row(1, 500)]) is None and knee_of([]) is None
    assert knee_of([_row(1, 5), _row(10, 6)]) == 10


async def test_floor_measures_a_loopback_hop_with_a_real_sink_process() -> None:
    from bench.options import Options
    from bench.progress import Progress
    from bench.scenarios import floor

    out = await floor(Options(tps=50.0, progress=False), Progress(False), seconds=1.0, levels=(20,))
    (row,) = out["levels"]
    assert row["streams"] == 20
    assert 500 <= row["msgs_per_s"] <= 1500  # 20 connections x 50/s, paced by timers
    # the sink's CPU comes from /proc in 10 ms clock ticks: ~1000 small reads in 1 s can round to 0 ticks
    assert row["sender_us"] > 0 and row["receiver_us"] >= 0
    assert row["hop_us"] == pytest.approx(row["sender_us"] + row["receiver_us"], abs=0.2)
    assert row["ceiling_streams"] > 0


async def test_thin_relay_sweep_runs_real_processes_and_delivers_the_offered_pace() -> None:
    """bench/thin.py in its own process between the real fake LLM and the real load generator: answers
    complete and correct, chunk latency measured, the delivered share near 1 at a light load."""
    from bench.options import Options
    from bench.progress import Progress
    from bench.scenarios import sweep

    o = Options(tps=40.0, tokens=20, levels=[5], level_s=1.5, warm_s=0.5, progress=False)
    out = await sweep(o, "thin", Progress(False))
    (row,) = out["levels"]
    assert row["errors"] == 0 and row["asks"] >= 5
    assert row["chunk_ms"]["n"] > 100
    assert 0.8 <= row["delivered"] <= 1.1  # window edges: a few % either way
    assert set(row["cpu"]) == {"relay", "llm", "load"}
    assert out["knee"] == 5 and "delivered" in out["knee_rule"]


# ---- the targets relative to the thin relay ------------------------------------------------------------------


def _lv(streams: int, p99: float, cpu: dict, chunks_per_s: float, chars_per_s: float | None = None) -> dict:
    return {**_row(streams, p99), "cpu": cpu, "chunks_per_s": chunks_per_s,
            "chars_per_s": chunks_per_s * 4 if chars_per_s is None else chars_per_s}


def _ours(knee: int | None = 200) -> dict:
    # edge 52 + node 47 % at 100 streams, 2000 chunks/s: 495 µs; past the knee from 300
    return {"broker": "amqtt", "knee": knee, "knee_exceeded": True, "levels": [
        _lv(100, 8.0, {"edge": 52.0, "node": 47.0, "llm": 16.0, "load": 16.0}, 2000.0),
        _lv(200, 21.0, {"edge": 55.0, "node": 50.0, "llm": 25.0, "load": 20.0}, 4000.0),
        _lv(300, 125.0, {"edge": 56.0, "node": 55.0, "llm": 34.0, "load": 28.0}, 5415.0),
        _lv(500, 208.0, {"edge": 57.0, "node": 61.0, "llm": 41.0, "load": 36.0}, 8500.0)]}


def _thin(knee: int | None = 500, exceeded: bool = True) -> dict:
    return {"broker": "thin", "knee": knee, "knee_exceeded": exceeded, "levels": [
        _lv(100, 1.9, {"relay": 21.0, "llm": 16.0, "load": 16.0}, 2000.0),
        _lv(200, 3.0, {"relay": 30.0, "llm": 25.0, "load": 20.0}, 4000.0),
        _lv(300, 4.1, {"relay": 43.0, "llm": 34.0, "load": 28.0}, 6056.0),
        _lv(500, 12.5, {"relay": 57.0, "llm": 41.0, "load": 36.0}, 9850.0),
        _lv(700, 15.0, {"relay": 71.0, "llm": 51.0, "load": 41.0}, 11000.0)]}


def test_cpu_per_chunk_counts_the_relays_own_processes_only() -> None:
    from bench.targets import cpu_us_per_chunk

    # SmartClaw: edge (with its embedded broker) + node; the fake LLM and the load generator are instruments
    assert cpu_us_per_chunk(_ours()["levels"][2]) == pytest.approx(111 / 100 / 5415 * 1e6, abs=0.1)  # ~205 µs
    assert cpu_us_per_chunk(_thin()["levels"][2]) == pytest.approx(43 / 100 / 6056 * 1e6, abs=0.1)  # ~71 µs
    assert cpu_us_per_chunk({"cpu": {"edge": 50.0}, "chunks_per_s": 0}) is None  # nothing delivered
    assert cpu_us_per_chunk({"cpu": {"llm": 50.0, "load": 9.0}, "chunks_per_s": 100.0}) is None
    assert cpu_us_per_chunk({"chunks_per_s": 100.0}) is None


def test_vs_thin_compares_cpu_at_the_highest_level_both_carried() -> None:
    from bench.targets import vs_thin

    v = vs_thin(_ours(knee=200), _thin(knee=500))
    assert v["measured"] is True
    c = v["cpu_per_chunk"]
    # 200: both under their knees (300 is past SmartClaw's, where the CPU per chunk measures the saturation)
    assert c["streams"] == 200 and c["carried_by_both"] is True
    assert c["smartclaw_us"] == pytest.approx(262.5) and c["thin_us"] == pytest.approx(75.0)
    assert c["ratio"] == pytest.approx(3.5)
    # every level both measured is listed (700: the thin relay's only), with its ratio
    assert [lv["streams"] for lv in c["levels"]] == [100, 200, 300, 500]
    assert {lv["streams"]: lv["ratio"] for lv in c["levels"]}[300] == pytest.approx(2.9, abs=0.02)  # the ~205 vs ~71 µs the docs quote
    assert [lv["carried_by_both"] for lv in c["levels"]] == [True, True, False, False]
    assert c["levels"][0]["smartclaw_chars_per_chunk"] == 4.0
    assert v["knee"] == {"smartclaw": 200, "thin": 500, "share": 0.4, "smartclaw_exceeded": True,
                         "thin_exceeded": True}


def test_vs_thin_without_a_carried_level_falls_back_to_the_lowest_common_one() -> None:
    from bench.targets import vs_thin

    v = vs_thin(_ours(knee=None), _thin())
    assert v["cpu_per_chunk"]["streams"] == 100 and v["cpu_per_chunk"]["carried_by_both"] is False
    assert v["knee"]["share"] == 0.0  # no knee at all is a share of 0, a miss
    no_thin_knee = vs_thin(_ours(), _thin(knee=None))
    assert no_thin_knee["knee"]["share"] is None


def test_vs_thin_is_not_measured_without_both_sweeps() -> None:
    from bench.targets import vs_thin

    assert vs_thin(_ours(), None) == {"measured": False, "cpu_ratio_max": 1.5, "knee_share_min": 0.7,
                                      "reason": "the thin relay was not swept in this run "
                                                "(claw bench brokers or all sweeps it)"}
    assert vs_thin(None, _thin())["measured"] is False


def test_checks_evaluate_the_ratio_targets_on_a_brokers_run() -> None:
    results = {"scenarios": {"brokers": {"amqtt": _ours(knee=200), "mosquitto": _ours(knee=100),
                                         "thin": _thin(knee=500), "knee_ratio": 0.5}}}
    got = {c["name"]: c for c in checks(results)}
    cpu = got["CPU per chunk vs the thin relay (same run)"]
    assert cpu["value"] == pytest.approx(3.5) and cpu["ok"] is False and cpu["status"] == "miss"
    assert cpu["target"] == "<= 1.5x" and "at 200 streams" in cpu["detail"]
    knee = got["knee vs the thin relay's (same run)"]
    assert knee["value"] == 0.4 and knee["ok"] is False and "SmartClaw 200 / thin relay 500" in knee["detail"]
    assert knee["target"] == ">= 70% of it"
    assert "knee (amqtt)" not in got
    assert all(c["status"] in ("pass", "miss") for c in got.values())

    # a SmartClaw as cheap as 1.5x the thin relay and with 70 % of its knee passes both
    cheap = _ours(knee=400)
    for lv in cheap["levels"]:
        lv["cpu"] = {"edge": 20.0, "node": 10.0, "llm": 1.0, "load": 1.0}
        lv["chunks_per_s"] = 3000.0
    thin = _thin(knee=500)
    for lv in thin["levels"]:
        lv["cpu"] = {"relay": 20.0}
        lv["chunks_per_s"] = 3000.0
    for lv in cheap["levels"][2:]:
        lv["chunk_ms"] = {"p99": 50.0}  # 300 and 500 now carried too; knee 400 is below the 500 level
    got = {c["name"]: c for c in checks({"scenarios": {"brokers": {"amqtt": {**cheap, "knee": 300},
                                                                   "thin": {**thin, "knee": 400}}}})}
    assert got["CPU per chunk vs the thin relay (same run)"]["value"] == 1.5
    assert got["CPU per chunk vs the thin relay (same run)"]["ok"] is True
    assert got["knee vs the thin relay's (same run)"]["value"] == 0.75
    assert got["knee vs the thin relay's (same run)"]["ok"] is True


def test_a_thin_relay_sweep_that_never_passed_its_knee_is_flagged() -> None:
    got = {c["name"]: c for c in checks({"scenarios": {"brokers": {"amqtt": _ours(), "thin": _thin(exceeded=False)}}})}
    assert "its knee is at least that" in got["knee vs the thin relay's (same run)"]["detail"]
