"""node/http1.py's response head reader against h11's: for generated heads (valid, ambiguous, malformed, cut
short, with interim responses, then mutated byte by byte) both give the same head -- status, headers, body
framing, keep-alive and the bytes after it -- or both refuse it, or both wait for more. The request's bytes are
what h11 writes, and what h11 would not send is refused."""

from __future__ import annotations

import random

import h11
import pytest

from node.http1 import MAX_HEAD, FramingError, Head, read_head, request_bytes

STATUS = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 200", b"HTTP/1.1 200 ",
          b"HTTP/1.1 500 Internal Server Error", b"HTTP/2.0 200 OK", b"HTTP/1.1 99 Low", b"HTTP/1.1 1000 x",
          b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 200 O\tK \x01", b"HTTP/1.1  200 OK", b"http/1.1 200 OK",
          b"HTTP/1.1 200 O\x00K", b" HTTP/1.1 200 OK", b"HTTP/1 200 OK"]
INTERIM = [b"HTTP/1.1 100 Continue", b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 101 Switching Protocols"]
HEADERS = [b"Content-Type: text/event-stream", b"Transfer-Encoding: chunked", b"Transfer-Encoding: CHUNKED",
           b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding:chunked ", b"Content-Length: 12",
           b"Content-Length: 12, 12", b"Content-Length: 12, 13", b"Content-Length: 0012", b"Content-Length: -1",
           b"Content-Length: 123456789012345678901", b"Content-Length:", b"Connection: close",
           b"Connection: keep-alive", b"Connection: Keep-Alive, CLOSE", b"X-A: b\tc", b"X-A:   ", b"X-A : b",
           b"X-A\x01: b", b": b", b"X-A: b\x00c", b" folded line", b"\tfolded", b"X-A: \x80\xff", b"no colon",
           b"Server: LM Studio"]


def _head(rng: random.Random) -> bytes:
    eol = b"\r\n" if rng.random() < 0.8 else b"\n"
    parts = [rng.choice(INTERIM) + eol + eol] if rng.random() < 0.15 else []
    lines = [rng.choice(STATUS) if rng.random() < 0.4 else b"HTTP/1.1 200 OK"]
    lines += rng.choices(HEADERS, k=rng.randrange(0, 6))
    parts.append(b"".join(ln + (eol if rng.random() < 0.95 else b"\r\n") for ln in lines) + eol + b"body")
    data = b"".join(parts)
    for _ in range(rng.choice([0, 0, 0, 1, 2])):  # byte-level mutations
        i = rng.randrange(len(data) + 1)
        op = rng.random()
        c = bytes([rng.choice(b"\r\n \t:,0aZ\x00\x7f\xff")])
        data = data[:i] + c + data[i:] if op < 0.4 else data[:i] + data[i + 1:] if op < 0.7 else \
            data[:i] + c + data[i + 1:]
    if rng.random() < 0.1:
        data = data[:rng.randrange(len(data) + 1)]  # cut short
    return data


def _ours(data: bytes) -> object:
    try:
        got = read_head(data)
    except FramingError:
        return "error"
    if got is None:
        return None
    head, rest = got
    return head.status, head.headers, head.framing, head.length, head.keep_alive, rest


def _h11(data: bytes) -> object:
    if not data:  # (h11 takes no bytes as the end of the stream; data_received never gets none)
        return None
    h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    h.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    h.send(h11.EndOfMessage())
    try:
        h.receive_data(data)
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                return None
            if type(ev) is h11.Response:
                head = Head(ev.status_code, ev.http_version, list(ev.headers))
                return head.status, head.headers, head.framing, head.length, head.keep_alive, h.trailing_data[0]
            if type(ev) is not h11.InformationalResponse:
                return "error"
    except (h11.ProtocolError, FramingError):
        return "error"


@pytest.mark.parametrize("seed", range(4))
def test_head_reader_agrees_with_h11(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1500):
        data = _head(rng)
        assert _ours(data) == _h11(data), data


def test_a_head_over_max_head_bytes_is_refused_while_incomplete() -> None:
    assert read_head(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (MAX_HEAD - 30)) is None
    with pytest.raises(FramingError):
        read_head(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (MAX_HEAD + 1))
    assert _h11(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (MAX_HEAD + 1)) == "error"


@pytest.mark.parametrize("body", [None, b"", b'{"model":"m"}'])
def test_request_bytes_are_what_h11_writes(body: bytes | None) -> None:
    headers = (("Host", "127.0.0.1:1234"), ("Connection", "keep-alive"), ("Accept", "text/event-stream"),
               ("Authorization", "Bearer k\xe9y"))
    h = h11.Connection(h11.CLIENT)
    hdrs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if body is not None:
        hdrs.append((b"Content-Length", b"%d" % len(body)))
    out = h.send(h11.Request(method="POST", target="/v1/chat/completions", headers=hdrs)) or b""
    out += (h.send(h11.Data(data=body)) or b"") if body else b""
    out += h.send(h11.EndOfMessage()) or b""
    assert request_bytes("POST", "/v1/chat/completions", headers, body) == out


@pytest.mark.parametrize("bad", [("Authorization", "Bearer a\r\nX: y"), ("Authorization", "Bearer \u4e2d"),
                                 ("Ho st", "x")])
def test_request_bytes_refuse_what_h11_would_not_send(bad: tuple[str, str]) -> None:
    with pytest.raises((h11.LocalProtocolError, UnicodeEncodeError)):
        request_bytes("POST", "/", (("Host", "x"), bad), b"{}")
