"""The login caches of broker/creds.py: successes and failures in separate LRU tables (real LMDB, real scrypt)."""

from __future__ import annotations

from pathlib import Path

import pytest

import broker.creds as creds_mod
from broker.creds import CredentialStore


@pytest.fixture
def scrypt_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real scrypt runs (the password hash is the expensive part the caches save)."""
    runs = [0]
    real = creds_mod._hash

    def counting(*args: object, **kw: object) -> bytes:
        runs[0] += 1
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(creds_mod, "_hash", counting)
    return runs


def test_failed_logins_never_evict_a_good_one(tmp_path: Path, scrypt_runs: list[int],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The one cache was cleared wholesale when full, so a flood of wrong passwords evicted every good login."""
    monkeypatch.setattr(creds_mod, "_CACHE_MAX", 8)
    monkeypatch.setattr(creds_mod, "_FAIL_CACHE_MAX", 8, raising=False)
    store = CredentialStore(tmp_path)
    user, pw = store.add("node", "n1")
    assert store.verify(user, pw) == "node"
    for i in range(20):
        assert store.verify(user, f"wrong-{i}") is None
    before = scrypt_runs[0]
    assert store.verify(user, pw) == "node"
    assert scrypt_runs[0] == before  # answered from the cache


def test_good_logins_are_kept_lru(tmp_path: Path, scrypt_runs: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(creds_mod, "_CACHE_MAX", 2)
    store = CredentialStore(tmp_path)
    creds = [store.add("device", f"d{i}") for i in range(3)]
    for u, p in creds[:2]:
        assert store.verify(u, p) == "device"
    assert store.verify(*creds[0]) == "device"  # d0 is now the most recent
    assert store.verify(*creds[2]) == "device"  # evicts d1, the least recent
    before = scrypt_runs[0]
    assert store.verify(*creds[0]) == "device" and store.verify(*creds[2]) == "device"
    assert scrypt_runs[0] == before
    assert store.verify(*creds[1]) == "device" and scrypt_runs[0] == before + 1


def test_replaced_password_is_not_served_from_the_cache(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    user, pw = store.add("node", "n1")
    assert store.verify(user, pw) == "node"
    _, pw2 = store.add("node", "n1", replace=True)
    assert store.verify(user, pw) is None and store.verify(user, pw2) == "node"
