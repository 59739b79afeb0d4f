"""Personal tokens (``claw token issue/list/revoke``, ``POST /api/login {"pat"}``) and ``claw chat`` signing in
with one, against the real edge on 127.0.0.1 (real auth.lmdb shared with the CLI in another process, real
node and fake LM Studio where an answer is needed, a real TLS proxy with a private CA for ``--cafile``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from claw.chat import default_user
from edge import api, auth
from edge.keys import STORE, TOKENS
from fakes.llm import FakeLLMConfig
from tests.conftest import System, free_port, run_system, wait_until
from tests.integration.test_edge_security import refresh as refresh_status
from tests.integration.test_edge_security import tasks_status as bearer_status
from tests.integration.test_sessions import open_ws

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
CLAW = [sys.executable, "-m", "claw.cli"]
EDGE_ONLY: dict[str, Any] = {"start_node": False}
NO_DEV: dict[str, Any] = {"edge": {"dev_login": False}}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAW_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def claw(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """``claw ARGS`` in another process (as an operator or a user runs it); (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(*CLAW, *args, cwd=ROOT, env=env or _env(),
                                                stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def pat_login(s: aiohttp.ClientSession, sys_: System, pat: Any) -> tuple[int, dict[str, Any], Any]:
    async with s.post(f"{sys_.http}/api/login", json={"pat": pat}) as r:
        return r.status, await r.json(), r.headers


# ---- the token store and the sign-in ---------------------------------------------------------------

async def test_issue_list_sign_in_and_revoke_one_while_the_edge_runs(tmp_path: Path, pki_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "WS_CHECK_S", 0.1)
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY, **NO_DEV) as sys_, aiohttp.ClientSession() as s:
        data = sys_.settings.data_dir
        rc, out, err = await claw("token", "issue", "web.alice", "--note", "alice laptop", "--data", data)
        assert rc == 0, err
        token = out.strip()
        assert out.count("\n") == 1 and token.startswith("pat_")  # the token alone on stdout
        assert token not in err and "web.alice" in err
        ident = auth.pat_id(token)
        assert ident is not None and ident in err
        rc, out, err = await claw("token", "issue", "web.alice", "--days", "2", "--data", data)
        second = out.strip()
        assert rc == 0 and second != token

        # stored hashed only: neither token is anywhere in auth.lmdb
        raw = b"".join(p.read_bytes() for p in (Path(data) / auth.ENV_DIR).iterdir())
        for t in (token, second):
            assert t.encode() not in raw and t.split("_", 2)[2].encode() not in raw

        rc, listed, _ = await claw("token", "list", "--data", data)
        assert rc == 0 and ident in listed and "web.alice" in listed and "alice laptop" in listed
        assert "never" in listed and token not in listed and second not in listed

        status, pair, _ = await pat_login(s, sys_, token)
        assert status == 200, pair
        assert set(pair) == {"token", "uid", "expires", "refresh", "refresh_expires"}
        assert pair["uid"] == "web.alice"
        assert pair["refresh_expires"] <= time.time() + 30 * 86400 + 5  # never beyond the personal token
        assert await bearer_status(s, sys_, pair["token"]) == 200
        async with s.post(f"{sys_.http}/api/login", json={"dev_user": "alice"}) as r:
            assert r.status == 403  # a non-dev edge: the personal token is the way in
        rc, listed, _ = await claw("token", "list", "web.alice", "--data", data)
        row = next(line for line in listed.splitlines() if line.startswith(ident))
        assert row.count("never") == 0  # last used is set now

        status, renewed = await refresh_status(s, sys_, pair["refresh"])
        assert status == 200 and renewed["uid"] == "web.alice"
        ws = await open_ws(s, sys_, renewed["token"])
        other = (await pat_login(s, sys_, second))[1]

        rc, out, err = await claw("token", "revoke", "--pat", ident, "--data", data)
        assert rc == 0 and ident in out, err
        status, body, _ = await pat_login(s, sys_, token)
        assert status == 401 and body["error"]["code"] == "pat_invalid"
        assert "令牌" in body["error"]["message"]
        assert await bearer_status(s, sys_, renewed["token"]) == 401  # its access token, at once
        assert (await refresh_status(s, sys_, renewed["refresh"]))[0] == 401  # and its session
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == api.WS_REVOKED
        # the user's other personal token and its session are untouched
        assert await bearer_status(s, sys_, other["token"]) == 200
        assert (await pat_login(s, sys_, second))[0] == 200
        rc, listed, _ = await claw("token", "list", "--data", data)
        assert ident not in listed and auth.pat_id(second) in listed
        rc, _, err = await claw("token", "revoke", "--pat", ident, "--data", data)
        assert rc == 1 and "no such" in err
        assert (await claw("token", "revoke", "--pat", "not-an-id", "--data", data))[0] == 2
        assert (await claw("token", "issue", "alice", "--data", data))[0] == 2  # not a uid
        assert (await claw("token", "issue", "web.alice", "--days", "0", "--data", data))[0] == 2


async def test_revoking_a_user_or_everybody_ends_their_personal_tokens(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY, **NO_DEV) as sys_, aiohttp.ClientSession() as s:
        data = sys_.settings.data_dir
        rev = auth.Revocations(data)
        alice, _ = rev.issue_pat("web.alice")
        bob, _ = rev.issue_pat("web.bob")
        a_pair = (await pat_login(s, sys_, alice))[1]
        rc, out, err = await claw("token", "revoke", "web.alice", "--data", data)
        assert rc == 0 and "1 personal token" in out, err
        assert (await pat_login(s, sys_, alice))[0] == 401
        assert await bearer_status(s, sys_, a_pair["token"]) == 401
        assert (await refresh_status(s, sys_, a_pair["refresh"]))[0] == 401
        b_pair = (await pat_login(s, sys_, bob))[1]
        assert await bearer_status(s, sys_, b_pair["token"]) == 200  # others are not affected
        alice2, _ = rev.issue_pat("web.alice")  # a new one works at once
        assert (await pat_login(s, sys_, alice2))[0] == 200
        rc, out, err = await claw("token", "revoke", "--all", "--data", data)
        assert rc == 0 and "every user" in out, err
        for t in (alice2, bob):
            assert (await pat_login(s, sys_, t))[0] == 401
        assert await bearer_status(s, sys_, b_pair["token"]) == 401
        assert rev.list_pats() == []


async def test_expired_personal_token_and_its_session_are_refused(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY, **NO_DEV) as sys_, aiohttp.ClientSession() as s:
        rev = auth.Revocations(sys_.settings.data_dir)
        expired, _ = rev.issue_pat("web.alice", days=1, now=time.time() - 86400 - 60)  # issued yesterday
        status, body, _ = await pat_login(s, sys_, expired)
        assert status == 401 and body["error"]["code"] == "pat_invalid"
        short, rec = rev.issue_pat("web.alice", days=1, now=time.time() - 86400 + 3)  # 3 s left
        status, pair, _ = await pat_login(s, sys_, short)
        assert status == 200 and pair["refresh_expires"] <= rec.expires  # the session ends with the token
        assert await bearer_status(s, sys_, pair["token"]) == 200
        await wait_until(lambda: time.time() > rec.expires + 1, timeout=10, step=0.1)
        assert await bearer_status(s, sys_, pair["token"]) == 401  # the access token (15 min) goes with it
        assert (await refresh_status(s, sys_, pair["refresh"]))[0] == 401
        assert (await pat_login(s, sys_, short))[0] == 401
        rc, listed, _ = await claw("token", "list", "--data", sys_.settings.data_dir)
        assert "(expired)" in listed


async def test_failed_sign_ins_are_throttled_per_address(tmp_path: Path, pki_dir: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(api, "_QUIET", {})  # the rate-limited log lines start afresh
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY, **NO_DEV) as sys_, aiohttp.ClientSession() as s:
        good, rec = auth.Revocations(sys_.settings.data_dir).issue_pat("web.alice")
        wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        unknown = f"pat_{'0' * 16}_{'x' * 43}"
        assert (await pat_login(s, sys_, ""))[0] == 400
        assert (await pat_login(s, sys_, 42))[0] == 400
        bad = [wrong_secret, unknown, "pat_", "garbage", "pat_" + "a" * 500]
        for i in range(auth.PAT_FAIL_BURST):
            status, body, _ = await pat_login(s, sys_, bad[i % len(bad)])
            assert status == 401 and body["error"]["code"] == "pat_invalid", (i, body)
        status, body, headers = await pat_login(s, sys_, good)  # over the budget: not even checked
        assert status == 429 and body["error"]["code"] == "pat_throttled"
        assert 1 <= int(headers["Retry-After"]) <= auth.PAT_FAIL_EVERY_S + 1
        # another address is not affected (127.0.0.2 is loopback too, and another peer address)
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=conn) as other:
            status, pair, _ = await pat_login(other, sys_, good)
            assert status == 200 and pair["uid"] == "web.alice"
        # the edge's map of failing addresses is bounded
        assert len(sys_.app[TOKENS].pat_throttle) <= auth.PAT_FAIL_MAX_ADDRS
    text = caplog.text
    assert all(t not in text for t in (good, wrong_secret, good.split("_", 2)[2]))  # never logged
    assert "unknown, revoked or expired personal token" in text and "throttled" in text


async def test_concurrent_guesses_stay_within_the_failure_budget(tmp_path: Path, pki_dir: Path) -> None:
    """The budget was checked before a token was looked at and spent only after the (awaited) check failed:
    100 guesses sent at once from one address were all checked (measured: 100 times 401, no 429). Now the token
    is checked, and a failure charged, before anything is awaited; sign-ins with a good token sent at once are
    not held back."""
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY, **NO_DEV) as sys_, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        good, _ = auth.Revocations(sys_.settings.data_dir).issue_pat("web.alice")
        got = await asyncio.gather(*(pat_login(s, sys_, good) for _ in range(3 * auth.PAT_FAIL_BURST)))
        assert [status for status, _, _ in got] == [200] * (3 * auth.PAT_FAIL_BURST)  # successes cost nothing
        guesses = [f"pat_{i:016x}_{'x' * 43}" for i in range(5 * auth.PAT_FAIL_BURST)]
        got = await asyncio.gather(*(pat_login(s, sys_, g) for g in guesses))
        statuses = [status for status, _, _ in got]
        assert statuses.count(401) == auth.PAT_FAIL_BURST and statuses.count(429) == len(guesses) - auth.PAT_FAIL_BURST


def test_failure_throttle_refills_and_stays_bounded() -> None:
    t = auth.FailureThrottle(burst=3, every_s=6.0, max_addrs=100)
    for _ in range(3):
        assert t.retry_after("192.0.2.1", now=0) == 0
        t.failed("192.0.2.1", now=0)
    assert t.retry_after("192.0.2.1", now=0) == pytest.approx(6.0)
    assert t.retry_after("192.0.2.1", now=6.0) == 0  # one more after every_s
    assert t.retry_after("192.0.2.2", now=0) == 0
    for i in range(3):  # an IPv6 /64 is one address; a mapped IPv4 is the IPv4 address
        t.failed(f"2001:db8::{i + 1}", now=0)
    assert t.retry_after("2001:db8::ffff:1", now=0) > 0
    assert t.retry_after("2001:db8:0:1::1", now=0) == 0
    assert t.key("::ffff:192.0.2.1") == "192.0.2.1"
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}", now=1)
    assert len(t) == 100


# ---- claw chat -------------------------------------------------------------------------------------

def test_a_token_over_plain_http_is_only_quiet_for_loopback() -> None:
    from claw.chat import _plain_remote

    for url in ("http://127.0.0.1:8080", "http://localhost:8080/", "http://[::1]:8080", "https://a.example.com"):
        assert not _plain_remote(url), url
    for url in ("http://a.example.com", "http://203.0.113.7:8080", "http://[2001:db8::1]:80/x"):
        assert _plain_remote(url), url


async def test_claw_chat_does_not_follow_a_redirect_with_the_token(tmp_path: Path) -> None:
    """aiohttp follows a 307/308 answer to a POST by sending the same body to the new address, whatever its host
    or scheme: an edge (or a proxy in front of it) answering 307 made claw chat post its personal token to
    another server (measured: the other server got {"pat": ...}). A redirect is now refused, named, exit 1."""
    got: list[str] = []

    async def other(request: web.Request) -> web.Response:
        got.append(await request.text())
        return web.json_response({"error": {"code": "x", "message": "x"}}, status=500)

    async def front(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"http://127.0.0.2:{ports[1]}{request.path}"})

    runners, ports = [], []
    try:
        for host, handler in (("127.0.0.1", front), ("127.0.0.2", other)):
            app = web.Application()
            app.router.add_route("*", "/{p:.*}", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, 0).start()
            ports.append(int(runner.addresses[0][1]))
        token = f"pat_{'ab' * 8}_{'s' * 43}"
        token_file = tmp_path / "t.token"
        token_file.write_text(token + "\n")
        rc, out, err = await claw("chat", "--url", f"http://127.0.0.1:{ports[0]}", "--token-file", str(token_file),
                                  "--reconnect-timeout", "2", "你好")
        assert got == [] and rc == 1, (got, rc, err)
        assert "重定向" in err and f"127.0.0.2:{ports[1]}" in err and token not in out + err
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_claw_chat_signs_in_with_a_token_file_or_claw_token(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(reply="令牌登录成功。", token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, **NO_DEV) as sys_:
        rev = auth.Revocations(sys_.settings.data_dir)
        token, rec = rev.issue_pat("web.carol")
        token_file = tmp_path / "carol.token"
        token_file.write_text(token + "\n")
        rc, out, err = await claw("chat", "--url", sys_.http, "--token-file", str(token_file), "你好")
        assert rc == 0, err
        assert "令牌登录成功。" in out and token not in out + err
        rc, out, err = await claw("chat", "--url", sys_.http, "--user", "ignored", "第二个问题",
                                  env=_env(CLAW_TOKEN=token))
        assert rc == 0 and "令牌登录成功。" in out, err
        history = sys_.app[STORE].history("web.carol")
        assert [r.text for r in history] == ["第二个问题", "你好"]
        assert sys_.app[STORE].history("web.ignored") == []
        assert rev.list_pats("web.carol")[0].last_used > 0

        rev.revoke_pat(rec.id)
        rc, out, err = await claw("chat", "--url", sys_.http, "--token-file", str(token_file), "你好")
        assert rc == 1 and "个人令牌无效" in err, err
        empty = tmp_path / "empty.token"
        empty.write_text("\n")
        assert (await claw("chat", "--url", sys_.http, "--token-file", str(empty), "你好"))[0] == 2
        assert (await claw("chat", "--url", sys_.http, "--token-file", str(tmp_path / "nope"), "你好"))[0] == 2


async def test_claw_chat_without_a_token_against_a_non_dev_edge_says_how_to_get_one(tmp_path: Path,
                                                                                    pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY, **NO_DEV) as sys_:
        rc, out, err = await claw("chat", "--url", sys_.http, "--user", "dave", "你好")
        assert rc == 1, err
        assert "claw token issue" in err and "--token-file" in err and "CLAW_TOKEN" in err
        assert "开发登录" in err and "dev login" in err


async def test_claw_chat_dev_login_defaults_to_the_os_user_name(tmp_path: Path, pki_dir: Path) -> None:
    name = default_user()
    assert name, "this machine has a user name"
    cfg = FakeLLMConfig(reply="好的。", token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_:
        rc, out, err = await claw("chat", "--url", sys_.http, "无名问题")
        assert rc == 0 and "好的。" in out, err
        assert [r.text for r in sys_.app[STORE].history(f"web.{name}")] == ["无名问题"]
        assert sys_.app[STORE].history("web.terminal") == []  # no shared default name any more


@contextlib.asynccontextmanager
async def tls_proxy(upstream: str, pki: Path) -> AsyncIterator[str]:
    """An HTTPS reverse proxy (certificate from the test's private CA) in front of the edge, passing HTTP
    requests and the WebSocket through, as nginx does in a deployment."""
    client = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/api/ws":
            down = web.WebSocketResponse()
            async with client.ws_connect(f"{upstream}/api/ws", params=request.query) as up:
                await down.prepare(request)

                async def pump(src: Any, dst: Any) -> None:
                    async for m in src:
                        if m.type == aiohttp.WSMsgType.TEXT:
                            await dst.send_str(m.data)
                    await dst.close()

                tasks = [asyncio.create_task(pump(up, down)), asyncio.create_task(pump(down, up))]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in tasks:
                    t.cancel()
            return down
        async with client.request(request.method, f"{upstream}{request.path_qs}", data=await request.read(),
                                  headers={k: v for k, v in request.headers.items()
                                           if k.lower() in ("content-type", "authorization")}) as r:
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await client.close()


async def test_claw_chat_over_https_with_a_private_ca(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(reply="经由 HTTPS。", token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, **NO_DEV) as sys_, tls_proxy(sys_.http, pki_dir) as url:
        token, _ = auth.Revocations(sys_.settings.data_dir).issue_pat("web.erin")
        env = _env(CLAW_TOKEN=token)
        rc, out, err = await claw("chat", "--url", url, "你好", env=env)  # the private CA is not trusted
        assert rc == 1 and "--cafile" in err, err
        rc, out, err = await claw("chat", "--url", url, "--cafile", str(pki_dir / "ca.crt"), "你好", env=env)
        assert rc == 0 and "经由 HTTPS。" in out, err
        assert "未加密" not in err  # https: no clear-text warning
        assert (await claw("chat", "--url", url, "--cafile", str(tmp_path / "none.crt"), "你好", env=env))[0] == 2
