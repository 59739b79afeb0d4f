"""HdrHistogram of microsecond latencies (1 µs … 1 h, 3 significant digits), reported in milliseconds:
the stats every bench row carries (n, min, p50, p90, p99, p99.9, max, mean) and a CDF for the report's charts."""

from __future__ import annotations

__all__ = ["Hist"]


class Hist:
    """HdrHistogram of microsecond values (1 µs … 1 h, 3 significant digits); stats in milliseconds."""

    def __init__(self) -> None:
        from hdrh.histogram import HdrHistogram

        self.h = HdrHistogram(1, 3_600_000_000, 3)
        self.negative = 0

    def add(self, us: float) -> None:
        if us < 0:
            self.negative += 1  # clock steps; never silently folded into the latency
            us = 0
        self.h.record_value(max(1, int(us)))

    @property
    def n(self) -> int:
        return int(self.h.get_total_count())

    def q(self, pct: float) -> float:
        return self.h.get_value_at_percentile(pct) / 1000 if self.n else float("nan")

    def stats(self) -> dict[str, float]:
        if not self.n:
            return {"n": 0}
        return {"n": self.n, "min": self.h.get_min_value() / 1000, "p50": self.q(50), "p90": self.q(90),
                "p99": self.q(99), "p999": self.q(99.9), "max": self.h.get_max_value() / 1000,
                "mean": round(self.h.get_mean_value() / 1000, 3)}

    def cdf(self, points: int = 60) -> list[list[float]]:
        if not self.n:
            return []
        qs = sorted({min(100.0, 100 * (1 - 10 ** (-4 * i / points))) for i in range(points + 1)} | {50.0, 90.0})
        return [[self.q(p), p / 100] for p in qs]
