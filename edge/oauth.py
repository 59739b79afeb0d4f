"""Web sign-in through WeCom (企业微信) OAuth, and ``GET /api/login/options``.

The chat page opened inside WeCom (the app's home page) sends the browser to ``GET /auth/wecom``, which answers
302 to WeCom's authorize page (``{wecom.oauth_base}/connect/oauth2/authorize``, scope ``snsapi_base``: no consent
screen) with a fresh random ``state``, and sets a cookie holding that state (HttpOnly, SameSite=Lax, Path
``/auth/wecom``, 10 min; Secure when ``edge.public_url`` is https). WeCom sends the browser back to
``{edge.public_url}/auth/wecom/callback?code=&state=``; the edge

1. checks the shape of ``code`` and ``state`` (length, characters) before anything else;
2. compares ``state`` with the cookie (constant time) and checks its signature and age (one use, 10 min);
3. exchanges the code with ``GET {wecom.api_base}/cgi-bin/auth/getuserinfo?access_token=&code=``, with the app's
   access token from :class:`edge.wecom.client.WeComApi` (the one ``message/send`` uses; fetched again once on
   40014/42001/41001), all within ``wecom.oauth_timeout_s``;
4. signs a member in as ``wc.{userid}`` -- the uid the WeCom chat gives the same member, so the page shows the
   same history -- with a new login session, and answers 302 ``/#signin=wecom`` with the session's refresh token
   in a cookie only ``POST /auth/wecom/session`` receives (HttpOnly, SameSite=Strict, 2 min).

The page then calls ``POST /auth/wecom/session``, which trades the cookie's refresh token for the usual token pair
(the refresh token is rotated, so the cookie's copy is spent) and deletes the cookie. The token never appears in
a URL, and a page cannot be handed somebody else's session (login CSRF): another site can neither set that
cookie nor make the browser send it.

Every failure answers 302 ``/#login_error=<code>`` (``wecom_state``, ``wecom_bad_code``, ``wecom_not_member``,
``wecom_busy``, ``wecom_unreachable``, ``wecom_error``); the page shows the matching Chinese message. A fragment
never reaches a server or a log. The code, the refresh token and the access token are never logged (failures are
logged within a :class:`~core.guard.LogBudget`: anyone can call the callback).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

import aiohttp
import lmdb
from aiohttp import web

import wire
from core.guard import LogBudget
from core.config import Settings

from .api import MAX_ASK_CHARS
from .keys import SETTINGS, TOKENS, WECOM_API
from .miniapp import json_object, read_bounded
from .wecom.client import CONFIG, TOKEN_INVALID, WeComApi, WeComError, _scrub

log = logging.getLogger(__name__)

COOKIE = "claw_wecom_state"
COOKIE_PATH = "/auth/wecom"
SIGNIN_COOKIE = "claw_wecom_signin"  # the new session's refresh token, for POST /auth/wecom/session only
SIGNIN_PATH = "/auth/wecom/session"
SIGNIN_TTL_S = 120
STATE_TTL_S = 600  # a sign-in must come back from WeCom within 10 minutes
MAX_PENDING = 10_000  # used states remembered (until they expire); past it the oldest are forgotten
STATE_RE = re.compile(r"[0-9a-f]{32}")  # what /auth/wecom hands out (WeCom allows a-zA-Z0-9, <= 128 bytes)
CODE_RE = re.compile(r"[\x21-\x7e]{1,512}")  # WeCom: at most 512 bytes; printable ASCII, no spaces
USERID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # a WeCom UserID that makes a uid
MAX_ANSWER = 64 * 1024  # bytes of a getuserinfo answer read at most

BAD_CODE = frozenset({40029, 41008})  # invalid / used / expired code, missing code
BUSY = frozenset({-1, 45009, 45033})  # system busy, API rate limits
OAUTH_HINTS = {
    50001: "the sign-in came back to a domain that is not the app's 可信域名: WeCom admin console → 应用管理 → "
           "智控未来 → 网页授权及JS-SDK → 可信域名 must be edge.public_url's host exactly",
}
ERRORS = ("wecom_state", "wecom_bad_code", "wecom_not_member", "wecom_busy", "wecom_unreachable", "wecom_error")


def oauth_ready(settings: Settings) -> bool:
    """WeCom web sign-in is offered: the app is configured (corp_id, secret, agent_id) and edge.public_url set."""
    return settings.wecom.oauth_ready and bool(settings.edge.public_url)


class OAuthFailed(Exception):
    """A web sign-in that failed: ``code`` is one of :data:`ERRORS` (the page's ``login_error``)."""

    def __init__(self, code: str) -> None:
        assert code in ERRORS
        super().__init__(code)
        self.code = code


class PendingStates:
    """The states handed out by ``/auth/wecom``. A state is *signed*, not stored: 32 hex digits = the time it was
    handed out (10 hex, ms since this object was made), 6 random hex, and 16 hex of an HMAC-SHA256 over both
    under a key made at start (so after an edge restart a sign-in in progress answers ``wecom_state`` and the
    page starts it again). Handing one out costs no memory, so a flood of ``GET /auth/wecom`` cannot push out
    the states of sign-ins in progress. A state is taken once, within ``ttl`` seconds: the states taken are
    remembered until they expire, at most ``cap`` of them (past that the oldest are forgotten, ``evicted``; a
    forgotten state could be taken again within its ten minutes, together with its cookie, and only reach
    WeCom with a code that is itself one use)."""

    def __init__(self, ttl: float = STATE_TTL_S, cap: int = MAX_PENDING) -> None:
        self.ttl, self.cap = ttl, cap
        self._key = secrets.token_bytes(32)
        self._t0 = time.monotonic()
        self._used: OrderedDict[str, float] = OrderedDict()  # state -> when it may be forgotten (monotonic)
        self.evicted = 0

    def _mac(self, head: str) -> str:
        return hmac.new(self._key, head.encode(), hashlib.sha256).hexdigest()[:16]

    def new(self) -> str:
        ms = int((time.monotonic() - self._t0) * 1000)
        head = f"{ms:010x}{secrets.token_hex(3)}"
        return head + self._mac(head)

    def take(self, state: str) -> bool:
        """True once for a state handed out less than ``ttl`` seconds ago; False for anything else."""
        if not STATE_RE.fullmatch(state) or not hmac.compare_digest(self._mac(state[:16]), state[16:]):
            return False
        now = time.monotonic()
        issued = self._t0 + int(state[:10], 16) / 1000
        if not issued <= now < issued + self.ttl or state in self._used:
            return False
        while self._used:  # expired ones first (then the oldest, over the cap)
            key, until = next(iter(self._used.items()))
            if until > now and len(self._used) < self.cap:
                break
            self._used.popitem(last=False)
            if until > now:
                self.evicted += 1
        self._used[state] = issued + self.ttl
        return True

    def __len__(self) -> int:
        return len(self._used)


class WeComOAuth:
    """``/auth/wecom`` and its callback, for one edge."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.states = PendingStates()
        self._log = LogBudget(log)  # anyone can call the callback: 20 lines a minute at most
        self.stats: dict[str, int] = {}  # outcomes of the callback: "ok" or the login_error
        self._secure = settings.edge.public_url.startswith("https://")  # the cookie only over https then

    # ---- the two routes ------------------------------------------------------------------------
    async def start(self, request: web.Request) -> web.StreamResponse:
        """302 to WeCom's authorize page, with a new state bound to a cookie."""
        w, public = self.s.wecom, self.s.edge.public_url.rstrip("/")
        state = self.states.new()  # signed, not stored: a flood of these costs no memory
        redirect_uri = quote(f"{public}/auth/wecom/callback", safe="")
        # WeCom's documented order of the parameters, and the #wechat_redirect it requires
        url = (f"{w.oauth_base.rstrip('/')}/connect/oauth2/authorize?appid={quote(w.corp_id, safe='')}"
               f"&redirect_uri={redirect_uri}&response_type=code&scope=snsapi_base&state={state}"
               f"&agentid={w.agent_id}#wechat_redirect")
        resp = web.Response(status=302, headers={"Location": url, **_NO_STORE})
        resp.set_cookie(COOKIE, state, max_age=STATE_TTL_S, path=COOKIE_PATH, httponly=True, samesite="Lax",
                        secure=self._secure)
        return resp

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """WeCom's redirect back: 302 ``/#signin=wecom`` (and the cookie) on success, ``/#login_error=…`` on
        failure."""
        try:
            uid = await self._sign_in(request)
            got = await request.app[TOKENS].login(uid)
        except OAuthFailed as exc:
            self.stats[exc.code] = self.stats.get(exc.code, 0) + 1
            return self._redirect(f"/#login_error={exc.code}")
        except lmdb.Error as exc:
            log.error("edge: cannot store a login session in auth.lmdb: %s", exc)
            self.stats["wecom_error"] = self.stats.get("wecom_error", 0) + 1
            return self._redirect("/#login_error=wecom_error")
        self.stats["ok"] = self.stats.get("ok", 0) + 1
        log.info("edge: %s signed in through WeCom", uid)
        resp = self._redirect("/#signin=wecom")
        resp.set_cookie(SIGNIN_COOKIE, str(got["refresh"]), max_age=SIGNIN_TTL_S, path=SIGNIN_PATH, httponly=True,
                        samesite="Strict", secure=self._secure)
        return resp

    async def session(self, request: web.Request) -> web.Response:
        """``POST /auth/wecom/session``: the refresh token the callback left in its cookie -> a token pair."""
        value = request.cookies.get(SIGNIN_COOKIE, "")
        got = None
        if value and len(value) <= 256:
            try:
                got = await request.app[TOKENS].refresh(value)
            except lmdb.Error as exc:
                log.error("edge: cannot renew a login session in auth.lmdb: %s", exc)
                return web.json_response({"error": {"code": "auth_store", "message": "服务器暂时无法登录，请稍后再试"}},
                                         status=503, headers=_NO_STORE)
        if got is None:
            resp = web.json_response({"error": {"code": "signin_invalid", "message":
                                      "企业微信登录已失效，请从企业微信工作台重新打开「智控未来」"}},
                                     status=401, headers=_NO_STORE)
        else:
            resp = web.json_response(got, headers=_NO_STORE)
        resp.del_cookie(SIGNIN_COOKIE, path=SIGNIN_PATH, secure=self._secure, httponly=True, samesite="Strict")
        return resp

    def _redirect(self, location: str) -> web.StreamResponse:
        resp = web.Response(status=302, headers={"Location": location, **_NO_STORE})
        # the state is used up whatever happened (same attributes as when set, or a browser may keep it)
        resp.del_cookie(COOKIE, path=COOKIE_PATH, secure=self._secure, httponly=True, samesite="Lax")
        return resp

    # ---- the checks and the exchange -----------------------------------------------------------
    async def _sign_in(self, request: web.Request) -> str:
        q = request.query
        state, code = q.get("state", ""), q.get("code", "")
        if not STATE_RE.fullmatch(state):
            self._warn("edge: WeCom sign-in with a missing or malformed state [%s]", request.remote)
            raise OAuthFailed("wecom_state")
        if not CODE_RE.fullmatch(code):
            self._warn("edge: WeCom sign-in with a missing or malformed code (%d characters) [%s]", len(code),
                       request.remote)
            raise OAuthFailed("wecom_bad_code")
        cookie = request.cookies.get(COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), state.encode()):
            self._warn("edge: WeCom sign-in whose state is not the one in its cookie (%s) [%s]",
                       "no cookie" if not cookie else "another sign-in's, or forged", request.remote)
            raise OAuthFailed("wecom_state")
        evicted = self.states.evicted
        if not self.states.take(state):
            self._warn("edge: WeCom sign-in with a state used already, expired (%d s), forged or from before a "
                       "restart [%s]", STATE_TTL_S, request.remote)
            raise OAuthFailed("wecom_state")
        if self.states.evicted != evicted:
            self._warn("edge: over %d WeCom sign-ins completed in %d s; the oldest used states are forgotten "
                       "[%s]", self.states.cap, STATE_TTL_S, request.remote)
        api = request.app.get(WECOM_API)
        if api is None:  # the channel has not started (cannot happen once the app runs)
            raise OAuthFailed("wecom_error")
        try:
            async with asyncio.timeout(self.s.wecom.oauth_timeout_s):
                userid = await self.userid(api, code)
        except TimeoutError:
            self._warn("edge: WeCom getuserinfo did not answer within %g s (wecom.oauth_timeout_s)",
                       self.s.wecom.oauth_timeout_s)
            raise OAuthFailed("wecom_unreachable") from None
        return f"wc.{userid}"

    async def userid(self, api: WeComApi, code: str) -> str:
        """The member's UserID behind an OAuth ``code``, or :class:`OAuthFailed`."""
        token = await self._token(api)
        for attempt in (1, 2):
            data = await self._getuserinfo(api, token, code)
            errcode = data.get("errcode", 0)
            if errcode is None:
                errcode = 0
            if not isinstance(errcode, int) or isinstance(errcode, bool):
                self._warn("edge: WeCom getuserinfo gave a non-integer errcode")
                raise OAuthFailed("wecom_error")
            if errcode in TOKEN_INVALID and attempt == 1:
                log.info("wecom: access_token rejected (%d) by getuserinfo; fetching a new one", errcode)
                token = await self._token(api, stale=token)
                continue
            if errcode:
                raise self._errcode(errcode, data.get("errmsg"))
            return self._member(data)
        raise AssertionError("unreachable")

    async def _token(self, api: WeComApi, stale: str | None = None) -> str:
        try:
            return await api.token(stale=stale)
        except WeComError as exc:  # its text is scrubbed of the secret and the token
            self._warn("edge: WeCom sign-in: no access_token: %s", exc)
            if exc.errcode == -3 or -600 < exc.errcode <= -500:
                raise OAuthFailed("wecom_unreachable") from None
            if exc.errcode in BUSY:
                raise OAuthFailed("wecom_busy") from None
            raise OAuthFailed("wecom_error") from None

    async def _getuserinfo(self, api: WeComApi, token: str, code: str) -> dict[str, Any]:
        url = api.base + "/cgi-bin/auth/getuserinfo"
        try:
            async with api.session.get(url, params={"access_token": token, "code": code},
                                       allow_redirects=False) as resp:
                status = resp.status
                raw = await read_bounded(resp.content, MAX_ANSWER)
        except aiohttp.ClientError as exc:
            # never the exception's text: aiohttp may quote the URL, which holds the access token and the code
            self._warn("edge: WeCom getuserinfo unreachable (%s)", type(exc).__name__)
            raise OAuthFailed("wecom_unreachable") from None
        if status >= 500:
            self._warn("edge: WeCom getuserinfo answered HTTP %d", status)
            raise OAuthFailed("wecom_unreachable")
        data = json_object(status, raw, MAX_ANSWER)
        if data is None:
            self._warn("edge: WeCom getuserinfo gave an invalid answer (HTTP %d, %d bytes)", status, len(raw))
            raise OAuthFailed("wecom_error")
        return data

    def _errcode(self, errcode: int, errmsg: Any) -> OAuthFailed:
        text = _scrub(errmsg) if isinstance(errmsg, str) else ""
        hint = OAUTH_HINTS.get(errcode) or CONFIG.get(errcode, "")
        if errcode == 60020 and (m := re.search(r"from ip:\s*([0-9a-fA-F.:]+)", text)):
            hint += f" ({m.group(1)})"
        self._warn("edge: WeCom getuserinfo errcode %d (%s)%s", errcode, text[:200], f" -- {hint}" if hint else "")
        if errcode in BAD_CODE:
            return OAuthFailed("wecom_bad_code")
        if errcode in BUSY:
            return OAuthFailed("wecom_busy")
        return OAuthFailed("wecom_error")

    def _member(self, data: dict[str, Any]) -> str:
        userid = data.get("userid", data.get("UserId"))
        if isinstance(userid, str) and userid:
            if USERID_RE.fullmatch(userid) and wire.is_uid(f"wc.{userid}"):
                return userid
            if "/" in userid:  # "CorpId/userid": a member of a linked corp, not of this one
                self._warn("edge: WeCom sign-in by a member of a linked corp refused")
                raise OAuthFailed("wecom_not_member")
            self._warn("edge: WeCom getuserinfo gave a UserID that cannot make a uid (%d characters)", len(userid))
            raise OAuthFailed("wecom_error")
        if data.get("openid") or data.get("OpenId") or data.get("external_userid"):
            self._warn("edge: WeCom sign-in by a non-member (openid only) refused")
            raise OAuthFailed("wecom_not_member")
        self._warn("edge: WeCom getuserinfo answered neither a userid nor an openid")
        raise OAuthFailed("wecom_error")

    def _warn(self, msg: str, *args: object) -> None:
        self._log.log(logging.WARNING, msg, *args)


_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
OAUTH = web.AppKey("wecom_oauth", WeComOAuth)

_UNAVAILABLE = "本服务器未配置企业微信网页登录（需要 [wecom] corp_id、secret、agent_id 和 edge.public_url）"
_PAGE = ("<!doctype html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
         "content=\"width=device-width, initial-scale=1\"><title>智控未来</title></head><body>"
         "<p>{msg}</p><p><a href=\"/\">返回首页</a></p></body></html>")


def _unavailable(request: web.Request) -> web.Response:
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(status=503, text=_PAGE.format(msg=_UNAVAILABLE), content_type="text/html",
                            headers=_NO_STORE)
    return web.json_response({"error": {"code": "wecom_oauth_unavailable", "message": _UNAVAILABLE}}, status=503,
                             headers=_NO_STORE)


async def auth_wecom(request: web.Request) -> web.StreamResponse:
    oauth = request.app.get(OAUTH)
    return _unavailable(request) if oauth is None else await oauth.start(request)


async def auth_wecom_callback(request: web.Request) -> web.StreamResponse:
    oauth = request.app.get(OAUTH)
    return _unavailable(request) if oauth is None else await oauth.callback(request)


async def auth_wecom_session(request: web.Request) -> web.Response:
    oauth = request.app.get(OAUTH)
    return _unavailable(request) if oauth is None else await oauth.session(request)


async def login_options(request: web.Request) -> web.Response:
    """Which sign-ins this edge offers (no secrets), and the longest question it takes."""
    s = request.app[SETTINGS]
    return web.json_response({"dev": s.edge.dev_login, "wecom": oauth_ready(s), "miniapp": s.miniapp.enabled,
                              "max_question": MAX_ASK_CHARS})


def add_routes(app: web.Application) -> None:
    s = app[SETTINGS]
    if oauth_ready(s):
        app[OAUTH] = WeComOAuth(s)
    app.router.add_get("/api/login/options", login_options)
    app.router.add_get("/auth/wecom", auth_wecom)
    # no HEAD: a link checker's HEAD must not use up the state and the one-use code
    app.router.add_get("/auth/wecom/callback", auth_wecom_callback, allow_head=False)
    app.router.add_post("/auth/wecom/session", auth_wecom_session)
