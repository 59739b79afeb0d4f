"""Every file SmartClaw creates is 0600 and every directory 0700, whatever the umask; too-open data is tightened.

Real components: LMDB environments, the private CA, ``claw init``, and a whole system (edge + embedded broker +
node over TLS) started by ``run_system``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from claw.cli import _parser
from claw.init import run_init
from core.perms import private_dir, secure_tree, too_open, write_private
from core.pki import issue_server_cert
from core.store import close_env, open_env
from tests.conftest import run_system

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (root included) whose group/other bits are set -> its mode, e.g. '0o644'."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
            out[str(p.relative_to(root))] = oct(stat.S_IMODE(st.st_mode))
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_lmdb_environment_is_private_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    env_dir = tmp_path / "data" / "sub" / "x.lmdb"  # two missing parents
    with umask(mask):
        env = open_env(env_dir, max_dbs=2)
        with env.begin(write=True) as txn:
            txn.put(b"k", b"an answer in plain text")
        close_env(env_dir)
    assert {p.name for p in env_dir.iterdir()} == {"data.mdb", "lock.mdb"}
    assert mode(env_dir / "data.mdb") == 0o600 and mode(env_dir / "lock.mdb") == 0o600
    assert mode(env_dir) == mode(env_dir.parent) == mode(tmp_path / "data") == 0o700
    assert modes(tmp_path / "data") == {}


def test_too_open_lmdb_environment_is_tightened_at_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env_dir = tmp_path / "node.lmdb"
    env = open_env(env_dir, max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    close_env(env_dir)
    # as an older version left it: world-readable directory and files
    os.chmod(env_dir, 0o755)
    for f in env_dir.iterdir():
        os.chmod(f, 0o644)
    with caplog.at_level(logging.WARNING, logger="core.perms"):
        env = open_env(env_dir, max_dbs=2)
    try:
        with env.begin() as txn:
            assert txn.get(b"k") == b"v"  # same data, only the modes changed
    finally:
        close_env(env_dir)
    assert modes(env_dir) == {}
    assert mode(env_dir) == 0o700 and mode(env_dir / "data.mdb") == 0o600
    assert any("readable by other users" in r.getMessage() and "3 path" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_pki_files_are_private(tmp_path: Path, mask: int) -> None:
    pki = tmp_path / "data" / "pki"
    with umask(mask):
        issue_server_cert(pki, ["localhost"])
        os.chmod(pki / "server.crt", 0o644)  # an existing, more open certificate is replaced by a 0600 one
        issue_server_cert(pki, ["localhost", "127.0.0.1"], force=True)
    assert sorted(p.name for p in pki.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert all(mode(p) == 0o600 for p in pki.iterdir())
    assert modes(tmp_path / "data") == {}


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_claw_init_writes_nothing_readable_by_others(tmp_path: Path, mask: int) -> None:
    d = tmp_path / "deploy"
    with umask(mask):
        assert run_init(_parser().parse_args(["init", "--public-host", "localhost", "--dir", str(d)])) == 0
        # --force rewrites a.toml/b.toml (keeping *.bak copies) and re-issues the certificate: all private too
        (d / "a" / "a.toml").write_text("# edited\n")
        assert run_init(_parser().parse_args(["init", "--public-host", "h.example", "--dir", str(d), "--force"])) == 0
    assert (d / "a" / "a.toml.bak").is_file()
    assert modes(d) == {}
    assert mode(d / "a" / "a.toml") == mode(d / "b" / "b.toml") == mode(d / "b" / "ca.crt") == 0o600
    assert mode(d) == mode(d / "a") == mode(d / "b") == mode(d / "a" / "data") == 0o700


def test_claw_init_force_tightens_an_older_deployment(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "deploy"
    assert run_init(_parser().parse_args(["init", "--public-host", "localhost", "--dir", str(d)])) == 0
    for p in [d / "a", d / "b", d / "a" / "data", d / "a" / "data" / "broker.lmdb"]:
        os.chmod(p, 0o755)
    for p in [d / "a" / "a.toml", d / "b" / "ca.crt", d / "a" / "data" / "pki" / "ca.crt"]:
        os.chmod(p, 0o644)
    with caplog.at_level(logging.WARNING, logger="core.perms"):
        assert run_init(_parser().parse_args(["init", "--public-host", "localhost", "--dir", str(d), "--force"])) == 0
    assert modes(d) == {}
    assert any("readable by other users" in r.getMessage() for r in caplog.records)


def test_secure_tree_leaves_symlink_targets_and_reports_nothing_when_private(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "shared.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o644)
    data = private_dir(tmp_path / "data")
    write_private(data / "x.secret", b"s3cret-value")
    (data / "link").symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="core.perms"):
        assert secure_tree(data) == []
    assert not caplog.records
    assert mode(outside) == 0o644  # a symbolic link is not followed
    os.chmod(data / "x.secret", 0o640)
    with caplog.at_level(logging.WARNING, logger="core.perms"):
        assert secure_tree(data) == [data / "x.secret"]
    assert too_open(data) == [] and mode(data / "x.secret") == 0o600
    assert "s3cret-value" not in caplog.text


@pytest.mark.integration
async def test_running_edge_and_node_leave_nothing_readable_by_others(
        tmp_path: Path, pki_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With umask 022, the test helper creates both data directories 0755 and copies the PKI files 0644 (as a
    careless operator would); starting the edge and the node tightens them, and everything they create (LMDB
    environments, edge.secret) is private."""
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.WARNING, logger="core.perms"):
            async with run_system(tmp_path, pki_dir) as sys_:
                a, b = Path(sys_.settings.data_dir), tmp_path / "b"
                assert (a / "edge.lmdb" / "data.mdb").is_file() and (a / "broker.lmdb").is_dir()
                assert (a / "edge.secret").is_file() and (b / "node.lmdb" / "data.mdb").is_file()
                assert modes(a) == {} and modes(b) == {}
    finally:
        os.umask(old)
    assert modes(tmp_path / "a") == {} and modes(tmp_path / "b") == {}
    warned = [r.getMessage() for r in caplog.records if "readable by other users" in r.getMessage()]
    assert any(str(tmp_path / "a") in m for m in warned) and any(str(tmp_path / "b") in m for m in warned)
