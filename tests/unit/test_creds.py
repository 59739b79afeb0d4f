"""broker.creds: LMDB credential store (add, list, revoke, verify, cache invalidation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.creds import CredentialStore, check_name, role_of, username_for
from wire import is_uid

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> CredentialStore:
    return CredentialStore(tmp_path)


def test_add_and_verify(store: CredentialStore, tmp_path: Path) -> None:
    user, pw = store.add("node", "n1")
    assert user == "node.n1"
    assert len(pw) >= 32
    assert store.verify(user, pw) == "node"
    assert store.verify(user, pw + "x") is None
    assert store.verify(user, "") is None
    assert store.verify("node.n2", pw) is None
    assert (tmp_path / "broker.lmdb").is_dir()


def test_device_username_is_its_uid(store: CredentialStore) -> None:
    user, pw = store.add("device", "lamp-1")
    assert user == "dev.lamp-1" and is_uid(user)
    assert store.verify(user, pw) == "device"


def test_only_a_salted_scrypt_hash_is_stored(store: CredentialStore) -> None:
    user, pw = store.add("device", "a")
    with store._env.begin(db=store._db) as txn:  # noqa: SLF001
        raw = bytes(txn.get(user.encode()))
    assert pw.encode() not in raw
    rec = json.loads(raw)
    assert rec["kdf"] == "scrypt" and rec["n"] == 2**14 and rec["r"] == 8 and rec["p"] == 1
    assert rec["role"] == "device" and rec["salt"] and rec["hash"] and rec["created"] > 0
    _, pw2 = store.add("device", "b")
    with store._env.begin(db=store._db) as txn:  # noqa: SLF001
        other = json.loads(bytes(txn.get(b"dev.b")))
    assert other["salt"] != rec["salt"]
    assert pw2 != pw


@pytest.mark.parametrize("name", ["", "a.b", "a b", "x" * 61, "ü", "a/b", "+", "#", None, 5])
def test_bad_names_raise(store: CredentialStore, name: object) -> None:
    with pytest.raises(ValueError, match="invalid credential name"):
        store.add("node", name)  # type: ignore[arg-type]


def test_bad_role_raises(store: CredentialStore) -> None:
    with pytest.raises(ValueError, match="invalid role"):
        store.add("edge", "x")


def test_names() -> None:
    assert check_name("A-z_09") == "A-z_09"
    assert check_name("x" * 60)
    assert username_for("node", "n") == "node.n"
    assert username_for("device", "n") == "dev.n"
    assert role_of("node.n1") == "node" and role_of("dev.x") == "device"
    assert role_of("edge") is None and role_of("dev.") is None and role_of("dev.a.b") is None


def test_add_existing_needs_replace(store: CredentialStore) -> None:
    user, pw = store.add("node", "n1")
    with pytest.raises(ValueError, match="already exists"):
        store.add("node", "n1")
    user2, pw2 = store.add("node", "n1", replace=True)
    assert user2 == user and pw2 != pw
    assert store.verify(user, pw) is None  # old password no longer works (cache invalidated by record change)
    assert store.verify(user, pw2) == "node"


def test_list(store: CredentialStore) -> None:
    assert store.list() == []
    store.add("node", "n1")
    store.add("device", "d1")
    infos = {i.username: i for i in store.list()}
    assert set(infos) == {"node.n1", "dev.d1"}
    assert infos["node.n1"].role == "node" and infos["dev.d1"].role == "device"
    assert infos["node.n1"].created > 0


def test_revoke(store: CredentialStore) -> None:
    user, pw = store.add("device", "d1")
    assert store.verify(user, pw) == "device"  # now cached
    assert store.revoke("d1") is True
    assert store.verify(user, pw) is None
    assert store.revoke("d1") is False
    store.add("node", "n1")
    assert store.revoke("node.n1") is True
    assert store.list() == []


def test_revoke_ambiguous_name(store: CredentialStore) -> None:
    store.add("node", "x")
    store.add("device", "x")
    with pytest.raises(ValueError, match="ambiguous"):
        store.revoke("x")
    assert store.revoke("dev.x") is True
    assert store.revoke("x") is True
    assert store.list() == []


def test_revoke_bad_name(store: CredentialStore) -> None:
    with pytest.raises(ValueError):
        store.revoke("a b")


@pytest.mark.parametrize(("user", "pw"), [(None, "x"), ("node.n1", None), ("", "x"), ("edge", "x"),
                                          ("node.n1", "x" * 10000), (b"node.n1", "x"), ("\udcff", "x")])
def test_verify_bad_input_is_none(store: CredentialStore, user: object, pw: object) -> None:
    store.add("node", "n1")
    assert store.verify(user, pw) is None  # type: ignore[arg-type]


def test_wrong_password_is_cached_too(store: CredentialStore, monkeypatch: pytest.MonkeyPatch) -> None:
    user, pw = store.add("node", "n1")
    assert store.verify(user, "wrong") is None
    assert store.verify(user, pw) == "node"
    import broker.creds as creds

    def boom(*a: object, **k: object) -> bytes:
        raise AssertionError("scrypt should not run for a cached answer")

    monkeypatch.setattr(creds, "_hash", boom)
    assert store.verify(user, "wrong") is None
    assert store.verify(user, pw) == "node"


async def test_averify(store: CredentialStore) -> None:
    user, pw = store.add("device", "d")
    assert await store.averify(user, pw) == "device"
    assert await store.averify(user, "nope") is None


def test_revoke_from_another_process_takes_effect(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    user, pw = store.add("device", "d")
    assert store.verify(user, pw) == "device"  # cached in this process
    code = ("import sys; from broker.creds import CredentialStore; "
            "sys.exit(0 if CredentialStore(sys.argv[1]).revoke('dev.d') else 3)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, timeout=30, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert store.verify(user, pw) is None
