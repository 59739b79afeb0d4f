"""broker.creds: the generation counter and record fingerprints (what the broker's session sweep reads), and
the persisted recent successful logins (the failed-login exemption after a restart), on real LMDB."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import broker.creds as creds
from broker.creds import CredentialStore
from core.guard import GOOD_TTL, AuthThrottle, AuthUnavailable

ROOT = Path(__file__).resolve().parents[2]


def test_generation_and_fingerprint_follow_add_replace_revoke(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    g0 = store.generation()
    user, _ = store.add("device", "d1")
    fp1 = store.fingerprint(user)
    assert fp1 is not None and store.generation() == g0 + 1 and store.state(user) == (g0 + 1, fp1)
    store.add("device", "d1", replace=True)
    fp2 = store.fingerprint(user)
    assert fp2 not in (None, fp1) and store.generation() == g0 + 2
    assert not store.revoke("nobody") and store.generation() == g0 + 2  # nothing deleted, nothing bumped
    # another process (the CLI) revokes: seen here at the next read
    code = "import sys; from broker.creds import CredentialStore; CredentialStore(sys.argv[1]).revoke('dev.d1')"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, timeout=30, check=True)
    assert store.generation() == g0 + 3 and store.fingerprint(user) is None
    assert store.state(user) == (g0 + 3, None)


def _spray(throttle: AuthThrottle, username: str, n: int) -> None:
    for i in range(n):
        try:
            throttle.done(f"10.9.0.{i}", username, ok=False, charged=throttle.admit(f"10.9.0.{i}", username))
        except AuthUnavailable:
            pass


async def test_recent_logins_survive_a_new_store(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    user, pw = store.add("node", "n1")
    assert await store.averify(user, pw, "10.0.0.1") == "node"
    await store.flush_logins()
    # "restart": a new store and a new throttle on the same LMDB
    fresh = CredentialStore(tmp_path, throttle=AuthThrottle(user_burst=3))
    assert fresh.load_recent_logins() == 1
    _spray(fresh.throttle, user, 10)  # the username's bucket is empty ...
    with pytest.raises(AuthUnavailable):
        fresh.throttle.admit("10.0.0.2", user)
    assert fresh.throttle.known_good("10.0.0.1", user)  # ... but the known pair is exempt
    assert not fresh.throttle.admit("10.0.0.1", user)  # not charged to the username's bucket


def test_load_prunes_old_entries_and_caps_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CredentialStore(tmp_path)
    now = time.time()
    store._write_logins({("10.0.0.1", "node.old"): now - GOOD_TTL - 10,  # noqa: SLF001
                         ("10.0.0.2", "node.future"): now + 3600,
                         **{(f"10.1.0.{i}", "dev.x"): now - 100 + i for i in range(10)}})
    monkeypatch.setattr(creds, "LOGIN_MAX", 4)
    fresh = CredentialStore(tmp_path)
    assert fresh.load_recent_logins() == 4
    with fresh._env.begin(db=fresh._logins) as txn:  # noqa: SLF001
        kept = {bytes(k).decode(): struct.unpack(">d", bytes(v))[0] for k, v in txn.cursor()}
    assert sorted(kept) == [f"dev.x 10.1.0.{i}" for i in range(6, 10)]
    assert fresh.throttle.known_good("10.1.0.9", "dev.x") and not fresh.throttle.known_good("10.1.0.1", "dev.x")


async def test_a_pair_is_written_at_most_once_per_interval(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    writes: list[dict[tuple[str, str], float]] = []
    real = store._write_logins  # noqa: SLF001

    def counting(batch: dict[tuple[str, str], float]) -> None:
        writes.append(dict(batch))
        real(batch)

    store._write_logins = counting  # type: ignore[method-assign]  # noqa: SLF001
    user, pw = store.add("device", "d1")
    for _ in range(20):
        assert await store.averify(user, pw, "10.0.0.1") == "device"  # scrypt once, then cache hits
    assert await store.averify(user, pw, "10.0.0.2") == "device"
    await store.flush_logins()  # note_login started the writer task at once: this waits for it
    assert sum(len(b) for b in writes) == 2 and len(writes) <= 2
