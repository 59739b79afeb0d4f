"""Latency histograms for ``/metrics`` (pure: no I/O, stdlib only).

``Histogram`` records integer microseconds into high-dynamic-range log-linear buckets, like
HdrHistogram: values below 128 µs are exact, above that every power of two is split into 64 linear
sub-buckets (a bucket is at most 1/64 = 1.6 % of its values wide; percentiles report the bucket's
middle, within 0.8 %). The range is 0 .. 2**32 - 1 µs (71.6 minutes); larger values are clamped to the
top bucket (and counted in ``sum`` as that top value, so ``sum`` and the buckets agree). 1,728 counters.

``record`` is O(1): a bit_length, a shift and three additions. Measured with timeit (CPython 3.11.7,
AMD EPYC VM with 2 vCPUs, best of 5, over several runs): ``Histogram.record(123456)`` 0.16-0.24 µs per
call, ``record(57)`` (exact range) 0.15-0.16 µs, ``Stages.observe(stage, 123456)`` 0.23-0.32 µs; for
scale, ``time.time_ns() // 1000`` is 0.09 µs.
(``python -m timeit -s "from core.metrics import Histogram; h = Histogram()" "h.record(123456)"``)

Prometheus exposition is a classic histogram over a FIXED small set of boundaries in seconds
(``PROM_BOUNDS_S``), derived from the fine buckets: a value is counted under ``le`` when its fine
bucket is at or below the one holding ``le`` (so a value at most one fine bucket, 1.6 %, above a
boundary may be counted under it). ``_sum`` is in seconds too. ``Stages`` keeps one histogram per
named stage and renders them as one family with a ``stage`` label; negative values (the two servers'
clocks disagree) are not recorded but counted per stage in ``<base>_skew_total``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

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


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str] | None, extra: str = "") -> str:
    parts = [f'{k}="{escape_label(str(v))}"' for k, v in (labels or {}).items()]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


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

    # ---- Prometheus text exposition ---------------------------------------------------------
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

    def samples(self, name: str, labels: Mapping[str, str] | None = None) -> list[str]:
        """The ``_bucket``/``_sum``/``_count`` sample lines (no ``# HELP``/``# TYPE``)."""
        lines = [f"{name}_bucket{_labels(labels, f'le={chr(34)}{le}{chr(34)}')} {n}"
                 for le, n in self.bucket_counts()]
        lines.append(f"{name}_sum{_labels(labels)} {_num(self.sum / 1_000_000)}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines

    def prometheus(self, name: str, help: str, labels: Mapping[str, str] | None = None,
                   quantiles: Iterable[int] = (50, 99)) -> list[str]:
        """One histogram family ``name`` (use a ``_seconds`` name), plus a gauge family
        ``<base>_p<q>_seconds`` per quantile (base = name without ``_seconds``; omitted when empty)."""
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram", *self.samples(name, labels)]
        if self.count:
            base = _base(name)
            for q in quantiles:
                lines += [f"# TYPE {base}_p{q}_seconds gauge",
                          f"{base}_p{q}_seconds{_labels(labels)} {_num(self.percentile(q) / 1_000_000)}"]
        return lines


def _base(name: str) -> str:
    return name[:-len("_seconds")] if name.endswith("_seconds") else name


class Stages:
    """Named stage histograms rendered as one family with a ``stage`` label.

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

    def prometheus(self, name: str, help: str, quantiles: Iterable[int] = (50, 99)) -> list[str]:
        """``name{stage=...}`` histograms, ``<base>_p<q>_seconds{stage=...}`` gauges (stages with
        values only) and ``<base>_skew_total{stage=...}`` (values dropped as negative)."""
        base = _base(name)
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        for stage in sorted(self.hists):
            lines += self.hists[stage].samples(name, {"stage": stage})
        for q in quantiles:
            filled = [(s, h) for s, h in sorted(self.hists.items()) if h.count]
            if filled:
                lines.append(f"# TYPE {base}_p{q}_seconds gauge")
                lines += [f'{base}_p{q}_seconds{{stage="{escape_label(s)}"}} {_num(h.percentile(q) / 1_000_000)}'
                          for s, h in filled]
        lines.append(f"# TYPE {base}_skew_total counter")
        for stage in sorted(set(self.hists) | set(self.skews)):
            lines.append(f'{base}_skew_total{{stage="{escape_label(stage)}"}} {self.skews.get(stage, 0)}')
        return lines
