"""The load generator's WebSocket users: a small RFC 6455 client written as an asyncio Protocol.

Why not aiohttp's client: the load generator shares the two cores with the system it measures. aiohttp's
``ws.receive()`` costs a coroutine wake and a queue hop per frame; at 500 streams that was ~30 µs of this
process's CPU per delta (measured in the bench sweep), CPU taken from the edge and the node. Here a frame is
parsed and handled inside ``data_received``: one user is a state machine, not a task.

What it speaks: the client side of RFC 6455 for what the edge sends (unfragmented text frames, ping, close;
a fragmented or binary frame is reported as an error), masked text frames out; the HTTP/1.1 upgrade with
``Sec-WebSocket-Accept`` checked. It is for the bench only; the product's clients are browsers and WeChat.
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

__all__ = ["WsUser", "connect", "WsError"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_decode = msgspec.json.Decoder().decode


class WsError(Exception):
    pass


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    m = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final frame (client → server)."""
    n = len(payload)
    key = os.urandom(4)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + _mask(payload, key)


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
            self.transport.write(client_frame(0x1, text.encode()))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(client_frame(0x8, struct.pack("!H", 1000)))
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
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, hl = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, hl = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, hl = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if b1 & 0x80:
                self._end("masked frame from the server")
                return
            if n - pos < hl + length:
                break
            payload = buf[pos + hl:pos + hl + length]
            pos += hl + length
            op = b0 & 0x0F
            if op == 0x1 and b0 & 0x80:
                try:
                    obj = _decode(payload)
                except msgspec.DecodeError:
                    self._end("a text frame that is not JSON")
                    return
                self.on_frame(self, obj)
                if self.closed:
                    return
            elif op == 0x9:  # ping → pong
                if self.transport is not None:
                    self.transport.write(client_frame(0xA, payload))
            elif op == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._end(f"socket closed ({code})")
                return
            elif op != 0xA:
                self._end(f"unexpected frame (opcode {op}, fin {b0 >> 7})")
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
