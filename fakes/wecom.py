"""A fake WeCom (企业微信) server API and a simulator of WeCom's encrypted callbacks.

Used by the integration tests and by ``claw bench wecom``; it lives in the package so the bench can
run from an installed wheel. Two independent halves:

**The fake server API** (:func:`run_fake_wecom` → :class:`FakeWeCom`), an aiohttp server on
127.0.0.1 that answers like ``qyapi.weixin.qq.com``: HTTP 200 and a JSON body with
``errcode``/``errmsg`` for everything, errors carrying WeCom's ``hint: [...], from ip: ...`` tail.

* ``GET /cgi-bin/gettoken?corpid=&corpsecret=`` issues an access_token (repeated calls while it is
  valid return the same token, as WeCom documents). 41002/41004 missing corpid/corpsecret,
  40013 wrong corpid, 40001 wrong secret.
* ``POST /cgi-bin/message/send?access_token=`` accepts ``msgtype: text`` only. 41001 missing token,
  40014 unknown token, 42001 expired token (:meth:`FakeWeCom.expire_tokens` or ``token_ttl``),
  47001 body not JSON, 40056 missing/non-integer agentid, 301002 another app's agentid,
  40008 other msgtype, 44004 empty content, 40003 no touser.
* WeCom's *silent* behaviour is emulated and recorded on each :class:`Sent`: text over
  ``max_bytes`` UTF-8 bytes is truncated at a character boundary (``truncated=True``), and past
  ``per_min`` messages in 60 s or ``per_hour`` in 3600 s to one member a message is dropped while
  ``errcode 0`` is still answered (``dropped=True``). Only delivered messages count against the limits.
* Fault injection: :meth:`FakeWeCom.fail_next`, :meth:`FakeWeCom.fail_user`, and
  :attr:`FakeWeCom.deny_ip` (every call answers 60020 naming the caller's real address).
* Web sign-in (OAuth): ``GET /connect/oauth2/authorize?appid=&redirect_uri=&response_type=code&scope=&state=
  &agentid=`` plays WeCom's authorize page (``open.weixin.qq.com``; point ``wecom.oauth_base`` at the fake): it
  issues a code for :attr:`FakeWeCom.oauth_user` and answers 302 to ``redirect_uri?code=&state=`` (a wrong appid,
  agentid, response_type or scope answers 400, as WeCom shows an error page). ``GET /cgi-bin/auth/getuserinfo?
  access_token=&code=`` trades a code (one use, 300 s; :meth:`FakeWeCom.oauth_code` makes one directly) for
  ``{"userid"}`` (a member) or ``{"openid"}`` (a non-member); 40029 for an unknown, used or expired code, the
  token errors as above. :meth:`FakeWeCom.fail_userinfo` makes the next calls answer an errcode, ``"garbage"``
  (HTML, not JSON), ``"drop"`` (the connection closed without an answer; a client may retry that once on a new
  connection) or ``"hang"`` (no answer until the server stops); :attr:`FakeWeCom.userinfo_down` closes every
  getuserinfo connection (the network to WeCom is down).

The access log is off and nothing here logs a secret or an access_token.

**The callback simulator** (:class:`WeComSim` → :class:`Callback`) builds the POSTs WeCom sends to an
app's callback URL: the plaintext message XML is encrypted and signed with wechatpy's own
:class:`~wechatpy.enterprise.crypto.WeChatCrypto` (AES-256-CBC over ``random16 + len + xml + corp_id``;
``msg_signature = sha1(sorted([token, timestamp, nonce, encrypt]))``) and wrapped in WeCom's
envelope ``<xml><ToUserName/><Encrypt/><AgentID/></xml>``; the query carries ``msg_signature``,
``timestamp`` and ``nonce``. :meth:`Callback.again` reproduces WeCom's retries of one message.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import xmltodict
from aiohttp import web
from wechatpy.enterprise.crypto import PrpCrypto, WeChatCrypto

__all__ = [
    "Callback",
    "FakeWeCom",
    "FakeWeComConfig",
    "FakeWeComStats",
    "MEDIA_KINDS",
    "Sent",
    "WeComSim",
    "run_fake_wecom",
    "signature",
]

log = logging.getLogger(__name__)

# errmsg texts as WeCom words them (the fake appends WeCom's "hint / from ip / more info" tail).
ERRMSG: dict[int, str] = {
    -1: "system busy",
    40001: "invalid credential",
    40003: "invalid userid",
    40008: "invalid message type",
    40013: "invalid corpid",
    40014: "invalid access_token",
    40029: "invalid code",
    40056: "invalid agentid",
    41001: "access_token missing",
    41002: "corpid missing",
    41004: "corpsecret missing",
    41008: "missing code",
    42001: "access_token expired",
    44004: "empty content",
    45009: "api freq out of limit",
    45033: "api concurrent out of limit",
    47001: "data format error",
    48002: "api forbidden",
    50001: "redirect_url not authorised",
    60011: "no privilege to access/modify contact/party/agent",
    60020: "not allow to access from your ip",
    81013: "user & party & tag all invalid",
    301002: "not allow operate another agent with this accesstoken.",
}
MORE_INFO = "https://open.work.weixin.qq.com/devtool/query?e="
MINUTE, HOUR = 60.0, 3600.0


# ================================================================================ the fake API


@dataclass
class FakeWeComConfig:
    """What the fake server accepts and how strict it is.

    ``per_min``/``per_hour`` are WeCom's limits for messages from one app to one member; past them
    WeCom drops messages silently. ``max_bytes`` is the text message limit (2048 UTF-8 bytes), past
    which WeCom truncates silently. ``port`` 0 binds a free port.
    """

    corp_id: str
    secret: str
    agent_id: int
    token_ttl: int = 7200
    per_min: int = 30
    per_hour: int = 1000
    max_bytes: int = 2048
    host: str = "127.0.0.1"
    port: int = 0


@dataclass
class FakeWeComStats:
    """Counters: ``gettoken`` and ``sends`` count calls (answered with any errcode), ``errors`` every
    answer with a non-zero errcode, ``dropped``/``truncated`` the messages WeCom would silently drop
    or cut."""

    gettoken: int = 0
    sends: int = 0
    userinfo: int = 0  # getuserinfo calls
    dropped: int = 0
    truncated: int = 0
    errors: int = 0


@dataclass
class Sent:
    """One text message ``message/send`` accepted (``errcode 0``) for one member.

    ``content`` is the text as WeCom kept it (truncated when over the limit), ``raw`` the text as
    sent; ``dropped`` means WeCom answered ok but the member never saw it (rate limit).
    """

    user: str
    content: str
    raw: str
    token: str
    agentid: int
    ts: float
    truncated: bool
    dropped: bool
    msgid: str
    safe: int = 0

    def __repr__(self) -> str:  # no access_token in reprs (they end up in assertion messages)
        flags = "".join((" truncated" if self.truncated else "", " dropped" if self.dropped else ""))
        return f"Sent(user={self.user!r}, content={_short(self.content)!r}, msgid={self.msgid!r}{flags})"


@dataclass
class _Token:
    value: str
    expires: float  # wall clock
    revoked: bool = False

    def valid(self, now: float) -> bool:
        return not self.revoked and now < self.expires


class FakeWeCom:
    """The running fake: its base :attr:`url`, what it recorded, and the fault-injection knobs.

    Created by :func:`run_fake_wecom`; everything is meant to be used from the event loop the
    server runs on.
    """

    def __init__(self, cfg: FakeWeComConfig) -> None:
        self.cfg = cfg
        self.stats = FakeWeComStats()
        self.sends: list[Sent] = []  # every accepted message, dropped ones included, in arrival order
        self.deny_ip = False  # True: every call answers 60020 (server A's IP not in 企业可信IP)
        self.host, self.port = cfg.host, 0
        self._tokens: dict[str, _Token] = {}
        self._current: _Token | None = None
        self._fail_next: list[int] = []  # errcodes for the next message/send calls, in order
        self._fail_user: dict[str, int] = {}
        self._delivered: list[Sent] = []
        self._by_user: dict[str, list[Sent]] = {}
        self._windows: dict[str, list[float]] = {}  # per member: monotonic times of delivered sends
        self._msgids = itertools.count(1)
        self._cond = asyncio.Condition()
        # web sign-in: who "opens" the authorize page -- ("userid", X) for a member, ("openid", X) for a non-member
        self.oauth_user: tuple[str, str] = ("userid", "zhangsan")
        self._codes: dict[str, tuple[str, str, float]] = {}  # code -> (kind, id, expiry)
        self.oauth_codes: list[str] = []  # every code handed out (tests check none reaches a log)
        self._fail_userinfo: list[int | str] = []
        self.userinfo_down = False  # True: every getuserinfo connection is closed without an answer
        self._stopping = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/cgi-bin/gettoken", self._gettoken)
        self.app.router.add_post("/cgi-bin/message/send", self._send)
        self.app.router.add_get("/cgi-bin/auth/getuserinfo", self._getuserinfo)
        self.app.router.add_get("/connect/oauth2/authorize", self._authorize)

    # ---- public API ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The API base, e.g. ``http://127.0.0.1:54321`` (clients append ``/cgi-bin/...``)."""
        return f"http://{self.host}:{self.port}"

    def delivered(self, user: str | None = None) -> list[Sent]:
        """The messages members actually got (not dropped), for ``user`` or for everyone, in order."""
        return list(self._delivered if user is None else self._by_user.get(user, ()))

    async def wait_sends(self, n: int, user: str | None = None, timeout: float = 10.0) -> list[Sent]:
        """Wait until at least ``n`` messages were delivered (to ``user``, or in all); returns them.

        Raises :class:`AssertionError` saying what was delivered when ``timeout`` seconds pass first.
        """

        def enough() -> bool:
            return self._count(user) >= n

        try:
            async with asyncio.timeout(timeout):
                async with self._cond:
                    await self._cond.wait_for(enough)
        except TimeoutError:
            raise AssertionError(self._wait_report(n, user, timeout)) from None
        return self.delivered(user)

    async def wait_delivered(self, predicate: Callable[[list[Sent]], bool], user: str | None = None,
                             timeout: float = 10.0) -> list[Sent]:
        """Wait until ``predicate(delivered)`` holds for the messages delivered (to ``user``, or to everyone),
        checked again at each delivery (no polling); returns them. Raises :class:`AssertionError` with what
        was delivered when ``timeout`` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                async with self._cond:
                    await self._cond.wait_for(lambda: predicate(self.delivered(user)))
        except TimeoutError:
            got = ", ".join(f"{m.user}: {_short(m.content)!r}" for m in self.delivered(user)[-10:])
            raise AssertionError(f"fake WeCom: condition not met within {timeout:g} s; delivered "
                                 f"(last 10) [{got}]") from None
        return self.delivered(user)

    def expire_tokens(self) -> None:
        """Every access_token issued so far answers 42001 from now on (WeCom may revoke early)."""
        for tok in self._tokens.values():
            tok.revoked = True
        self._current = None

    def fail_next(self, n: int, errcode: int) -> None:
        """The next ``n`` well-formed, authenticated ``message/send`` calls answer ``errcode``
        (e.g. 45009 rate limited, -1 system busy) instead of sending. Calls queue up in order."""
        if errcode == 0:
            raise ValueError("fail_next needs a non-zero errcode")
        self._fail_next.extend([errcode] * n)

    def fail_user(self, user: str, errcode: int | None) -> None:
        """Sends to ``user`` answer ``errcode`` from now on (81013: not in the app's visible range,
        reported as ``invaliduser``); ``None`` or 0 lifts it."""
        if errcode:
            self._fail_user[user] = errcode
        else:
            self._fail_user.pop(user, None)

    def oauth_code(self, userid: str | None = None, *, openid: str | None = None, ttl: float = 300.0) -> str:
        """A web sign-in code for member ``userid`` (or non-member ``openid``), as WeCom hands the browser:
        one use, valid ``ttl`` seconds (WeCom: 5 minutes)."""
        if (userid is None) == (openid is None):
            raise ValueError("oauth_code needs a userid or an openid")
        code = secrets.token_urlsafe(32)
        self.oauth_codes.append(code)
        self._codes[code] = ("userid", userid, time.time() + ttl) if userid is not None else \
            ("openid", openid or "", time.time() + ttl)
        return code

    def fail_userinfo(self, *outcomes: int | str) -> None:
        """The next getuserinfo calls (one per outcome, in order) answer an errcode (e.g. 45009, -1, 40029), or
        ``"garbage"`` (an HTML page), ``"drop"`` (close the connection) or ``"hang"`` (never answer). The code
        is not used up by them."""
        for o in outcomes:
            if o == 0 or (isinstance(o, str) and o not in ("garbage", "drop", "hang")):
                raise ValueError(f"fail_userinfo: a non-zero errcode or garbage/drop/hang, got {o!r}")
        self._fail_userinfo.extend(outcomes)

    # ---- helpers ---------------------------------------------------------------------------------
    def _count(self, user: str | None) -> int:
        return len(self._delivered) if user is None else len(self._by_user.get(user, ()))

    def _wait_report(self, n: int, user: str | None, timeout: float) -> str:
        who = f"user {user!r}" if user is not None else "all users"
        got = self.delivered(user)
        shown = ", ".join(f"{m.user}: {_short(m.content)!r}" for m in got[-10:])
        more = f"(last 10 of {len(got)}) " if len(got) > 10 else ""
        return (f"fake WeCom: {len(got)} of {n} expected message(s) delivered to {who} within {timeout:g} s; "
                f"delivered {more}[{shown}]; {self.stats}; injected failures pending: {len(self._fail_next)}; "
                f"deny_ip={self.deny_ip}")

    def _error(self, request: web.Request, errcode: int, extra: Mapping[str, Any] | None = None) -> web.Response:
        self.stats.errors += 1
        hint = f"{int(time.time())}_{secrets.randbelow(100):02d}_{secrets.token_hex(16)}"
        msg = (f"{ERRMSG.get(errcode, 'error')}, hint: [{hint}], from ip: {request.remote or '?'}, "
               f"more info at {MORE_INFO}{errcode}")
        log.debug("fake wecom: %s answered errcode %d", request.path, errcode)
        return web.json_response({"errcode": errcode, "errmsg": msg, **(extra or {})})

    def _check_token(self, request: web.Request) -> tuple[str, int]:
        """(token, errcode) for the request's access_token; errcode 0 when it is valid."""
        token = request.query.get("access_token", "")
        if not token:
            return token, 41001
        tok = self._tokens.get(token)
        if tok is None:
            return token, 40014
        if not tok.valid(time.time()):
            return token, 42001
        return token, 0

    def _admit(self, user: str) -> bool:
        """True when one more message to ``user`` fits WeCom's per-member limits (and counts it)."""
        now = time.monotonic()
        win = self._windows.setdefault(user, [])
        del win[:bisect.bisect_right(win, now - HOUR)]  # forget sends older than an hour
        last_min = len(win) - bisect.bisect_right(win, now - MINUTE)
        if last_min >= self.cfg.per_min or len(win) >= self.cfg.per_hour:
            return False
        win.append(now)
        return True

    # ---- handlers --------------------------------------------------------------------------------
    async def _gettoken(self, request: web.Request) -> web.Response:
        self.stats.gettoken += 1
        if self.deny_ip:
            return self._error(request, 60020)
        corpid, secret = request.query.get("corpid", ""), request.query.get("corpsecret", "")
        if not corpid:
            return self._error(request, 41002)
        if not secret:
            return self._error(request, 41004)
        if corpid != self.cfg.corp_id:
            return self._error(request, 40013)
        if not secrets.compare_digest(secret.encode(), self.cfg.secret.encode()):
            return self._error(request, 40001)
        now = time.time()
        tok = self._current
        if tok is None or not tok.valid(now):
            tok = _Token(secrets.token_urlsafe(96), now + self.cfg.token_ttl)
            self._tokens[tok.value] = tok
            self._current = tok
            log.debug("fake wecom: issued a new access_token (valid %d s)", self.cfg.token_ttl)
        return web.json_response({"errcode": 0, "errmsg": "ok", "access_token": tok.value,
                                  "expires_in": max(1, int(tok.expires - now))})

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            agentid = int(q.get("agentid", ""))
        except ValueError:
            agentid = -1
        if (q.get("appid") != self.cfg.corp_id or agentid != int(self.cfg.agent_id) or q.get("response_type") != "code"
                or q.get("scope") not in ("snsapi_base", "snsapi_privateinfo")
                or not q.get("redirect_uri", "").startswith(("http://", "https://"))):
            return web.Response(status=400, text="fake wecom: 参数错误", content_type="text/plain")
        kind, ident = self.oauth_user
        code = self.oauth_code(ident) if kind == "userid" else self.oauth_code(openid=ident)
        uri = q["redirect_uri"]
        target = uri + ("&" if "?" in uri else "?") + urlencode({"code": code, "state": q.get("state", "")})
        return web.Response(status=302, headers={"Location": target})

    async def _getuserinfo(self, request: web.Request) -> web.StreamResponse:
        self.stats.userinfo += 1
        if self.userinfo_down:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if self.deny_ip:
            return self._error(request, 60020)
        _, code = self._check_token(request)
        if code:
            return self._error(request, code)
        if self._fail_userinfo:
            outcome = self._fail_userinfo.pop(0)
            if outcome == "garbage":
                return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>",
                                    content_type="text/html")
            if outcome == "drop":
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            if outcome == "hang":
                await self._stopping.wait()
                return web.Response(status=503)
            assert isinstance(outcome, int)
            return self._error(request, outcome)
        got = self._codes.pop(request.query.get("code", ""), None)
        if got is None or got[2] < time.time():
            return self._error(request, 40029)
        kind, ident, _ = got
        return web.json_response({"errcode": 0, "errmsg": "ok", kind: ident})

    async def _send(self, request: web.Request) -> web.Response:
        self.stats.sends += 1
        if self.deny_ip:
            return self._error(request, 60020)
        token, code = self._check_token(request)
        if code:
            return self._error(request, code)
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return self._error(request, 47001)
        try:
            agentid = int(body.get("agentid"))  # WeCom accepts the number or its string
        except (TypeError, ValueError):
            return self._error(request, 40056)
        if agentid != int(self.cfg.agent_id):
            return self._error(request, 301002)
        if body.get("msgtype") != "text":
            return self._error(request, 40008)
        text = body.get("text")
        content = text.get("content") if isinstance(text, dict) else None
        if not isinstance(content, str) or not content:
            return self._error(request, 44004)
        touser = body.get("touser")
        users = [u for u in touser.split("|") if u] if isinstance(touser, str) else []
        if not users:
            return self._error(request, 40003)
        if self._fail_next:
            return self._error(request, self._fail_next.pop(0))
        invalid: list[str] = []
        for u in users:
            code = self._fail_user.get(u, 0)
            if code == 81013:
                invalid.append(u)
            elif code:
                return self._error(request, code)
        if len(invalid) == len(users):
            return self._error(request, 81013, {"invaliduser": "|".join(invalid)})

        msgid = f"fake{secrets.token_hex(8)}_{next(self._msgids)}"
        raw = content
        data = raw.encode()
        truncated = len(data) > self.cfg.max_bytes
        if truncated:  # cut at a character boundary (the partial sequence at the end is dropped)
            content = data[: self.cfg.max_bytes].decode("utf-8", "ignore")
        try:
            safe = int(body.get("safe", 0) or 0)
        except (TypeError, ValueError):
            safe = 0
        for u in users:
            if u in invalid:
                continue
            dropped = not self._admit(u)
            rec = Sent(user=u, content=content, raw=raw, token=token, agentid=agentid, ts=time.time(),
                       truncated=truncated, dropped=dropped, msgid=msgid, safe=safe)
            self.sends.append(rec)
            self.stats.truncated += truncated
            if dropped:
                self.stats.dropped += 1
                log.debug("fake wecom: message to %s dropped silently (rate limit)", u)
            else:
                self._delivered.append(rec)
                self._by_user.setdefault(u, []).append(rec)
        async with self._cond:
            self._cond.notify_all()
        answer: dict[str, Any] = {"errcode": 0, "errmsg": "ok", "msgid": msgid}
        if invalid:
            answer["invaliduser"] = "|".join(invalid)
        return web.json_response(answer)


@contextlib.asynccontextmanager
async def run_fake_wecom(cfg: FakeWeComConfig, *, shutdown_timeout: float = 0.5) -> AsyncIterator[FakeWeCom]:
    """Serve a :class:`FakeWeCom` on ``cfg.host:cfg.port`` (0 = a free port) for the ``async with``."""
    fw = FakeWeCom(cfg)
    runner = web.AppRunner(fw.app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        fw.port = int(runner.addresses[0][1])
        log.debug("fake wecom: listening on %s", fw.url)
        yield fw
    finally:
        fw._stopping.set()  # a "hang" getuserinfo answers now
        await runner.cleanup()


# ================================================================================ callbacks


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """WeCom's ``msg_signature``: sha1 over the sorted, concatenated four strings."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypt])).encode()).hexdigest()


def _cdata(value: object) -> str:
    """``<![CDATA[...]]>`` that survives a ``]]>`` inside the value."""
    return "<![CDATA[" + str(value).replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# MsgIds: WeCom's are 64-bit integers; one process-wide counter seeded from the clock keeps them
# unique across simulators (tests build a fresh WeComSim per message) and across quick restarts.
_MSG_IDS = itertools.count(((time.time_ns() // 1000) << 10) | secrets.randbelow(1 << 10))

# Extra fields of the media messages, as WeCom sends them to a self-built app.
MEDIA_KINDS: dict[str, dict[str, Any]] = {
    "image": {"PicUrl": "https://wework.qpic.cn/wwpic/123456_abcdefghij_1700000000/0",
              "MediaId": "1N_aB3cD4eF5gH6iJ7kL8mN9oP0qR1sT2uV3wX4yZ5-image"},
    "voice": {"MediaId": "2V_aB3cD4eF5gH6iJ7kL8mN9oP0qR1sT2uV3wX4yZ5-voice", "Format": "amr"},
    "video": {"MediaId": "3D_aB3cD4eF5gH6iJ7kL8mN9oP0qR1sT2uV3wX4yZ5-video",
              "ThumbMediaId": "3T_aB3cD4eF5gH6iJ7kL8mN9oP0qR1sT2uV3wX4yZ5-thumb"},
    "file": {"MediaId": "4F_aB3cD4eF5gH6iJ7kL8mN9oP0qR1sT2uV3wX4yZ5-file", "FileName": "季度报告.pdf"},
    "location": {"Location_X": "23.134521", "Location_Y": "113.358803", "Scale": "20",
                 "Label": "广州市天河区天河路385号", "AppType": "wxwork"},
    "link": {"Title": "企业微信开发文档", "Description": "接收消息与事件",
             "Url": "https://developer.work.weixin.qq.com/document/path/90239",
             "PicUrl": "https://wework.qpic.cn/wwpic/654321_jihgfedcba_1700000000/0"},
}
_NUMERIC = frozenset({"CreateTime", "MsgId", "AgentID", "Location_X", "Location_Y", "Scale"})


@dataclass(eq=False)
class Callback:
    """One callback POST as WeCom sends it: the query (``msg_signature``, ``timestamp``, ``nonce``),
    the envelope ``body`` and, for assertions, the plaintext ``inner`` XML."""

    query: dict[str, str]
    body: bytes
    inner: str
    sim: WeComSim = field(repr=False)

    async def post(self, session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
        """POST it to the app's callback ``url``; returns (HTTP status, response text)."""
        async with session.post(url, params=self.query, data=self.body,
                                headers={"Content-Type": "text/xml"}) as resp:
            return resp.status, await resp.text()

    def again(self, fresh_signature: bool = False) -> Callback:
        """WeCom's retry of the same message (same MsgId, CreateTime and content).

        ``fresh_signature=False``: byte-identical query and body. ``True``: a new nonce and the
        current timestamp, encrypted again (new random prefix) and signed again.
        """
        if not fresh_signature:
            return Callback(dict(self.query), self.body, self.inner, self.sim)
        return self.sim.wrap(self.inner)


class WeComSim:
    """Builds WeCom's callbacks for one app: ``token`` and ``encoding_aes_key`` as configured in
    the app's 接收消息 settings, the ``corp_id`` (ToUserName, and the id inside the ciphertext) and
    the ``agent_id``."""

    def __init__(self, token: str, encoding_aes_key: str, corp_id: str, agent_id: int | str) -> None:
        self.token, self.corp_id, self.agent_id = token, corp_id, agent_id
        self.crypto = WeChatCrypto(token, encoding_aes_key, corp_id)

    def __repr__(self) -> str:  # the token and the AES key stay out of reprs
        return f"WeComSim(corp_id={self.corp_id!r}, agent_id={self.agent_id!r})"

    # ---- messages ----------------------------------------------------------------------------
    @staticmethod
    def next_msg_id() -> int:
        """A fresh MsgId (unique in this process)."""
        return next(_MSG_IDS)

    def text(self, user: str, content: str, *, msg_id: int | None = None,
             create_time: int | None = None) -> Callback:
        """A text message from member ``user``."""
        return self.message(user, "text", {"Content": content}, msg_id=msg_id, create_time=create_time)

    def event(self, user: str, event: str, *, create_time: int | None = None,
              fields: Mapping[str, Any] | None = None) -> Callback:
        """An event (``enter_agent``, ``subscribe``, ``click``, ...) from ``user``; events carry no
        MsgId. ``fields`` adds elements (e.g. ``{"EventKey": "menu1"}``); ``enter_agent`` and
        ``click``/``view`` get an empty ``EventKey`` by default, as WeCom sends."""
        extra: dict[str, Any] = {"Event": event}
        if event in ("enter_agent", "click", "view"):
            extra["EventKey"] = ""
        extra.update(fields or {})
        return self.message(user, "event", extra, msg_id=None, create_time=create_time)

    def media(self, user: str, kind: str, *, msg_id: int | None = None,
              create_time: int | None = None) -> Callback:
        """A non-text message: ``image``, ``voice``, ``video``, ``file``, ``location`` or ``link``."""
        try:
            extra = MEDIA_KINDS[kind]
        except KeyError:
            raise ValueError(f"unknown media kind {kind!r}; one of {', '.join(MEDIA_KINDS)}") from None
        return self.message(user, kind, extra, msg_id=msg_id, create_time=create_time)

    def message(self, user: str, msg_type: str, fields: Mapping[str, Any], *, msg_id: int | None = None,
                create_time: int | None = None) -> Callback:
        """Any message: the common elements, then ``fields``, then MsgId (unless an event) and AgentID."""
        parts: dict[str, Any] = {
            "ToUserName": self.corp_id, "FromUserName": user,
            "CreateTime": int(time.time()) if create_time is None else int(create_time),
            "MsgType": msg_type, **fields,
        }
        if msg_type != "event":
            parts["MsgId"] = self.next_msg_id() if msg_id is None else int(msg_id)
        parts["AgentID"] = self.agent_id
        inner = "<xml>" + "".join(
            f"<{k}>{v if k in _NUMERIC else _cdata(v)}</{k}>" for k, v in parts.items()) + "</xml>"
        return self.wrap(inner)

    # ---- crypto ------------------------------------------------------------------------------
    @staticmethod
    def new_nonce() -> str:
        """A nonce like WeCom's (a 9-10 digit number)."""
        return str(100_000_000 + secrets.randbelow(9_900_000_000))

    def wrap(self, inner: str, *, timestamp: int | str | None = None, nonce: str | None = None) -> Callback:
        """Encrypt and sign the plaintext message XML ``inner`` into a :class:`Callback`."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        nonce = nonce or self.new_nonce()
        reply = xmltodict.parse(self.crypto.encrypt_message(inner, nonce, ts))["xml"]
        encrypt, sig = reply["Encrypt"], reply["MsgSignature"]
        body = (f"<xml><ToUserName>{_cdata(self.corp_id)}</ToUserName><Encrypt>{_cdata(encrypt)}</Encrypt>"
                f"<AgentID>{_cdata(self.agent_id)}</AgentID></xml>").encode()
        return Callback({"msg_signature": sig, "timestamp": ts, "nonce": nonce}, body, inner, self)

    def url_check(self, echostr_plain: str, *, timestamp: int | str | None = None,
                  nonce: str | None = None) -> dict[str, str]:
        """The GET query of WeCom's URL verification: the app must answer the decrypted echostr."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        nonce = nonce or self.new_nonce()
        echostr = PrpCrypto(self.crypto.key).encrypt(echostr_plain, self.corp_id).decode()
        return {"msg_signature": signature(self.token, ts, nonce, echostr), "timestamp": ts, "nonce": nonce,
                "echostr": echostr}
