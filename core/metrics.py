"""Metrics for ``/metrics``: fast latency histograms, and the prometheus_client glue that exposes them.

``Histogram`` records integer microseconds into high-dynamic-range log-linear buckets, like
HdrHistogram: values below 128 µs are exact, above that every power of two is split into 64 linear
sub-buckets (a bucket is at most 1/64 = 1.6 % of its values wide; percentiles report the bucket's
middle, within 0.8 %). The range is 0 .. 2**32 - 1 µs (71.6 minutes); larger values are clamped to the
top bucket (and counted in ``sum`` as that top value, so ``sum`` and the buckets agree). 1,728 counters.
``record`` is O(1): a bit_length, a shift and three additions (docs/performance.md "Prometheus" has its cost).
``Stages`` keeps one histogram per named stage; negative values (the two servers' clocks disagree) are not
recorded but counted per stage.

Exposition is prometheus_client's: the processes keep plain ``int`` counters on their hot paths, and a
collector per process object builds the metric families from them at scrape time (:class:`Families`,
:class:`StagesCollector`), registered in a :func:`registry` of its own (never the library's global one: several
edges and nodes may run in one process). :func:`exposition` renders a registry as Prometheus text. A stage
family is a classic histogram over the FIXED boundaries ``PROM_BOUNDS_S`` (seconds), derived from the fine
buckets: a value is counted under ``le`` when its fine bucket is at or below the one holding ``le`` (so a value
at most one fine bucket, 1.6 %, above a boundary may be counted under it); ``_sum`` is in seconds. Next to it
come the gauges ``<base>_p50_seconds`` / ``<base>_p99_seconds`` (stages with values only) and the counter
``<base>_skew_total``, all labelled ``stage``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

SUB_BITS = 7  # values < 2**SUB_BITS are exact; above, each power of two has 2**(SUB_BITS-1) = 64 sub-buckets
_HALF = 1 << (SUB_BITS - 1)  # 64
_HALF_SHIFT = SUB_BITS - 1  # 6
MAX_BITS = 32  # highest trackable value: 2**32 - 1 µs = 4294.97 s
HIGHEST_US = (1 << MAX_BITS) - 1
N_BUCKETS = ((MAX_BITS - SUB_BITS) << _HALF_SHIFT) + (1 << SUB_BITS)  # 1728
_TOP = N_BUCKETS - 1

# The classic Prometheus histogram's boundaries, seconds (+Inf is added).
PROM_BOUNDS_S: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                    1, 2.5, 5, 10, 30, 60)


def bucket_index(value_us: int) -> int:
    """Index of the fine bucket holding ``value_us`` (>= 0), clamped to the top bucket."""
    b = value_us.bit_length() - SUB_BITS
    if b <= 0:
        return value_us
    idx = (b << _HALF_SHIFT) + (value_us >> b)
    return idx if idx < _TOP else _TOP


def bucket_bounds(idx: int) -> tuple[int, int]:
    """(lowest, highest) value in µs of fine bucket ``idx``, both inclusive."""
    if idx < (1 << SUB_BITS):
        return idx, idx
    b = (idx >> _HALF_SHIFT) - 1
    sub = idx - (b << _HALF_SHIFT)  # in [64, 128)
    lo = sub << b
    return lo, lo + (1 << b) - 1


def _mid(idx: int) -> float:
    lo, hi = bucket_bounds(idx)
    return (lo + hi) / 2


def _cutoffs() -> list[tuple[str, int]]:
    out = []
    for s in PROM_BOUNDS_S:
        out.append((f"{s:g}", bucket_index(round(s * 1_000_000))))
    return out


_PROM_CUTOFFS = _cutoffs()  # (le text, last fine bucket counted under it)


class Histogram:
    """Integer microseconds, log-linear buckets (see the module docstring)."""

    __slots__ = ("_counts", "count", "sum")

    def __init__(self) -> None:
        self._counts = [0] * N_BUCKETS
        self.count = 0
        self.sum = 0  # µs (values above HIGHEST_US count as HIGHEST_US)

    def record(self, value_us: int) -> None:
        """Add one value (an int >= 0, µs). O(1); the hot path of the reply stream."""
        b = value_us.bit_length() - SUB_BITS
        if b <= 0:
            if value_us < 0:
                raise ValueError(f"negative value {value_us}")
            idx = value_us
        else:
            idx = (b << _HALF_SHIFT) + (value_us >> b)
            if idx >= _TOP:
                idx, value_us = _TOP, min(value_us, HIGHEST_US)
        self._counts[idx] += 1
        self.count += 1
        self.sum += value_us

    def percentile(self, q: float) -> float:
        """The value (µs) at or below which ``q`` percent of the recorded values are (nearest rank;
        the fine bucket's middle). 0.0 when empty."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in 0..100, got {q}")
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for idx, c in enumerate(self._counts):
            if c:
                seen += c
                if seen >= rank:
                    return _mid(idx)
        return _mid(_TOP)  # pragma: no cover - unreachable: the counts sum to count

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s values to this one."""
        mine = self._counts
        for idx, c in enumerate(other._counts):
            if c:
                mine[idx] += c
        self.count += other.count
        self.sum += other.sum

    def reset(self) -> None:
        self._counts = [0] * N_BUCKETS
        self.count = 0
        self.sum = 0

    def bucket_counts(self) -> list[tuple[str, int]]:
        """Cumulative counts for the ``le`` boundaries of PROM_BOUNDS_S, then ``+Inf``."""
        out = []
        counts = self._counts
        start = total = 0
        for le, last in _PROM_CUTOFFS:
            total += sum(counts[start:last + 1])
            start = last + 1
            out.append((le, total))
        out.append(("+Inf", self.count))
        return out


class Stages:
    """Named stage histograms, exposed as one family with a ``stage`` label (:func:`stage_families`).

    ``observe`` ignores negative values (clock skew between the two servers' wall clocks) and counts
    them in ``skew`` (total) and ``skews`` (per stage). Stages given to the constructor are rendered
    (with zero counts) before anything was observed, so their series exist from the start.
    """

    __slots__ = ("hists", "skew", "skews")

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.hists: dict[str, Histogram] = {n: Histogram() for n in names}
        self.skew = 0
        self.skews: dict[str, int] = {}

    def observe(self, stage: str, value_us: int) -> None:
        if value_us < 0:
            self.skew += 1
            self.skews[stage] = self.skews.get(stage, 0) + 1
            return
        h = self.hists.get(stage)
        if h is None:
            h = self.hists[stage] = Histogram()
        h.record(value_us)

    def __getitem__(self, stage: str) -> Histogram:
        return self.hists[stage]

    def reset(self) -> None:
        for h in self.hists.values():
            h.reset()
        self.skew = 0
        self.skews.clear()


# ---- exposition (prometheus_client) ---------------------------------------------------------------

CONTENT_TYPE = "text/plain; charset=utf-8"  # of exposition()'s text (Prometheus text format 0.0.4)


def registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of its own for one process object's collectors (never prometheus_client's global one)."""
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    """The registry's families as Prometheus text (built now, at the scrape)."""
    return generate_latest(reg)


class Families(Collector):
    """A collector whose families ``build()`` makes at each scrape from the owner's plain counters."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterable[Metric]:
        return self._build()


def counter(name: str, help: str, value: int) -> CounterMetricFamily:
    """An unlabelled counter ``name`` (ending ``_total``)."""
    return CounterMetricFamily(name, help, value=value)


def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)


def counters_by(name: str, help: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    """A counter ``name`` (ending ``_total``) with one series per ``label`` value, sorted."""
    family = CounterMetricFamily(name, help, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _base(name: str) -> str:
    return name[:-len("_seconds")] if name.endswith("_seconds") else name


def stage_families(stages: Stages, name: str, help: str, quantiles: Iterable[int] = (50, 99)) -> Iterator[Metric]:
    """``name{stage}`` (a histogram; use a ``_seconds`` name), ``<base>_p<q>_seconds{stage}`` gauges (stages with
    values only; no family while none has one) and ``<base>_skew_total{stage}`` (values dropped as negative);
    base = name without ``_seconds``."""
    base = _base(name)
    family = HistogramMetricFamily(name, help, labels=["stage"])
    for stage, h in sorted(stages.hists.items()):
        family.add_metric([stage], h.bucket_counts(), h.sum / 1_000_000)
    yield family
    filled = [(stage, h) for stage, h in sorted(stages.hists.items()) if h.count]
    if filled:
        for q in quantiles:
            g = GaugeMetricFamily(f"{base}_p{q}_seconds", f"{q}th percentile of {name} since the start",
                                  labels=["stage"])
            for stage, h in filled:
                g.add_metric([stage], h.percentile(q) / 1_000_000)
            yield g
    yield counters_by(f"{base}_skew_total", f"Values of {name} not recorded because they were negative (clock skew)",
                      "stage", {stage: stages.skews.get(stage, 0) for stage in set(stages.hists) | set(stages.skews)})


class StagesCollector(Collector):
    """The families of :func:`stage_families` for one ``Stages``, at each scrape."""

    def __init__(self, stages: Stages, name: str, help: str) -> None:
        self._stages, self._name, self._help = stages, name, help

    def collect(self) -> Iterator[Metric]:
        return stage_families(self._stages, self._name, self._help)
