"""Mini-program sign-in: the ``jscode2session`` client behind ``POST /api/login {"code"}``.

``wx.login`` gives the mini-program a one-use ``code``; the edge trades it, together with the AppID and the
AppSecret, for the user's ``openid`` with one direct GET of ``{api_base}/sns/jscode2session`` (no access_token
is involved). The user becomes uid ``mp.{openid}``.

The request URL carries the AppSecret, so neither the URL nor an exception text that could quote it is ever
logged or returned; only the exception's type is. The ``session_key`` in the answer is dropped at once: it is
never stored, logged or sent to the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

import wire
from core.guard import LogBudget
from core.config import MiniappSettings

from .keys import SETTINGS

log = logging.getLogger(__name__)

CODE_RE = re.compile(r"[\x21-\x7e]{1,128}")  # a wx.login code: printable ASCII, no spaces (WeChat's are 32)
OPENID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ANSWER = 64 * 1024  # bytes of a jscode2session answer read at most


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to its end or ``limit + 1`` bytes, whichever comes first (so a caller can tell "too big").
    One ``read(n)`` returns what has arrived so far, which may be part of an answer sent in pieces."""
    raw = b""
    while len(raw) <= limit:
        chunk = await content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return raw


def json_object(status: int, raw: bytes, limit: int) -> dict[str, Any] | None:
    """The JSON object an HTTP 200 answer of at most ``limit`` bytes holds; None for anything else (another
    status, too big, not JSON, nested too deep, not an object)."""
    if status != 200 or len(raw) > limit:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


class LoginError(Exception):
    """A sign-in that failed: the HTTP status, stable code and Simplified Chinese message for the client."""

    def __init__(self, status: int, code: str, message: str, errcode: int | None = None) -> None:
        super().__init__(code)
        self.status, self.code, self.message, self.errcode = status, code, message, errcode


# WeChat errcode -> (HTTP status, our code, message)
_ERRCODES: dict[int, tuple[int, str, str]] = {
    40029: (401, "mp_bad_code", "登录凭证无效或已过期，请重新打开小程序登录"),
    40163: (401, "mp_bad_code", "登录凭证已被使用，请重新打开小程序登录"),
    45011: (429, "mp_rate_limited", "登录过于频繁，请一分钟后再试"),
    40226: (403, "mp_user_blocked", "该微信账号被微信判定为高风险，暂时无法登录"),
    -1: (503, "mp_busy", "微信服务繁忙，请稍后再试"),
}


class MiniappClient:
    """One ``jscode2session`` call per sign-in, over the edge's aiohttp client session for WeChat."""

    def __init__(self, settings: MiniappSettings, session: aiohttp.ClientSession) -> None:
        self._s = settings
        self._session = session
        self._url = settings.api_base.rstrip("/") + "/sns/jscode2session"
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._log = LogBudget(log)  # anyone can post codes: 20 lines a minute at most

    async def openid(self, code: str) -> str:
        """The openid behind a ``wx.login`` code, or :class:`LoginError`."""
        params = {"appid": self._s.appid, "secret": self._s.secret, "js_code": code,
                  "grant_type": "authorization_code"}
        try:
            async with self._session.get(self._url, params=params, timeout=self._timeout,
                                         allow_redirects=False) as resp:
                status = resp.status
                raw = await read_bounded(resp.content, MAX_ANSWER)
        except (asyncio.TimeoutError, TimeoutError):
            self._log.log(logging.WARNING, "miniapp: jscode2session did not answer within %g s",
                          self._s.timeout_s)
            raise LoginError(504, "mp_unreachable", "连接微信服务器超时，请稍后再试") from None
        except aiohttp.ClientError as exc:
            # never the exception text: aiohttp may quote the request URL, which holds the AppSecret
            self._log.log(logging.WARNING, "miniapp: jscode2session unreachable (%s)", type(exc).__name__)
            raise LoginError(502, "mp_unreachable", "无法连接微信服务器，请稍后再试") from None
        data = json_object(status, raw, MAX_ANSWER)
        if data is None:
            self._log.log(logging.WARNING, "miniapp: jscode2session gave an invalid answer (HTTP %d, %d bytes)",
                          status, len(raw))
            raise LoginError(502, "mp_bad_answer", "微信服务器返回了无法识别的应答，请稍后再试")
        errcode = data.get("errcode", 0)  # a success often has no errcode at all
        if errcode is None:
            errcode = 0
        if not isinstance(errcode, int) or isinstance(errcode, bool):
            self._log.log(logging.WARNING, "miniapp: jscode2session gave a non-integer errcode")
            raise LoginError(502, "mp_bad_answer", "微信服务器返回了无法识别的应答，请稍后再试")
        if errcode != 0:
            errmsg = data.get("errmsg")
            self._log.log(logging.WARNING, "miniapp: jscode2session errcode %d (%s)", errcode,
                          errmsg[:200] if isinstance(errmsg, str) else "")
            if errcode in _ERRCODES:
                st, our, msg = _ERRCODES[errcode]
                raise LoginError(st, our, msg, errcode)
            raise LoginError(502, "mp_error", f"微信登录失败（错误码 {errcode}），请稍后再试", errcode)
        openid = data.get("openid")
        if not isinstance(openid, str) or not OPENID_RE.fullmatch(openid) or not wire.is_uid(f"mp.{openid}"):
            self._log.log(logging.WARNING, "miniapp: jscode2session answered without a valid openid")
            raise LoginError(502, "mp_bad_answer", "微信服务器返回了无法识别的应答，请稍后再试")
        return openid  # session_key (and unionid) are dropped with ``data``


MINIAPP = web.AppKey("miniapp", MiniappClient)


async def miniapp_ctx(app: web.Application) -> AsyncIterator[None]:
    """The jscode2session client and its aiohttp session, for the app's lifetime."""
    s = app[SETTINGS].miniapp
    async with aiohttp.ClientSession(headers={"User-Agent": "SmartClaw"}) as session:
        app[MINIAPP] = MiniappClient(s, session)
        log.info("edge: mini-program sign-in enabled (AppID %s, API %s)", s.appid, s.api_base)
        yield
