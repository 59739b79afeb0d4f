"""The fake WeCom API and the callback simulator (real sockets on 127.0.0.1, wechatpy's real crypto)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import xmltodict
from aiohttp import web
from wechatpy.enterprise import parse_message
from wechatpy.enterprise.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidSignatureException

from fakes.wecom import FakeWeCom, FakeWeComConfig, WeComSim, run_fake_wecom, signature
from tests.conftest import serve_app

TOKEN, AES, CORP, AGENT = "QDG6eK", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wx5823bf96d3bd56c7", 1000002
SECRET = "test-secret-Zq8wX1"


def crypto() -> WeChatCrypto:
    return WeChatCrypto(TOKEN, AES, CORP)


def decrypt(cb: Any) -> str:
    q = cb.query
    return crypto().decrypt_message(cb.body, q["msg_signature"], q["timestamp"], q["nonce"])


# ---- WeComSim ----------------------------------------------------------------------------------

def test_text_callback_decrypts_and_parses() -> None:
    sim = WeComSim(TOKEN, AES, CORP, AGENT)
    before = int(time.time())
    cb = sim.text("zhangsan", "你好 <b>&]]> world")
    assert set(cb.query) == {"msg_signature", "timestamp", "nonce"}
    assert before <= int(cb.query["timestamp"]) <= int(time.time()) and cb.query["nonce"].isdigit()
    env = xmltodict.parse(cb.body)["xml"]
    assert env["ToUserName"] == CORP and env["AgentID"] == str(AGENT)
    assert cb.query["msg_signature"] == signature(TOKEN, cb.query["timestamp"], cb.query["nonce"], env["Encrypt"])
    inner = decrypt(cb)
    assert inner == cb.inner
    msg = parse_message(inner)
    assert msg.type == "text" and msg.source == "zhangsan" and msg.target == CORP
    assert msg.content == "你好 <b>&]]> world" and msg.agent == AGENT
    assert msg.id > 0 and before <= msg.time <= int(time.time())
    other = parse_message(decrypt(sim.text("zhangsan", "x", msg_id=42, create_time=1700000000)))
    assert other.id == 42 and other.time == 1700000000
    assert len({parse_message(decrypt(WeComSim(TOKEN, AES, CORP, AGENT).text("u", "x"))).id
                for _ in range(20)}) == 20  # unique across simulators


def test_events_media_and_url_check() -> None:
    sim = WeComSim(TOKEN, AES, CORP, AGENT)
    ev = parse_message(decrypt(sim.event("lisi", "enter_agent", create_time=1700000001)))
    assert ev.type == "event" and ev.event == "enter_agent" and ev.source == "lisi" and ev.time == 1700000001
    assert "<MsgId>" not in sim.event("lisi", "subscribe").inner
    img = parse_message(decrypt(sim.media("lisi", "image")))
    assert img.type == "image" and img.image.startswith("https://") and img.media_id and img.id
    voice = parse_message(decrypt(sim.media("lisi", "voice")))
    assert voice.type == "voice" and voice.format == "amr" and voice.media_id
    loc = parse_message(decrypt(sim.media("lisi", "location")))
    assert loc.type == "location" and tuple(map(float, loc.location)) == (23.134521, 113.358803)
    assert int(loc.scale) == 20 and loc.label
    for kind in ("video", "file", "link"):
        raw = xmltodict.parse(decrypt(sim.media("lisi", kind)))["xml"]
        assert raw["MsgType"] == kind and int(raw["MsgId"]) > 0
    with pytest.raises(ValueError):
        sim.media("lisi", "sticker")
    q = sim.url_check("1616140317555161061")
    assert crypto().check_signature(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"]) == \
        "1616140317555161061"


def test_again_is_identical_or_freshly_signed() -> None:
    cb = WeComSim(TOKEN, AES, CORP, AGENT).text("wangwu", "同一个问题", create_time=int(time.time()) - 5)
    same = cb.again(fresh_signature=False)
    assert same.query == cb.query and same.body == cb.body and same.inner == cb.inner
    fresh = cb.again(fresh_signature=True)
    assert fresh.query["msg_signature"] != cb.query["msg_signature"] and fresh.query["nonce"] != cb.query["nonce"]
    assert fresh.body != cb.body
    assert decrypt(fresh) == decrypt(cb) == cb.inner  # same MsgId, CreateTime, content
    with pytest.raises(InvalidSignatureException):  # the old signature does not fit the new body
        crypto().decrypt_message(fresh.body, cb.query["msg_signature"], fresh.query["timestamp"],
                                 fresh.query["nonce"])


async def test_post_sends_query_and_body() -> None:
    got: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        got["query"], got["body"] = dict(request.query), await request.read()
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/wecom/callback", handler)
    runner, port = await serve_app(app, access_log=None)
    try:
        cb = WeComSim(TOKEN, AES, CORP, AGENT).text("u1", "hi")
        async with aiohttp.ClientSession() as s:
            assert await cb.post(s, f"http://127.0.0.1:{port}/wecom/callback") == (200, "")
        assert got == {"query": cb.query, "body": cb.body}
    finally:
        await runner.cleanup()


# ---- the fake API ------------------------------------------------------------------------------

@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeWeCom, aiohttp.ClientSession]]:
    cfg = FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=AGENT, per_min=3, per_hour=5)
    async with run_fake_wecom(cfg) as fw, aiohttp.ClientSession() as s:
        assert fw.url.startswith("http://127.0.0.1:") and not fw.url.endswith(":0")
        yield fw, s


async def gettoken(fw: FakeWeCom, s: aiohttp.ClientSession, corpid: str = CORP,
                   secret: str = SECRET) -> dict[str, Any]:
    async with s.get(f"{fw.url}/cgi-bin/gettoken", params={"corpid": corpid, "corpsecret": secret}) as r:
        assert r.status == 200
        return await r.json()


async def send(fw: FakeWeCom, s: aiohttp.ClientSession, token: str | None, user: str = "u1",
               content: str = "hi", **over: Any) -> dict[str, Any]:
    body = {"touser": user, "msgtype": "text", "agentid": AGENT, "text": {"content": content}, "safe": 0, **over}
    params = {"access_token": token} if token is not None else {}
    async with s.post(f"{fw.url}/cgi-bin/message/send", params=params, json=body) as r:
        assert r.status == 200
        return await r.json()


async def test_tokens_and_auth_errors(api: tuple[FakeWeCom, aiohttp.ClientSession]) -> None:
    fw, s = api
    t = await gettoken(fw, s)
    assert t["errcode"] == 0 and t["errmsg"] == "ok" and t["expires_in"] == 7200 and len(t["access_token"]) > 32
    assert (await gettoken(fw, s))["access_token"] == t["access_token"]  # same token while valid
    assert (await gettoken(fw, s, corpid="wwwrong"))["errcode"] == 40013
    bad = await gettoken(fw, s, secret="wrong")
    assert bad["errcode"] == 40001 and "wrong" not in bad["errmsg"] and "from ip: 127.0.0.1" in bad["errmsg"]
    assert fw.stats.gettoken == 4
    tok = t["access_token"]
    ok = await send(fw, s, tok)
    assert ok["errcode"] == 0 and ok["errmsg"] == "ok" and ok["msgid"]
    assert (await send(fw, s, None))["errcode"] == 41001
    assert (await send(fw, s, "not-a-token"))["errcode"] == 40014
    assert (await send(fw, s, tok, agentid=999))["errcode"] in (40056, 301002)
    assert (await send(fw, s, tok, agentid="x"))["errcode"] == 40056
    assert (await send(fw, s, tok, msgtype="markdown"))["errcode"] == 40008
    assert (await send(fw, s, tok, content=""))["errcode"] == 44004
    fw.expire_tokens()
    assert (await send(fw, s, tok))["errcode"] == 42001
    t2 = await gettoken(fw, s)
    assert t2["access_token"] != tok and (await send(fw, s, t2["access_token"]))["errcode"] == 0
    [first, second] = fw.sends
    assert first.token == tok and second.token == t2["access_token"] and first.agentid == AGENT
    assert first.user == "u1" and first.content == first.raw == "hi" and first.msgid == ok["msgid"]
    assert not first.truncated and not first.dropped and abs(first.ts - time.time()) < 5
    assert tok not in repr(first)
    assert fw.stats.sends == 9 and fw.stats.errors == 7 + 2


async def test_truncation_at_a_character_boundary(api: tuple[FakeWeCom, aiohttp.ClientSession]) -> None:
    fw, s = api
    tok = (await gettoken(fw, s))["access_token"]
    fits = "字" * 682 + "ab"  # 2046 + 2 = 2048 bytes: kept whole
    long = "a" + "字" * 700  # 2101 bytes: cut to 1 + 682 * 3 = 2047 bytes
    assert (await send(fw, s, tok, content=fits))["errcode"] == 0
    assert (await send(fw, s, tok, content=long))["errcode"] == 0  # silently
    kept, cut = fw.sends
    assert kept.content == fits and not kept.truncated
    assert cut.truncated and cut.raw == long and cut.content == "a" + "字" * 682
    assert len(cut.content.encode()) == 2047 and fw.stats.truncated == 1


async def test_rate_limit_drops_silently(api: tuple[FakeWeCom, aiohttp.ClientSession]) -> None:
    fw, s = api
    tok = (await gettoken(fw, s))["access_token"]
    for i in range(5):  # per_min=3
        assert (await send(fw, s, tok, content=f"m{i}"))["errcode"] == 0
    assert (await send(fw, s, tok, user="u2", content="other"))["errcode"] == 0  # per member
    assert [m.content for m in fw.delivered("u1")] == ["m0", "m1", "m2"]
    assert [m.dropped for m in fw.sends] == [False, False, False, True, True, False]
    assert fw.stats.dropped == 2 and len(fw.delivered()) == 4 and len(fw.sends) == 6
    assert [m.content for m in await fw.wait_sends(1, user="u2")] == ["other"]


async def test_per_hour_limit(api: tuple[FakeWeCom, aiohttp.ClientSession]) -> None:
    fw, s = api
    fw.cfg.per_min = 100  # per_hour=5
    tok = (await gettoken(fw, s))["access_token"]
    for i in range(7):
        await send(fw, s, tok, content=f"m{i}")
    assert len(fw.delivered("u1")) == 5 and fw.stats.dropped == 2


async def test_fail_next_fail_user_and_deny_ip(api: tuple[FakeWeCom, aiohttp.ClientSession]) -> None:
    fw, s = api
    fw.cfg.per_min = 100
    tok = (await gettoken(fw, s))["access_token"]
    fw.fail_next(2, 45009)
    fw.fail_next(1, -1)
    assert [(await send(fw, s, tok))["errcode"] for _ in range(4)] == [45009, 45009, -1, 0]
    fw.fail_user("outsider", 81013)
    r = await send(fw, s, tok, user="outsider")
    assert r["errcode"] == 81013 and r["invaliduser"] == "outsider"
    r = await send(fw, s, tok, user="outsider|u3")  # partly invalid: sent, invalid ones reported
    assert r["errcode"] == 0 and r["invaliduser"] == "outsider" and [m.user for m in fw.delivered()] == ["u1", "u3"]
    fw.fail_user("outsider", None)
    assert (await send(fw, s, tok, user="outsider"))["errcode"] == 0
    fw.deny_ip = True
    for answer in (await send(fw, s, tok), await gettoken(fw, s)):
        assert answer["errcode"] == 60020
        msg = answer["errmsg"]
        assert msg.startswith("not allow to access from your ip, hint: [") and ", from ip: 127.0.0.1, " in msg
        assert msg.endswith("more info at https://open.work.weixin.qq.com/devtool/query?e=60020")
    fw.deny_ip = False
    assert (await send(fw, s, tok))["errcode"] == 0
    assert [m.user for m in fw.delivered()] == ["u1", "u3", "outsider", "u1"]


async def test_wait_sends_wakes_up_and_times_out(api: tuple[FakeWeCom, aiohttp.ClientSession]) -> None:
    fw, s = api
    tok = (await gettoken(fw, s))["access_token"]
    waiter = asyncio.create_task(fw.wait_sends(2, user="u1", timeout=5))
    await send(fw, s, tok, content="one")
    for _ in range(20):  # loop passes (no time) for the waiter to wake up, look and wait again
        await asyncio.sleep(0)
    assert not waiter.done()
    await send(fw, s, tok, content="two")
    assert [m.content for m in await waiter] == ["one", "two"]
    t0 = time.perf_counter()
    with pytest.raises(AssertionError, match=r"2 of 3 expected .* user 'u1' .*'one'"):
        await fw.wait_sends(3, user="u1", timeout=0.2)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(AssertionError, match="0 of 1"):
        await fw.wait_sends(1, user="nobody", timeout=0.05)
