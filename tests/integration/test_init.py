"""``claw init``: the files it writes, and a real two-process deployment (edge and node as subprocesses).

Relative paths in a.toml/b.toml resolve against the config file's directory, so the processes are started from
a *different* working directory than the config, and b/ is copied elsewhere first (as onto server B).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from broker.creds import CredentialStore
from claw.cli import _parser
from core.config import Settings, load_settings
from claw.init import run_init
from core.mqtt import tls_context
from core.pki import ensure_ca
from fakes.llm import FakeLLMConfig, run_fake_llm
from tests.conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLAW = [sys.executable, "-m", "claw.cli"]
POSIX = os.name != "nt"


def init(*argv: str) -> int:
    return run_init(_parser().parse_args(["init", *argv]))


def layout(d: Path) -> dict[str, Path]:
    a, b = d / "a", d / "b"
    pki = a / "data" / "pki"
    return {"a.toml": a / "a.toml", "ca.crt": pki / "ca.crt", "ca.key": pki / "ca.key",
            "server.crt": pki / "server.crt", "server.key": pki / "server.key", "b.toml": b / "b.toml",
            "b/ca.crt": b / "ca.crt", "node.secret": b / "node.secret"}


def sans(cert_path: Path) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), [str(i) for i in ext.get_values_for_type(x509.IPAddress)]


def issued_by(cert_path: Path, ca_path: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # InvalidSignature, ValueError (issuer mismatch), TypeError
        return False
    return True


# ---- files ---------------------------------------------------------------------------------------------------

def test_init_writes_both_servers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "deploy"
    assert init("--public-host", "claw.example.com", "--public-host", "203.0.113.7",
                "--public-host", "[2001:db8::1]", "--dir", str(d), "--node", "b7") == 0
    out, err = capsys.readouterr()
    f = layout(d)
    for name, path in f.items():
        assert path.is_file(), name
    secret = f["node.secret"].read_text()
    assert len(secret) >= 24 and secret not in out + err, "the password must never be printed"
    assert "node.b7" in out and "b.toml" in out and "复制" in out

    # secrets 0600; the CA key stays on A; B gets the CA certificate only
    if POSIX:
        for name in ("ca.key", "server.key", "node.secret"):
            assert stat.S_IMODE(f[name].stat().st_mode) == 0o600, name
    assert sorted(p.name for p in (d / "b").iterdir()) == ["b.toml", "ca.crt", "node.secret"]
    assert f["b/ca.crt"].read_bytes() == f["ca.crt"].read_bytes()
    assert b"PRIVATE KEY" not in f["b/ca.crt"].read_bytes()
    assert sans(f["server.crt"]) == (["claw.example.com"], ["203.0.113.7", "2001:db8::1"])
    assert issued_by(f["server.crt"], f["ca.crt"])
    assert CredentialStore(d / "a" / "data").verify("node.b7", secret) == "node"

    # both configs load from any working directory; relative paths are relative to the config file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a = load_settings(f["a.toml"], env={})
    assert Path(a.data_dir) == (d / "a" / "data").resolve()
    assert a.broker.enabled and a.broker.listen == "0.0.0.0:8883" and a.broker.local_listen.startswith("127.0.0.1:")
    assert Path(a.broker.cert_file) == f["server.crt"].resolve() and Path(a.broker.key_file).is_file()
    assert a.edge.http == "127.0.0.1:8080" and a.edge.dev_login is False
    assert a.wecom.corp_id == "" and a.wecom.secret == "" and a.miniapp.appid == ""

    server_b = tmp_path / "serverB" / "b"
    shutil.copytree(d / "b", server_b)
    b = load_settings(server_b / "b.toml", env={})
    assert (b.mqtt.host, b.mqtt.port, b.mqtt.tls) == ("claw.example.com", 8883, True)
    assert b.mqtt.username == "node.b7" and b.mqtt.password == secret and b.node.id == "b7"
    assert Path(b.mqtt.ca_file) == (server_b / "ca.crt").resolve()
    tls_context(b.mqtt.ca_file)  # loads
    assert b.node.llm_url == "http://127.0.0.1:1234/v1"

    # the configs document every key an operator may set (possibly in a comment)
    a_text, b_text = f["a.toml"].read_text(), f["b.toml"].read_text()
    for section, text in (("broker", a_text), ("edge", a_text), ("wecom", a_text), ("miniapp", a_text),
                          ("mqtt", b_text), ("node", b_text), ("log", b_text), ("log", a_text)):
        for key in getattr(Settings(), section).__struct_fields__:
            assert key in text, f"{section}.{key} missing from {'a' if text is a_text else 'b'}.toml"


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "deploy"
    assert init("--public-host", "a.example.com", "--dir", str(d)) == 0
    before = {k: p.read_bytes() for k, p in layout(d).items()}
    capsys.readouterr()
    assert init("--public-host", "other.example.com", "--dir", str(d)) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "a.toml" in err and "node.secret" in err
    assert {k: p.read_bytes() for k, p in layout(d).items()} == before

    # one existing file is enough to refuse, and nothing else gets written
    d2 = tmp_path / "d2"
    (d2 / "b").mkdir(parents=True)
    (d2 / "b" / "b.toml").write_text("# mine\n")
    assert init("--public-host", "a.example.com", "--dir", str(d2)) == 2
    assert not (d2 / "a").exists() and (d2 / "b" / "b.toml").read_text() == "# mine\n"


def test_force_keeps_ca_and_working_node_credential(tmp_path: Path) -> None:
    d = tmp_path / "deploy"
    f = layout(d)
    assert init("--public-host", "a.example.com", "--dir", str(d)) == 0
    ca, ca_key, secret = f["ca.crt"].read_bytes(), f["ca.key"].read_bytes(), f["node.secret"].read_text()
    old_server = f["server.crt"].read_bytes()

    assert init("--public-host", "a2.example.com", "--public-host", "198.51.100.4", "--dir", str(d), "--force") == 0
    assert f["ca.crt"].read_bytes() == ca and f["ca.key"].read_bytes() == ca_key
    assert f["b/ca.crt"].read_bytes() == ca
    assert f["server.crt"].read_bytes() != old_server
    assert sans(f["server.crt"]) == (["a2.example.com"], ["198.51.100.4"])
    assert issued_by(f["server.crt"], f["ca.crt"])
    assert f["node.secret"].read_text() == secret, "a node credential that still works is kept"
    assert load_settings(f["b.toml"], env={}).mqtt.host == "a2.example.com"
    assert "a.example.com" in (d / "b" / "b.toml.bak").read_text()
    store = CredentialStore(d / "a" / "data")
    assert store.verify("node.b1", secret) == "node"

    # without b/node.secret a new password is issued and the old one stops working
    f["node.secret"].unlink()
    assert init("--public-host", "a2.example.com", "--dir", str(d), "--force") == 0
    new = f["node.secret"].read_text()
    assert new != secret and store.verify("node.b1", new) == "node" and store.verify("node.b1", secret) is None
    if POSIX:
        assert stat.S_IMODE(f["node.secret"].stat().st_mode) == 0o600


def test_force_creates_ca_when_absent(tmp_path: Path) -> None:
    d = tmp_path / "deploy"
    f = layout(d)
    assert init("--public-host", "a.example.com", "--dir", str(d)) == 0
    old_ca = f["ca.crt"].read_bytes()
    f["ca.key"].unlink()
    assert init("--public-host", "a.example.com", "--dir", str(d), "--force") == 0
    assert f["ca.crt"].read_bytes() != old_ca and f["ca.key"].is_file()
    assert f["b/ca.crt"].read_bytes() == f["ca.crt"].read_bytes()
    assert issued_by(f["server.crt"], f["ca.crt"])


@pytest.mark.parametrize("argv", [
    ["--public-host", "https://a.example.com"],
    ["--public-host", "a.example.com:8883"],
    ["--public-host", "0.0.0.0"],
    ["--public-host", "bad host"],
    ["--public-host", "a.example.com", "--node", "bad.name"],
])
def test_bad_arguments_write_nothing(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert init(*argv, "--dir", str(tmp_path / "deploy")) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "deploy").exists()


# ---- two real processes ----------------------------------------------------------------------------------------

def clean_env(**over: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAW_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(over)
    return env


@contextlib.contextmanager
def process(argv: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    fh = open(log, "wb")
    p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        fh.close()


async def poll(what: str, check: Callable[[], Awaitable[Any]], procs: dict[str, tuple[subprocess.Popen[bytes], Path]],
               timeout: float = 30) -> Any:
    """Wait until ``check()`` returns a truthy value; fail early (with its log) if a process exits."""
    end = time.monotonic() + timeout
    while True:
        for name, (p, log) in procs.items():
            if p.poll() is not None:
                pytest.fail(f"{name} exited with {p.returncode} while waiting for {what}:\n{log.read_text()}")
        result = await check()
        if result:
            return result
        if time.monotonic() > end:
            logs = "\n".join(f"--- {n}:\n{lg.read_text()}" for n, (_, lg) in procs.items())
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        await asyncio.sleep(0.1)


def deploy(tmp_path: Path) -> Path:
    """``claw init --public-host localhost`` run as a command in ``tmp_path``; returns claw-deploy/."""
    r = subprocess.run([*CLAW, "init", "--public-host", "localhost"], cwd=tmp_path, env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "claw-deploy"
    assert (d / "b" / "node.secret").read_text() not in r.stdout + r.stderr
    return d


def edge_env(http: int, tls: int) -> dict[str, str]:
    return clean_env(CLAW_EDGE__HTTP=f"127.0.0.1:{http}", CLAW_BROKER__LISTEN=f"127.0.0.1:{tls}",
                     CLAW_EDGE__DEV_LOGIN="true", CLAW_EDGE__NODE_TIMEOUT_S="5")


def node_env(tls: int, llm_url: str = "http://127.0.0.1:9/v1") -> dict[str, str]:
    return clean_env(CLAW_MQTT__PORT=str(tls), CLAW_NODE__LLM_URL=llm_url, CLAW_NODE__BEAT_S="0.5",
                     CLAW_MQTT__RECONNECT_MIN="0.1", CLAW_MQTT__RECONNECT_MAX="1")


async def health(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return await r.json() if r.status in (200, 503) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


def group_or_other_access(root: Path) -> list[str]:
    """Paths under ``root`` (root included) that group or others may access, with their modes."""
    return [f"{p} {oct(stat.S_IMODE(p.lstat().st_mode))}" for p in [root, *root.rglob("*")]
            if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077]


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask (files 0644, directories 0755 unless the program asks for less), inherited by the
    processes a test starts."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def test_init_then_edge_and_node_processes_answer(tmp_path: Path, umask_022: None) -> None:
    d = deploy(tmp_path)
    server_b = tmp_path / "serverB" / "smartclaw-b"  # "copy b/ to server B"
    shutil.copytree(d / "b", server_b)
    http, tls = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    cfg = FakeLLMConfig(n_tokens=30, tokens_per_s=300, token_chars=3)
    async with run_fake_llm(cfg) as fake, aiohttp.ClientSession() as s:
        # the edge runs from tmp_path (not a/), the node from its own copied directory
        with process([*CLAW, "edge", "--config", "claw-deploy/a/a.toml"], cwd=tmp_path,
                     env=edge_env(http, tls), log=tmp_path / "edge.log") as edge, \
             process([*CLAW, "node", "--config", "b.toml"], cwd=server_b,
                     env=node_env(tls, fake.url), log=tmp_path / "node.log") as node:
            procs = {"edge": (edge, tmp_path / "edge.log"), "node": (node, tmp_path / "node.log")}

            async def node_online() -> Any:
                h = await health(s, url)
                return h if h and h["ok"] and h["node_online"] and "b1" in h["nodes"] else None

            await poll("node b1 online at the edge", node_online, procs)
            async with s.post(f"{url}/api/login", json={"dev_user": "alice"}) as r:
                assert r.status == 200, await r.text()
                token = (await r.json())["token"]
            frames: list[dict[str, Any]] = []
            async with s.ws_connect(f"{url}/api/ws", params={"token": token}) as ws:
                await ws.send_json({"type": "ask", "text": "你好"})
                async with asyncio.timeout(20):
                    while True:
                        frame = await ws.receive_json()
                        frames.append(frame)
                        if frame["type"] == "done":
                            break
            deltas = [f for f in frames if f["type"] == "delta"]
            done = frames[-1]
            assert any(f["type"] == "accepted" for f in frames)
            assert done["status"] == "ok", done
            assert [f["seq"] for f in deltas] == list(range(1, len(deltas) + 1)) and len(deltas) >= 1
            assert done["text"] == "".join(f["text"] for f in deltas) and len(done["text"]) == 90
            assert fake.stats.streams_completed == 1
        # data went where a.toml says (relative to a.toml), not into the working directory
        assert (d / "a" / "data" / "edge.lmdb").is_dir() and (d / "a" / "data" / "edge.secret").is_file()
        assert not (tmp_path / ".claw").exists() and not (tmp_path / "data").exists()
    if POSIX:
        assert edge.returncode == 0 and node.returncode == 0, "both stop cleanly on SIGTERM"
        # with umask 022: configs, keys, certificates, secrets, LMDB data and lock files 0600, directories 0700
        assert (server_b / "data" / "node.lmdb" / "data.mdb").is_file()
        assert group_or_other_access(d) == [] and group_or_other_access(server_b) == []


async def test_wrong_password_and_wrong_ca_are_refused(tmp_path: Path) -> None:
    d = deploy(tmp_path)
    bad_pw, bad_ca = tmp_path / "bad-pw", tmp_path / "bad-ca"
    shutil.copytree(d / "b", bad_pw)
    shutil.copytree(d / "b", bad_ca)
    (bad_pw / "node.secret").write_text("not-the-password-" + "x" * 16)
    other = ensure_ca(tmp_path / "other-ca")  # a CA that did not sign server A's certificate
    shutil.copyfile(other.ca_cert, bad_ca / "ca.crt")
    http, tls = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    logs = {n: tmp_path / f"{n}.log" for n in ("edge", "bad-pw", "bad-ca")}
    async with aiohttp.ClientSession() as s:
        with process([*CLAW, "edge", "--config", str(d / "a" / "a.toml")], cwd=tmp_path,
                     env=edge_env(http, tls), log=logs["edge"]) as edge:
            procs = {"edge": (edge, logs["edge"])}

            async def up() -> Any:
                h = await health(s, url)
                return h if h and h["ok"] else None

            await poll("edge up", up, procs)
            with process([*CLAW, "node", "--config", "b.toml"], cwd=bad_pw, env=node_env(tls),
                         log=logs["bad-pw"]) as n1, \
                 process([*CLAW, "node", "--config", "b.toml"], cwd=bad_ca, env=node_env(tls),
                         log=logs["bad-ca"]) as n2:
                procs |= {"bad-pw": (n1, logs["bad-pw"]), "bad-ca": (n2, logs["bad-ca"])}

                def lines(name: str, *words: str) -> int:
                    return sum(all(w in line for w in words) for line in logs[name].read_text().splitlines())

                async def refused() -> bool:  # twice each: the retry (0.1-1 s later) was refused too
                    pw = logs["bad-pw"].read_text()
                    return (lines("bad-pw", "Not authorized") >= 2 and "bad username/password" in pw
                            and lines("bad-ca", "CERTIFICATE_VERIFY_FAILED") >= 2
                            and lines("edge", "MQTT CONNECT refused: user 'node.b1'") >= 2)

                # Each node's attempts are one after the other: with a second refusal logged, none got in before
                # it (and beat), so nothing may show up at the edge
                await poll("both nodes refused twice", refused, procs)
                h = await health(s, url)
                assert h is not None and h["node_online"] is False and h["nodes"] == {}, h
                for n in ("bad-pw", "bad-ca"):
                    assert "connected to MQTT broker" not in logs[n].read_text(), n


# ---- the printed next steps work as printed -----------------------------------------------------------------

def _printed_claw(out: str, marker: str) -> str:
    line = next(ln for ln in out.splitlines() if marker in ln)
    return line.split(marker, 1)[1].split(" edge --config", 1)[0].strip()


@pytest.mark.skipif(not POSIX, reason="runs the printed command with /bin/sh")
@pytest.mark.parametrize("how", ["script", "module"])
def test_init_prints_a_claw_command_that_runs_from_where_it_was_started(tmp_path: Path, how: str) -> None:
    """``claw`` is not on PATH after ``make demo``/``make test`` (``.venv/bin/claw`` is): the next steps name the
    program the user actually ran, so that copying the line works from the same shell."""
    script = Path(sys.executable).parent / "claw"
    argv = [str(script)] if how == "script" else list(CLAW)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # no venv on PATH, as in a fresh shell
    r = subprocess.run([*argv, "init", "--public-host", "a.example.com", "--dir", "deploy"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    claw = _printed_claw(r.stdout, "3. Server A: ")
    assert claw != "claw"
    check = subprocess.run(f"{claw} --help", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, (claw, check.stderr)
    assert "init" in check.stdout
