"""Fuzz cases for the node's LM Studio client: whole HTTP responses, mostly a well-formed LM Studio stream
(chunked, Content-Length or close-delimited; LF, CRLF or CR line ends; comments, ``event:`` lines, error
objects, ``[DONE]``) with its head or body mutated, sometimes random bytes. Each case is made from its own
``random.Random`` (harness.Fuzz.rng), so a seed replays the same bytes."""

from __future__ import annotations

import json
import random

HEADER_JUNK = [
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked, chunked",
    b"Content-Length: 7", b"Content-Length: -1", b"Content-Length: 99999999999999999999", b"Content-Length: x",
    b"Connection: close", b"Connection: keep-alive", b"Content-Type: text/html", b"Content-Type: text/event-stream",
    b"X-Odd:", b": no name", b"no colon", b"X-Folded: a\r\n b", b"X-Nul: \x00", b"X-Big: " + b"y" * 70000,
]
STATUS = [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 400 Bad Request",
          b"HTTP/1.1 404 Not Found", b"HTTP/1.1 500 Internal Server Error", b"HTTP/1.1 204 No Content",
          b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK", b"HTTP/2 200", b"HTTP/1.1 2OO OK", b"ICY 200 OK"]


def _event(rng: random.Random, i: int) -> bytes:
    kind = rng.random()
    if kind < 0.6:
        obj: object = {"choices": [{"index": 0, "delta": {"content": rng.choice(["a", "你好", "😀", "", " x"])},
                                    "finish_reason": None}]}
    elif kind < 0.7:
        obj = {"choices": [{"index": 0, "delta": {}, "finish_reason": rng.choice(["stop", "length"])}],
               "usage": {"total_tokens": i}}
    elif kind < 0.75:
        obj = {"error": {"message": rng.choice(["Compute error.", "Context size has been exceeded."])}}
    elif kind < 0.8:
        obj = {"choices": [{"delta": {"content": 5, "reasoning": ["x"]}}]}
    else:
        obj = {"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}
    data = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()
    nl = rng.choice([b"\n", b"\r\n", b"\r"])
    pre = rng.choice([b"", b"", b"", b": keep-alive" + nl, b"event: error" + nl, b"id: 1" + nl])
    sep = rng.choice([b"data: ", b"data: ", b"data:"])
    return pre + sep + data + nl + nl


def sse_body(rng: random.Random) -> bytes:
    events = [_event(rng, i) for i in range(rng.randrange(0, 12))]
    if rng.random() < 0.8:
        events.append(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
    if rng.random() < 0.7:
        events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        if not b:
            break
        op, i = rng.random(), rng.randrange(len(b))
        if op < 0.3:
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            del b[i:i + rng.randrange(1, 20)]
        elif op < 0.7:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op < 0.85:
            b[i:i] = rng.choice([b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"0\r\n\r\n", b":", b"data:"])
        else:
            del b[i:]
    return bytes(b)


def make_case(rng: random.Random) -> tuple[bytes, bool]:
    """(the response bytes, whether the server holds the connection open after them instead of closing)."""
    hold = rng.random() < 0.1
    if rng.random() < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))), hold
    body = sse_body(rng)
    framing = rng.choice(["chunked", "length", "close"])
    headers = [rng.choice(STATUS), b"Content-Type: text/event-stream"]
    if framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        out, i = b"", 0
        while i < len(body):
            n = rng.randrange(1, 80)
            out += b"%x\r\n%s\r\n" % (len(body[i:i + n]), body[i:i + n])
            i += n
        body = out + b"0\r\n\r\n"
    elif framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        headers.insert(rng.randrange(1, len(headers) + 1), rng.choice(HEADER_JUNK))
    head = b"\r\n".join(headers) + b"\r\n\r\n"
    where = rng.random()
    if where < 0.3:
        head = _mutate(rng, head)
    elif where < 0.7:
        body = _mutate(rng, body)
    return head + body, hold
