"""WeCom server API client (runs on server A only: its fixed IP is the one in 企业可信IP).

``gettoken`` and ``message/send`` over aiohttp. The access_token is cached in memory and in LMDB
(so a restart does not call ``gettoken`` again), refreshed ``token_refresh_margin_s`` before it
expires, and refetched once on 40014/42001/41001. Every failure becomes a :class:`WeComError`
whose ``kind`` tells the outbox what to do; the token and the secret never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import aiohttp
import cbor2

from core.config import WecomSettings
from core.store import Writer

log = logging.getLogger(__name__)

TOKEN_INVALID = frozenset({40014, 42001, 41001})
RETRY = frozenset({-1, 45009, 45033, 50001, 45047})  # busy / rate limits: retry with backoff
# Fixable only by the operator; messages stay queued and are retried slowly until send_max_age_s.
CONFIG = {
    60020: "server A's outgoing IP is not in the app's 企业可信IP list: WeCom admin console → 应用管理 → "
           "智控未来 → 企业可信IP, add the IP shown here",
    40001: "wrong wecom.secret (the app's Secret in 应用管理 → 智控未来)",
    40013: "wrong wecom.corp_id (我的企业 → 企业ID)",
    40056: "wrong wecom.agent_id (the app's AgentId)",
    301002: "wrong wecom.agent_id, or the secret belongs to another app",
    48002: "the API is not allowed for this app (check the app's API permissions)",
    60011: "the app has no permission for this user (check the app's 可见范围)",
}
# The message itself cannot be delivered; it is dropped and the failure recorded on its task.
PERMANENT = {
    81013: "the user is outside the app's visible range (应用管理 → 智控未来 → 可见范围), or left the corp",
    40003: "invalid UserID",
    44004: "empty message text",
    45002: "message too long",
}


class WeComError(Exception):
    """``kind``: ``token`` (refetch), ``retry`` (back off), ``config`` (operator), ``permanent``,
    ``unknown`` (an errcode we do not know: a few retries, then treated as permanent)."""

    def __init__(self, errcode: int, errmsg: str, kind: str, hint: str = "") -> None:
        self.errcode, self.errmsg, self.kind, self.hint = errcode, errmsg, kind, hint
        super().__init__(f"WeCom API error {errcode} ({kind}): {errmsg}" + (f" -- {hint}" if hint else ""))


def classify(errcode: int, errmsg: str) -> WeComError:
    errmsg = _scrub(errmsg)
    if errcode in TOKEN_INVALID:
        return WeComError(errcode, errmsg, "token")
    if errcode in RETRY:
        return WeComError(errcode, errmsg, "retry")
    if errcode in CONFIG:
        hint = CONFIG[errcode]
        if errcode == 60020 and (m := re.search(r"from ip:\s*([0-9a-fA-F.:]+)", errmsg)):
            hint += f" ({m.group(1)})"
        return WeComError(errcode, errmsg, "config", hint)
    if errcode in PERMANENT:
        return WeComError(errcode, errmsg, "permanent", PERMANENT[errcode])
    # Unknown: retried a few times (the outbox gives up after UNKNOWN_TRIES), then recorded.
    return WeComError(errcode, errmsg, "unknown", "see https://developer.work.weixin.qq.com/devtool/query?e="
                      f"{errcode}")


def _scrub(text: str) -> str:
    """Errors may echo the request URL: never let an access_token or secret through."""
    text = re.sub(r"(access_token|corpsecret)=[^&\s,\]]+", r"\1=***", str(text))
    return text[:300]


class WeComApi:
    def __init__(self, cfg: WecomSettings, session: aiohttp.ClientSession, writer: Writer | None = None,
                 kv_db: Any = None, timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.session = session
        self.writer = writer
        self.kv_db = kv_db
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.base = cfg.api_base.rstrip("/")
        self._token: str | None = None
        self._expires = 0.0  # wall clock (seconds since the epoch)
        self._lock = asyncio.Lock()
        self.gettoken_calls = 0
        self.calls = 0
        self._key = f"token:{cfg.corp_id}:{cfg.agent_id}".encode()
        self._load_cached()

    # ---- token -------------------------------------------------------------------------------
    def _load_cached(self) -> None:
        if self.writer is None or self.kv_db is None:
            return
        with self.writer.env.begin() as txn:
            raw = txn.get(self._key, db=self.kv_db)
        if raw:
            try:
                d = cbor2.loads(raw)
                self._token, self._expires = str(d["t"]), float(d["exp"])
            except Exception:  # noqa: BLE001 - a bad cache entry is just a miss
                self._token, self._expires = None, 0.0

    def _fresh(self) -> bool:
        return self._token is not None and time.time() < self._expires - self.cfg.token_refresh_margin_s

    async def token(self, *, stale: str | None = None) -> str:
        """A valid access_token; ``stale`` = the token WeCom just rejected (refetch unless already new)."""
        async with self._lock:
            if self._fresh() and (stale is None or self._token != stale):
                assert self._token is not None
                return self._token
            if not self.cfg.secret:
                raise WeComError(0, "wecom.secret is not set", "config", "set wecom.secret or wecom.secret_file")
            self.gettoken_calls += 1
            data = await self._request("GET", "/cgi-bin/gettoken",
                                       params={"corpid": self.cfg.corp_id, "corpsecret": self.cfg.secret})
            code = int(data.get("errcode", 0) or 0)
            if code:
                err = classify(code, str(data.get("errmsg", "")))
                raise err if err.kind != "token" else WeComError(code, err.errmsg, "retry")
            token = data.get("access_token")
            if not isinstance(token, str) or not token:
                raise WeComError(-2, "gettoken answered without access_token", "retry")
            ttl = int(data.get("expires_in", 7200) or 7200)
            self._token, self._expires = token, time.time() + ttl
            log.info("wecom: new access_token (valid %d s)", ttl)
            if self.writer is not None and self.kv_db is not None:
                raw, key, db = cbor2.dumps({"t": token, "exp": self._expires}), self._key, self.kv_db
                await self.writer.write(lambda txn: txn.put(key, raw, db=db))
            return token

    # ---- calls -------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       json: Any = None) -> dict[str, Any]:
        self.calls += 1
        try:
            async with self.session.request(method, self.base + path, params=params, json=json,
                                            timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise WeComError(-resp.status, f"HTTP {resp.status} from WeCom API", "retry")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise WeComError(-3, f"network error calling WeCom API: {type(exc).__name__}", "retry") from None
        if not isinstance(data, dict):
            raise WeComError(-2, "WeCom API answered something that is not a JSON object", "retry")
        return data

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with the access_token; refetches the token once when WeCom says it is invalid."""
        token = await self.token()
        for attempt in (1, 2):
            data = await self._request("POST", path, params={"access_token": token}, json=body)
            code = int(data.get("errcode", 0) or 0)
            if not code:
                return data
            err = classify(code, str(data.get("errmsg", "")))
            if err.kind == "token" and attempt == 1:
                log.info("wecom: access_token rejected (%d); fetching a new one", code)
                token = await self.token(stale=token)
                continue
            if err.kind == "token":
                raise WeComError(code, err.errmsg, "retry")
            raise err
        raise AssertionError("unreachable")

    async def send_text(self, user: str, content: str) -> str:
        """``message/send`` a text message to one member; returns WeCom's msgid."""
        data = await self.call("/cgi-bin/message/send", {
            "touser": user, "msgtype": "text", "agentid": self.cfg.agent_id,
            "text": {"content": content}, "safe": 0,
        })
        invalid = data.get("invaliduser")
        if invalid:
            raise WeComError(81013, f"invaliduser: {str(invalid)[:64]}", "permanent", PERMANENT[81013])
        return str(data.get("msgid", ""))
