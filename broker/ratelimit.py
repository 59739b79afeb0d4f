"""Per-device publish rate limit of the embedded broker (token buckets).

A device account (role ``device``) may publish at most ``broker.device_publish_rate`` messages per second on
average, with bursts of up to ``broker.device_publish_burst``. The bucket belongs to the username, so it is
shared by all of that device's connections and survives reconnects (a device cannot reset it by reconnecting
or by opening more connections). Nodes and the edge are not limited.

Over the limit the broker still acknowledges the PUBLISH (amqtt sends the PUBACK as it reads the packet) and
then drops the message: it reaches no subscriber. Drops are counted (:attr:`RateLimiter.dropped`, and per
device) and logged at WARNING at most once per ``LOG_EVERY`` seconds per device, with the count since the last
line. The connection stays open: a device that keeps flooding only loses its excess messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between two "over the rate" lines for one device
MAX_BUCKETS = 4096  # above this many tracked devices, full (idle) buckets are forgotten


class _Bucket:
    __slots__ = ("tokens", "stamp", "dropped", "unlogged", "logged_at")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.dropped = 0
        self.unlogged = 0
        self.logged_at = -LOG_EVERY


class RateLimiter:
    """Token buckets keyed by username: ``rate`` tokens per second, at most ``burst`` (rate <= 0: no limit)."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.dropped = 0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, key: str) -> bool:
        """Take one token from ``key``'s bucket; False (and counted, logged) if there is none."""
        if self.rate <= 0:
            return True
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        self.dropped += 1
        bucket.dropped += 1
        bucket.unlogged += 1
        if now - bucket.logged_at >= LOG_EVERY:
            log.warning("device %r publishes faster than broker.device_publish_rate=%g/s (burst %d): dropped %d "
                        "message(s); %d dropped in total", key[:100], self.rate, self.burst, bucket.unlogged,
                        bucket.dropped)
            bucket.logged_at = now
            bucket.unlogged = 0
        return False

    def dropped_for(self, key: str) -> int:
        bucket = self._buckets.get(key)
        return bucket.dropped if bucket is not None else 0

    def _forget_idle(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key in [k for k, b in self._buckets.items() if now - b.stamp >= full_after]:
            del self._buckets[key]
