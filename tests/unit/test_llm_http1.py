"""node.llm's HTTP/1.1 framing (h11, node/http1.py) against raw asyncio TCP servers on 127.0.0.1 sending
responses whose framing headers are ambiguous: each is refused as LLM_BAD_RESPONSE, at once. The hand-written
parser this replaced let a repeated header overwrite the first, took any Transfer-Encoding containing
"chunked" as chunked, and read a response with both Content-Length and Transfer-Encoding."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from node.llm import LLM_BAD_RESPONSE, LLMClient
from tests.unit.test_llm import BOUND, _keepalive_server, _sse_body, collect, fails, text_of

pytestmark = pytest.mark.timeout(20)

SSE = b"Content-Type: text/event-stream\r\n"


@pytest.fixture
async def client() -> AsyncIterator[LLMClient]:
    async with LLMClient() as c:
        yield c


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


BODY = _sse_body("a", "b")

AMBIGUOUS = {
    # the first Content-Length would end the body after 5 bytes; the old parser kept the second
    "repeated-content-length": b"HTTP/1.1 200 OK\r\n" + SSE + b"Content-Length: 5\r\nContent-Length: %d\r\n\r\n"
                               % len(BODY) + BODY,
    # not the chunked coding, though the name contains it
    "te-notchunked": b"HTTP/1.1 200 OK\r\n" + SSE + b"Transfer-Encoding: notchunked\r\n\r\n" + _chunked(BODY),
    # a coding the client cannot undo, before chunked
    "te-gzip-chunked": b"HTTP/1.1 200 OK\r\n" + SSE + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + _chunked(BODY),
    "te-repeated": b"HTTP/1.1 200 OK\r\n" + SSE + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + _chunked(BODY),
    # which one frames the body? (a request smuggling shape)
    "content-length-and-te": b"HTTP/1.1 200 OK\r\n" + SSE + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                             % len(_chunked(BODY)) + _chunked(BODY),
    # a repeated Content-Type: the old parser kept the last one only
    "content-type-repeated": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + SSE
                             + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
}


async def _read_twice(client: LLMClient, resp: bytes) -> list[int]:
    """Two streams from a server answering every request with ``resp``: requests per connection."""
    server, url, per_conn = await _keepalive_server([resp])
    try:
        for _ in range(2):
            assert text_of(await collect(client, url)) == "ab"
    finally:
        server.close()
    return per_conn


@pytest.mark.parametrize("resp", list(AMBIGUOUS.values()), ids=list(AMBIGUOUS))
async def test_ambiguous_framing_is_a_bad_response_at_once(client: LLMClient, resp: bytes) -> None:
    server, url, _ = await _keepalive_server([resp], close_after=BOUND)  # held open: no drop to hide behind
    try:
        _, elapsed = await fails(client, url, LLM_BAD_RESPONSE, stall_timeout=BOUND - 1, first_token_timeout=BOUND - 1)
    finally:
        server.close()
    assert elapsed < 1.0


async def test_a_repeated_connection_header_saying_close_is_not_overwritten(client: LLMClient) -> None:
    """``Connection: close`` then ``Connection: keep-alive``: the server said it will close, so the connection
    is not reused (the old parser kept only the last header and sent the next request on it)."""
    resp = (b"HTTP/1.1 200 OK\r\n" + SSE + b"Connection: close\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n"
            % len(BODY) + BODY)
    assert await _read_twice(client, resp) == [1, 1] and client.connects == 2


async def test_plain_framings_still_read_and_reused(client: LLMClient) -> None:
    """The unambiguous shapes next to the ones above: Content-Length, chunked (any case) and a repeated
    identical Content-Length (RFC 9110 allows it) are read, and the connection is reused."""
    for resp in (b"HTTP/1.1 200 OK\r\n" + SSE + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
                 b"HTTP/1.1 200 OK\r\n" + SSE + b"Transfer-Encoding: Chunked\r\n\r\n" + _chunked(BODY),
                 b"HTTP/1.1 200 OK\r\n" + SSE + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                 % (len(BODY), len(BODY)) + BODY):
        assert await _read_twice(client, resp) == [2], resp[:120]
