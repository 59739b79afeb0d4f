"""node.llm against the real fake LM Studio (node.fakellm) on 127.0.0.1:0 -- no mocks."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from node.fakellm import DEMO_INTRO, DEMO_MODEL, FakeLLM, FakeLLMConfig, reply_tokens, run_fake_llm
from node.llm import (
    LLM_BAD_RESPONSE,
    LLM_DROPPED,
    LLM_EMPTY,
    LLM_HTTP,
    LLM_NO_MODEL,
    LLM_STALL,
    LLM_STREAM_ERROR,
    LLM_UNREACHABLE,
    LLMError,
    StreamEvent,
    list_models,
    stream_chat,
)

pytestmark = pytest.mark.timeout(20)

BOUND = 5.0  # every failure must surface well within this many seconds
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好, what is 2+2?"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with run_fake_llm(FakeLLMConfig()) as f:
        yield f


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as c:
        yield c


async def collect(client: aiohttp.ClientSession, url: str, *, fake: dict | None = None, **kw: Any) -> list[StreamEvent]:
    kw.setdefault("model", "fake-model")
    kw.setdefault("messages", MSGS)
    kw.setdefault("stall_timeout", 2.0)
    kw.setdefault("first_token_timeout", 3.0)
    kw.setdefault("connect_timeout", 1.0)
    extra = dict(kw.pop("extra", None) or {})
    if fake is not None:
        extra["fake"] = fake
    return [ev async for ev in stream_chat(client, url, extra=extra or None, **kw)]


async def fails(client: aiohttp.ClientSession, url: str, code: str, **kw: Any) -> tuple[LLMError, float]:
    t0 = time.monotonic()
    with pytest.raises(LLMError) as ei:
        await collect(client, url, **kw)
    elapsed = time.monotonic() - t0
    assert ei.value.code == code, (ei.value.code, str(ei.value))
    assert elapsed < BOUND
    assert ei.value.user_message and any("\u4e00" <= ch <= "\u9fff" for ch in ei.value.user_message)
    return ei.value, elapsed


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if e.kind == "text")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- happy paths


async def test_normal_stream_exact_text_and_usage(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    reply = "Hello, 世界! This is a streamed reply.\n第二行。"
    events = await collect(client, fake.url, fake={"reply": reply})
    assert text_of(events) == reply
    texts = [e for e in events if e.kind == "text"]
    assert [e.text for e in texts] == reply_tokens(FakeLLMConfig(reply=reply), MSGS)
    assert len(texts) > 5  # really streamed in pieces
    last = events[-1]
    assert last.kind == "usage" and last.finish_reason == "stop"
    assert last.usage is not None and last.usage["completion_tokens"] == len(texts)
    assert last.usage["total_tokens"] == last.usage["prompt_tokens"] + last.usage["completion_tokens"]
    assert [e.kind for e in events].count("usage") == 1
    body = fake.stats.last_request
    assert body is not None
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "fake-model" and body["messages"] == MSGS
    assert "max_tokens" not in body  # -1 = unlimited → omitted
    assert "Authorization" not in fake.stats.last_headers
    assert fake.stats.streams_completed == 1 and fake.stats.active_streams == 0


async def test_default_reply_is_deterministic(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    a = await collect(client, fake.url, fake={"n_tokens": 7})
    b = await collect(client, fake.url, fake={"n_tokens": 7})
    expected = reply_tokens(FakeLLMConfig(n_tokens=7), MSGS)
    assert [e.text for e in a if e.kind == "text"] == expected
    assert text_of(a) == text_of(b) and len(text_of(a)) == 7 * 4
    other = await collect(client, fake.url, fake={"n_tokens": 7}, messages=[{"role": "user", "content": "x"}])
    assert text_of(other) != text_of(a)


async def test_reasoning_max_tokens_and_no_usage(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    events = await collect(client, fake.url, fake={"reasoning": "thinking...", "n_tokens": 10}, max_tokens=3)
    assert events[0].kind == "reasoning" and events[0].text == "thinking..."
    assert len([e for e in events if e.kind == "text"]) == 3
    assert events[-1].kind == "usage" and events[-1].finish_reason == "length"
    assert fake.stats.last_request["max_tokens"] == 3
    events = await collect(client, fake.url, fake={"include_usage": False})
    assert events and all(e.kind == "text" for e in events)


async def test_close_after_finish_reason_without_done_is_normal(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    events = await collect(client, fake.url, fake={"send_done": False, "reply": "abcdefgh"})
    assert text_of(events) == "abcdefgh"
    assert events[-1].kind == "usage" and events[-1].finish_reason == "stop"


async def test_per_request_override_does_not_leak(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    await fails(client, fake.url, LLM_HTTP, fake={"http_status": 500})
    events = await collect(client, fake.url)
    assert len([e for e in events if e.kind == "text"]) == FakeLLMConfig().n_tokens
    assert fake.stats.chat_requests == 2 and fake.stats.requests == 2


async def test_slow_consumer_is_not_a_stall(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    # the stall timer must only run while waiting for the server, never while the consumer works
    n = 0
    async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=0.1,
                                first_token_timeout=0.1, extra={"fake": {"n_tokens": 4}}):
        n += ev.kind == "text"
        await asyncio.sleep(0.15)
    assert n == 4


async def test_paced_stream_timing(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    stamps = []
    async for ev in stream_chat(client, fake.url, model="m", messages=MSGS,
                                extra={"fake": {"ttft": 0.2, "tokens_per_s": 50, "n_tokens": 6}}):
        if ev.kind == "text":
            stamps.append(time.monotonic() - t0)
    assert len(stamps) == 6
    assert stamps[0] >= 0.19
    assert stamps[-1] - stamps[0] >= 5 / 50 * 0.9
    assert stamps[-1] < BOUND


async def test_non_stream_request(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{fake.url}/chat/completions",
                           json={"model": "fake-model", "messages": MSGS, "fake": {"reply": "full"}}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "full"}
    assert body["usage"]["completion_tokens"] == 1


async def test_sse_wire_format(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    import json

    async with client.post(f"{fake.url}/chat/completions",
                           json={"model": "fake-model", "messages": MSGS, "stream": True,
                                 "stream_options": {"include_usage": True}, "fake": {"reply": "abcdef"}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = (await r.text()).split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    chunks = [json.loads(f[len("data: "):]) for f in frames[:-2]]
    first = chunks[0]
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert {"created", "model", "system_fingerprint"} <= first.keys()
    assert first["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": "abcd"},
                                   "logprobs": None, "finish_reason": None}
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


# --------------------------------------------------------------------------- failures


async def test_http_500_before_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    err, _ = await fails(client, fake.url, LLM_HTTP, fake={"http_status": 500})
    assert err.status == 500
    assert "500" in str(err) and "Injected server error" in str(err)


async def test_404_no_model(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    err, _ = await fails(client, fake.url, LLM_NO_MODEL, fake={"http_status": 404})
    assert "No models loaded" in str(err)
    assert "没有加载模型" in err.user_message and "服务器 B" in err.user_message
    await fails(client, fake.url, LLM_NO_MODEL, fake={"models": []})


async def test_error_object_in_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    got: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, extra={"fake": {"error_after": 2}}):
            got.append(ev.text)
    assert time.monotonic() - t0 < BOUND
    assert ei.value.code == LLM_STREAM_ERROR and "Compute error." in str(ei.value)
    assert len(got) == 2  # the text before the error was delivered


async def test_refused_connection(client: aiohttp.ClientSession) -> None:
    await fails(client, f"http://127.0.0.1:{closed_port()}/v1", LLM_UNREACHABLE)


async def test_invalid_url_maps_to_llm_error(client: aiohttp.ClientSession) -> None:
    await fails(client, "notaurl", LLM_UNREACHABLE)


async def test_stall_mid_stream_closes_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    got: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=0.5,
                                    extra={"fake": {"stall_after": 2}}):
            got.append(ev.text)
    elapsed = time.monotonic() - t0
    assert ei.value.code == LLM_STALL and len(got) == 2
    assert 0.45 <= elapsed < BOUND
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)


async def test_first_token_timeout(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    err, elapsed = await fails(client, fake.url, LLM_STALL, fake={"ttft": 10}, first_token_timeout=0.5)
    assert 0.45 <= elapsed < 3
    assert "first_token_timeout" in str(err)
    assert await fake.wait_for(lambda s: s.active_streams == 0, 2.0)


async def test_no_response_headers_is_first_token_timeout(client: aiohttp.ClientSession) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # read the request, never answer, return when the client hangs up
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, elapsed = await fails(client, f"http://127.0.0.1:{port}/v1", LLM_STALL, first_token_timeout=0.5)
        assert elapsed >= 0.45
    finally:
        server.close()
        await server.wait_closed()


async def test_close_before_response_is_dropped(client: aiohttp.ClientSession) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await fails(client, f"http://127.0.0.1:{port}/v1", LLM_DROPPED)
    finally:
        server.close()
        await server.wait_closed()


async def test_drop_mid_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    got: list[str] = []
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, extra={"fake": {"drop_after": 3}}):
            got.append(ev.text)
    assert ei.value.code == LLM_DROPPED and len(got) == 3


async def test_drop_right_before_finish_is_dropped(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    await fails(client, fake.url, LLM_DROPPED, fake={"drop_after": 20, "n_tokens": 20})


async def test_bad_json_chunk(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    await fails(client, fake.url, LLM_BAD_RESPONSE, fake={"bad_json_after": 1})


async def test_wrong_content_type(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    err, _ = await fails(client, fake.url, LLM_BAD_RESPONSE, fake={"content_type": "application/json"})
    assert "application/json" in str(err)


async def test_empty_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    await fails(client, fake.url, LLM_EMPTY, fake={"reply": ""})


async def test_401_and_api_key() -> None:
    key = "sk-secret-token-123"
    async with run_fake_llm(FakeLLMConfig(require_key=key)) as f, aiohttp.ClientSession() as c:
        err, _ = await fails(c, f.url, LLM_HTTP)
        assert err.status == 401 and "密钥" in err.user_message
        err, _ = await fails(c, f.url, LLM_HTTP, api_key="wrong-key")
        assert "wrong-key" not in str(err) and "wrong-key" not in repr(err)
        events = await collect(c, f.url, api_key=key)
        assert text_of(events)
        assert f.stats.last_headers["Authorization"] == f"Bearer {key}"
        assert key not in str(err)
        with pytest.raises(LLMError) as ei:
            await list_models(c, f.url)
        assert ei.value.code == LLM_HTTP and ei.value.status == 401
        assert await list_models(c, f.url, api_key=key) == ["fake-model"]


# --------------------------------------------------------------------------- early close


async def test_aclose_closes_server_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    gen = stream_chat(client, fake.url, model="m", messages=MSGS, extra={"fake": {"tokens_per_s": 50, "n_tokens": 500}})
    n = 0
    async for ev in gen:
        n += 1
        if n == 3:
            break
    assert fake.stats.active_streams == 1
    t0 = time.monotonic()
    await gen.aclose()
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)
    assert time.monotonic() - t0 < 1.0
    assert fake.stats.tokens_sent < 100 and fake.stats.streams_completed == 0


async def test_cancel_closes_server_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    got: list[str] = []

    async def consume() -> None:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS,
                                    extra={"fake": {"tokens_per_s": 50, "n_tokens": 500}}):
            got.append(ev.text)

    task = asyncio.create_task(consume())
    assert await fake.wait_for(lambda s: s.tokens_sent >= 3, 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)
    assert got and fake.stats.tokens_sent < 100


async def test_cancel_during_ttft_closes_server_stream(fake: FakeLLM, client: aiohttp.ClientSession) -> None:
    task = asyncio.create_task(collect(client, fake.url, fake={"ttft": 10}, first_token_timeout=30))
    assert await fake.wait_for(lambda s: s.active_streams == 1, 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)


# --------------------------------------------------------------------------- demo model, models


async def test_demo_mode(client: aiohttp.ClientSession) -> None:
    async with run_fake_llm(FakeLLMConfig(demo=True)) as f:
        assert await list_models(client, f.url) == [DEMO_MODEL]
        question = "今天天气怎么样？"
        msgs = [{"role": "user", "content": question}]
        events = await collect(client, f.url, model=DEMO_MODEL, messages=msgs, fake={"tokens_per_s": 10_000})
        text = text_of(events)
        assert text.startswith(DEMO_INTRO)
        assert "演示模型" in text and "不是真正的大模型" in text and "LM Studio" in text
        assert question in text
        assert all(len(e.text) <= 2 for e in events if e.kind == "text")
        # default demo pacing is ~30 tokens/s, so streaming is visible
        stamps = []
        t0 = time.monotonic()
        gen = stream_chat(client, f.url, model=DEMO_MODEL, messages=msgs)
        try:
            async for ev in gen:
                stamps.append(time.monotonic() - t0)
                if len(stamps) == 7:
                    break
        finally:
            await gen.aclose()
        assert stamps[-1] - stamps[0] >= 6 / 30 * 0.9
    assert reply_tokens(FakeLLMConfig(demo=True), msgs)[0] == DEMO_INTRO[:2]


async def test_list_models(client: aiohttp.ClientSession) -> None:
    async with run_fake_llm(FakeLLMConfig(models=["qwen2.5-7b-instruct", "llama-3.1-8b"])) as f:
        assert await list_models(client, f.url) == ["qwen2.5-7b-instruct", "llama-3.1-8b"]
        assert await list_models(client, f.url + "/") == ["qwen2.5-7b-instruct", "llama-3.1-8b"]
        with pytest.raises(LLMError) as ei:  # wrong base URL → LM Studio's "Unexpected endpoint" 404
            await list_models(client, f"http://127.0.0.1:{f.port}/nope")
        assert ei.value.code == LLM_HTTP and ei.value.status == 404
    t0 = time.monotonic()
    with pytest.raises(LLMError) as ei:
        await list_models(client, f"http://127.0.0.1:{closed_port()}/v1", timeout=1.0)
    assert ei.value.code == LLM_UNREACHABLE and time.monotonic() - t0 < BOUND


# --------------------------------------------------------------------------- the SSE reader (node.llm._events)


async def _raw_server(body: bytes) -> tuple[asyncio.base_events.Server, str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


def _chunk(content: str) -> str:
    import json
    return json.dumps({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


async def test_sse_reader_crlf_comments_and_multiline_data(client: aiohttp.ClientSession) -> None:
    """CRLF line ends, comment lines, an ``id:`` field and one event's JSON split over two ``data:`` lines
    (joined with a newline, as the SSE rules say) all read as LM Studio's stream would."""
    split = '{"choices": [{"index": 0,\r\ndata: "delta": {"content": "B"}, "finish_reason": "stop"}]}'
    body = (f": keep-alive\r\ndata: {_chunk('A')}\r\nid: 7\r\n\r\n"
            f"data: {split}\r\n\r\ndata: [DONE]\r\n\r\n").encode()
    server, url = await _raw_server(body)
    try:
        events = await collect(client, url)
    finally:
        server.close()
    assert text_of(events) == "AB"


async def test_sse_reader_refuses_non_utf8(client: aiohttp.ClientSession) -> None:
    server, url = await _raw_server(b"data: {\"choices\": [{\"delta\": {\"content\": \"\xff\xfe\"}}]}\n\n")
    try:
        await fails(client, url, LLM_BAD_RESPONSE)
    finally:
        server.close()


async def test_sse_error_event_with_unparseable_data(client: aiohttp.ClientSession) -> None:
    server, url = await _raw_server(f"data: {_chunk('x')}\n\nevent: error\ndata: model crashed\n\n".encode())
    try:
        err, _ = await fails(client, url, LLM_STREAM_ERROR)
        assert "model crashed" in str(err)
    finally:
        server.close()


async def test_list_models_reads_a_body_that_arrives_in_pieces(client: aiohttp.ClientSession) -> None:
    import json

    from aiohttp import web

    async def models(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        body = json.dumps({"data": [{"id": f"model-{i}", "owned_by": "x" * 50} for i in range(40)]}).encode()
        await resp.write(body[:1000])
        await asyncio.sleep(0.05)
        await resp.write(body[1000:])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        assert len(await list_models(client, f"http://127.0.0.1:{port}/v1")) == 40
    finally:
        await runner.cleanup()


async def test_connect_timeout_is_unreachable_not_a_stall(client: aiohttp.ClientSession) -> None:
    """A listener whose backlog is full drops the SYNs (127.0.0.1): the connect times out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    await asyncio.sleep(0.2)
    try:
        await fails(client, f"http://127.0.0.1:{port}/v1", LLM_UNREACHABLE, connect_timeout=0.5, first_token_timeout=4)
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_sse_event_with_empty_data_is_not_dispatched(client: aiohttp.ClientSession) -> None:
    server, url = await _raw_server(f"data:\n\ndata: {_chunk('hi')}\n\ndata:\n\ndata: [DONE]\n\n".encode())
    try:
        assert text_of(await collect(client, url)) == "hi"
    finally:
        server.close()
