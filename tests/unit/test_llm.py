"""node.llm against the real fake LM Studio (fakes.llm) on 127.0.0.1:0 -- no mocks."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from fakes.llm import DEMO_INTRO, DEMO_MODEL, FakeLLM, FakeLLMConfig, prompt_tokens, reply_tokens, run_fake_llm
from node.llm import (
    LLMClient,
    LLM_BAD_RESPONSE,
    LLM_CONTEXT,
    LLM_DROPPED,
    LLM_EMPTY,
    LLM_HTTP,
    LLM_NO_MODEL,
    LLM_STALL,
    LLM_STREAM_ERROR,
    LLM_UNREACHABLE,
    LLMError,
    StreamEvent,
    chat,
    is_context_error,
    list_models,
    stream_chat,
)
from tests.conftest import serve_app

pytestmark = pytest.mark.timeout(20)

BOUND = 5.0  # every failure must surface well within this many seconds
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好, what is 2+2?"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    async with run_fake_llm(FakeLLMConfig()) as f:
        yield f


@pytest.fixture
async def client() -> AsyncIterator[LLMClient]:
    async with LLMClient() as c:
        yield c


@pytest.fixture
async def plain_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A general HTTP client, for checking the fake LM Studio's own wire format."""
    async with aiohttp.ClientSession() as c:
        yield c


async def collect(client: LLMClient, url: str, *, fake: dict | None = None, **kw: Any) -> list[StreamEvent]:
    kw.setdefault("model", "fake-model")
    kw.setdefault("messages", MSGS)
    kw.setdefault("stall_timeout", 2.0)
    kw.setdefault("first_token_timeout", 3.0)
    kw.setdefault("connect_timeout", 1.0)
    extra = dict(kw.pop("extra", None) or {})
    if fake is not None:
        extra["fake"] = fake
    return [ev async for ev in stream_chat(client, url, extra=extra or None, **kw)]


async def fails(client: LLMClient, url: str, code: str, **kw: Any) -> tuple[LLMError, float]:
    t0 = time.monotonic()
    with pytest.raises(LLMError) as ei:
        await collect(client, url, **kw)
    elapsed = time.monotonic() - t0
    assert ei.value.code == code, (ei.value.code, str(ei.value))
    assert elapsed < BOUND
    assert ei.value.user_message and any("\u4e00" <= ch <= "\u9fff" for ch in ei.value.user_message)
    return ei.value, elapsed


async def collect_then_close(server: asyncio.base_events.Server, client: LLMClient, url: str) -> list[StreamEvent]:
    """:func:`collect` from a test server, which is closed afterwards."""
    try:
        return await collect(client, url)
    finally:
        server.close()


async def fails_then_close(server: asyncio.base_events.Server, client: LLMClient, url: str,
                           code: str) -> tuple[LLMError, float]:
    """:func:`fails` against a test server, which is closed afterwards."""
    try:
        return await fails(client, url, code)
    finally:
        server.close()


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if e.kind == "text")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- happy paths


async def test_normal_stream_exact_text_and_usage(fake: FakeLLM, client: LLMClient) -> None:
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


async def test_default_reply_is_deterministic(fake: FakeLLM, client: LLMClient) -> None:
    a = await collect(client, fake.url, fake={"n_tokens": 7})
    b = await collect(client, fake.url, fake={"n_tokens": 7})
    expected = reply_tokens(FakeLLMConfig(n_tokens=7), MSGS)
    assert [e.text for e in a if e.kind == "text"] == expected
    assert text_of(a) == text_of(b) and len(text_of(a)) == 7 * 4
    other = await collect(client, fake.url, fake={"n_tokens": 7}, messages=[{"role": "user", "content": "x"}])
    assert text_of(other) != text_of(a)


async def test_reasoning_max_tokens_and_no_usage(fake: FakeLLM, client: LLMClient) -> None:
    events = await collect(client, fake.url, fake={"reasoning": "thinking...", "n_tokens": 10}, max_tokens=3)
    assert events[0].kind == "reasoning" and events[0].text == "thinking..."
    assert len([e for e in events if e.kind == "text"]) == 3
    assert events[-1].kind == "usage" and events[-1].finish_reason == "length"
    assert fake.stats.last_request["max_tokens"] == 3
    events = await collect(client, fake.url, fake={"include_usage": False})
    assert events and all(e.kind == "text" for e in events)


async def test_close_after_finish_reason_without_done_is_normal(fake: FakeLLM, client: LLMClient) -> None:
    events = await collect(client, fake.url, fake={"send_done": False, "reply": "abcdefgh"})
    assert text_of(events) == "abcdefgh"
    assert events[-1].kind == "usage" and events[-1].finish_reason == "stop"


async def test_per_request_override_does_not_leak(fake: FakeLLM, client: LLMClient) -> None:
    await fails(client, fake.url, LLM_HTTP, fake={"http_status": 500})
    events = await collect(client, fake.url)
    assert len([e for e in events if e.kind == "text"]) == FakeLLMConfig().n_tokens
    assert fake.stats.chat_requests == 2 and fake.stats.requests == 2


async def test_slow_consumer_is_not_a_stall(fake: FakeLLM, client: LLMClient) -> None:
    # the stall timer must only run while waiting for the server, never while the consumer works
    n = 0
    async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=0.1,
                                first_token_timeout=0.1, extra={"fake": {"n_tokens": 4}}):
        n += ev.kind == "text"
        await asyncio.sleep(0.15)  # the behaviour under test: a consumer slower than stall_timeout
    assert n == 4


async def test_paced_stream_timing(fake: FakeLLM, client: LLMClient) -> None:
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


async def test_non_stream_request(fake: FakeLLM, plain_http: aiohttp.ClientSession) -> None:
    async with plain_http.post(f"{fake.url}/chat/completions",
                           json={"model": "fake-model", "messages": MSGS, "fake": {"reply": "full"}}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "full"}
    assert body["usage"]["completion_tokens"] == 1


async def test_sse_wire_format(fake: FakeLLM, plain_http: aiohttp.ClientSession) -> None:
    import json

    async with plain_http.post(f"{fake.url}/chat/completions",
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


async def test_http_500_before_stream(fake: FakeLLM, client: LLMClient) -> None:
    err, _ = await fails(client, fake.url, LLM_HTTP, fake={"http_status": 500})
    assert err.status == 500
    assert "500" in str(err) and "Injected server error" in str(err)


async def test_404_no_model(fake: FakeLLM, client: LLMClient) -> None:
    err, _ = await fails(client, fake.url, LLM_NO_MODEL, fake={"http_status": 404})
    assert "No models loaded" in str(err)
    assert "没有加载模型" in err.user_message and "服务器 B" in err.user_message
    await fails(client, fake.url, LLM_NO_MODEL, fake={"models": []})


async def test_error_object_in_stream(fake: FakeLLM, client: LLMClient) -> None:
    got: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, extra={"fake": {"error_after": 2}}):
            got.append(ev.text)
    assert time.monotonic() - t0 < BOUND
    assert ei.value.code == LLM_STREAM_ERROR and "Compute error." in str(ei.value)
    assert len(got) == 2  # the text before the error was delivered


async def test_refused_connection(client: LLMClient) -> None:
    await fails(client, f"http://127.0.0.1:{closed_port()}/v1", LLM_UNREACHABLE)


async def test_invalid_url_maps_to_llm_error(client: LLMClient) -> None:
    await fails(client, "notaurl", LLM_UNREACHABLE)


async def test_stall_mid_stream_closes_stream(fake: FakeLLM, client: LLMClient) -> None:
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


async def test_first_token_timeout(fake: FakeLLM, client: LLMClient) -> None:
    err, elapsed = await fails(client, fake.url, LLM_STALL, fake={"ttft": 10}, first_token_timeout=0.5)
    assert 0.45 <= elapsed < 3
    assert "first_token_timeout" in str(err)
    assert await fake.wait_for(lambda s: s.active_streams == 0, 2.0)


async def test_no_response_headers_is_first_token_timeout(client: LLMClient) -> None:
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


async def test_close_before_response_is_dropped(client: LLMClient) -> None:
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


async def test_drop_mid_stream(fake: FakeLLM, client: LLMClient) -> None:
    got: list[str] = []
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, extra={"fake": {"drop_after": 3}}):
            got.append(ev.text)
    assert ei.value.code == LLM_DROPPED and len(got) == 3


async def test_drop_right_before_finish_is_dropped(fake: FakeLLM, client: LLMClient) -> None:
    await fails(client, fake.url, LLM_DROPPED, fake={"drop_after": 20, "n_tokens": 20})


async def test_bad_json_chunk(fake: FakeLLM, client: LLMClient) -> None:
    await fails(client, fake.url, LLM_BAD_RESPONSE, fake={"bad_json_after": 1})


async def test_wrong_content_type(fake: FakeLLM, client: LLMClient) -> None:
    err, _ = await fails(client, fake.url, LLM_BAD_RESPONSE, fake={"content_type": "application/json"})
    assert "application/json" in str(err)


async def test_empty_stream(fake: FakeLLM, client: LLMClient) -> None:
    await fails(client, fake.url, LLM_EMPTY, fake={"reply": ""})


async def test_401_and_api_key() -> None:
    key = "sk-secret-token-123"
    async with run_fake_llm(FakeLLMConfig(require_key=key)) as f, LLMClient() as c:
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


async def test_aclose_closes_server_stream(fake: FakeLLM, client: LLMClient) -> None:
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


async def test_cancel_closes_server_stream(fake: FakeLLM, client: LLMClient) -> None:
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


async def test_cancel_during_ttft_closes_server_stream(fake: FakeLLM, client: LLMClient) -> None:
    task = asyncio.create_task(collect(client, fake.url, fake={"ttft": 10}, first_token_timeout=30))
    assert await fake.wait_for(lambda s: s.active_streams == 1, 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)


# --------------------------------------------------------------------------- demo model, models


async def test_demo_mode(client: LLMClient) -> None:
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


async def test_list_models(client: LLMClient) -> None:
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


# --------------------------------------------------------------------------- the SSE reader (node/sse.py)


async def _raw_server(body: bytes) -> tuple[asyncio.base_events.Server, str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


_STOP = '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'


def _chunk(content: str) -> str:
    import json
    return json.dumps({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


async def test_sse_reader_crlf_comments_and_multiline_data(client: LLMClient) -> None:
    """CRLF line ends, comment lines, an ``id:`` field and one event's JSON split over two ``data:`` lines
    (joined with a newline, as the SSE rules say) all read as LM Studio's stream would."""
    split = '{"choices": [{"index": 0,\r\ndata: "delta": {"content": "B"}, "finish_reason": "stop"}]}'
    body = (f": keep-alive\r\ndata: {_chunk('A')}\r\nid: 7\r\n\r\n"
            f"data: {split}\r\n\r\ndata: [DONE]\r\n\r\n").encode()
    server, url = await _raw_server(body)
    events = await collect_then_close(server, client, url)
    assert text_of(events) == "AB"


async def test_sse_reader_refuses_non_utf8(client: LLMClient) -> None:
    server, url = await _raw_server(b"data: {\"choices\": [{\"delta\": {\"content\": \"\xff\xfe\"}}]}\n\n")
    await fails_then_close(server, client, url, LLM_BAD_RESPONSE)


async def test_sse_error_event_with_unparseable_data(client: LLMClient) -> None:
    server, url = await _raw_server(f"data: {_chunk('x')}\n\nevent: error\ndata: model crashed\n\n".encode())
    try:
        err, _ = await fails(client, url, LLM_STREAM_ERROR)
        assert "model crashed" in str(err)
    finally:
        server.close()


async def test_list_models_reads_a_body_that_arrives_in_pieces(client: LLMClient) -> None:
    import json

    from aiohttp import web

    async def models(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        body = json.dumps({"data": [{"id": f"model-{i}", "owned_by": "x" * 50} for i in range(40)]}).encode()
        await resp.write(body[:1000])
        await asyncio.sleep(0.05)  # the behaviour under test: the rest of the body comes in a later read
        await resp.write(body[1000:])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner, port = await serve_app(app)
    try:
        assert len(await list_models(client, f"http://127.0.0.1:{port}/v1")) == 40
    finally:
        await runner.cleanup()


async def test_connect_timeout_is_unreachable_not_a_stall(client: LLMClient) -> None:
    """A listener whose backlog is full drops the SYNs (127.0.0.1): the connect times out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)  # Linux: an accept queue of one, never accepted from
    port = srv.getsockname()[1]
    loop = asyncio.get_running_loop()
    fillers: list[socket.socket] = []
    try:
        for i in range(4):
            c = socket.socket()
            c.setblocking(False)
            fillers.append(c)
            if i == 0:  # its handshake done, it fills the queue: SYNs are dropped from now on (no timed wait)
                await asyncio.wait_for(loop.sock_connect(c, ("127.0.0.1", port)), BOUND)
            else:  # three more attempts on top: their SYNs are dropped, like the client's will be
                try:
                    c.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
        await fails(client, f"http://127.0.0.1:{port}/v1", LLM_UNREACHABLE, connect_timeout=0.5, first_token_timeout=4)
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_sse_event_with_empty_data_is_not_dispatched(client: LLMClient) -> None:
    server, url = await _raw_server(f"data:\n\ndata: {_chunk('hi')}\n\ndata:\n\ndata: {_STOP}\n\n"
                                    f"data: [DONE]\n\n".encode())
    try:
        assert text_of(await collect(client, url)) == "hi"
    finally:
        server.close()


# --------------------------------------------------------------------------- ec53492: the per-read SSE reader,
# the lazily re-armed deadline, external cancellation and the fake's paced (timer-callback) streaming


def _cut_points(wire_bytes: bytes, *, run: tuple[int, int]) -> list[int]:
    """Offsets at which to cut ``wire_bytes`` into separate socket writes: inside every ``data:``, between
    every ``\\r`` and ``\\n``, between the two newlines that end an event, inside every multi-byte UTF-8
    character, and every byte of ``run`` (a stretch sent one byte at a time)."""
    cuts: set[int] = set()
    for needle, at in ((b"data:", 2), (b"\r\n", 1), (b"\n\n", 1), (b"\n\r\n", 1)):
        i = wire_bytes.find(needle)
        while i >= 0:
            cuts.add(i + at)
            i = wire_bytes.find(needle, i + 1)
    for i, b in enumerate(wire_bytes):
        if b >= 0xC0:  # the lead byte of a multi-byte character: cut right after it
            cuts.add(i + 1)
    cuts.update(range(run[0], min(run[1], len(wire_bytes))))
    return sorted(c for c in cuts if 0 < c < len(wire_bytes))


async def _piecewise_server(head: bytes, pieces: list[bytes], *, gap: float = 0.002,
                            hold_open: bool = False) -> tuple[asyncio.base_events.Server, str, list[int]]:
    """A raw HTTP server: the response head, then each piece in its own write (drained, ``gap`` apart) so the
    split is real on the socket; then a close (``hold_open``: wait for the client to hang up instead)."""
    written: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            await writer.drain()
            for p in pieces:
                writer.write(p)
                await writer.drain()
                written.append(len(p))
                await asyncio.sleep(gap)  # the behaviour under test: each piece in its own read on the client
            if hold_open:
                while await reader.read(65536):
                    pass
        except (ConnectionError, asyncio.CancelledError):  # the client is done (or the test's loop is closing)
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", written


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _chunked(body: bytes, size: int) -> bytes:
    out = b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


_SPLIT_TOKENS = ["Hello", ", 世界", "！", " 😀 emoji", " naïve", "\n第二行", " end."]


def _split_stream_body() -> bytes:
    import json

    events = []
    for i, t in enumerate(_SPLIT_TOKENS):
        data = json.dumps({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]},
                          ensure_ascii=False)
        nl = "\r\n" if i % 2 else "\n"  # both line ends, mixed in one stream
        events.append(f"data: {data}{nl}{nl}")
    events.append('data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\r\n\r\n')
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()


@pytest.mark.parametrize("framing", ["close_delimited", "chunked"])
async def test_sse_bytes_split_at_awkward_places_still_read_exactly(
        client: LLMClient, framing: str) -> None:
    """The per-read reader keeps incomplete lines across reads: a stream cut inside ``data:``, between
    ``\\r`` and ``\\n``, between an event's two newlines, inside UTF-8 characters and one byte at a time for
    a while yields exactly the text (and the same events) as in one piece."""
    body = _split_stream_body()
    if framing == "chunked":
        wire_bytes = _chunked(body, 53)  # the chunk framing itself is cut at odd places too
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    else:
        wire_bytes = body
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    start = wire_bytes.find(b"data:", 40)
    pieces = _split(wire_bytes, _cut_points(wire_bytes, run=(start - 3, start + 90)))
    assert b"".join(pieces) == wire_bytes and len(pieces) > 120
    assert any(p.endswith(b"\r") for p in pieces) and any(p == b"\n" for p in pieces)
    server, url, written = await _piecewise_server(head, pieces, gap=0.002)
    try:
        t0 = time.monotonic()
        events = await collect(client, url, stall_timeout=BOUND, first_token_timeout=BOUND)
        assert time.monotonic() - t0 < BOUND
    finally:
        server.close()
    assert len(written) == len(pieces)  # the server really wrote piece by piece
    assert [e.text for e in events if e.kind == "text"] == _SPLIT_TOKENS
    assert text_of(events) == "".join(_SPLIT_TOKENS)


async def test_sse_bytes_split_reads_the_same_as_unsplit(client: LLMClient) -> None:
    server, url = await _raw_server(_split_stream_body())
    events = await collect_then_close(server, client, url)
    assert [e.text for e in events if e.kind == "text"] == _SPLIT_TOKENS


@pytest.mark.parametrize("terminated", [False, True], ids=["unterminated", "terminated"])
async def test_sse_line_longer_than_the_limit_is_a_bad_response(client: LLMClient, terminated: bool) -> None:
    """A line over MAX_SSE_LINE ends the stream with LLM_BAD_RESPONSE at once -- not after a stall timeout,
    and not by buffering without end -- even while the server keeps the connection open."""
    from node.llm import MAX_SSE_LINE

    first = f"data: {_chunk('ok')}\n\n".encode()
    line = b"data: " + b"x" * (MAX_SSE_LINE + 100)
    if terminated:
        line += b"\n\n"
    pieces = [first] + [line[i:i + 65536] for i in range(0, len(line), 65536)]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    server, url, _ = await _piecewise_server(head, pieces, gap=0.0, hold_open=True)
    try:
        got: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(LLMError) as ei:
            async for ev in stream_chat(client, url, model="m", messages=MSGS, stall_timeout=30,
                                        first_token_timeout=30):
                got.append(ev.text)
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert ei.value.code == LLM_BAD_RESPONSE, (ei.value.code, str(ei.value))
    assert got == ["ok"]
    assert elapsed < BOUND


async def test_sse_line_of_exactly_the_limit_is_read(client: LLMClient) -> None:
    from node.llm import MAX_SSE_LINE

    prefix = b'data: {"choices": [{"index": 0, "delta": {"content": "'
    suffix = b'"}, "finish_reason": "stop"}]}'
    n = MAX_SSE_LINE - len(prefix) - len(suffix)
    line = prefix + b"y" * n + suffix
    assert len(line) == MAX_SSE_LINE
    body = line + b"\n\ndata: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    server, url, _ = await _piecewise_server(head, [body[i:i + 40000] for i in range(0, len(body), 40000)],
                                             gap=0.0)
    events = await collect_then_close(server, client, url)
    assert text_of(events) == "y" * n


async def test_stall_with_long_first_token_timeout_and_short_stall(fake: FakeLLM, client: LLMClient) -> None:
    """The deadline is armed at first_token_timeout (300 s) and moved *earlier* (to stall_timeout) at the first
    event: it must be re-armed, or a stall after the first tokens would go unnoticed for 5 minutes."""
    stall = 0.3
    got: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, first_token_timeout=300,
                                    stall_timeout=stall, extra={"fake": {"stall_after": 2}}):
            got.append(time.monotonic())
    end = time.monotonic()
    assert ei.value.code == LLM_STALL, (ei.value.code, str(ei.value))
    assert "stalled" in str(ei.value) and "first_token" not in str(ei.value)
    assert len(got) == 2
    assert end - got[-1] >= stall * 0.9
    assert end - t0 < BOUND
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)


async def test_stall_deadline_moves_with_each_event(fake: FakeLLM, client: LLMClient) -> None:
    """Tokens every 0.1 s with stall_timeout 0.5: never a stall, however long the whole answer takes (more than
    twice stall_timeout)."""
    t0 = time.monotonic()
    events = await collect(client, fake.url, fake={"n_tokens": 12, "tokens_per_s": 10}, stall_timeout=0.5,
                           first_token_timeout=300)
    assert len([e for e in events if e.kind == "text"]) == 12
    assert time.monotonic() - t0 >= 11 / 10 * 0.9


async def test_external_cancel_while_waiting_for_an_event_is_cancelled_error(
        fake: FakeLLM, client: LLMClient) -> None:
    """A cancellation from outside (not the deadline's) passes through as CancelledError -- never turned into
    an LLMError (LLM_STALL) by the deadline's uncancel bookkeeping -- and closes the HTTP stream."""
    got: list[str] = []
    seen: list[BaseException] = []
    three = asyncio.Event()

    async def consume() -> None:
        try:
            async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=0.5,
                                        first_token_timeout=300,
                                        extra={"fake": {"tokens_per_s": 20, "n_tokens": 500}}):
                got.append(ev.text)
                if len(got) == 3:
                    three.set()
        except BaseException as exc:
            seen.append(exc)
            raise

    task = asyncio.create_task(consume())
    await asyncio.wait_for(three.wait(), BOUND)
    # No timed wait: this task runs only while the consumer is suspended, and once events have come its only
    # suspension point is stream_chat()'s wait for the next one. (A slow machine may have handed it a fourth
    # token with the third: then it waits for the fifth.)
    assert not task.done() and 3 <= len(got) < 500
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert len(seen) == 1 and type(seen[0]) is asyncio.CancelledError, seen
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)
    assert fake.stats.streams_completed == 0 and fake.stats.tokens_sent < 100


async def test_external_cancel_near_the_stall_deadline_is_still_cancelled_error(
        fake: FakeLLM, client: LLMClient) -> None:
    """Cancelled from outside while the server stalls and the deadline is about to pass: CancelledError."""
    got: list[str] = []

    async def consume() -> None:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=0.6,
                                    first_token_timeout=300, extra={"fake": {"stall_after": 1}}):
            got.append(ev.text)

    task = asyncio.create_task(consume())
    assert await fake.wait_for(lambda s: s.errors_injected == 1, 2.0)
    # the behaviour under test: cancelled while the server is silent and the stall deadline (0.6 s from the
    # token) is half gone; the 0.3 s either side keep the cancel inside that window on a slow machine
    await asyncio.sleep(0.3)
    assert not task.done()  # the deadline has not fired yet: the cancel below is the one the test is about
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got and task.cancelled()
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)


async def test_paced_stream_complete_and_spread(fake: FakeLLM, client: LLMClient) -> None:
    stamps: list[float] = []
    texts: list[str] = []
    t0 = time.monotonic()
    async for ev in stream_chat(client, fake.url, model="m", messages=MSGS,
                                extra={"fake": {"n_tokens": 6, "tokens_per_s": 50}}):
        if ev.kind == "text":
            stamps.append(time.monotonic())
            texts.append(ev.text)
    assert texts == reply_tokens(FakeLLMConfig(n_tokens=6), MSGS)
    assert len(texts) == 6 and len("".join(texts)) == 6 * 4
    # token i leaves at t0 + i/50: the last one at least 5/50 s after the first (5% slack for the first
    # token's own delivery delay)
    assert stamps[-1] - stamps[0] >= 5 / 50 * 0.95
    assert stamps[-1] - t0 < BOUND
    assert fake.stats.streams_completed == 1 and fake.stats.tokens_sent == 6 and fake.stats.active_streams == 0


def _chat_request(port: int, fake_cfg: dict) -> bytes:
    import json

    body = json.dumps({"model": "fake-model", "messages": MSGS, "stream": True,
                       "stream_options": {"include_usage": True}, "fake": fake_cfg}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


async def test_paced_stream_raw_body_is_valid_chunked_sse(fake: FakeLLM) -> None:
    """Read the paced response off a raw socket and parse the chunked framing by hand: the frames written
    straight to the transport from the timer callbacks must be well-formed chunks, in order, with the SSE
    ending ``data: [DONE]`` and the terminating ``0\\r\\n\\r\\n``."""
    import json

    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    try:
        writer.write(_chat_request(fake.port, {"n_tokens": 6, "tokens_per_s": 50}))
        await writer.drain()
        async with asyncio.timeout(BOUND):
            head = await reader.readuntil(b"\r\n\r\n")
            status, *header_lines = head.decode("latin-1").split("\r\n")
            assert status.startswith("HTTP/1.1 200")
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if h)}
            assert headers["transfer-encoding"].lower() == "chunked"
            assert "content-length" not in headers
            assert headers["content-type"].startswith("text/event-stream")
            chunks: list[bytes] = []
            stamps: list[float] = []
            raw = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                raw += size_line
                assert size_line[:-2] and all(c in b"0123456789abcdefABCDEF" for c in size_line[:-2]), size_line
                size = int(size_line[:-2], 16)
                data = await reader.readexactly(size)
                crlf = await reader.readexactly(2)
                raw += data + crlf
                assert crlf == b"\r\n", (size_line, data[-20:], crlf)
                if size == 0:
                    break
                chunks.append(data)
                stamps.append(time.monotonic())
            assert await reader.read() == b""  # nothing after the last chunk (Connection: close)
    finally:
        writer.close()
    assert raw.endswith(b"0\r\n\r\n")
    sse = b"".join(chunks).decode("utf-8")
    assert sse.endswith("data: [DONE]\n\n")
    events = sse.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    objs = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    texts = [o["choices"][0]["delta"]["content"] for o in objs if o["choices"] and o["choices"][0]["delta"]]
    assert texts == reply_tokens(FakeLLMConfig(n_tokens=6), MSGS)
    assert objs[-2]["choices"][0]["finish_reason"] == "stop" and objs[-1]["usage"]["completion_tokens"] == 6
    # one whole SSE event per chunk; the token chunks arrived paced
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"\n\n") == 1 for c in chunks)
    assert stamps[5] - stamps[0] >= 5 / 50 * 0.95
    assert fake.stats.streams_completed == 1 and fake.stats.active_streams == 0


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_client_gone_mid_paced_stream_is_counted(fake: FakeLLM, how: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    try:
        writer.write(_chat_request(fake.port, {"n_tokens": 500, "tokens_per_s": 50}))
        await writer.drain()
        async with asyncio.timeout(BOUND):
            await reader.readuntil(b"\r\n\r\n")
            for _ in range(3):  # three token chunks, then hang up mid-stream
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                await reader.readexactly(size + 2)
        assert fake.stats.active_streams == 1
    finally:
        if how == "abort":
            writer.transport.abort()
        else:
            writer.close()
    t0 = time.monotonic()
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, BOUND)
    assert time.monotonic() - t0 < BOUND
    sent = fake.stats.tokens_sent
    assert 3 <= sent < 100 and fake.stats.streams_completed == 0
    # No timer callback is left writing to the closed socket. The paced stream keeps one timer armed, never
    # more than one interval (1/50 s) ahead, so any the fake failed to cancel is due by now + 1/50. The loop
    # runs timers in deadline order, so once a timer armed for now + 2/50 has run, every such callback has run
    # too: an ordering barrier, not a guess of how long is long enough.
    loop = asyncio.get_running_loop()
    barrier = loop.create_future()
    loop.call_at(loop.time() + 2 / 50, barrier.set_result, None)
    await barrier
    assert fake.stats.tokens_sent == sent


async def test_paced_stream_to_an_http10_client_is_not_chunked(fake: FakeLLM) -> None:
    """HTTP/1.0 has no chunked encoding: the frames the timer callbacks write must then go out bare."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    try:
        writer.write(_chat_request(fake.port, {"n_tokens": 6, "tokens_per_s": 50}).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        await writer.drain()
        async with asyncio.timeout(BOUND):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read()  # close-delimited: everything until EOF
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head.lower()
    sse = body.decode("utf-8")
    assert sse.startswith("data: ") and sse.endswith("data: [DONE]\n\n")
    import json

    objs = [json.loads(e[len("data: "):]) for e in sse.split("\n\n")[:-2]]
    texts = [o["choices"][0]["delta"]["content"] for o in objs if o["choices"] and o["choices"][0]["delta"]]
    assert texts == reply_tokens(FakeLLMConfig(n_tokens=6), MSGS)


async def test_stall_counts_only_the_wait_for_the_server_not_the_consumers_time(fake: FakeLLM,
                                                                              client: LLMClient) -> None:
    """Tokens 1 s apart, stall_timeout 0.5 s, and a consumer that takes 0.6 s over the first token: its next
    read waits only 0.4 s, so this is no stall (the deadline starts when the read starts)."""
    got = []
    async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=0.5,
                                first_token_timeout=5, extra={"fake": {"n_tokens": 2, "tokens_per_s": 1}}):
        if ev.kind == "text":
            got.append(ev.text)
            if len(got) == 1:
                await asyncio.sleep(0.6)  # the behaviour under test: a consumer busy longer than stall_timeout
    assert len(got) == 2


# --------------------------------------------------------------------------- the HTTP client (node.llm.LLMClient)


async def _keepalive_server(responses: list[bytes], *, close_after: float | None = None
                            ) -> tuple[asyncio.base_events.Server, str, list[int]]:
    """A raw HTTP/1.1 server answering each request on a connection with the next of ``responses``
    (whole); with ``close_after``, it closes every connection that long after its last answer. Returns
    (server, url, requests per connection)."""
    per_conn: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_conn.append(0)
        me = len(per_conn) - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length:")), b"0"))
                await reader.readexactly(n)
                writer.write(responses[min(sum(per_conn), len(responses) - 1)])
                per_conn[me] += 1
                await writer.drain()
                if close_after is not None:
                    await asyncio.sleep(close_after)  # the server's own idle timeout (the behaviour under test)
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", per_conn


def _sse_body(*tokens: str) -> bytes:
    return ("".join(f"data: {_chunk(t)}\n\n" for t in tokens)
            + 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n').encode()


async def test_streams_reuse_one_kept_alive_connection(fake: FakeLLM, client: LLMClient) -> None:
    texts = [text_of(await collect(client, fake.url, fake={"reply": f"answer {i}"})) for i in range(3)]
    assert texts == ["answer 0", "answer 1", "answer 2"]
    assert client.connects == 1 and fake.stats.chat_requests == 3


async def test_a_stream_closed_early_is_not_reused(fake: FakeLLM, client: LLMClient) -> None:
    gen = stream_chat(client, fake.url, model="m", messages=MSGS, extra={"fake": {"tokens_per_s": 50, "n_tokens": 500}})
    async for _ in gen:
        break
    await gen.aclose()
    assert await fake.wait_for(lambda s: s.client_closed == 1, 2.0)
    assert text_of(await collect(client, fake.url, fake={"reply": "again"})) == "again"
    assert client.connects == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused(client: LLMClient,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    body = _sse_body("one", " two")
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    server, url, per_conn = await _keepalive_server([resp], close_after=0.05)
    try:
        assert text_of(await collect(client, url)) == "one two"
        (conn, _), = client._idle[next(iter(client._idle))]  # pooled, idle
        hung_up = asyncio.Event()
        lost = conn.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            lost(exc)
            hung_up.set()

        conn.connection_lost = connection_lost  # type: ignore[method-assign]
        if conn.closed:  # a slow machine: the hang-up came in already, before the hook
            hung_up.set()
        await asyncio.wait_for(hung_up.wait(), BOUND)  # the server hung up and the client has seen it
        assert per_conn == [1]
        taken: list[object] = []
        take = client._take
        monkeypatch.setattr(client, "_take", lambda key, now: taken.append(take(key, now)) or taken[-1])
        assert text_of(await collect(client, url)) == "one two"
        assert taken == [None]  # not even tried (and then retried as stale): the pool dropped it
    finally:
        server.close()
    assert per_conn == [1, 1] and client.connects == 2


async def test_a_connection_idle_too_long_is_not_reused(fake: FakeLLM, client: LLMClient,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool judges idleness by the loop time handed to LLMClient._take: the test moves that time on by
    hand instead of waiting IDLE_S."""
    from node.llm import IDLE_S

    ahead = 0.0
    take = client._take
    monkeypatch.setattr(client, "_take", lambda key, now: take(key, now + ahead))
    await collect(client, fake.url)
    ahead = IDLE_S / 2  # idle for half the limit (plus the real milliseconds): reused
    await collect(client, fake.url)
    assert client.connects == 1
    ahead = IDLE_S  # idle for the limit: closed, a new connection
    await collect(client, fake.url)
    assert client.connects == 2
    ahead = 0.0  # and the new one is pooled as usual
    await collect(client, fake.url)
    assert client.connects == 2


async def test_content_length_framed_stream_is_read_and_reused(client: LLMClient) -> None:
    body = _sse_body("a", "b", "c")
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    server, url, per_conn = await _keepalive_server([resp])
    try:
        assert text_of(await collect(client, url)) == "abc"
        assert text_of(await collect(client, url)) == "abc"
    finally:
        server.close()
    assert per_conn == [2] and client.connects == 1


async def test_chunk_extensions_and_trailers_are_read(client: LLMClient) -> None:
    body = _sse_body("x", "y")
    framed = b"".join(b"%x;name=value\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\nX-T: 1\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    server, url, per_conn = await _keepalive_server([resp])
    try:
        assert text_of(await collect(client, url)) == "xy"
        assert text_of(await collect(client, url)) == "xy"  # the trailers ended the body: reused
    finally:
        server.close()
    assert per_conn == [2]


@pytest.mark.parametrize("resp", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\ndata: x\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef",
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nbad header line\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nContent-Type: text/event-stream\r\n\r\n",
], ids=["bad-chunk-size", "no-crlf-after-chunk", "not-http", "bad-header", "bad-content-length"])
async def test_malformed_http_is_a_bad_response_at_once(client: LLMClient, resp: bytes) -> None:
    server, url, _ = await _keepalive_server([resp], close_after=BOUND)  # held open: no drop to hide behind
    try:
        _, elapsed = await fails(client, url, LLM_BAD_RESPONSE, stall_timeout=BOUND - 1, first_token_timeout=BOUND - 1)
        assert elapsed < 1.0
    finally:
        server.close()


async def test_chat_delivers_each_delta_from_the_read_callback(fake: FakeLLM, client: LLMClient) -> None:
    got: list[tuple[str, str]] = []
    usage, finish = await chat(client, fake.url, on_event=lambda k, t: got.append((k, t)), model="m",
                               messages=MSGS, extra={"fake": {"reply": "abcdefgh"}})
    assert got == [("text", "abcd"), ("text", "efgh")] and finish == "stop" and usage["completion_tokens"] == 2


async def test_chat_callback_error_ends_the_stream_and_is_raised_as_is(fake: FakeLLM, client: LLMClient) -> None:
    class PublishFailed(Exception):
        pass

    n = 0

    def on_event(kind: str, text: str) -> None:
        nonlocal n
        n += 1
        if n == 3:
            raise PublishFailed("broker gone")

    with pytest.raises(PublishFailed):
        await chat(client, fake.url, on_event=on_event, model="m", messages=MSGS,
                   extra={"fake": {"tokens_per_s": 100, "n_tokens": 500}})
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)
    assert fake.stats.tokens_sent < 100


def chat_task(client: LLMClient, url: str, got: list[str], **fake: Any) -> asyncio.Future[Any]:
    """:func:`chat` running in a task, each delta's text appended to ``got``; ``fake`` configures the fake."""
    return asyncio.ensure_future(chat(client, url, on_event=lambda k, t: got.append(t), model="m", messages=MSGS,
                                      extra={"fake": fake}))


async def test_cancelling_chat_closes_the_stream(fake: FakeLLM, client: LLMClient) -> None:
    got: list[str] = []
    task = chat_task(client, fake.url, got, tokens_per_s=50, n_tokens=500)
    assert await fake.wait_for(lambda s: s.tokens_sent >= 2, 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)
    assert got and fake.stats.streams_completed == 0


async def test_a_slow_consumer_pauses_reading_and_loses_nothing(fake: FakeLLM, client: LLMClient) -> None:
    """Far more events than QUEUE_PAUSE arrive while the consumer sleeps: reading pauses, then resumes."""
    from node.llm import QUEUE_PAUSE

    n_tokens = 3 * QUEUE_PAUSE
    got: list[str] = []
    async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=0.5,
                                extra={"fake": {"n_tokens": n_tokens}}):
        if ev.kind == "text":
            got.append(ev.text)
            if len(got) == 1:
                await asyncio.sleep(0.8)  # longer than stall_timeout: not a stall either
    assert got == reply_tokens(FakeLLMConfig(n_tokens=n_tokens), MSGS)


async def test_bytes_after_a_content_length_body_mean_the_connection_is_not_reused(client: LLMClient) -> None:
    body = _sse_body("a")
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    server, url, per_conn = await _keepalive_server([resp + b"HTTP/1.1 200 OK\r\n\r\n"])  # junk after the body
    try:
        assert text_of(await collect(client, url)) == "a"
        assert text_of(await collect(client, url)) == "a"
    finally:
        server.close()
    assert client.connects == 2


# --------------------------------------------------------------------------- review regressions (LLMClient)


async def test_a_response_with_its_fin_right_behind_it_is_never_a_stale_reuse(client: LLMClient) -> None:
    """The server ends each kept-alive response with a close and no "Connection: close": the next request
    must not fail on that closing connection (it is not reused; were it lost before any byte, it is sent
    again on a new one)."""
    body = _sse_body("a", "b")
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(resp)
        writer.close()  # the body and the FIN together

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    try:
        for _ in range(30):
            assert text_of(await collect(client, url)) == "ab"
            usage, finish = await chat(client, url, on_event=lambda k, t: None, model="m", messages=MSGS)
            assert finish == "stop"
    finally:
        server.close()


async def test_a_stale_pooled_connection_is_retried_on_a_new_one(client: LLMClient) -> None:
    """A pooled connection that turns out closed before any byte of the response (the server's idle close
    raced the reuse): the request goes again on a new connection, once."""
    body = _sse_body("x")
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    server, url, per_conn = await _keepalive_server([resp])
    try:
        assert text_of(await collect(client, url)) == "x"
        (conn, _), = client._idle[next(iter(client._idle))]
        conn.closed = False
        real_write = conn.transport.write
        conn.transport.write = lambda data: (real_write(b""), conn.transport.abort())  # lost, no byte back
        assert text_of(await collect(client, url)) == "x"
    finally:
        server.close()
    assert client.connects == 2


@pytest.mark.parametrize("where", ["error_body", "stream"])
async def test_json_nested_too_deep_is_a_clear_error_not_a_hang(client: LLMClient, where: str) -> None:
    deep = b"[" * 5000
    if where == "error_body":
        resp = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + deep
        code = LLM_HTTP
    else:
        resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                b"data: " + deep + b"\n\n")
        code = LLM_BAD_RESPONSE
    server, url, _ = await _keepalive_server([resp], close_after=0.01)
    try:
        _, elapsed = await fails(client, url, code, stall_timeout=2.0, first_token_timeout=3.0)
        assert elapsed < 1.5
    finally:
        server.close()


@pytest.mark.parametrize("exc", [StopIteration(), asyncio.CancelledError(), KeyError("k")],
                         ids=["StopIteration", "CancelledError", "KeyError"])
async def test_whatever_on_event_raises_ends_chat_at_once(fake: FakeLLM, client: LLMClient,
                                                          exc: BaseException) -> None:
    def on_event(kind: str, text: str) -> None:
        raise exc

    t0 = time.monotonic()
    with pytest.raises(RuntimeError if isinstance(exc, StopIteration) else type(exc)):
        await chat(client, fake.url, on_event=on_event, model="m", messages=MSGS,
                   extra={"fake": {"tokens_per_s": 100, "n_tokens": 500}}, stall_timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, 2.0)


async def test_a_header_that_is_not_latin1_is_a_clear_error_and_leaks_nothing(fake: FakeLLM,
                                                                             client: LLMClient) -> None:
    key = "sk-\u2014-dash"
    err, elapsed = await fails(client, fake.url, LLM_HTTP, api_key=key)
    assert key not in str(err) and elapsed < 1.0 and "api_key" in str(err)
    assert client.connects == 0 and fake.stats.requests == 0


async def test_list_models_on_a_204_is_a_bad_response_not_a_stall(client: LLMClient) -> None:
    server, url, _ = await _keepalive_server([b"HTTP/1.1 204 No Content\r\n\r\n"])
    try:
        t0 = time.monotonic()
        with pytest.raises(LLMError) as ei:
            await list_models(client, url, timeout=3.0)
        assert ei.value.code == LLM_BAD_RESPONSE and time.monotonic() - t0 < 1.0
    finally:
        server.close()


async def test_cancelling_chat_stops_the_callbacks_at_once(fake: FakeLLM, client: LLMClient) -> None:
    got: list[str] = []
    task = chat_task(client, fake.url, got, tokens_per_s=2000, n_tokens=5000)
    assert await fake.wait_for(lambda s: s.tokens_sent >= 20, 2.0)
    task.cancel()
    n = len(got)
    with pytest.raises(asyncio.CancelledError):
        await task
    # Barrier: the fake has seen the client hang up. The client stops reading the socket when it closes it,
    # which comes before the fake can see the close; so every callback the stream could still have made
    # (from bytes read before the close) has run by now. A client that never closed fails the wait.
    assert await fake.wait_for(lambda s: s.active_streams == 0 and s.client_closed == 1, BOUND)
    assert len(got) <= n + 1  # nothing more after the cancellation took effect


# --------------------------------------------------------------------------- an answer is complete only when the
# model said so (finish_reason); the context window's errors in every shape servers use


async def test_done_without_finish_reason_is_dropped_and_the_text_before_it_delivered(
        fake: FakeLLM, client: LLMClient) -> None:
    """llama-cpp-python's server ends a running answer with a clean [DONE] (no finish_reason) when another
    request arrives: not a complete answer."""
    got: list[str] = []
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS, stall_timeout=2,
                                    first_token_timeout=3, extra={"fake": {"done_after": 5, "n_tokens": 20}}):
            got.append(ev.text)
    assert ei.value.code == LLM_DROPPED, (ei.value.code, str(ei.value))
    assert "[DONE]" in str(ei.value) and "finish_reason" in str(ei.value)
    assert "不完整" in ei.value.user_message
    assert got == reply_tokens(FakeLLMConfig(n_tokens=20), MSGS)[:5]
    # chat() too: the deltas were delivered, the call fails
    seen: list[str] = []
    with pytest.raises(LLMError) as ei:
        await chat(client, fake.url, on_event=lambda k, t: seen.append(t), model="m", messages=MSGS,
                   extra={"fake": {"done_after": 3}})
    assert ei.value.code == LLM_DROPPED and len(seen) == 3


async def test_close_after_text_without_finish_reason_or_done_is_dropped(client: LLMClient) -> None:
    server, url = await _raw_server(f"data: {_chunk('partial')}\n\n".encode())
    err, _ = await fails_then_close(server, client, url, LLM_DROPPED)
    assert "finish_reason" in str(err)


async def test_max_tokens_is_sent_only_when_positive(fake: FakeLLM, client: LLMClient) -> None:
    for limit in (0, -1):
        await collect(client, fake.url, max_tokens=limit)
        assert "max_tokens" not in fake.stats.last_request  # 0 or less: the server's own limit
    events = await collect(client, fake.url, max_tokens=2048)
    assert fake.stats.last_request["max_tokens"] == 2048
    assert events[-1].finish_reason == "stop"


@pytest.mark.parametrize("text, expected", [
    ("request (3892 tokens) exceeds the available context size (2048 tokens), try increasing it", True),
    ('{"error": {"code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 3892}}', True),
    ("Context size has been exceeded.", True),
    ("This model's maximum context length is 8192 tokens. However, you requested 9100 tokens", True),
    ("CONTEXT_LENGTH_EXCEEDED", True),
    ("slot unavailable, n_ctx too small", True),
    ("the prompt does not fit in the context window", True),
    ("Compute error.", False),
    ("No models loaded. Please load a model in the developer page", False),
    ("Invalid or missing API token.", False),
    ("", False),
])
def test_is_context_error(text: str, expected: bool) -> None:
    assert is_context_error(text) is expected


@pytest.mark.parametrize("shape, status", [("http", 400), ("http500", 500)])
async def test_context_error_as_an_http_error_before_the_stream(fake: FakeLLM, client: LLMClient, shape: str,
                                                                status: int) -> None:
    err, _ = await fails(client, fake.url, LLM_CONTEXT, fake={"n_ctx": 10, "ctx_error": shape})
    assert err.status == status
    if shape == "http":  # llama.cpp's words, with the numbers, for the operator
        assert f"request ({prompt_tokens(MSGS)} tokens) exceeds the available context size (10 tokens)" in str(err)
    else:
        assert "Context size has been exceeded." in str(err)
    assert "太长" in err.user_message
    assert fake.stats.context_errors == 1


@pytest.mark.parametrize("shape", ["empty", "done"])
async def test_a_200_stream_without_any_chunk_is_a_context_error(fake: FakeLLM, client: LLMClient,
                                                                 shape: str) -> None:
    """Headers then the end of the body (or just [DONE]): what a server does with a request over its context."""
    err, _ = await fails(client, fake.url, LLM_CONTEXT, fake={"n_ctx": 10, "ctx_error": shape})
    assert "no chunk" in str(err) and ("[DONE] only" in str(err)) is (shape == "done")
    assert "上下文" in err.user_message


async def test_headers_then_a_close_is_a_context_error(client: LLMClient) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    server, url, _ = await _piecewise_server(head, [])  # then the connection closes, the body unterminated
    err, _ = await fails_then_close(server, client, url, LLM_CONTEXT)
    assert "no chunk" in str(err)


async def test_context_error_object_at_the_start_of_the_stream(fake: FakeLLM, client: LLMClient) -> None:
    err, _ = await fails(client, fake.url, LLM_CONTEXT, fake={"n_ctx": 10, "ctx_error": "stream"})
    assert "context length of only 10 tokens" in str(err)
    assert "太长" in err.user_message


async def test_context_error_event_with_unparseable_data(client: LLMClient) -> None:
    server, url = await _raw_server(b"event: error\ndata: n_ctx exceeded\n\n")
    await fails_then_close(server, client, url, LLM_CONTEXT)


async def test_context_filling_up_mid_answer(fake: FakeLLM, client: LLMClient) -> None:
    """The prompt fits, the answer does not: llama.cpp's in-stream error after the tokens that fit (the text
    before it delivered, the message says the answer was cut off), or finish_reason "length"."""
    n_ctx = prompt_tokens(MSGS) + 3
    got: list[str] = []
    with pytest.raises(LLMError) as ei:
        async for ev in stream_chat(client, fake.url, model="m", messages=MSGS,
                                    extra={"fake": {"n_ctx": n_ctx, "ctx_error": "stream", "n_tokens": 10}}):
            got.append(ev.text)
    assert ei.value.code == LLM_CONTEXT and "Context size has been exceeded." in str(ei.value)
    assert len(got) == 3 and "回答不完整" in ei.value.user_message
    events = await collect(client, fake.url, fake={"n_ctx": n_ctx, "n_tokens": 10})
    assert len([e for e in events if e.kind == "text"]) == 3 and events[-1].finish_reason == "length"
    events = await collect(client, fake.url, fake={"n_ctx": n_ctx + 7, "n_tokens": 10})
    assert len([e for e in events if e.kind == "text"]) == 10 and events[-1].finish_reason == "stop"


async def test_fake_counts_prompt_tokens_from_characters(fake: FakeLLM, plain_http: aiohttp.ClientSession) -> None:
    msgs = [{"role": "system", "content": "你好"}, {"role": "user", "content": "abcdefgh世界"}]
    assert prompt_tokens(msgs) == (4 + 2) + (4 + 2 + 2)
    async with plain_http.post(f"{fake.url}/chat/completions", json={
            "model": "fake-model", "messages": msgs, "stream": True, "stream_options": {"include_usage": True},
            "fake": {"n_ctx": 13}}) as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"]["type"] == "exceed_context_size_error"
    assert body["error"]["n_prompt_tokens"] == 14 and body["error"]["n_ctx"] == 13
    assert list(fake.stats.recent_requests)[-1]["messages"] == msgs
