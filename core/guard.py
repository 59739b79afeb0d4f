"""Connection hygiene for the embedded broker: pure bookkeeping, no amqtt and no I/O.

- :func:`client_id_ok` -- the client-id rule: a client id belongs to one credential (its username, or
  ``<username>:<suffix>``), so no credential can hold, take over or squat an id that belongs to another.
- :class:`AuthThrottle` -- failed-login throttling per (IP, username) and per username (token buckets in
  bounded tables) and a bound on password verifications waiting for scrypt; a refusal is immediate. The
  recent successes that exempt a pair from the per-username bucket are persisted by
  :class:`broker.creds.CredentialStore` (LMDB) and fed back with :meth:`AuthThrottle.remember` after a restart.
- :class:`ConnectionLimiter` -- global and per-IP caps on open client connections.
- :class:`Counters` and :class:`RateLimitedLog` -- what the broker refused or dropped, counted, and logged at
  most once per interval per kind (no traceback), so one misbehaving client cannot flood the log.

The limits are documented in docs/broker.md ("Limits").
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# -- client ids ------------------------------------------------------------------------------------------------

CLIENT_ID_SEP = ":"  # never in a username ([A-Za-z0-9_.@-]), so "<username>:" prefixes cannot overlap
_SUFFIX_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


def client_id_ok(username: str | None, client_id: str | None) -> bool:
    """May the client logged in as ``username`` use ``client_id``? It must be ``username`` itself or
    ``<username>:<suffix>`` with a suffix of 1-64 characters of ``A-Z a-z 0-9 _ . : @ -``."""
    if not username or not client_id or CLIENT_ID_SEP in username:
        return False
    if client_id == username:
        return True
    head, sep, suffix = client_id.partition(CLIENT_ID_SEP)
    return bool(sep) and head == username and _SUFFIX_RE.fullmatch(suffix) is not None


CLIENT_ID_RULE = "the client id must be the username or '<username>:<suffix>'"


# -- counters and rate-limited logging ---------------------------------------------------------------------------

@dataclass
class Counters:
    """What the broker refused or dropped since it started (all monotonically increasing)."""

    client_id_refused: int = 0  # CONNACK 2: the client id does not belong to the credential
    auth_throttled: int = 0  # CONNACK 3: too many failed logins for (IP, username) or username
    auth_busy: int = 0  # CONNACK 3: too many password verifications waiting
    conn_refused_global: int = 0  # closed at once: broker.max_connections reached
    conn_refused_ip: int = 0  # closed at once: broker.max_connections_per_ip reached for that IP
    oversize_dropped: int = 0  # PUBLISH payload above max_packet, read and dropped (acknowledged if QoS 1)
    oversize_closed: int = 0  # packet above its hard limit: connection closed
    queue_dropped: int = 0  # messages to a client dropped: its session's queue was full (broker.max_queued)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class RateLimitedLog:
    """Log a kind of event at most once per ``interval`` seconds, with how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, kind: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` was logged less than ``interval`` s ago; True if it was logged."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        if skipped:
            msg += " (%d more like this in the last %.0f s not logged)"
            args = (*args, skipped, self.interval)
        self.logger.log(level, msg, *args)
        return True


class LogBudget:
    """At most ``burst`` log lines at once and ``per_minute`` a minute on average, for events an outsider can
    repeat at will with ever new details (usernames, client ids, peers), so one key per kind would not bound
    them; lines left out are counted and the count is added to the next line logged."""

    def __init__(self, logger: logging.Logger | None, *, per_minute: float = 20.0, burst: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self.suppressed = 0

    def take(self) -> int | None:
        """None if a line now is over the budget (it is counted as left out); else how many were left out
        since the last line let through (the count starts again)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return None
        self._tokens -= 1.0
        left_out, self.suppressed = self.suppressed, 0
        return left_out

    def log(self, level: int, msg: str, *args: object) -> bool:
        left_out = self.take()
        if left_out is None:
            return False
        if left_out:
            msg += " (%d similar lines left out before this one)"
            args = (*args, left_out)
        self.logger.log(level, msg, *args)
        return True


# -- failed-login throttling -------------------------------------------------------------------------------------

class AuthUnavailable(Exception):
    """A login was not checked (CONNACK 3 "server unavailable"); the message names why, never the password."""

    def __init__(self, reason: str, *, busy: bool) -> None:
        super().__init__(reason)
        self.busy = busy  # True: verification queue full; False: throttled after failed logins


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class _Buckets:
    """Token buckets keyed by anything, in an LRU table of at most ``size`` entries."""

    burst: float
    per_s: float
    size: int
    table: OrderedDict[object, _Bucket] = field(default_factory=OrderedDict)

    def _get(self, key: object, now: float) -> _Bucket:
        b = self.table.get(key)
        if b is None:
            b = self.table[key] = _Bucket(self.burst, now)
            while len(self.table) > self.size:
                self.table.popitem(last=False)
        else:
            self.table.move_to_end(key)
            b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.per_s)
            b.stamp = now
        return b

    def take(self, key: object, now: float) -> bool:
        b = self._get(key, now)
        if b.tokens < 1:
            return False
        b.tokens -= 1
        return True

    def give(self, key: object, now: float, n: float = 1.0) -> None:
        b = self._get(key, now)
        b.tokens = min(self.burst, b.tokens + n)


# defaults (docs/broker.md "Limits")
PAIR_BURST, PAIR_PER_S = 5, 1 / 12  # failed logins per (IP, username): 5 at once, then 5 a minute
USER_BURST, USER_PER_S = 30, 1 / 2  # failed logins per username from IPs without a recent success: 30, then 30/min
GOOD_TTL = 24 * 3600.0  # an (IP, username) with a success this recent is exempt from the per-username bucket
TABLE_SIZE = 16384  # entries per table (LRU)
AUTH_QUEUE = 64  # password verifications waiting or running at once; more -> CONNACK 3 at once


class AuthThrottle:
    """Admission control for password verifications that need scrypt (cache hits never come here).

    :meth:`admit` reserves a token from the (IP, username) bucket and -- unless that pair logged in
    successfully within ``GOOD_TTL`` -- from the username's bucket, and a place among at most ``queue``
    pending verifications; otherwise it raises :class:`AuthUnavailable` at once. :meth:`done` releases the
    place; a success gives the tokens back (a correct password never uses up a bucket).
    """

    def __init__(self, *, queue: int = AUTH_QUEUE, pair_burst: float = PAIR_BURST, pair_per_s: float = PAIR_PER_S,
                 user_burst: float = USER_BURST, user_per_s: float = USER_PER_S, size: int = TABLE_SIZE,
                 good_ttl: float = GOOD_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.pending = 0
        self._pairs = _Buckets(pair_burst, pair_per_s, size)
        self._users = _Buckets(user_burst, user_per_s, size)
        self._good: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._size = size
        self._good_ttl = good_ttl
        self.clock = clock  # the time source of the buckets and the exemptions (tests may freeze it)

    def remember(self, ip: str, username: str, age: float = 0.0) -> None:
        """Record a successful login of ``username`` from ``ip`` ``age`` seconds ago (a cache hit, or one
        persisted before a restart); it exempts the pair from the per-username bucket for ``good_ttl``."""
        if age >= self._good_ttl:
            return
        pair = (ip, username)
        stamp = self.clock() - max(age, 0.0)
        old = self._good.get(pair)
        if old is not None and old > stamp:
            return
        self._good[pair] = stamp
        self._good.move_to_end(pair)
        while len(self._good) > self._size:
            self._good.popitem(last=False)

    def known_good(self, ip: str, username: str) -> bool:
        return self._known_good((ip, username), self.clock())

    def _known_good(self, pair: tuple[str, str], now: float) -> bool:
        t = self._good.get(pair)
        return t is not None and now - t < self._good_ttl

    def admit(self, ip: str, username: str) -> bool:
        """Reserve a verification; returns whether the username bucket was charged (pass it to :meth:`done`)."""
        if self.pending >= self.queue:
            raise AuthUnavailable(f"server busy: {self.pending} password checks already waiting", busy=True)
        now = self.clock()
        pair = (ip, username)
        if not self._pairs.take(pair, now):
            raise AuthUnavailable(f"too many failed logins for this user from {ip}; try again later", busy=False)
        charged = not self._known_good(pair, now)
        if charged and not self._users.take(username, now):
            self._pairs.give(pair, now)
            raise AuthUnavailable("too many failed logins for this user; try again later", busy=False)
        self.pending += 1
        return charged

    def done(self, ip: str, username: str, *, ok: bool, charged: bool) -> None:
        self.pending -= 1
        if not ok:
            return
        now = self.clock()
        pair = (ip, username)
        self._pairs.give(pair, now, self._pairs.burst)
        if charged:
            self._users.give(username, now)
        self.remember(ip, username)


# -- connection caps ---------------------------------------------------------------------------------------------

class ConnectionLimiter:
    """Open client connections, globally and per IP (0 = no cap)."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def acquire(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; None if admitted, else which cap refused it."""
        if self.max_total and self.total >= self.max_total:
            return "global"
        n = self.per_ip.get(ip, 0)
        if self.max_per_ip and n >= self.max_per_ip:
            return "ip"
        self.total += 1
        self.per_ip[ip] = n + 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)
