"""Failed-login throttling, connection caps, rate-limited logs and the client-id rule (core/guard.py,
broker/creds.py ``averify``), on real LMDB."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.creds import CredentialStore
from core.guard import AuthThrottle, AuthUnavailable, ConnectionLimiter, RateLimitedLog, client_id_ok


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_throttle_per_ip_and_username() -> None:
    clock = Clock()
    t = AuthThrottle(pair_burst=3, pair_per_s=1 / 10, user_burst=5, user_per_s=1 / 10, clock=clock)
    for _ in range(3):
        charged = t.admit("10.0.0.1", "dev.a")
        t.done("10.0.0.1", "dev.a", ok=False, charged=charged)
    with pytest.raises(AuthUnavailable) as info:
        t.admit("10.0.0.1", "dev.a")
    assert not info.value.busy and "10.0.0.1" in str(info.value)
    # another username from the same IP, and the same username from another IP, are not blocked by it
    t.done("10.0.0.1", "node.n1", ok=True, charged=t.admit("10.0.0.1", "node.n1"))
    t.done("10.0.0.2", "dev.a", ok=False, charged=t.admit("10.0.0.2", "dev.a"))
    t.done("10.0.0.3", "dev.a", ok=False, charged=t.admit("10.0.0.3", "dev.a"))
    with pytest.raises(AuthUnavailable, match="for this user;"):  # the username's bucket (5) is empty now
        t.admit("10.0.0.4", "dev.a")
    clock.t += 10  # one token back in each bucket
    t.done("10.0.0.1", "dev.a", ok=False, charged=t.admit("10.0.0.1", "dev.a"))
    assert t.pending == 0


def test_a_success_refills_and_exempts_its_pair_from_the_username_bucket() -> None:
    clock = Clock()
    t = AuthThrottle(pair_burst=2, pair_per_s=0.001, user_burst=2, user_per_s=0.001, clock=clock)
    t.done("10.0.0.1", "node.n1", ok=True, charged=t.admit("10.0.0.1", "node.n1"))
    for ip in ("10.0.0.8", "10.0.0.9"):  # an attacker drains the username's bucket from elsewhere
        t.done(ip, "node.n1", ok=False, charged=t.admit(ip, "node.n1"))
    with pytest.raises(AuthUnavailable):
        t.admit("10.0.0.7", "node.n1")
    for _ in range(5):  # the node's own IP logged in before: still admitted, success after success
        t.done("10.0.0.1", "node.n1", ok=True, charged=t.admit("10.0.0.1", "node.n1"))


def test_throttle_tables_are_bounded() -> None:
    t = AuthThrottle(size=100)
    for i in range(1000):
        ip, user = f"10.0.{i // 256}.{i % 256}", f"dev.u{i}"
        t.done(ip, user, ok=bool(i % 2), charged=t.admit(ip, user))
    assert len(t._pairs.table) <= 100 and len(t._users.table) <= 100 and len(t._good) <= 100


async def test_averify_refuses_at_once_when_the_queue_is_full(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path, throttle=AuthThrottle(queue=1))
    user, pw = store.add("device", "d1")
    first = asyncio.create_task(store.averify(user, pw, "127.0.0.1"))
    await asyncio.sleep(0)  # the first one is admitted and waits for scrypt
    assert store.throttle.pending == 1
    with pytest.raises(AuthUnavailable) as info:
        await store.averify(user, pw + "x", "127.0.0.1")
    assert info.value.busy
    assert await first == "device" and store.throttle.pending == 0
    assert await store.averify(user, pw, "127.0.0.1") == "device"  # cached: never throttled


def test_client_id_rule() -> None:
    ok = [("node.n1", "node.n1"), ("node.n1", "node.n1:a"), ("dev.x", "dev.x:1:2"), ("edge", "edge:bridge"),
          ("dev.a@b", "dev.a@b:x-y_z.1")]
    bad = [("node.n1", "node-n1"), ("node.n1", "node.n12"), ("node.n1", "node.n1:"), ("dev.x", "node.n1"),
           ("dev.x", "dev.x:a/b"), ("dev.x", "dev.x:+"), ("dev.x", "dev.x:" + "a" * 65), ("", ""),
           ("dev.x", ""), ("a:b", "a:b")]
    assert all(client_id_ok(u, c) for u, c in ok)
    assert not any(client_id_ok(u, c) for u, c in bad)


def test_connection_limiter() -> None:
    lim = ConnectionLimiter(3, 2)
    assert [lim.acquire("a"), lim.acquire("a"), lim.acquire("a")] == [None, None, "ip"]
    assert lim.acquire("b") is None and lim.acquire("c") == "global"
    lim.release("a")
    assert lim.acquire("c") is None and lim.per_ip == {"a": 1, "b": 1, "c": 1}


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), interval=60, clock=clock)
    caplog.set_level(logging.INFO, "t.ratelog")
    assert rl.log("k", logging.WARNING, "event %d", 1)
    assert not any(rl.log("k", logging.WARNING, "event %d", i) for i in range(2, 50))
    assert rl.log("other", logging.WARNING, "other kind")
    clock.t += 61
    assert rl.log("k", logging.WARNING, "event %d", 50)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["event 1", "other kind", "event 50 (48 more like this in the last 60 s not logged)"]
