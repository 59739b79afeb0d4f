"""One HTTP/1.1 client connection to LM Studio: an ``asyncio.Protocol`` whose HTTP framing is h11's.

:class:`Conn` holds the connection's ``h11.Connection`` (the request is written through it, the response read
from it) and hands every read to the response using the connection (at most one at a time) in the same
``data_received`` callback: no task, future or stream reader per read. A connection is reusable once both
sides of a request/response are done and neither asked to close (:meth:`Conn.reusable`); bytes that arrive
while no response is using it, or the server's EOF, mean it is never reused.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import h11

__all__ = ["MAX_HEAD", "Conn", "Reader", "request_event"]

MAX_HEAD = 64 * 1024  # bytes of response status line + headers at most


class Reader(Protocol):
    """What a connection hands its bytes and its end to (node/llm_response.py ``Response``)."""

    def feed(self, data: bytes) -> None: ...

    def lost(self, exc: Exception | None) -> None: ...


def request_event(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    """The request head, validated now (raises ``h11.LocalProtocolError`` on a header h11 would not send)."""
    return h11.Request(method=method, target=target, headers=headers)


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
        """Write ``request`` and its ``body`` (whose length the request's Content-Length gives) in one write."""
        h = self.h11
        out = h.send(request) or b""
        if body:
            out += h.send(h11.Data(data=body)) or b""
        out += h.send(h11.EndOfMessage()) or b""
        assert self.transport is not None
        self.transport.write(out)

    def reusable(self) -> bool:
        """Both sides of the last request/response are done, neither asked to close, nothing more came."""
        h = self.h11
        return (h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]
                and self.open())

    def next_cycle(self) -> None:
        """Ready the connection for the next request (only when :meth:`reusable`)."""
        self.h11.start_next_cycle()
