"""WeCom self-built app end to end: encrypted callbacks into the real edge (wechatpy crypto), the real
broker, node and a fake LM Studio, answers out through a fake WeCom API server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.keys import BRIDGE, STORE, WECOM
from edge.store import FINAL
from fakes.wecom import FakeWeComConfig, WeComSim, run_fake_wecom
from fakes.llm import FakeLLMConfig
from tests.conftest import System, run_system, wait_until

pytestmark = pytest.mark.integration

TOKEN, AES, CORP, AGENT = "QDG6eK", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wx5823bf96d3bd56c7", 1000002
SECRET = "test-secret-Zq8wX1"


def wecom_over(url: str, **kw: Any) -> dict[str, Any]:
    return {"wecom": {"corp_id": CORP, "agent_id": AGENT, "secret": SECRET, "token": TOKEN,
                      "encoding_aes_key": AES, "api_base": url, **kw}}


@contextlib.asynccontextmanager
async def wecom_system(tmp: Path, pki: Path, *, fake_cfg: Any = None, fw_cfg: Any = None, start_node: bool = True,
                       wecom: dict[str, Any] | None = None, **over: Any) -> AsyncIterator[tuple[System, Any, str]]:
    cfg = fw_cfg or FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=AGENT)
    async with run_fake_wecom(cfg) as fw, run_system(tmp, pki, fake_cfg=fake_cfg, start_node=start_node,
                                                     **wecom_over(fw.url, **(wecom or {})), **over) as sys_:
        yield sys_, fw, f"{sys_.http}/wecom/callback"


def sim() -> WeComSim:
    return WeComSim(TOKEN, AES, CORP, AGENT)


def tasks_of(sys_: System, user: str) -> list[Any]:
    return sys_.app[STORE].history(f"wc.{user}")


# ---- URL verification and the official vector --------------------------------------------------

async def test_official_vector_url_check_through_http(tmp_path: Path, pki_dir: Path) -> None:
    q = {"msg_signature": "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3", "timestamp": "1409659589",
         "nonce": "263014780",
         "echostr": "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ=="}
    # (the vector's timestamp is from 2014: the time window is off here; test_edge_security checks it)
    async with wecom_system(tmp_path, pki_dir, wecom={"replay_window_s": 0}) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        async with s.get(url, params=q) as r:
            assert r.status == 200
            assert await r.text() == "1616140317555161061"
        assert time.perf_counter() - t0 < 1.0  # WeCom wants the answer within 1 s
        async with s.get(url, params={**q, "msg_signature": "0" * 40}) as r:
            assert r.status == 403
        async with s.get(url, params={k: v for k, v in q.items() if k != "echostr"}) as r:
            assert r.status == 400


async def test_official_vector_message_decrypts_through_http(tmp_path: Path, pki_dir: Path) -> None:
    body = ("<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName><Encrypt><![CDATA[RypEvHKD8QQKFhvQ6QleEB4J58t"
            "iPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt6"
            "6wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5m"
            "ZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22"
            "Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07"
            "+qN+E7Q==]]></Encrypt><AgentID><![CDATA[218]]></AgentID></xml>")
    q = {"msg_signature": "477715d11cdb4164915debcba66cb864d751f3e6", "timestamp": "1409659813", "nonce": "1372623149"}
    fw_cfg = FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=218)
    async with wecom_system(tmp_path, pki_dir, fw_cfg=fw_cfg, fake_cfg=FakeLLMConfig(reply="你好！"),
                            wecom={"agent_id": 218, "replay_window_s": 0}) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        async with s.post(url, params=q, data=body.encode()) as r:
            assert r.status == 200 and await r.text() == ""
        [task] = tasks_of(sys_, "mycreate")
        assert task.text == "hello"
        await fw.wait_sends(1, user="mycreate")
        assert fw.delivered("mycreate")[0].content == "你好！"
    # The same vector with the default replay window: a 2014 timestamp is a replay → 403, no task.
    async with wecom_system(tmp_path / "2", pki_dir, fw_cfg=fw_cfg, wecom={"agent_id": 218}) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        async with s.post(url, params=q, data=body.encode()) as r:
            assert r.status == 403
        assert tasks_of(sys_, "mycreate") == []


# ---- the main flow ------------------------------------------------------------------------------

async def test_callback_to_message_send_and_retries_give_one_answer(tmp_path: Path, pki_dir: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reply = "这是答案。"
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply=reply, tokens_per_s=200)) as \
            (sys_, fw, url), aiohttp.ClientSession() as s:
        w = sim()
        cb = w.text("zhangsan", "你好，请介绍一下你自己")
        times = []
        for attempt in (cb, cb.again(fresh_signature=False), cb.again(fresh_signature=True)):
            t0 = time.perf_counter()
            status, text = await attempt.post(s, url)
            times.append(time.perf_counter() - t0)
            assert status == 200 and text == ""
        assert max(times) < 1.0
        [task] = tasks_of(sys_, "zhangsan")  # each callback is answered after it was recorded: one task
        await wait_until(lambda: (sys_.app[STORE].get(task.id).delivery or {}).get("status") == "sent", 10)
        await _all_sent(sys_, "zhangsan")  # nothing else is left to send: every delivery happened
        assert [m.content for m in fw.delivered("zhangsan")] == [reply]  # exactly one answer
        task = sys_.app[STORE].get(task.id)
        assert task.status == "ok" and task.answer == reply and task.ch == "wc"
        assert sys_.app[WECOM].stats.get("duplicates") == 2
        assert fw.stats.gettoken == 1
    logs = caplog.text
    token = fw.sends[0].token
    for secret in (SECRET, AES, token):
        assert secret not in logs


async def test_retry_after_edge_restart_still_one_answer(tmp_path: Path, pki_dir: Path) -> None:
    w = sim()
    cb = w.text("lisi", "第一个问题")
    cfg = FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=AGENT)
    async with run_fake_wecom(cfg) as fw:
        async with run_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="答一"), **wecom_over(fw.url)) as sys_, \
                aiohttp.ClientSession() as s:
            assert (await cb.post(s, f"{sys_.http}/wecom/callback"))[0] == 200
            await fw.wait_sends(1, user="lisi")
        # edge (and everything) restarted on the same data dir; WeCom retries the same message
        async with run_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="答一"), **wecom_over(fw.url)) as sys_, \
                aiohttp.ClientSession() as s:
            await _all_sent(sys_, "lisi")  # the restarted outbox has nothing left for lisi (nothing to send again)
            assert (await cb.again(fresh_signature=True).post(s, f"{sys_.http}/wecom/callback"))[0] == 200
            [task] = tasks_of(sys_, "lisi")  # the retry is answered after the dedup check: no second task
            assert (sys_.app[STORE].get(task.id).delivery or {}).get("status") == "sent"
            await _all_sent(sys_, "lisi")
        assert [m.content for m in fw.delivered("lisi")] == ["答一"]
        assert fw.stats.gettoken == 1  # the access_token came from the LMDB cache after the restart


async def test_long_answer_with_code_block_arrives_in_ordered_parts(tmp_path: Path, pki_dir: Path) -> None:
    code = "```python\ndef 求和(a, b):\n    # 把两个数相加\n    return a + b\n\nprint(求和(1, 2))\n```"
    para = "这是一个很长的回答中的一段，用来测试分段发送是否正确。" * 16
    answer = "\n\n".join([f"## 第{i}部分\n\n{para}" for i in range(1, 7)] + [code] +
                         [f"{para}" for _ in range(6)])
    assert len(answer) > 5000
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply=answer, tokens_per_s=0,
                                                                      token_chars=50)) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        await sim().text("wangwu", "写一篇长文").post(s, url)
        [task] = await _wait_tasks(sys_, "wangwu")
        await wait_until(lambda: sys_.app[STORE].get(task.id).delivery is not None, 10)
        n = sys_.app[STORE].get(task.id).delivery["parts"]
        assert n >= 4
        await fw.wait_sends(n, user="wangwu")
        parts = [m.content for m in fw.delivered("wangwu")]
    assert len(parts) == n
    assert all(len(p.encode()) <= 2048 for p in parts)
    assert not any(m.truncated or m.dropped for m in fw.sends)
    assert [p.split(" ", 1)[0] for p in parts] == [f"({i}/{n})" for i in range(1, n + 1)]
    with_code = [p for p in parts if "def 求和(a, b):" in p]
    assert len(with_code) == 1 and "print(求和(1, 2))" in with_code[0] and "return a + b" in with_code[0]
    assert "```" not in "".join(parts) and "## " not in "".join(parts)  # markdown turned into plain text


async def _wait_tasks(sys_: System, user: str, n: int = 1) -> list[Any]:
    await wait_until(lambda: len(tasks_of(sys_, user)) >= n, 10)
    return tasks_of(sys_, user)


async def _all_sent(sys_: System, user: str) -> None:
    """A barrier instead of "wait a moment, then check that nothing more came": every task of ``user`` has
    ended and its delivery is over, and the outbox holds nothing for ``user`` and is not sending. With no
    callback coming in, nothing more can be delivered to ``user`` after this."""
    store, outbox = sys_.app[STORE], sys_.app[WECOM].outbox

    def over() -> bool:
        tasks = [store.get(t.id) for t in tasks_of(sys_, user)]
        return (all(t.status in FINAL and (t.delivery or {}).get("status") in ("sent", "failed") for t in tasks)
                and not outbox.pending(user) and user not in outbox._sending)

    await wait_until(over, 15)


# ---- bad input ----------------------------------------------------------------------------------

async def test_bad_callbacks_are_refused_and_create_nothing(tmp_path: Path, pki_dir: Path) -> None:
    async with wecom_system(tmp_path, pki_dir) as (sys_, fw, url), aiohttp.ClientSession() as s:
        w = sim()
        good = w.text("mallory", "hi")
        bad_sig = {**good.query, "msg_signature": "f" * 40}
        async with s.post(url, params=bad_sig, data=good.body) as r:
            assert r.status == 403
        async with s.post(url, params=good.query, data=b"<xml><Encrypt>not closed") as r:
            assert r.status == 400
        async with s.post(url, params=good.query, data=b"{\"json\": true}") as r:
            assert r.status == 400
        async with s.post(url, params=good.query, data=b"<xml>" + b"A" * (70 * 1024) + b"</xml>") as r:
            assert r.status == 413
        other = WeComSim(TOKEN, "a" * 43, CORP, AGENT).text("mallory", "wrong key")  # signed right, bad AES
        async with s.post(url, params=other.query, data=other.body) as r:
            assert r.status == 400
        wrong_corp = WeComSim(TOKEN, AES, "wwotherCorp00001", AGENT).text("mallory", "other corp")
        async with s.post(url, params=wrong_corp.query, data=wrong_corp.body) as r:
            assert r.status == 400
        async with s.post(url, params={}, data=good.body) as r:
            assert r.status == 400
        assert tasks_of(sys_, "mallory") == []
        # the good one goes through once; replaying it later is answered 200 and creates nothing
        assert (await good.post(s, url))[0] == 200
        await fw.wait_sends(1, user="mallory")
        for _ in range(3):
            assert (await good.again(fresh_signature=True).post(s, url))[0] == 200
        assert len(tasks_of(sys_, "mallory")) == 1  # each callback is answered after its dedup check
        await _all_sent(sys_, "mallory")
        assert len(fw.delivered("mallory")) == 1
        st = sys_.app[WECOM].stats
        assert st["http_403"] == 1 and st["http_400"] == 5 and st["http_413"] == 1


# ---- WeCom API failures -------------------------------------------------------------------------

async def test_token_expiry_and_rate_limit_errors_are_retried(tmp_path: Path, pki_dir: Path) -> None:
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="好的")) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        await sim().text("zhaoliu", "一").post(s, url)
        await fw.wait_sends(1, user="zhaoliu")
        fw.expire_tokens()  # → 42001 → new token → sent
        await sim().text("zhaoliu", "二").post(s, url)
        await fw.wait_sends(2, user="zhaoliu")
        assert fw.stats.gettoken == 2
        fw.fail_next(2, 45009)
        await sim().text("zhaoliu", "三").post(s, url)
        await fw.wait_sends(3, user="zhaoliu", timeout=15)
        fw.fail_next(1, -1)
        await sim().text("zhaoliu", "四").post(s, url)
        await fw.wait_sends(4, user="zhaoliu", timeout=15)
        assert [m.content for m in fw.delivered("zhaoliu")] == ["好的"] * 4
        assert sys_.app[WECOM].outbox.retries >= 3


async def test_permanent_and_operator_errors_are_recorded_with_hints(tmp_path: Path, pki_dir: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="答")) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        fw.fail_user("outsider", 81013)
        await sim().text("outsider", "你好").post(s, url)
        [task] = await _wait_tasks(sys_, "outsider")
        await wait_until(lambda: (sys_.app[STORE].get(task.id).delivery or {}).get("status") == "failed", 10)
        d = sys_.app[STORE].get(task.id).delivery
        assert d["code"] == 81013 and "visible range" in d["hint"]
        fw.deny_ip = True
        await sim().text("qianqi", "你好").post(s, url)
        [task2] = await _wait_tasks(sys_, "qianqi")
        await wait_until(lambda: (sys_.app[STORE].get(task2.id).delivery or {}).get("status") == "retrying", 10)
        d2 = sys_.app[STORE].get(task2.id).delivery
        assert d2["code"] == 60020 and "企业可信IP" in d2["hint"] and "127.0.0.1" in d2["hint"]
        assert "企业可信IP" in caplog.text
        assert sys_.app[WECOM].outbox.pending("qianqi") == 1  # kept, not dropped
    assert SECRET not in caplog.text


# ---- pacing, offline, events, commands ----------------------------------------------------------

async def test_excess_messages_wait_instead_of_being_dropped(tmp_path: Path, pki_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    async with wecom_system(tmp_path, pki_dir, wecom={"per_user_per_min": 5}) as (sys_, fw, url):
        outbox = sys_.app[WECOM].outbox
        calls: list[str] = []  # send attempts, counted as the worker makes them
        send_text = outbox.api.send_text

        def counting(user: str, text: str) -> Any:
            calls.append(text)
            return send_text(user, text)

        monkeypatch.setattr(outbox.api, "send_text", counting)
        fifth = asyncio.Event()
        outbox.on_sent.append(lambda msg: fifth.set() if outbox.sent == 5 else None)
        await outbox.put("pacer", [f"消息 {i}" for i in range(8)])
        await asyncio.wait_for(fifth.wait(), 15)
        # The worker ran on from the fifth's record (in the same step) to its next message: it either started
        # sending it (a call counted above) or is waiting for the pace. Waiting it is:
        assert calls == [f"消息 {i}" for i in range(5)]
        assert [m.content for m in fw.delivered("pacer")] == [f"消息 {i}" for i in range(5)]
        assert outbox.pending("pacer") == 3 and fw.stats.dropped == 0
        assert 55 < outbox.wait_time("pacer") <= 60


async def test_node_offline_user_told_at_once_then_answered(tmp_path: Path, pki_dir: Path) -> None:
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="离线后的回答"),
                            start_node=False) as (sys_, fw, url), aiohttp.ClientSession() as s:
        assert not sys_.app[BRIDGE].node_online
        await sim().text("sunba", "在吗").post(s, url)
        await fw.wait_sends(1, user="sunba")
        assert "离线" in fw.delivered("sunba")[0].content and "排队" in fw.delivered("sunba")[0].content
        sys_.node_task = asyncio.create_task(sys_.node.run())  # server B comes back
        await fw.wait_sends(2, user="sunba", timeout=15)
        assert fw.delivered("sunba")[1].content == "离线后的回答"


async def test_pending_questions_per_user_are_bounded_with_a_clear_reply(tmp_path: Path, pki_dir: Path) -> None:
    """edge.max_pending_per_user holds for WeCom too: over it, a message gets one clear reply (and its retry
    nothing), no task; the queued ones are answered when the node is back."""
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="答"), start_node=False,
                            edge={"max_pending_per_user": 2}, wecom={"offline_notice": ""}) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        w = sim()
        for q in ("一", "二"):
            assert (await w.text("zhouqi", q).post(s, url))[0] == 200
        third = w.text("zhouqi", "三")
        for attempt in (third, third.again(fresh_signature=True)):
            assert (await attempt.post(s, url))[0] == 200
        await fw.wait_sends(1, user="zhouqi")
        assert "过多" in fw.delivered("zhouqi")[0].content
        assert [t.text for t in tasks_of(sys_, "zhouqi")] == ["二", "一"]
        sys_.node_task = asyncio.create_task(sys_.node.run())
        await fw.wait_sends(3, user="zhouqi", timeout=15)
        await _all_sent(sys_, "zhouqi")
        assert [m.content for m in fw.delivered("zhouqi")][1:] == ["答", "答"]


async def test_events_media_and_commands(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=400, tokens_per_s=40)
    async with wecom_system(tmp_path, pki_dir, fake_cfg=cfg) as (sys_, fw, url), aiohttp.ClientSession() as s:
        w = sim()
        now = int(time.time())
        for t in (now, now, now + 5):  # the same event retried, then entering again later that day
            assert (await w.event("zhou", "enter_agent", create_time=t).post(s, url))[0] == 200
        assert (await w.media("zhou", "image").post(s, url))[0] == 200
        assert (await w.text("zhou", "/help").post(s, url))[0] == 200
        await fw.wait_sends(3, user="zhou")
        got = [m.content for m in fw.delivered("zhou")]
        assert "智控未来" in got[0]  # welcome once
        assert "图片" in got[1] and "文字" in got[1]
        assert "/new" in got[2] and "/stop" in got[2]
        # every other kind of media gets a polite note naming it, and creates no task
        kinds = {"voice": "语音", "video": "视频", "file": "文件", "location": "位置", "link": "链接"}
        for kind in kinds:
            assert (await w.media("wu", kind).post(s, url))[0] == 200
        await fw.wait_sends(len(kinds), user="wu")
        assert [m.content for m in fw.delivered("wu")] == [
            f"抱歉，目前还不支持{name}消息。请直接用文字描述您的问题，我会尽快回答。" for name in kinds.values()]
        assert tasks_of(sys_, "wu") == []
        # /stop cancels a running answer end to end (LM Studio stream closed)
        await w.text("zhou", "写一篇很长的文章").post(s, url)
        [task] = await _wait_tasks(sys_, "zhou")
        await wait_until(lambda: sys_.fake.stats.active_streams == 1, 10)
        await w.text("zhou", "/stop").post(s, url)
        await wait_until(lambda: sys_.app[STORE].get(task.id).status == "cancelled", 10)
        await fw.wait_sends(4, user="zhou")
        assert "已停止" in fw.delivered("zhou")[3].content
        await wait_until(lambda: sys_.fake.stats.client_closed >= 1, 5)
        # /new starts a new conversation: the next task carries another conv id
        await w.text("zhou", "/new").post(s, url)
        await fw.wait_sends(5, user="zhou")
        assert "新的对话" in fw.delivered("zhou")[4].content
        await w.text("zhou", "新问题").post(s, url)
        tasks = await _wait_tasks(sys_, "zhou", 2)
        assert tasks[0].conv and tasks[0].conv != tasks[1].conv
        assert fw.stats.dropped == 0  # (a message the fake dropped would not be among those waited for above)


async def test_progressive_mode_sends_finished_paragraphs_while_generating(tmp_path: Path, pki_dir: Path) -> None:
    from edge.wecom.shape import to_plain

    paras = [f"第{i}段：" + "这一段讲述一个要点，并给出解释。" * 12 for i in range(1, 7)]
    answer = "\n\n".join(paras[:3] + ["```\nprint('代码块')\n```"] + paras[3:])
    cfg = FakeLLMConfig(reply=answer, tokens_per_s=60, token_chars=20)  # ~1.6 s of generation
    async with wecom_system(tmp_path, pki_dir, fake_cfg=cfg,
                            wecom={"progressive": True, "progressive_min_bytes": 400}) as (sys_, fw, url), \
            aiohttp.ClientSession() as s:
        await sim().text("progress", "讲讲要点").post(s, url)
        [task] = await _wait_tasks(sys_, "progress")
        await fw.wait_sends(1, user="progress", timeout=10)
        assert sys_.app[STORE].get(task.id).status not in ("ok", "error")  # the first part came before the end
        await wait_until(lambda: (sys_.app[STORE].get(task.id).delivery or {}).get("status") == "sent", 15)
        msgs = [m.content for m in fw.delivered("progress")]
    n = len(msgs)
    assert n >= 3 and all(len(m.encode()) <= 2048 for m in msgs)
    assert [m.split(" ", 1)[0] for m in msgs] == [f"({i})" for i in range(1, n)] + [f"({n}/{n})"]
    body = "".join(m.split(" ", 1)[1] for m in msgs)
    got, want = "".join(body.split()), "".join(to_plain(answer).split())
    assert got == want, f"{len(got)} vs {len(want)} chars; parts: {[m[:30] for m in msgs]}"  # once, in order


# ---- regressions from review: slow bodies, odd signatures, malformed fields ---------------------

async def _raw_post(port: int, path: str, head_extra: str, pieces: list[bytes]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n{head_extra}"
                 "Connection: close\r\n\r\n".encode())
    for piece in pieces:  # each piece in its own TCP segment, a moment apart
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    resp = await reader.read()
    writer.close()
    return resp.split(b"\r\n", 1)[0]


async def test_body_in_several_segments_and_chunked_oversize(tmp_path: Path, pki_dir: Path) -> None:
    from urllib.parse import urlencode
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="分段收到")) as (sys_, fw, url):
        port = int(sys_.http.rsplit(":", 1)[1])
        cb = sim().text("slowpoke", "慢慢发")
        path = f"/wecom/callback?{urlencode(cb.query)}"
        status = await _raw_post(port, path, f"Content-Length: {len(cb.body)}\r\n", [cb.body[:100], cb.body[100:]])
        assert b" 200 " in status + b" "  # the whole body was read, not just the first segment
        await fw.wait_sends(1, user="slowpoke")
        big = b"<xml><Encrypt>" + b"A" * 70000 + b"</Encrypt></xml>"
        chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in (big[:1000], big[1000:])] + [b"0\r\n\r\n"]
        status = await _raw_post(port, path, "Transfer-Encoding: chunked\r\n", chunks)
        assert b"413" in status
        assert len(tasks_of(sys_, "slowpoke")) == 1


async def test_non_ascii_signature_and_malformed_fields_are_refused(tmp_path: Path, pki_dir: Path) -> None:
    async with wecom_system(tmp_path, pki_dir) as (sys_, fw, url), aiohttp.ClientSession() as s:
        good = sim().text("odd", "hi")
        async with s.post(url, params={**good.query, "msg_signature": "é" * 40}, data=good.body) as r:
            assert r.status == 403
        w = sim()
        mid = _msg_id(good.inner)
        bad_id = w.wrap(good.inner.replace(mid, "abc"))
        assert "abc" in bad_id.inner
        async with s.post(url, params=bad_id.query, data=bad_id.body) as r:
            assert r.status == 400
        assert tasks_of(sys_, "odd") == []


def _msg_id(inner: str) -> str:
    import re
    m = re.search(r"<MsgId>(?:<!\[CDATA\[)?(\d+)", inner)
    assert m
    return m.group(1)
