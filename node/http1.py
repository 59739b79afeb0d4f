"""One HTTP/1.1 client connection to LM Studio: an ``asyncio.Protocol``, h11 for the request and the response
head, and the response body's framing by hand (the hot path).

:class:`Conn` writes each request through a fresh ``h11.Connection`` (which validates it) and hands every
read to the response using the connection (at most one at a time) in the same ``data_received`` callback: no
task, future or stream reader per read. :func:`read_head` lets h11 parse and check the status line and
headers (a repeated or conflicting Content-Length, any Transfer-Encoding but a single ``chunked``, a
malformed line: :class:`FramingError`) and picks the body's framing from them; :class:`BodyReader` then cuts
the body (chunked, Content-Length or until close) into pieces for a sink, one call per read. A connection is
reused only when its response ended cleanly, the server kept it alive (HTTP/1.1, no ``close`` in any
``Connection`` header) and nothing came after the body; bytes on an idle connection, or the server's EOF,
mean it is never reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import h11

__all__ = ["CHUNKED", "CLOSE", "LENGTH", "MAX_HEAD", "BodyReader", "Conn", "FramingError", "Head", "Reader",
           "read_head", "request_event"]

MAX_HEAD = 64 * 1024  # bytes of response status line + headers at most
CLOSE, LENGTH, CHUNKED = 0, 1, 2  # body framings: until the close, Content-Length, chunked
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER = 0, 1, 2, 3  # chunked reader states
_HEX = b"0123456789abcdefABCDEF"


class FramingError(ValueError):
    """The response's head or framing is not HTTP/1.1 this client reads."""


class Reader(Protocol):
    """What a connection hands its bytes and its end to (node/llm_response.py ``Response``)."""

    def feed(self, data: bytes) -> None: ...

    def lost(self, exc: Exception | None) -> None: ...


def request_event(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    """The request head, validated now (raises ``h11.LocalProtocolError`` on a header h11 would not send)."""
    return h11.Request(method=method, target=target, headers=headers)


class Head:
    """A response head as h11 read it, and the body framing it gives."""

    __slots__ = ("status", "headers", "framing", "length", "keep_alive")

    def __init__(self, resp: h11.Response) -> None:
        self.status = resp.status_code
        self.headers: list[tuple[bytes, bytes]] = list(resp.headers)  # names lower-case, in order, repeats kept
        names = [n for n, _ in self.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise FramingError("both Content-Length and Transfer-Encoding")
        self.length = 0
        if self.status in (204, 304):  # no body, whatever the headers say
            self.framing = LENGTH
        elif b"transfer-encoding" in names:  # h11 let only a single "chunked" through
            self.framing = CHUNKED
        elif b"content-length" in names:  # h11 checked it: digits, every copy the same
            self.framing, self.length = LENGTH, int(self.values(b"content-length")[0])
        else:
            self.framing = CLOSE
        tokens = {t.strip().lower() for v in self.values(b"connection") for t in v.split(b",")}
        self.keep_alive = resp.http_version == b"1.1" and b"close" not in tokens and self.framing != CLOSE

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower-case), in order."""
        return [v for n, v in self.headers if n == name]


def read_head(h: h11.Connection, data: bytes) -> tuple[Head, bytes] | None:
    """Feed ``data`` to h11 until the final response head: (the head, the bytes after it), or None while the
    head is incomplete. Interim (1xx) responses are skipped. Raises FramingError."""
    try:
        h.receive_data(data)
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                return None
            if type(ev) is h11.Response:
                return Head(ev), h.trailing_data[0]
            if type(ev) is not h11.InformationalResponse:
                raise FramingError(f"unexpected {type(ev).__name__} before the response head")
    except h11.ProtocolError as exc:
        raise FramingError(str(exc) or type(exc).__name__) from None


Sink = Callable[[bytes], None]


class BodyReader:
    """Cuts a response body into pieces for a sink, as they arrive. ``feed(data, sink)`` (the method for the
    framing, picked once) returns None while the body goes on, or, once it ended, how many bytes came after it
    (0: none, the connection may be reused)."""

    __slots__ = ("framing", "left", "cstate", "cbuf", "feed")

    def __init__(self, framing: int, length: int = 0) -> None:
        self.framing = framing
        self.left = length  # LENGTH: bytes still to come; CHUNKED: of the current chunk
        self.cstate = _C_SIZE
        self.cbuf = b""
        self.feed: Callable[[bytes, Sink], int | None] = (
            self._chunked if framing == CHUNKED else self._length if framing == LENGTH else self._close)

    def _close(self, data: bytes, sink: Sink) -> int | None:
        sink(data)
        return None

    def _length(self, data: bytes, sink: Sink) -> int | None:
        left = self.left
        if len(data) >= left:
            self.left = 0
            sink(data[:left] if len(data) > left else data)
            return len(data) - left
        self.left = left - len(data)
        sink(data)
        return None

    def _chunked(self, data: bytes, sink: Sink) -> int | None:
        if not self.cbuf and self.cstate == _C_SIZE:  # the usual read: exactly one whole chunk (one event)
            i = data.find(b"\r\n", 0, 18)
            if 0 < i < 17 and data.endswith(b"\r\n"):
                size_s = data[:i]
                if not size_s.translate(None, _HEX):  # hex digits only
                    size = int(size_s, 16)
                    if size > 0 and len(data) == i + size + 4:
                        sink(data[i + 2:-2])
                        return None
        buf = self.cbuf + data if self.cbuf else data
        pos, n = 0, len(buf)
        st = self.cstate
        while pos < n:
            if st == _C_DATA:
                take = min(self.left, n - pos)
                piece = buf[pos:pos + take] if (pos or take != n) else buf
                pos += take
                self.left -= take
                if self.left == 0:
                    st = _C_CRLF
                self.cstate = st
                self.cbuf = b""
                sink(piece)
            elif st == _C_SIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    if n - pos > 1024:
                        raise FramingError("bad chunked encoding (size line)")
                    break
                size_s = buf[pos:i].split(b";", 1)[0].strip(b" \t")
                if not 0 < len(size_s) <= 16 or size_s.translate(None, _HEX):
                    raise FramingError(f"bad chunked encoding ({buf[pos:i][:40].decode('latin-1')!r})")
                size = int(size_s, 16)
                pos = i + 2
                if size:
                    self.left, st = size, _C_DATA
                else:
                    st = _C_TRAILER
            elif st == _C_CRLF:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise FramingError("bad chunked encoding (no CRLF after data)")
                pos += 2
                st = _C_SIZE
            else:  # trailers, then the blank line that ends the body
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    if n - pos > MAX_HEAD:
                        raise FramingError("chunked trailers too long")
                    break
                if i == pos:
                    self.cstate, self.cbuf = st, b""
                    return n - pos - 2
                pos = i + 2
        self.cstate = st
        self.cbuf = buf[pos:] if pos < n else b""
        return None


class Conn(asyncio.Protocol):
    """One connection; its bytes go to the response reading it (``ex``)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ex: Reader | None = None
        self.closed = False
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # bytes on an idle connection: not a response to anything; do not reuse it
            self.close()
        else:
            ex.feed(data)

    def eof_received(self) -> bool:
        self.closed = True  # the server is done with this connection: never reuse it (connection_lost follows)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex, self.ex = self.ex, None
        if ex is not None:
            ex.lost(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def open(self) -> bool:
        """Whether the connection can still carry bytes (not closed by either side)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, request: h11.Request, body: bytes | None) -> None:
        """Write ``request`` and its ``body`` (whose length the request's Content-Length gives) in one write,
        through a fresh h11 connection state, which then reads the response head (:func:`read_head`)."""
        h = self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        out = h.send(request) or b""
        if body:
            out += h.send(h11.Data(data=body)) or b""
        out += h.send(h11.EndOfMessage()) or b""
        assert self.transport is not None
        self.transport.write(out)
