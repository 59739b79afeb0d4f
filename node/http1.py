"""One HTTP/1.1 client connection to LM Studio: an ``asyncio.Protocol``, the request's bytes, and a strict
reader of the response head and of the body's framing (the hot path).

:func:`request_bytes` writes a request; h11 checks its fixed part (method, target, headers) once per distinct
set. :class:`Conn` hands every read to the response using the connection (at most one at a time) in the same
``data_received`` callback: no task, future or stream reader per read. :func:`read_head` parses the status line
and headers with h11's grammar and rules (a malformed line, a repeated or conflicting Content-Length, any
Transfer-Encoding but a single ``chunked``: :class:`FramingError`) and picks the body's framing from them;
:class:`BodyReader` then cuts the body (chunked, Content-Length or until close) into pieces for a sink, one
call per read. A connection is reused only when its response ended cleanly, the server kept it alive
(HTTP/1.1, no ``close`` in any ``Connection`` header) and nothing came after the body; bytes on an idle
connection, or the server's EOF, mean it is never reused.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from typing import Protocol

import h11

__all__ = ["CHUNKED", "CLOSE", "LENGTH", "MAX_HEAD", "BodyReader", "Conn", "FramingError", "Head", "Reader",
           "read_head", "request_bytes"]

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


@functools.lru_cache(maxsize=64)
def _request_head(method: str, target: str, headers: tuple[tuple[str, str], ...]) -> bytes:
    enc = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    h11.Request(method=method, target=target, headers=[*enc, (b"Content-Length", b"0")])  # checks it all
    return b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target.encode("ascii")) + b"".join(
        b"%s: %s\r\n" % kv for kv in enc)


def request_bytes(method: str, target: str, headers: tuple[tuple[str, str], ...], body: bytes | None) -> bytes:
    """The request (head and ``body``, with its Content-Length) as it is written. The head's fixed part is
    checked by h11 once per distinct (method, target, headers): raises ``UnicodeEncodeError`` (not Latin-1
    text) or ``h11.LocalProtocolError`` (a header h11 would not send)."""
    head = _request_head(method, target, headers)
    if body is None:
        return head + b"\r\n"
    return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)


# the response head's grammar (RFC 9112), as h11 reads it
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VCHAR = rb"[^\x00\s]"
_STATUS_RE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: (?:[ \t]|" + _VCHAR + rb")*)?")
_FIELD_RE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*")
_END_RE = re.compile(rb"\n\r?\n")  # the blank line ending a head (CRLF or bare LF lines)
_DIGITS_RE = re.compile(rb"[0-9]{1,20}")


class Head:
    """A response head: its status, headers and the body framing they give."""

    __slots__ = ("status", "headers", "framing", "length", "keep_alive")

    def __init__(self, status: int, version: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers  # names lower-case, in order, repeats kept (but a repeated equal Content-Length)
        names = [n for n, _ in headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise FramingError("both Content-Length and Transfer-Encoding")
        self.length = 0
        if status in (204, 304):  # no body, whatever the headers say
            self.framing = LENGTH
        elif b"transfer-encoding" in names:  # _headers() let only a single "chunked" through
            self.framing = CHUNKED
        elif b"content-length" in names:  # _headers() checked it: digits, every copy the same
            self.framing, self.length = LENGTH, int(self.values(b"content-length")[0])
        else:
            self.framing = CLOSE
        tokens = {t.strip().lower() for v in self.values(b"connection") for t in v.split(b",")}
        self.keep_alive = version == b"1.1" and b"close" not in tokens and self.framing != CLOSE

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower-case), in order."""
        return [v for n, v in self.headers if n == name]


def _headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The header lines' (lower-case name, value) pairs; raises FramingError on a malformed line, a repeated or
    conflicting Content-Length, or a Transfer-Encoding but a single ``chunked``."""
    out: list[tuple[bytes, bytes]] = []
    folded: list[bytes] = []
    for line in lines:  # obs-fold: a line starting with a space or tab continues the one before
        if line[:1] in (b" ", b"\t"):
            if not folded:
                raise FramingError("continuation line at start of headers")
            folded[-1] += b" " + line.lstrip(b" \t")
        else:
            folded.append(line)
    length = None
    chunked = False
    for line in folded:
        m = _FIELD_RE.fullmatch(line)
        if m is None:
            raise FramingError(f"illegal header line: {line[:60]!r}")
        name, value = m.group(1).lower(), m.group(2) or b""
        if name == b"content-length":
            lengths = {v.strip() for v in value.split(b",")}
            if len(lengths) != 1:
                raise FramingError("conflicting Content-Length headers")
            value = lengths.pop()
            if not _DIGITS_RE.fullmatch(value):
                raise FramingError("bad Content-Length")
            if length is None:
                length = value
            elif length != value:
                raise FramingError("conflicting Content-Length headers")
            else:
                continue  # the same again: kept once
        elif name == b"transfer-encoding":
            if chunked:
                raise FramingError("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise FramingError("Only Transfer-Encoding: chunked is supported")
            chunked = True
        out.append((name, value))
    return out


def read_head(buf: bytes) -> tuple[Head, bytes] | None:
    """The final response head at the start of ``buf``: (the head, the bytes after it), or None while it is
    incomplete (the caller keeps ``buf`` and calls again with more). Interim (1xx) responses are skipped.
    Raises FramingError on what is not an HTTP/1.x response head, as h11 reads one."""
    while True:
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":
            raise FramingError("no response line received")
        m = _END_RE.search(buf)
        if m is None:
            if buf and buf[0] < 0x21:
                raise FramingError("illegal status line")
            if len(buf) > MAX_HEAD:
                raise FramingError("response head too long")
            return None
        lines = buf[:m.start()].split(b"\n")
        lines = [ln[:-1] if ln[-1:] == b"\r" else ln for ln in lines]
        rest = buf[m.end():]
        sm = _STATUS_RE.fullmatch(lines[0])
        if sm is None:
            raise FramingError(f"illegal status line: {lines[0][:60]!r}")
        headers = _headers(lines[1:])
        status = int(sm.group(2))
        if status >= 200:
            return Head(status, sm.group(1), headers), rest
        if status < 100 or status == 101:  # 101: an upgrade this client never asked for
            raise FramingError(f"unexpected status {status}")
        buf = rest  # an interim response (100 Continue): the final one follows


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

    def whole(self, data: bytes) -> int:
        """Where the chunk's data starts when ``data`` is exactly one whole chunk (a size line with no
        extension, the data, CRLF: the data is ``data[start:-2]``) starting at a chunk boundary, the usual read
        of a stream; 0 for anything else (``feed`` it)."""
        if self.cbuf or self.cstate != _C_SIZE:
            return 0
        i = data.find(b"\r\n", 0, 18)
        if 0 < i < 17 and data[-2:] == b"\r\n":
            size_s = data[:i]
            if not size_s.translate(None, _HEX) and int(size_s, 16) == len(data) - i - 4 > 0:  # hex digits only
                return i + 2
        return 0

    def _chunked(self, data: bytes, sink: Sink) -> int | None:
        start = self.whole(data)
        if start:
            sink(data[start:-2])
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

    def send(self, data: bytes) -> None:
        """Write a request (:func:`request_bytes`) in one write."""
        assert self.transport is not None
        self.transport.write(data)
