"""edge.api.WsSession's bounds: a long answer's done frame never cuts off a client that keeps up."""

from __future__ import annotations

import asyncio

from edge.api import WS_QUEUE_CHARS, WsSession


class SlowSocket:
    """Stands in for the aiohttp socket under the session: each frame takes 10 ms to write."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed_with: int | None = None

    async def send_str(self, s: str) -> None:
        await asyncio.sleep(0.01)
        self.sent += 1

    async def close(self, code: int | None = None, message: bytes = b"") -> None:
        self.closed_with = code


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
    await asyncio.sleep(0.01)
    assert sess.overflowed and ws.closed_with == 1013
