"""core.metrics: log-linear histogram accuracy, merge, the Stages registry, and their exposition through
prometheus_client (parsed back with its own parser)."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from core.metrics import (HIGHEST_US, N_BUCKETS, PROM_BOUNDS_S, Families, Histogram, Stages, StagesCollector,
                          bucket_bounds, bucket_index, counter, counters_by, exposition, gauge, registry)


def exact(values: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(1, math.ceil(q / 100 * len(s))) - 1]


def scrape(*collectors: object) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(family name -> type, [(sample name, labels, value)]) of the collectors' exposition, parsed by
    prometheus_client's own parser (in exposition order)."""
    text = exposition(registry(*collectors)).decode()  # type: ignore[arg-type]
    types, samples = {}, []
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} twice"
        types[family.name] = family.type
        samples += [(s.name, s.labels, s.value) for s in family.samples]
    assert not any(name.endswith("_created") for name, _, _ in samples)
    return types, samples


def test_buckets_are_contiguous_and_narrow() -> None:
    prev_hi = -1
    for idx in range(N_BUCKETS):
        lo, hi = bucket_bounds(idx)
        assert lo == prev_hi + 1, idx
        assert bucket_index(lo) == idx and bucket_index(hi) == idx
        assert (hi - lo + 1) / max(lo, 1) <= 1 / 64 or hi == lo
        prev_hi = hi
    assert prev_hi == HIGHEST_US


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_match_exact_within_relative_error(seed: int) -> None:
    rng = random.Random(seed)
    # log-uniform from 1 µs to ~1 h, plus a cluster of small exact values
    values = [int(math.exp(rng.uniform(0, math.log(3.6e9)))) for _ in range(20_000)]
    values += [rng.randrange(0, 200) for _ in range(2_000)]
    h = Histogram()
    for v in values:
        h.record(v)
    assert h.count == len(values)
    assert h.sum == sum(values)
    for q in (0, 1, 10, 25, 50, 75, 90, 95, 99, 99.9, 100):
        want = exact(values, q)
        got = h.percentile(q)
        assert abs(got - want) <= max(0.5, 0.01 * want), (q, want, got)


def test_small_values_are_exact_and_empty_is_zero() -> None:
    h = Histogram()
    assert h.percentile(50) == 0.0
    for v in (0, 1, 2, 3, 100):
        h.record(v)
    assert h.percentile(0) == 0 and h.percentile(100) == 100 and h.percentile(50) == 2
    with pytest.raises(ValueError):
        h.percentile(101)


def test_merge_and_reset() -> None:
    rng = random.Random(7)
    a_vals = [rng.randrange(1, 10_000_000) for _ in range(5000)]
    b_vals = [rng.randrange(1, 100_000) for _ in range(3000)]
    a, b, both = Histogram(), Histogram(), Histogram()
    for v in a_vals:
        a.record(v)
        both.record(v)
    for v in b_vals:
        b.record(v)
        both.record(v)
    a.merge(b)
    assert (a.count, a.sum) == (both.count, both.sum)
    assert a.bucket_counts() == both.bucket_counts()
    for q in (1, 50, 99):
        assert a.percentile(q) == both.percentile(q)
    assert b.count == 3000  # the merged-in histogram is unchanged
    a.reset()
    assert (a.count, a.sum, a.percentile(50)) == (0, 0, 0.0)
    assert all(n == 0 for _, n in a.bucket_counts())


def test_huge_values_clamp_to_top_bucket() -> None:
    h = Histogram()
    h.record(2**62)
    h.record(10 * 3600 * 1_000_000)
    assert h.count == 2
    assert h.sum == 2 * HIGHEST_US
    lo, hi = bucket_bounds(N_BUCKETS - 1)
    assert lo <= h.percentile(100) <= hi
    buckets = dict(h.bucket_counts())
    assert buckets["60"] == 0 and buckets["+Inf"] == 2


def test_negative_value_is_refused_by_histogram() -> None:
    with pytest.raises(ValueError):
        Histogram().record(-1)


def test_exposition_is_cumulative_and_parses() -> None:
    rng = random.Random(3)
    values = [int(math.exp(rng.uniform(0, math.log(1e8)))) for _ in range(3000)]
    st = Stages()
    for v in values:
        st.observe('a"b\\c', v)  # a label value that needs escaping
    types, samples = scrape(StagesCollector(st, "claw_test_seconds", "a test histogram"))
    assert types == {"claw_test_seconds": "histogram", "claw_test_p50_seconds": "gauge",
                     "claw_test_p99_seconds": "gauge", "claw_test_skew": "counter"}
    assert all(lab["stage"] == 'a"b\\c' for _, lab, _ in samples)
    buckets = [(lab["le"], v) for n, lab, v in samples if n == "claw_test_seconds_bucket"]
    assert [le for le, _ in buckets] == [f"{s:g}" for s in PROM_BOUNDS_S] + ["+Inf"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    assert counts[-1] == len(values)
    for le, n in buckets[:-1]:
        bound = float(le) * 1e6
        # within one fine bucket of the boundary (values just above it may be counted under it)
        assert sum(v <= bound for v in values) <= n <= sum(v <= bound * (1 + 1 / 64) for v in values), le
    by = {n: v for n, _, v in samples}
    assert by["claw_test_seconds_count"] == len(values)
    assert by["claw_test_seconds_sum"] == pytest.approx(sum(values) / 1e6)
    assert by["claw_test_p50_seconds"] == pytest.approx(exact(values, 50) / 1e6, rel=0.01)
    assert by["claw_test_p99_seconds"] == pytest.approx(exact(values, 99) / 1e6, rel=0.01)
    assert by["claw_test_skew_total"] == 0


def test_stages_family_skew_and_labels() -> None:
    st = Stages(["a", "b"])
    st.observe("a", 1500)
    st.observe("a", 3000)
    st.observe("c", 70_000_000)  # not pre-registered: added on first use; beyond 60 s: only in +Inf
    st.observe("b", -5)  # clock skew: not recorded
    st.observe("c", -1)
    assert st.skew == 2 and st.skews == {"b": 1, "c": 1}
    assert st["a"].count == 2 and st["b"].count == 0 and st["c"].count == 1
    types, samples = scrape(StagesCollector(st, "claw_x_stage_seconds", "stage latency"))
    assert types["claw_x_stage_seconds"] == "histogram"  # one family, every stage's series inside it
    count = {lab["stage"]: v for n, lab, v in samples if n == "claw_x_stage_seconds_count"}
    assert count == {"a": 2, "b": 0, "c": 1}
    for stage in ("a", "b", "c"):
        cum = [v for n, lab, v in samples if n == "claw_x_stage_seconds_bucket" and lab["stage"] == stage]
        assert cum == sorted(cum) and cum[-1] == count[stage]
    a_buckets = {lab["le"]: v for n, lab, v in samples if n == "claw_x_stage_seconds_bucket" and lab["stage"] == "a"}
    assert a_buckets["0.001"] == 0 and a_buckets["0.0025"] == 1 and a_buckets["0.005"] == 2
    a_sum = [v for n, lab, v in samples if n == "claw_x_stage_seconds_sum" and lab["stage"] == "a"]
    assert a_sum == [pytest.approx(0.0045)]  # seconds
    skew = {lab["stage"]: v for n, lab, v in samples if n == "claw_x_stage_skew_total"}
    assert skew == {"a": 0, "b": 1, "c": 1}
    p50 = {lab["stage"]: v for n, lab, v in samples if n == "claw_x_stage_p50_seconds"}
    assert set(p50) == {"a", "c"}  # empty stages have no quantile gauge
    st.reset()
    assert st.skew == 0 and st["a"].count == 0
    types, _ = scrape(StagesCollector(st, "claw_x_stage_seconds", "stage latency"))
    assert "claw_x_stage_p50_seconds" not in types  # no stage with values: no quantile family at all


def test_families_are_built_at_each_scrape_in_a_registry_of_their_own() -> None:
    """The hot path keeps plain ints; a collector reads them when scraped. Each registry is its own (several
    edges and nodes run in one test process): nothing lands in prometheus_client's global REGISTRY."""
    state = {"n": 0, "by": {"ok": 1}}

    def build() -> list[object]:
        return [counter("claw_t_things_total", "things", state["n"]), gauge("claw_t_level", "level", 0.5),
                counters_by("claw_t_done_total", "done by status", "status", state["by"])]

    collector = Families(build)  # type: ignore[arg-type]
    types, samples = scrape(collector)
    assert types == {"claw_t_things": "counter", "claw_t_level": "gauge", "claw_t_done": "counter"}
    assert ("claw_t_things_total", {}, 0) in samples and ("claw_t_level", {}, 0.5) in samples
    state["n"] += 41
    state["n"] += 1
    state["by"]["error"] = 2  # type: ignore[index]
    _, samples = scrape(collector)
    assert ("claw_t_things_total", {}, 42) in samples
    assert [(lab, v) for n, lab, v in samples if n == "claw_t_done_total"] == [({"status": "error"}, 2),
                                                                                 ({"status": "ok"}, 1)]
    assert not any(m.name.startswith("claw_") for m in REGISTRY.collect())


def test_boundary_value_is_counted_under_its_le() -> None:
    h = Histogram()
    h.record(500)  # exactly 0.0005 s: le is "less than or equal"
    h.record(1_000_000)
    buckets = dict(h.bucket_counts())
    assert buckets["0.0005"] == 1 and buckets["0.5"] == 1 and buckets["1"] == 2


def test_node_metrics_listen_config() -> None:
    from core.config import ConfigError, load_settings
    from claw.init import b_toml

    assert load_settings(env={}).node.metrics_listen == ""
    assert load_settings(env={}, overrides={"node": {"metrics_listen": "127.0.0.1:9464"}}).node.metrics_listen \
        == "127.0.0.1:9464"
    with pytest.raises(ConfigError, match="node.metrics_listen"):
        load_settings(env={}, overrides={"node": {"metrics_listen": "9464"}})
    assert 'metrics_listen = ""' in b_toml("a.example.com", "b1")
