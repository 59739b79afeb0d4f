"""Mini-program sign-in: ``POST /api/login {"code"}`` against a fake ``jscode2session`` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import wire
from tests.conftest import free_port, run_system

pytestmark = pytest.mark.integration

APPID = "wx0123456789abcdef"
SECRET = "S3cr3t-AppSecret-0f9e8d7c6b5a4321"
SESSION_KEY = "SeSsIoNkEy+tJ4bq9YuP0w=="


class FakeJsCode2Session:
    """``GET /sns/jscode2session`` like api.weixin.qq.com: HTTP 200, JSON served as ``text/plain``, no errcode on
    success. The code chooses the answer: ``ok-<openid>``, ``err<N>`` (errcode N), ``slow`` (never answers until
    :attr:`release` is set), ``split-<openid>`` (success sent in two writes), ``garbage`` (not JSON), ``drop`` (connection closed without an answer)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        self.calls.append(q)
        if q.get("appid") != APPID or q.get("secret") != SECRET:
            return _plain({"errcode": 40125, "errmsg": "invalid appsecret"})
        if q.get("grant_type") != "authorization_code" or "access_token" in q:
            return _plain({"errcode": 40002, "errmsg": "invalid grant_type"})
        code = q.get("js_code", "")
        if code.startswith("ok-"):
            return _plain({"openid": code[3:], "session_key": SESSION_KEY})
        if code.startswith("err"):
            return _plain({"errcode": int(code[3:]), "errmsg": f"error {code[3:]}, rid: 1234"})
        if code == "slow":
            await self.release.wait()
            return _plain({"openid": "late", "session_key": SESSION_KEY})
        if code.startswith("split-"):  # the answer in two TCP writes with a pause: a single read() sees half
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            body = json.dumps({"openid": code[6:], "session_key": SESSION_KEY}).encode()
            await resp.write(body[:10])
            # a gap between the pieces, as a slow link makes it; under load they may still arrive together (then
            # this is the plain success path): tests/unit/test_read_bounded.py pins the reading deterministically
            await asyncio.sleep(0.05)
            await resp.write(body[10:])
            await resp.write_eof()
            return resp
        if code == "garbage":
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        if code == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        return _plain({"errcode": 40029, "errmsg": "invalid code"})


def _plain(obj: dict[str, Any]) -> web.Response:
    import json

    return web.Response(text=json.dumps(obj), content_type="text/plain")


@contextlib.asynccontextmanager
async def run_fake() -> AsyncIterator[FakeJsCode2Session]:
    fake = FakeJsCode2Session()
    app = web.Application()
    app.router.add_get("/sns/jscode2session", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        fake.release.set()
        await runner.cleanup()


async def _login(http: aiohttp.ClientSession, base: str, code: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{base}/api/login", json={"code": code}) as r:
        return r.status, await r.json()


async def test_mp_login_success_errors_and_secret_never_logged(tmp_path: Path, pki_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with run_fake() as fake, run_system(tmp_path, pki_dir, start_node=False, miniapp={
            "appid": APPID, "secret": SECRET, "api_base": fake.url, "timeout_s": 1.0}) as sys_, \
            aiohttp.ClientSession() as http:
        # success: uid mp.<openid>, the dev-login token shape, and the token works on /api/tasks
        status, body = await _login(http, sys_.http, "ok-oAbC_12-xyz")
        assert status == 200, body
        assert body["uid"] == "mp.oAbC_12-xyz" and wire.is_uid(body["uid"])
        assert set(body) == {"token", "uid", "expires", "refresh", "refresh_expires"}
        assert SESSION_KEY not in str(body)
        q = fake.calls[-1]
        assert q == {"appid": APPID, "secret": SECRET, "js_code": "ok-oAbC_12-xyz",
                     "grant_type": "authorization_code"}
        async with http.get(f"{sys_.http}/api/tasks",
                            headers={"Authorization": f"Bearer {body['token']}"}) as r:
            assert r.status == 200, await r.text()
        # the refresh token renews the mini-program session like any other
        async with http.post(f"{sys_.http}/api/refresh", json={"refresh": body["refresh"]}) as r:
            assert r.status == 200 and (await r.json())["uid"] == "mp.oAbC_12-xyz"
        status, split = await _login(http, sys_.http, "split-oSplit")  # an answer that arrives in pieces
        assert status == 200 and split["uid"] == "mp.oSplit", split

        # each WeChat errcode: its status, stable code and a Chinese message
        cases = {
            "err40029": (401, "mp_bad_code"), "err40163": (401, "mp_bad_code"),
            "err45011": (429, "mp_rate_limited"), "err-1": (503, "mp_busy"),
            "err40226": (403, "mp_user_blocked"), "err40013": (502, "mp_error"),
            "garbage": (502, "mp_bad_answer"), "drop": (502, "mp_unreachable"),
            # an openid that cannot make a uid
            "ok-bad.openid": (502, "mp_bad_answer"),
        }
        for code, (want_status, want_code) in cases.items():
            status, body = await _login(http, sys_.http, code)
            assert (status, body["error"]["code"]) == (want_status, want_code), (code, body)
            msg = body["error"]["message"]
            assert any("\u4e00" <= ch <= "\u9fff" for ch in msg), msg
            assert SECRET not in msg and APPID not in msg
        status, body = await _login(http, sys_.http, "err40013")
        assert body["error"]["errcode"] == 40013 and "40013" in body["error"]["message"]

        # jscode2session does not answer within miniapp.timeout_s -> 504
        status, body = await _login(http, sys_.http, "slow")
        assert (status, body["error"]["code"]) == (504, "mp_unreachable"), body

        # missing, empty, wrong type, oversized: refused before WeChat is asked
        n = len(fake.calls)
        for bad, want in (("", "missing_code"), (None, "missing_code"), (12345, "missing_code"),
                          ("x" * 129, "bad_code"), ("has space", "bad_code")):
            status, body = await _login(http, sys_.http, bad)
            assert (status, body["error"]["code"]) == (400, want), (bad, body)
        assert len(fake.calls) == n

    records = [r.getMessage() + " " + str(r.args) + " " + (r.exc_text or "") for r in caplog.records]
    assert any("jscode2session" in m for m in records)  # the failures were logged ...
    for m in records:  # ... without the AppSecret (the URL holds it) or the session_key
        assert SECRET not in m and SESSION_KEY not in m, m


async def test_mp_login_unreachable_and_unconfigured(tmp_path: Path, pki_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with run_system(tmp_path / "a", pki_dir, start_node=False, miniapp={
            "appid": APPID, "secret": SECRET, "api_base": dead}) as sys_, aiohttp.ClientSession() as http:
        status, body = await _login(http, sys_.http, "ok-whoever")
        assert (status, body["error"]["code"]) == (502, "mp_unreachable"), body
    for r in caplog.records:
        assert SECRET not in r.getMessage() + str(r.args), r.getMessage()

    async with run_system(tmp_path / "b", pki_dir, start_node=False) as sys_, aiohttp.ClientSession() as http:
        status, body = await _login(http, sys_.http, "ok-whoever")
        assert (status, body["error"]["code"]) == (501, "miniapp_login_unavailable"), body
        assert "[miniapp]" in body["error"]["message"] and "appid" in body["error"]["message"]


def test_miniapp_config_checked() -> None:
    from core.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="appid and secret"):
        load_settings(env={}, overrides={"miniapp": {"appid": APPID}})
    with pytest.raises(ConfigError, match="api_base"):
        load_settings(env={}, overrides={"miniapp": {"appid": APPID, "secret": "x", "api_base": "ftp://x"}})
    s = load_settings(env={}, overrides={"miniapp": {"appid": APPID, "secret": SECRET}})
    assert s.miniapp.enabled and s.miniapp.timeout_s == 5.0 and SECRET not in repr(s)
