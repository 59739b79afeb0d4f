"""The load generator's WebSocket users: a small RFC 6455 client written as an asyncio Protocol.

Each user is a state machine run from ``data_received``, not a task: a frame is decoded
(``core.wsframe.frames``) and handed to ``on_frame`` in the same callback, with no coroutine wake or queue hop
per frame, so the generator takes little of the CPU it shares with the system it measures.

What it speaks: the client side of RFC 6455 for what the edge sends (unfragmented text frames, ping, close;
a fragmented or binary frame is reported as an error), masked text frames out (``core.wsframe.client_frame``);
the HTTP/1.1 upgrade with ``Sec-WebSocket-Accept`` checked. It is for the bench only; the product's clients are
browsers and WeChat.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any

import msgspec

from core.wsframe import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, client_frame, frames

__all__ = ["WsUser", "connect", "WsError"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_decode = msgspec.json.Decoder().decode


class WsError(Exception):
    pass


class WsUser(asyncio.Protocol):
    """One WebSocket connection. ``on_frame(user, obj)`` gets every text frame decoded as JSON, synchronously,
    in ``data_received``; ``on_close(user, reason)`` once when the connection ends."""

    def __init__(self, key: bytes, on_frame: Callable[[WsUser, Any], None],
                 on_close: Callable[[WsUser, str], None]) -> None:
        self.key = key
        self.on_frame = on_frame
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.state: Any = None  # the owner's per-user state
        self._buf = b""
        self._head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(client_frame(OP_TEXT, text.encode()))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
            self.transport.close()

    def _end(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            if not self.upgraded.done():
                self.upgraded.set_exception(WsError(reason))
            self.on_close(self, reason)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost ({exc})" if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if self._head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
            lines = head.split("\r\n")
            want = base64.b64encode(hashlib.sha1(self.key + _GUID).digest()).decode()
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            if not lines[0].startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != want:
                self._end(f"upgrade refused: {lines[0]}")
                return
            self._head = False
            self.upgraded.set_result(None)
        got, pos, error = frames(buf)
        for fin, op, payload in got:
            if op == OP_TEXT and fin:
                try:
                    obj = _decode(payload)
                except msgspec.DecodeError:
                    self._end("a text frame that is not JSON")
                    return
                self.on_frame(self, obj)
                if self.closed:
                    return
            elif op == OP_PING:
                if self.transport is not None:
                    self.transport.write(client_frame(OP_PONG, payload))
            elif op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._end(f"socket closed ({code})")
                return
            elif op != OP_PONG:
                self._end(f"unexpected frame (opcode {op}, fin {int(fin)})")
                return
        if error is not None:
            self._end(str(error))
            return
        self._buf = buf[pos:]


async def connect(host: str, port: int, path: str, on_frame: Callable[[WsUser, Any], None],
                  on_close: Callable[[WsUser, str], None], timeout: float = 10.0) -> WsUser:
    """Open one connection to ``ws://host:port{path}`` (path with its query) and complete the upgrade."""
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    _, user = await asyncio.wait_for(
        loop.create_connection(lambda: WsUser(key, on_frame, on_close), host, port), timeout)
    assert user.transport is not None
    user.transport.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    try:
        await asyncio.wait_for(asyncio.shield(user.upgraded), timeout)
    except BaseException:
        if not user.upgraded.done():
            user.upgraded.cancel()
        elif not user.upgraded.cancelled():
            user.upgraded.exception()  # retrieved: no "exception was never retrieved" at exit
        user.transport.close()
        raise
    return user
