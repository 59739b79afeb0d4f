"""Outgoing delivery for one session of the embedded broker: ordered, windowed, bounded, resumable.

amqtt delivered every message by a task of its own that waited 5 s for the PUBACK and then forgot the message,
so an unacknowledged QoS 1 message was never re-sent when a persistent session resumed (MQTT-4.4.0-1), and the
offline queue was unbounded. :class:`Outbox` replaces that path. One outbox belongs to one session (it lives in
``session.attributes[OUTBOX_KEY]`` and dies with the session):

- ``inflight``: QoS 1 messages written to the client and not yet acknowledged, in the order they were sent,
  at most ``max_inflight``. A message stays in flight until its PUBACK arrives: there is no timeout and no
  re-send while the connection lasts (MQTT 3.1.1 re-sends only on reconnect). When a persistent session
  resumes (clean session 0), every message in flight is written again first, with DUP=1 and its original
  packet identifier, in the original order.
- ``queue``: messages waiting for a free slot in the window, for a write buffer to drain, or (persistent
  session, QoS 1 only) for the client to reconnect. At most ``max_queued``; a message arriving at a full
  queue is dropped and counted (``dropped``), with one WARNING line per outbox per ``DROP_LOG_EVERY`` s.

Messages are written synchronously (one ``write`` per packet, so they never interleave with amqtt's own
packets) from the broker's broadcast step: no task, no future per message besides amqtt's PUBACK waiter.
Outgoing QoS is at most 1 (the broker grants at most QoS 1 on SUBSCRIBE). amqtt plugins get no
``PACKET_SENT`` event for these PUBLISH packets (ours do not listen to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from functools import partial
from typing import Any

log = logging.getLogger(__name__)

OUTBOX_KEY = "claw.outbox"  # session.attributes key
MAX_QOS = 1  # the highest QoS the broker grants and delivers with
WRITE_HIGH_WATER = 256 * 1024  # bytes buffered in the transport above which the outbox waits for it to drain
DROP_LOG_EVERY = 10.0  # seconds between two "queue full" WARNING lines of one outbox


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def encode_publish(topic: str, data: bytes | bytearray, qos: int, packet_id: int = 0, dup: bool = False) -> bytes:
    """One MQTT 3.1.1 PUBLISH packet (RETAIN=0)."""
    t = topic.encode()
    head = len(t).to_bytes(2, "big") + t
    if qos:
        head += packet_id.to_bytes(2, "big")
    flags = 0x30 | (0x08 if dup else 0) | (qos << 1)
    return bytes((flags,)) + _varint(len(head) + len(data)) + head + data


class Outbox:
    """The outgoing messages of one session (see the module docstring)."""

    __slots__ = ("client_id", "max_inflight", "max_queued", "inflight", "queue", "dropped", "sent", "resent",
                 "_handler", "_writer", "_transport", "_waiters", "_next_id", "_drain_task", "_drop_logged_at",
                 "_drops_unlogged", "_counters")

    def __init__(self, client_id: str | None, *, max_inflight: int, max_queued: int, counters: Any = None) -> None:
        self.client_id = client_id
        self._counters = counters  # the broker's core.guard.Counters (queue_dropped), if any
        self.max_inflight = max(1, max_inflight)
        self.max_queued = max(0, max_queued)
        self.inflight: OrderedDict[int, tuple[str, bytes | bytearray]] = OrderedDict()
        self.queue: deque[tuple[str, bytes | bytearray, int]] = deque()
        self.dropped = 0  # messages dropped because the queue was full
        self.sent = 0  # PUBLISH packets written (re-sends included)
        self.resent = 0  # of which re-sends with DUP=1 on resume
        self._handler: Any = None
        self._writer: Any = None
        self._transport: Any = None
        self._waiters: dict[int, asyncio.Future[Any]] | None = None
        self._next_id = 0
        self._drain_task: asyncio.Task[None] | None = None
        self._drop_logged_at = 0.0
        self._drops_unlogged = 0

    @property
    def attached(self) -> bool:
        return self._writer is not None

    # -- connection lifecycle ---------------------------------------------------------------------------------

    def attach(self, handler: Any, transport: Any, waiters: dict[int, asyncio.Future[Any]]) -> None:
        """The session's client is connected through ``handler`` (CONNACK sent), whose socket is ``transport``
        and whose reader resolves the PUBACK futures in ``waiters`` (amqtt's, see
        :func:`broker.amqtt_overrides.attach_outbox`): re-send what is in flight (DUP=1, original packet ids, in
        order), then what is queued."""
        self.detach()
        writer = handler.writer
        if writer is None:
            return
        self._handler = handler
        self._writer = writer
        self._transport = transport
        self._waiters = waiters
        for packet_id, (topic, data) in self.inflight.items():
            self._watch(packet_id)
            self._write(encode_publish(topic, data, 1, packet_id, dup=True))
            self.resent += 1
        self._pump()

    def detach(self, handler: Any = None) -> None:
        """The connection through ``handler`` (default: any) ended; what is in flight stays for a resume."""
        if handler is not None and handler is not self._handler:
            return
        self._handler = self._writer = self._transport = self._waiters = None
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None

    def clear(self) -> None:
        """The session is discarded."""
        self.detach()
        self.inflight.clear()
        self.queue.clear()

    # -- messages ---------------------------------------------------------------------------------------------

    def push(self, topic: str, data: bytes | bytearray, qos: int, *, online: bool = True) -> bool:
        """Deliver (or queue) one message at ``qos`` (0 or 1). ``online``: the session's client is connected
        (possibly not attached yet); an offline session only queues QoS 1. False if it was dropped."""
        if self._writer is not None and not self.queue and self._can_send(qos):
            self._send(topic, data, qos)
            return True
        if not qos and not online:
            return False
        if len(self.queue) >= self.max_queued:
            self._dropped()
            return False
        self.queue.append((topic, data, qos))
        if self._writer is not None:
            self._pump()
        return True

    def acked(self, packet_id: int) -> None:
        if self.inflight.pop(packet_id, None) is not None and self.queue:
            self._pump()

    # -- internals --------------------------------------------------------------------------------------------

    def _can_send(self, qos: int) -> bool:
        if qos and len(self.inflight) >= self.max_inflight:
            return False
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            if self._drain_task is None:
                self._drain_task = asyncio.get_running_loop().create_task(self._drain())
            return False
        return True

    def _pump(self) -> None:
        queue = self.queue
        while queue and self._writer is not None and self._can_send(queue[0][2]):
            topic, data, qos = queue.popleft()
            self._send(topic, data, qos)

    def _send(self, topic: str, data: bytes | bytearray, qos: int) -> None:
        if qos:
            packet_id = self._new_id()
            self.inflight[packet_id] = (topic, data)
            self._watch(packet_id)
            self._write(encode_publish(topic, data, 1, packet_id))
        else:
            self._write(encode_publish(topic, data, 0))

    def _write(self, packet: bytes) -> None:
        transport = self._transport
        if transport is not None and transport.is_closing():
            return  # the connection is going; what is in flight is re-sent on resume
        try:
            self._writer.write(packet)
            self.sent += 1
        except Exception as exc:  # noqa: BLE001 - a dead socket: the reader loop will end the connection
            log.debug("client %r: write failed: %s", self.client_id, exc)

    def _new_id(self) -> int:
        inflight = self.inflight
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in inflight:
                return self._next_id
        raise RuntimeError("no free packet identifier")  # unreachable: inflight <= max_inflight < 65535

    def _watch(self, packet_id: int) -> None:
        """Register a PUBACK waiter with the connection's handler (its reader resolves it; stopping cancels it)."""
        waiters = self._waiters
        assert waiters is not None  # attached
        old = waiters.get(packet_id)
        if old is not None and not old.done():
            old.cancel()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiters[packet_id] = fut
        fut.add_done_callback(partial(self._on_puback, self._handler, waiters, packet_id))

    def _on_puback(self, handler: Any, waiters: dict[int, asyncio.Future[Any]], packet_id: int,
                   fut: asyncio.Future[Any]) -> None:
        if waiters.get(packet_id) is fut:
            del waiters[packet_id]
        if fut.cancelled() or handler is not self._handler:
            return  # the connection ended: the message stays in flight for a resume
        self.acked(packet_id)

    async def _drain(self) -> None:
        try:
            while self._writer is not None:
                writer = self._writer
                await writer.drain()
                transport = self._transport
                if transport is None or transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
                    break
                await asyncio.sleep(0.01)  # drain() returned above our mark: the transport's own mark is higher
        except Exception:  # noqa: BLE001 - the connection is gone; the disconnect path detaches us
            return
        finally:
            if self._drain_task is asyncio.current_task():
                self._drain_task = None
        with contextlib.suppress(Exception):
            self._pump()

    def _dropped(self) -> None:
        self.dropped += 1
        self._drops_unlogged += 1
        if self._counters is not None:
            self._counters.queue_dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_EVERY:
            log.warning("client %r: outgoing queue full (broker.max_queued=%d, %d in flight): dropped %d "
                        "message(s); %d dropped in total", self.client_id, self.max_queued, len(self.inflight),
                        self._drops_unlogged, self.dropped)
            self._drop_logged_at = now
            self._drops_unlogged = 0
