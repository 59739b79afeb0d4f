"""WeCom web sign-in (``GET /auth/wecom`` → WeCom's authorize page → ``/auth/wecom/callback``) and
``GET /api/login/options``, against the real edge and the fake WeCom server (``fakes.wecom``) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest

from edge.oauth import COOKIE, OAUTH, SIGNIN_COOKIE, PendingStates
from fakes.wecom import FakeWeCom, FakeWeComConfig, WeComSim, run_fake_wecom
from fakes.llm import FakeLLMConfig
from tests.conftest import System, free_port, run_system, wait_until

pytestmark = pytest.mark.integration

TOKEN, AES, CORP, AGENT = "QDG6eK", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wx5823bf96d3bd56c7", 1000002
SECRET = "test-secret-Zq8wX1"


def _wecom(api: str, **kw: Any) -> dict[str, Any]:
    return {"corp_id": CORP, "agent_id": AGENT, "secret": SECRET, "token": TOKEN, "encoding_aes_key": AES,
            "api_base": api, "oauth_base": api, "oauth_timeout_s": 1.0, **kw}


@contextlib.asynccontextmanager
async def oauth_system(tmp: Path, pki: Path, *, start_node: bool = False, fake_cfg: Any = None,
                       public_url: str | None = None, wecom: dict[str, Any] | None = None,
                       **over: Any) -> AsyncIterator[tuple[System, FakeWeCom]]:
    """The edge on a port known in advance (edge.public_url names it) with WeCom pointed at the fake."""
    port = free_port()
    public = f"http://127.0.0.1:{port}" if public_url is None else public_url
    async with run_fake_wecom(FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=AGENT)) as fw, \
            run_system(tmp, pki, start_node=start_node, fake_cfg=fake_cfg,
                       edge={"http": f"127.0.0.1:{port}", "public_url": public},
                       wecom=_wecom(fw.url, **(wecom or {})), **over) as sys_:
        yield sys_, fw


def _browser() -> aiohttp.ClientSession:
    """A client that keeps cookies like a browser (also for 127.0.0.1) and does not follow redirects itself."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _start(http: aiohttp.ClientSession, sys_: System) -> tuple[str, str, SimpleCookie]:
    """``GET /auth/wecom``: (the authorize URL, its state, the Set-Cookie sent)."""
    async with http.get(f"{sys_.http}/auth/wecom", allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        assert r.headers["Cache-Control"] == "no-store"
        cookie: SimpleCookie = SimpleCookie()
        for h in r.headers.getall("Set-Cookie"):
            cookie.load(h)
        location = r.headers["Location"]
    state = parse_qs(urlsplit(location).query)["state"][0]
    return location, state, cookie


SIGNED_IN = "/#signin=wecom"


def _signed_in(r: aiohttp.ClientResponse) -> str:
    """The Location of a callback answer; on success with ``&cookie=<the sign-in cookie's value>`` added (for the
    test: a browser keeps it in its jar), after checking the cookie's attributes."""
    location = r.headers["Location"]
    if location != SIGNED_IN:
        assert not any(h.startswith(SIGNIN_COOKIE) for h in r.headers.getall("Set-Cookie")), r.headers
        return location
    cookie: SimpleCookie = SimpleCookie()
    for h in r.headers.getall("Set-Cookie"):
        cookie.load(h)
    m = cookie[SIGNIN_COOKIE]
    assert m["httponly"] and m["samesite"] == "Strict" and m["path"] == "/auth/wecom/session", m
    assert m["max-age"] == "120" and len(m.value) > 20, m
    return f"{location}&cookie={m.value}"


async def _callback(http: aiohttp.ClientSession, sys_: System, *, code: str | None, state: str | None,
                    cookie: str | None) -> str:
    """``GET /auth/wecom/callback`` with the given cookie (None: none); returns the Location answered (with the
    sign-in cookie's value added on success, see :func:`_signed_in`)."""
    params = {k: v for k, v in (("code", code), ("state", state)) if v is not None}
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie is not None else {}
    async with http.get(f"{sys_.http}/auth/wecom/callback", params=params, headers=headers,
                        allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        assert r.headers["Cache-Control"] == "no-store" and r.headers["Referrer-Policy"] == "no-referrer"
        assert any(h.startswith(f"{COOKIE}=;") or f'{COOKIE}=""' in h for h in r.headers.getall("Set-Cookie")), \
            r.headers  # the state cookie is deleted, whatever the outcome
        return _signed_in(r)


async def browser_signin(sys_: System, fw: FakeWeCom) -> str:
    """The whole flow as a browser inside WeCom goes through it: the Location the callback answered."""
    async with _browser() as http:
        location, state, cookie = await _start(http, sys_)
        async with http.get(location, allow_redirects=False) as r:  # WeCom's authorize page (the fake)
            assert r.status == 302, await r.text()
            back = r.headers["Location"]
        assert back.startswith(f"{sys_.settings.edge.public_url}/auth/wecom/callback?code=")
        async with http.get(back, allow_redirects=False) as r:  # the browser sends the state cookie back
            assert r.status == 302
            return _signed_in(r)


async def _session(http: aiohttp.ClientSession, sys_: System, location: str) -> dict[str, Any]:
    """What the page does after ``/#signin=wecom``: ``POST /auth/wecom/session`` with the sign-in cookie. The
    cookie is good once (its refresh token is rotated)."""
    assert location.startswith(SIGNED_IN + "&cookie="), location
    value = location.split("&cookie=", 1)[1]
    headers = {"Cookie": f"{SIGNIN_COOKIE}={value}"}
    async with http.post(f"{sys_.http}/auth/wecom/session", json={}, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert any(h.startswith(f"{SIGNIN_COOKIE}=;") or f'{SIGNIN_COOKIE}=""' in h
                   for h in r.headers.getall("Set-Cookie")), r.headers  # deleted once used
        got = await r.json()
    async with http.post(f"{sys_.http}/auth/wecom/session", json={}, headers=headers) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "signin_invalid"
    return got


def _logs(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() + " " + str(r.args) + " " + (r.exc_text or "") for r in caplog.records)


# ---- success ------------------------------------------------------------------------------------------------

async def test_signin_is_the_wecom_chat_user_and_its_tokens_work(tmp_path: Path, pki_dir: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A chat message from member zhangsan (through the encrypted callback), then zhangsan signs in on the web
    page: the web session is uid wc.zhangsan and /api/tasks shows the question asked in the WeCom chat."""
    caplog.set_level(logging.DEBUG)
    async with oauth_system(tmp_path, pki_dir, start_node=True,
                            fake_cfg=FakeLLMConfig(reply="企业微信里的回答。")) as (sys_, fw), \
            aiohttp.ClientSession() as http:
        sim = WeComSim(TOKEN, AES, CORP, AGENT)
        status, _ = await sim.text("zhangsan", "企业微信里问的问题").post(http, f"{sys_.http}/wecom/callback")
        assert status == 200
        await fw.wait_sends(1, user="zhangsan")

        # the authorize URL is exactly WeCom's, parameters in WeCom's order
        async with _browser() as b:
            location, state, cookie = await _start(b, sys_)
        public = sys_.settings.edge.public_url
        assert location == (f"{fw.url}/connect/oauth2/authorize?appid={CORP}&redirect_uri="
                            f"{quote(public + '/auth/wecom/callback', safe='')}&response_type=code"
                            f"&scope=snsapi_base&state={state}&agentid={AGENT}#wechat_redirect")
        morsel = cookie[COOKIE]
        assert morsel.value == state and morsel["httponly"] and morsel["samesite"] == "Lax"
        assert morsel["path"] == "/auth/wecom" and morsel["max-age"] == "600" and not morsel["secure"]

        fw.oauth_user = ("userid", "zhangsan")
        where = await browser_signin(sys_, fw)
        refresh = where.split("&cookie=", 1)[1]
        got = await _session(http, sys_, where)
        assert got["uid"] == "wc.zhangsan"
        auth = {"Authorization": f"Bearer {got['token']}"}
        async with http.get(f"{sys_.http}/api/tasks", headers=auth) as r:
            assert r.status == 200
            tasks = (await r.json())["tasks"]
        assert [(t["text"], t["ch"]) for t in tasks] == [("企业微信里问的问题", "wc")]
        await wait_until(lambda: sys_.app[OAUTH].stats.get("ok") == 1)
        # the same history through the socket: a ticket, the WebSocket, a resume of the chat's task
        async with http.post(f"{sys_.http}/api/ws-ticket", headers=auth) as r:
            assert r.status == 200
            ticket = (await r.json())["ticket"]
        async with http.ws_connect(f"{sys_.http}/api/ws?ticket={ticket}") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "node"
            await ws.send_json({"type": "resume", "task": tasks[0]["task"], "seq": 0})
            frames = [await ws.receive_json(timeout=5)]
            while frames[-1]["type"] == "delta":
                frames.append(await ws.receive_json(timeout=5))
            assert frames[-1]["type"] == "done" and frames[-1]["text"] == "企业微信里的回答。", frames
        # the refresh token the sign-in cookie held was used up by /auth/wecom/session above
        async with http.post(f"{sys_.http}/api/refresh", json={"refresh": refresh}) as r:
            assert r.status == 401
        assert fw.stats.gettoken == 1  # one access token for message/send and the sign-in

    logs = _logs(caplog)
    assert "wc.zhangsan signed in through WeCom" in logs
    secrets_ = [SECRET, AES, refresh, got["refresh"], got["token"], *fw._tokens, *fw.oauth_codes]
    assert len(fw.oauth_codes) == 1
    for s in secrets_:
        assert s not in logs


# ---- the state (CSRF) -----------------------------------------------------------------------------------------

async def test_state_must_match_the_cookie_once_within_ten_minutes(tmp_path: Path, pki_dir: Path) -> None:
    async with oauth_system(tmp_path, pki_dir) as (sys_, fw), \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        _, state, _ = await _start(http, sys_)
        _, other, _ = await _start(http, sys_)
        asked = fw.stats.userinfo
        cases = [  # (code, state, cookie) -> wecom_state, WeCom never asked
            (fw.oauth_code("zhangsan"), state, None),  # no cookie (another browser: login CSRF)
            (fw.oauth_code("zhangsan"), state, other),  # another sign-in's cookie
            (fw.oauth_code("zhangsan"), state, "f" * 32),  # a forged one
            (fw.oauth_code("zhangsan"), None, state),  # no state
            (fw.oauth_code("zhangsan"), "F" * 32, "F" * 32),  # not the shape handed out
            (fw.oauth_code("zhangsan"), state + "0", state + "0"),
            (fw.oauth_code("zhangsan"), "<script>", "<script>"),
            (fw.oauth_code("zhangsan"), "a" * 32, "a" * 32),  # the right shape, never handed out
        ]
        for code, st, cookie in cases:
            assert await _callback(http, sys_, code=code, state=st, cookie=cookie) == "/#login_error=wecom_state", \
                (st, cookie)
        for code in (None, "", "x" * 513, "has space", "\u4e2d\u6587"):  # a malformed code: wecom_bad_code
            got = await _callback(http, sys_, code=code, state=state, cookie=state)
            assert got == "/#login_error=wecom_bad_code", code
        assert fw.stats.userinfo == asked

        # a HEAD (a link checker) is refused before anything: it must not use up the state or the code
        async with http.head(f"{sys_.http}/auth/wecom/callback", params={"code": "c", "state": state},
                             headers={"Cookie": f"{COOKIE}={state}"}) as r:
            assert r.status == 405
        # none of that used the state up: the right pair signs in, once
        assert (await _callback(http, sys_, code=fw.oauth_code("lisi"), state=state, cookie=state)).startswith(
            SIGNED_IN)
        assert await _callback(http, sys_, code=fw.oauth_code("lisi"), state=state,
                               cookie=state) == "/#login_error=wecom_state"  # reused
        assert fw.stats.userinfo == asked + 1

        # expired: a state older than its ten minutes (made short here) is refused
        sys_.app[OAUTH].states.ttl = 0.2
        _, old, _ = await _start(http, sys_)
        t0 = time.monotonic()
        await wait_until(lambda: time.monotonic() > t0 + 0.3)
        assert await _callback(http, sys_, code=fw.oauth_code("lisi"), state=old,
                               cookie=old) == "/#login_error=wecom_state"
        assert fw.stats.userinfo == asked + 1
        assert sys_.app[OAUTH].stats["wecom_state"] == len(cases) + 2


def test_pending_states_are_bounded_and_one_use() -> None:
    states = PendingStates(ttl=600, cap=3)
    made = [states.new() for _ in range(5000)]
    assert len(states) == 0  # handing states out stores nothing
    assert len({*made}) == 5000 and all(len(s) == 32 and int(s, 16) >= 0 for s in made)
    assert states.take(made[0]) and not states.take(made[0])  # one use
    forged = made[1][:16] + format(int(made[1][16:], 16) ^ 1, "016x")
    assert not states.take(forged)  # not signed by this edge
    assert not PendingStates().take(made[1])  # another edge's (or before a restart)
    assert all(states.take(s) for s in made[1:4])
    assert len(states) == 3 and states.evicted == 1  # the used states remembered are bounded


async def test_a_flood_of_sign_in_starts_does_not_break_one_in_progress(tmp_path: Path, pki_dir: Path) -> None:
    """Anyone can GET /auth/wecom. The edge kept every state handed out, at most 10 000, forgetting the oldest:
    a stranger's flood of starts (about 1 000 a second, measured through a local TLS proxy) pushed out the
    states of members signing in at that moment, whose callback then failed with wecom_state. States are
    now signed instead of stored."""
    async with oauth_system(tmp_path, pki_dir) as (sys_, fw), _browser() as member, aiohttp.ClientSession() as att:
        sys_.app[OAUTH].states.cap = 50  # the bound, made small
        _, state, _ = await _start(member, sys_)
        for _ in range(60):  # the stranger's flood, over the bound
            async with att.get(f"{sys_.http}/auth/wecom", allow_redirects=False) as r:
                assert r.status == 302
        location = await _callback(member, sys_, code=fw.oauth_code("zhangsan"), state=state, cookie=state)
        assert location.startswith(SIGNED_IN), location
        assert (await _session(member, sys_, location))["uid"] == "wc.zhangsan"


# ---- WeCom's answers ------------------------------------------------------------------------------------------

async def test_each_wecom_failure_is_its_login_error(tmp_path: Path, pki_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with oauth_system(tmp_path, pki_dir) as (sys_, fw), \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def attempt(code: str) -> str:
            _, state, _ = await _start(http, sys_)
            return await _callback(http, sys_, code=code, state=state, cookie=state)

        used = fw.oauth_code("zhangsan")
        assert (await attempt(used)).startswith(SIGNED_IN)
        cases: list[tuple[Any, str]] = [
            (40029, "wecom_bad_code"), (-1, "wecom_busy"), (45009, "wecom_busy"), (45033, "wecom_busy"),
            (50001, "wecom_error"), (60020, "wecom_error"), (48002, "wecom_error"), (12345, "wecom_error"),
            ("garbage", "wecom_error"), ("hang", "wecom_unreachable"), ("down", "wecom_unreachable"),
        ]
        for outcome, want in cases:
            if outcome == "down":  # every connection to WeCom's API closed without an answer
                fw.userinfo_down = True
            else:
                fw.fail_userinfo(outcome)
            t0 = time.monotonic()
            assert await attempt(fw.oauth_code("zhangsan")) == f"/#login_error={want}", outcome
            assert time.monotonic() - t0 < 5  # bounded: wecom.oauth_timeout_s is 1 s here
            fw.userinfo_down = False
        assert await attempt(used) == "/#login_error=wecom_bad_code"  # a code is one use (WeCom: 40029)
        expired = fw.oauth_code("zhangsan", ttl=-1)
        assert await attempt(expired) == "/#login_error=wecom_bad_code"
        # a non-member (WeCom answers an openid, no userid) and a linked corp's member
        assert await attempt(fw.oauth_code(openid="oXYZ_external-1")) == "/#login_error=wecom_not_member"
        assert await attempt(fw.oauth_code("wwlinked0123/zhangsan")) == "/#login_error=wecom_not_member"
        assert await attempt(fw.oauth_code("bad user!")) == "/#login_error=wecom_error"
        # server A's IP not in 企业可信IP
        fw.deny_ip = True
        assert await attempt(fw.oauth_code("zhangsan")) == "/#login_error=wecom_error"
        fw.deny_ip = False
        # the token is rejected and fetching a new one fails (the app's Secret was reset in the console)
        fw.expire_tokens()
        fw.cfg.secret = "reset-in-the-console"
        assert await attempt(fw.oauth_code("zhangsan")) == "/#login_error=wecom_error"
        fw.cfg.secret = SECRET
        assert (await attempt(fw.oauth_code("zhangsan"))).startswith(SIGNED_IN)

    logs = _logs(caplog)
    assert "getuserinfo errcode 45009" in logs and "可信域名" in logs  # failures logged, 50001 with its fix
    assert "from ip: 127.0.0.1" in logs and "non-member" in logs and "wrong wecom.secret" in logs
    for s in [SECRET, "reset-in-the-console", *fw._tokens, *fw.oauth_codes]:
        assert s not in logs


async def test_network_down_and_token_renewed_mid_flow(tmp_path: Path, pki_dir: Path) -> None:
    # WeCom's API host unreachable (nothing listens there): the token fetch fails -> wecom_unreachable
    dead = f"http://127.0.0.1:{free_port()}"
    async with oauth_system(tmp_path / "a", pki_dir, wecom={"api_base": dead}) as (sys_, fw), \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        _, state, _ = await _start(http, sys_)
        assert await _callback(http, sys_, code=fw.oauth_code("zhangsan"), state=state,
                               cookie=state) == "/#login_error=wecom_unreachable"

    async with oauth_system(tmp_path / "b", pki_dir) as (sys_, fw), aiohttp.ClientSession() as http:
        got = await _session(http, sys_, await browser_signin(sys_, fw))
        assert got["uid"] == "wc.zhangsan" and fw.stats.gettoken == 1
        # WeCom expires the app's access token early: getuserinfo answers 42001, the edge fetches a new one
        fw.expire_tokens()
        fw.oauth_user = ("userid", "lisi")
        got = await _session(http, sys_, await browser_signin(sys_, fw))
        assert got["uid"] == "wc.lisi"
        assert fw.stats.gettoken == 2 and fw.stats.userinfo == 3  # one rejected call, one renewal, one retry
        # the renewed token is the one message/send uses too (one cache)
        fw.fail_userinfo(40014, 40014)  # rejected again after the renewal: given up, no loop
        assert (await browser_signin(sys_, fw)) == "/#login_error=wecom_error"
        assert fw.stats.gettoken == 3


# ---- options and an edge without WeCom sign-in ------------------------------------------------------------------

async def test_login_options_and_unconfigured_wecom(tmp_path: Path, pki_dir: Path) -> None:
    async def options(sys_: System) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"{sys_.http}/api/login/options") as r:
            assert r.status == 200
            return await r.json()

    # demo: dev login only; WeCom sign-in refused with a clear 503 (JSON, or a page for a browser)
    async with run_system(tmp_path / "dev", pki_dir, start_node=False) as sys_:
        assert await options(sys_) == {"dev": True, "wecom": False, "miniapp": False, "max_question": 8000}
        async with aiohttp.ClientSession() as http:
            for path in ("/auth/wecom", "/auth/wecom/callback?code=x&state=y"):
                async with http.get(f"{sys_.http}{path}", allow_redirects=False) as r:
                    assert r.status == 503
                    err = (await r.json())["error"]
                    assert err["code"] == "wecom_oauth_unavailable" and "public_url" in err["message"]
            async with http.get(f"{sys_.http}/auth/wecom", headers={"Accept": "text/html,*/*"}) as r:
                assert r.status == 503 and r.content_type == "text/html" and "企业微信" in await r.text()

    # production with the mini-program only
    async with run_system(tmp_path / "mp", pki_dir, start_node=False, edge={"dev_login": False},
                          miniapp={"appid": "wx0123456789abcdef", "secret": "mp-secret-1"}) as sys_:
        assert await options(sys_) == {"dev": False, "wecom": False, "miniapp": True, "max_question": 8000}

    # the WeCom channel without edge.public_url: no web sign-in (WeCom needs the address to come back to)
    async with run_system(tmp_path / "nopub", pki_dir, start_node=False, edge={"dev_login": False},
                          wecom=_wecom("http://127.0.0.1:9")) as sys_:
        assert await options(sys_) == {"dev": False, "wecom": False, "miniapp": False, "max_question": 8000}

    # production behind https: offered; the state cookie is Secure; redirect_uri is the public address
    async with oauth_system(tmp_path / "prod", pki_dir, public_url="https://claw.example.com") as (sys_, fw):
        body = await options(sys_)
        assert body == {"dev": True, "wecom": True, "miniapp": False, "max_question": 8000}
        assert SECRET not in str(body) and CORP not in str(body)
        async with aiohttp.ClientSession() as http:
            location, _, cookie = await _start(http, sys_)
        assert "&redirect_uri=https%3A%2F%2Fclaw.example.com%2Fauth%2Fwecom%2Fcallback&" in location
        assert cookie[COOKIE]["secure"]


def test_oauth_config_checked() -> None:
    from core.config import ConfigError, load_settings

    base = {"corp_id": CORP, "token": TOKEN, "encoding_aes_key": AES}
    s = load_settings(env={}, overrides={"wecom": base})
    assert s.wecom.oauth_base == "https://open.weixin.qq.com" and s.wecom.oauth_timeout_s == 5.0
    assert not s.wecom.oauth_ready  # no secret, no agent_id
    s = load_settings(env={}, overrides={"wecom": {**base, "secret": SECRET, "agent_id": AGENT}})
    assert s.wecom.oauth_ready
    with pytest.raises(ConfigError, match="oauth_base"):
        load_settings(env={}, overrides={"wecom": {**base, "oauth_base": "ftp://x"}})
    with pytest.raises(ConfigError, match="oauth_base"):
        load_settings(env={}, overrides={"wecom": {**base, "oauth_base": "https://x/connect?a=b"}})
    with pytest.raises(ConfigError, match="oauth_timeout_s"):
        load_settings(env={}, overrides={"wecom": {**base, "oauth_timeout_s": 0}})
