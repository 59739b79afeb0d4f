"""bench/suite.py's pure parts: HdrHistogram stats, the knee rule, the targets table, CLI levels."""

from __future__ import annotations

import argparse
import random

import pytest

from bench.cli import _levels
from bench.suite import KNEE_MS, Hist, _bad, checks


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
    assert not _bad(_row(10, KNEE_MS))
    assert _bad(_row(10, KNEE_MS + 0.1))
    assert _bad(_row(10, 5.0, asks=100, errors=2))  # > 1 % errors
    assert not _bad(_row(10, 5.0, asks=100, errors=1))
    assert _bad(_row(10, 5.0, asks=0))  # nothing measured is not a pass
    assert _bad({"streams": 1, "asks": 3, "errors": 0, "chunk_ms": {"n": 0}})


def test_knee_rule_also_needs_the_offered_pace_delivered() -> None:
    from bench.suite import KNEE_DELIVERED

    # a relay that cannot keep up makes tokens late before they are stamped: the chunk latency stays low
    assert _bad({**_row(1000, 6.0), "delivered": KNEE_DELIVERED - 0.01})
    assert not _bad({**_row(1000, 6.0), "delivered": KNEE_DELIVERED})
    assert not _bad(_row(1000, 6.0))  # no offered pace known (e.g. tps 0): latency and errors decide


def test_offered_pace_is_the_fake_llms_own_answer_cycle() -> None:
    from bench.suite import Options, offered_chars_per_s

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
    assert not got["knee (amqtt)"]["ok"] and got["knee (amqtt)"]["value"] == 500
    assert got["edge+broker RSS up to the knee"]["ok"]
    assert got["amqtt knee within 2x of Mosquitto's"]["ok"]
    assert got["WeCom ack p99 at ~200/s"]["ok"]
    assert checks({"scenarios": {}}) == []


def test_levels_option() -> None:
    assert _levels("100,1,10,10") == [1, 10, 100]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            _levels(bad)


def test_knee_is_the_last_level_before_the_first_bad_one() -> None:
    from bench.suite import _knee
    assert _knee([_row(1, 5), _row(10, 50), _row(100, 150), _row(200, 20)]) == 10  # later recovery ignored
    assert _knee([_row(1, 500)]) is None and _knee([]) is None
    assert _knee([_row(1, 5), _row(10, 6)]) == 10


async def test_floor_measures_a_loopback_hop_with_a_real_sink_process() -> None:
    from bench.suite import Options, Progress, floor

    out = await floor(Options(tps=50.0, progress=False), Progress(False), seconds=1.0, levels=(20,))
    (row,) = out["levels"]
    assert row["streams"] == 20
    assert 500 <= row["msgs_per_s"] <= 1500  # 20 connections x 50/s, paced by timers
    assert row["sender_us"] > 0 and row["receiver_us"] > 0
    assert row["hop_us"] == pytest.approx(row["sender_us"] + row["receiver_us"], abs=0.2)
    assert row["ceiling_streams"] > 0


async def test_thin_relay_sweep_runs_real_processes_and_delivers_the_offered_pace() -> None:
    """bench/thin.py in its own process between the real fake LLM and the real load generator: answers
    complete and correct, chunk latency measured, the delivered share near 1 at a light load."""
    from bench.suite import Options, Progress, sweep

    o = Options(tps=40.0, tokens=20, levels=[5], level_s=1.5, warm_s=0.5, progress=False)
    out = await sweep(o, "thin", Progress(False))
    (row,) = out["levels"]
    assert row["errors"] == 0 and row["asks"] >= 5
    assert row["chunk_ms"]["n"] > 100
    assert 0.8 <= row["delivered"] <= 1.1  # window edges: a few % either way
    assert set(row["cpu"]) == {"relay", "llm", "load"}
    assert out["knee"] == 5 and "delivered" in out["knee_rule"]
