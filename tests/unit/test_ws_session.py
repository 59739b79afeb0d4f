"""edge.api.WsSession's bounds: a long answer's done frame never cuts off a client that keeps up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import WSMsgType, web

from edge.api import DIRECT_BUFFER, WS_QUEUE_CHARS, WsSession
from tests.conftest import serve_app


class SlowSocket:
    """Stands in for the aiohttp socket under the session: each frame takes 10 ms to write."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed_with: int | None = None
        self.closed = asyncio.Event()

    async def send_str(self, s: str) -> None:
        await asyncio.sleep(0.01)
        self.sent += 1

    async def close(self, code: int | None = None, message: bytes = b"") -> None:
        self.closed_with = code
        self.closed.set()


async def test_the_done_frame_of_a_long_answer_does_not_overflow_the_socket() -> None:
    ws = SlowSocket()
    sess = WsSession(ws, "web.alice")  # type: ignore[arg-type]
    text = "x" * 95_000
    for seq in range(1, 21):  # 1.9 M characters, a few frames behind at the end
        sess.push({"type": "delta", "task": "t", "seq": seq, "text": text})
        if seq < 18:
            await asyncio.sleep(0.02)
    sess.push({"type": "done", "task": "t", "seq": 20, "status": "ok", "text": text * 20})
    sess.push({"type": "node", "online": True})
    assert not sess.overflowed and sess.queued_chars < WS_QUEUE_CHARS
    await sess.close()
    assert ws.closed_with is None


async def test_a_client_that_stops_reading_is_still_cut_off() -> None:
    ws = SlowSocket()
    sess = WsSession(ws, "web.alice")  # type: ignore[arg-type]
    for seq in range(1, 40):
        sess.push({"type": "delta", "task": "t", "seq": seq, "text": "y" * 100_000})
    assert sess.overflowed
    await asyncio.wait_for(ws.closed.wait(), BOUND)  # the close runs in a task of its own
    assert ws.closed_with == 1013


# --------------------------------------------------------------------------- the direct-write path (ec53492), on a
# real aiohttp server and client over 127.0.0.1: WsSession(ws, uid, request.transport) with compress=False

BOUND = 5.0  # seconds: anything that must "eventually" happen does so well within this
MAX_PUSH_BYTES = 40 * 1024 * 1024  # the most a test pushes into one session


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[tuple[str, asyncio.Future[tuple[WsSession, web.WebSocketResponse]]]]:
    """An aiohttp app whose /ws handler is the edge's in miniature: WsSession over the request's transport,
    reading the client until it goes, then closing the session. Yields (ws URL, future of (session, ws))."""
    got: asyncio.Future[tuple[WsSession, web.WebSocketResponse]] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        sess = WsSession(ws, "web.alice", request.transport)  # type: ignore[arg-type]
        got.set_result((sess, ws))
        try:
            async for _ in ws:
                pass
        finally:
            await sess.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner, port = await serve_app(app, access_log=None, shutdown_timeout=1.0)
    try:
        yield f"http://127.0.0.1:{port}/ws", got
    finally:
        await runner.cleanup()


def _pushed(sess: WsSession, frame: dict[str, Any]) -> str:
    """Push, and say which path the frame took: "queue" if it was queued, else "direct" (written now)."""
    before = sess.queue.qsize()
    sess.push(frame)
    return "queue" if sess.queue.qsize() > before else "direct"


async def _idle(sess: WsSession) -> None:
    """Until the queue is empty, its writer idle and the transport's buffer small again."""
    end = time.monotonic() + BOUND
    while sess.queue.qsize() or sess.sending or sess.transport.get_write_buffer_size() > DIRECT_BUFFER:  # type: ignore[union-attr]
        assert time.monotonic() < end, "the session never drained"
        await asyncio.sleep(0.005)


def _delta(seq: int, text: str) -> dict[str, Any]:
    return {"type": "delta", "task": "t" * 32, "seq": seq, "text": text}


def _sized(seq: int, n: int) -> dict[str, Any]:
    """A delta whose JSON is exactly ``n`` bytes (for the frame header's length boundaries)."""
    base = len(msgspec.json.encode(_delta(seq, "")))
    frame = _delta(seq, "n" * (n - base))
    assert len(msgspec.json.encode(frame)) == n
    return frame


def _done_sized(seq: int, n: int) -> dict[str, Any]:
    base = len(msgspec.json.encode({"type": "done", "task": "t" * 32, "seq": seq, "status": "ok", "text": ""}))
    frame = {"type": "done", "task": "t" * 32, "seq": seq, "status": "ok", "text": "d" * (n - base)}
    assert len(msgspec.json.encode(frame)) == n
    return frame


async def _read_until_end(ws: aiohttp.ClientWebSocketResponse, out: list[dict[str, Any]]) -> None:
    async for msg in ws:
        assert msg.type == WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        out.append(frame)
        if frame["type"] == "end":
            return


@pytest.mark.timeout(30)
async def test_direct_and_queued_frames_arrive_in_order_and_parse() -> None:
    async with _served() as (url, got), aiohttp.ClientSession() as client, client.ws_connect(url) as ws:
        sess, _ = await asyncio.wait_for(got, BOUND)
        received: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read_until_end(ws, received))
        frames: list[dict[str, Any]] = []
        paths: list[str] = []

        def push(frame: dict[str, Any]) -> str:
            frames.append(frame)
            path = _pushed(sess, frame)
            paths.append(path)
            return path

        assert push({"type": "node", "online": True}) == "direct"
        assert push(_delta(1, "你好，世界！😀 naïve “quotes” \\ \n \u2028 tab\t")) == "direct"
        for i, n in enumerate((125, 126, 127, 200, 16000), start=2):  # 7-bit / 16-bit length boundaries
            assert push(_sized(i, n)) == "direct", n
        assert push(_delta(10, "中文" * 5000)) == "direct"  # 10 000 characters, 30 kB of UTF-8: 16-bit length
        await _idle(sess)
        assert push(_delta(11, "长" * 13000 + "x" * 1000)) == "direct"  # 14 000 characters, ~40 kB: direct
        await _idle(sess)
        assert push(_delta(12, "q" * 40_000)) == "queue"  # ~40 kB of text: ≥ 16384 characters take the queue
        assert push(_delta(13, "after the big one")) == "queue"  # behind it: queued too, keeping the order
        await _idle(sess)
        assert push(_done_sized(14, 65535)) == "direct"  # a done frame counts 0 characters: direct if < 64 KiB
        await _idle(sess)
        assert push(_done_sized(15, 65536)) == "queue"  # ... one byte more and it takes the queue
        await _idle(sess)
        big_done = {"type": "done", "task": "t" * 32, "seq": 16, "status": "ok", "text": "完" * 100_000}  # 300 kB
        assert push(big_done) == "queue"
        assert push({"type": "node", "online": False}) == "queue"
        await _idle(sess)
        assert push({"type": "end"}) == "direct"
        await asyncio.wait_for(reader, BOUND)
        assert received == frames
        assert not sess.overflowed and sess.queued_chars == 0


async def _push_until(sess: WsSession, frames: list[dict[str, Any]], paths: list[str], make: Any,
                      stop: Any, *, every: int = 1, nap: float = 0.0) -> None:
    """Push ``make(seq)`` frames (yielding to the loop every ``every`` pushes) until ``stop()`` or the byte
    cap / BOUND is reached."""
    end = time.monotonic() + BOUND
    pushed = sum(len(f.get("text", "").encode()) for f in frames)
    while not stop():
        assert pushed < MAX_PUSH_BYTES and time.monotonic() < end, (len(frames), paths[-5:], sess.queue.qsize())
        frame = make(len(frames) + 1)
        frames.append(frame)
        paths.append(_pushed(sess, frame))
        pushed += len(frame["text"].encode())
        if len(frames) % every == 0:
            await asyncio.sleep(nap)


def _text(seq: int, size: int = 10_000) -> str:
    head = f"{seq:07d}:"
    body = ("数据流" * (size // 9)) if seq % 4 == 0 else ("z" * size)  # some frames multi-byte
    return head + body


@pytest.mark.timeout(30)
async def test_a_client_that_stops_reading_overflows_and_is_closed_with_1013() -> None:
    """The client reads nothing: first the frames go direct (into the kernel's buffers), then -- once the
    transport holds more than DIRECT_BUFFER -- into the queue, which overflows its bound: the session is
    marked overflowed and the socket closed with 1013 (the client sees it once it reads again, after the
    frames that did go out, in order, with no gap)."""
    async with _served() as (url, got), aiohttp.ClientSession() as client, client.ws_connect(url) as ws:
        sess, server_ws = await asyncio.wait_for(got, BOUND)
        frames: list[dict[str, Any]] = []
        paths: list[str] = []
        t0 = time.monotonic()
        await _push_until(sess, frames, paths, lambda seq: _delta(seq, _text(seq)), lambda: sess.overflowed)
        assert time.monotonic() - t0 < BOUND
        assert sess.overflowed
        assert paths[0] == "direct" and "queue" in paths
        first_queued = paths.index("queue")
        assert all(p == "direct" for p in paths[:first_queued])  # direct while the socket kept up ...
        assert sess.transport.get_write_buffer_size() > DIRECT_BUFFER  # type: ignore[union-attr]
        n_frames = len(frames)
        # ... pushes after the overflow are dropped, never queued or written
        sess.push(_delta(n_frames + 1, "dropped"))
        assert len(frames) == n_frames
        # now read: the frames that left, in order and without a gap, then the close with 1013
        seqs: list[int] = []
        async with asyncio.timeout(BOUND):
            while True:
                msg = await ws.receive()
                if msg.type != WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                assert frame == frames[len(seqs)], (frame["seq"], len(seqs))
                seqs.append(frame["seq"])
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
        assert ws.close_code == 1013
        assert seqs == list(range(1, len(seqs) + 1))
        assert first_queued <= len(seqs) < n_frames  # everything written direct arrived; the overflow did not
        assert server_ws.closed


@pytest.mark.timeout(30)
async def test_order_is_kept_switching_between_direct_and_queued_writes() -> None:
    """The client pauses for a moment: frames go direct, then queued behind the full transport, then --
    once it reads again and the queue drains -- direct again. It gets every frame, in order, no gap."""
    async with _served() as (url, got), aiohttp.ClientSession() as client, client.ws_connect(url) as ws:
        sess, _ = await asyncio.wait_for(got, BOUND)
        received: list[dict[str, Any]] = []
        paused = asyncio.Event()
        resume = asyncio.Event()

        async def slow_reader() -> None:
            async for msg in ws:
                assert msg.type == WSMsgType.TEXT, msg
                received.append(json.loads(msg.data))
                if received[-1]["type"] == "end":
                    return
                if len(received) == 40:
                    paused.set()
                    await resume.wait()  # reads nothing meanwhile: the socket backs up

        reader = asyncio.create_task(slow_reader())
        frames: list[dict[str, Any]] = []
        paths: list[str] = []
        def make(seq: int) -> dict[str, Any]:  # every 7th frame too long for the direct path: always queued
            return _delta(seq, _text(seq, 20_000) if seq % 7 == 0 else _text(seq, 6000))

        # 1: a client keeping up -- direct, but for the long frames (and what is pushed right behind them)
        await _push_until(sess, frames, paths, make, lambda: len(frames) >= 40, every=3, nap=0.002)
        async with asyncio.timeout(BOUND):
            await paused.wait()
        # 2: the client stopped reading: direct until the transport backs up, then queued
        await _push_until(sess, frames, paths, make, lambda: sess.queue.qsize() >= 20)
        assert not sess.overflowed and paths[-20:] == ["queue"] * 20
        assert "direct" in paths[40:]  # direct again between the long frames, until the transport backed up
        resume.set()
        # 3: reading again; pushes keep coming while the queue drains, and go direct once it has
        k = len(paths)
        await _push_until(sess, frames, paths, make, every=3, nap=0.001,
                          stop=lambda: len(paths) - k >= 60 and paths[-1] == "direct" and not sess.queue.qsize())
        frames.append({"type": "end"})
        paths.append(_pushed(sess, frames[-1]))
        await asyncio.wait_for(reader, BOUND)
        assert not sess.overflowed
        seqs = [f["seq"] for f in received[:-1]]
        assert seqs == list(range(1, len(frames)))  # every frame, in order, no gap, no duplicate
        assert received == frames
        # the pushes really went direct -> queue -> direct
        changes = [p for i, p in enumerate(paths) if i == 0 or p != paths[i - 1]]
        assert changes[0] == "direct" and changes[-1] == "direct" and len(changes) >= 5, changes
        assert paths[:2] == ["direct", "direct"]


def _ws_frames(buf: bytearray) -> list[tuple[int, int, bool, bytes]]:
    """Parse (and remove) the complete server frames at the front of ``buf``: (fin, opcode, masked, payload)."""
    out = []
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, at = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, at = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < at + n:
            break
        out.append((b0 >> 7, b0 & 0x0F, bool(b1 & 0x80), bytes(buf[at:at + n])))
        del buf[: at + n]
    return out


@pytest.mark.timeout(30)
async def test_raw_client_that_never_reads_gets_wellformed_frames_then_close_1013() -> None:
    """A raw socket with a tiny receive buffer that reads nothing until the session overflowed: then every byte
    on the wire parses as RFC 6455 server frames (FIN, text, unmasked, the shortest length form the direct
    path writes), JSON in order without a gap, ending with a close frame carrying 1013."""
    async with _served() as (url, got):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          ).encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
            assert head.startswith(b"HTTP/1.1 101")
            sess, _ = await asyncio.wait_for(got, BOUND)
            frames: list[dict[str, Any]] = []
            paths: list[str] = []
            t0 = time.monotonic()
            await _push_until(sess, frames, paths, lambda seq: _delta(seq, _text(seq, 4000)),
                              lambda: sess.overflowed, every=8)
            assert time.monotonic() - t0 < BOUND and "queue" in paths and paths[0] == "direct"
            # now read it all
            buf = bytearray()
            parsed: list[tuple[int, int, bool, bytes]] = []
            async with asyncio.timeout(BOUND):
                while not parsed or parsed[-1][1] != 0x8:
                    data = await reader.read(65536)
                    assert data, "closed without a close frame"
                    buf += data
                    parsed += _ws_frames(buf)
            *texts, close = parsed
            assert close[0] == 1 and close[2] is False and struct.unpack("!H", close[3][:2])[0] == 1013
            seq = 0
            for fin, opcode, masked, payload in texts:
                assert (fin, opcode, masked) == (1, 0x1, False)
                frame = json.loads(payload.decode("utf-8"))
                seq += 1
                assert frame == frames[seq - 1]
            assert paths.index("queue") <= seq < len(frames)
            writer.write(bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000))  # masked close reply
            await writer.drain()
        finally:
            writer.close()
