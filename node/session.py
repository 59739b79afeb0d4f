"""The node's MQTT link to the broker: the session (subscribe to the task topics, heartbeats, hand each
inbound message on), and QoS 1 publishes that wait for the connection and retry across reconnects.

Replies for the edge go in batches (``node.batch_replies``, :class:`node.batcher.ReplyBatcher`); a device's
replies stay on its own reply topic, one message each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiomqtt

import wire

from .batcher import ReplyBatcher

__all__ = ["Link"]

log = logging.getLogger(__name__)

_REPLY_PREFIX = f"{wire.PREFIX}/reply/"
_DEVICE_REPLY = f"{wire.PREFIX}/reply/dev."  # a device reads its own reply topic: never batched


class Link:
    """``client`` is set by the node before :meth:`session` runs; ``connected`` is set while a session is up.
    ``beat(state)`` builds the heartbeat to publish, ``state()`` says the node's state (the heartbeats stop
    at ``offline``), ``on_message`` takes every message on the task topics."""

    def __init__(self, node_id: str, *, beat_s: float, beat: Callable[[str], wire.Beat],
                 state: Callable[[], str], on_message: Callable[[aiomqtt.Message], None]) -> None:
        self.id = node_id
        self.beat_s = beat_s
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.batcher: ReplyBatcher | None = None  # while batching (node.batch_replies)
        self.stopping = False  # the node is stopping: a publish no longer waits for a reconnect
        self._beat = beat
        self._state = state
        self._on_message = on_message

    # ---- the session -----------------------------------------------------------------------
    async def session(self, client: aiomqtt.Client) -> None:
        """One connection's life (for :func:`core.mqtt.run_forever`)."""
        await client.subscribe(wire.TASK_FILTER, qos=1)
        self.connected.set()
        await self.publish_beat(client)
        stop = asyncio.Event()
        beat = asyncio.create_task(self._beat_loop(client, stop))
        try:
            async for msg in client.messages:
                self._on_message(msg)
        finally:
            # The flag as well as the cancel: Python 3.11's asyncio.wait_for (inside aiomqtt's publish) can
            # swallow a cancellation that lands as the publish completes; the loop then ends at its next
            # check instead of sleeping on for ever (seen as a hung node shutdown in the huge-resume test).
            stop.set()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    def disconnected(self) -> None:
        self.connected.clear()

    async def publish_beat(self, client: aiomqtt.Client) -> None:
        await client.publish(wire.node_topic(self.id), wire.encode(self._beat(self._state())), qos=0)

    async def _beat_loop(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        while self._state() != "offline" and not stop.is_set():
            await asyncio.sleep(self.beat_s)
            if stop.is_set():
                return
            with contextlib.suppress(aiomqtt.MqttError):
                await self.publish_beat(client)

    async def withdraw(self) -> None:
        """Take no more tasks (unsubscribe) and announce the node's state; within 2 s, errors ignored. Does
        nothing when not connected."""
        client = self.client if self.connected.is_set() else None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                async with asyncio.timeout(2):
                    await client.unsubscribe(wire.TASK_FILTER)
                    await self.publish_beat(client)

    async def say_offline(self) -> None:
        """Publish the ``offline`` heartbeat (QoS 1) while still connected; within 2 s, errors ignored."""
        if self.connected.is_set() and self.client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                async with asyncio.timeout(2):
                    await self.client.publish(wire.node_topic(self.id), wire.encode(self._beat("offline")), qos=1)

    # ---- batching ----------------------------------------------------------------------------
    def start_batching(self, linger: float) -> None:
        self.batcher = ReplyBatcher(self.id, self.publish_payload, linger=linger)
        self.batcher.start()

    async def stop_batching(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
            self.batcher = None

    def batched(self, topic: str) -> bool:
        """Whether a reply on ``topic`` goes in a batch (the edge's, while batching)."""
        return self.batcher is not None and topic.startswith(_REPLY_PREFIX) and not topic.startswith(_DEVICE_REPLY)

    # ---- publishing ----------------------------------------------------------------------------
    def send(self, topic: str, msg: wire.Message) -> asyncio.Future[None]:
        """Publish ``msg`` without waiting: its place in the order is taken now; the future is done when it is
        acknowledged (batched: when its batch is)."""
        if self.batched(topic):
            return self.batcher.enqueue(msg)  # type: ignore[union-attr, arg-type]
        return asyncio.ensure_future(self.publish(topic, msg))

    async def put(self, topic: str, msg: wire.Message) -> None:
        """Batched: queue ``msg`` and return at once (the batcher keeps the order); otherwise publish it and
        wait for the acknowledgement."""
        if self.batched(topic):
            self.batcher.enqueue(msg)  # type: ignore[union-attr, arg-type]
        else:
            await self.publish(topic, msg)

    def spawn_publish(self, topic: str, msg: wire.Message) -> None:
        """Publish ``msg`` in a task of its own; a failure is dropped (the edge repairs what is lost)."""
        async def go() -> None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await self.publish(topic, msg)
        asyncio.create_task(go())

    async def publish(self, topic: str, msg: wire.Message) -> None:
        """Publish QoS 1, waiting for the connection and retrying across reconnects (seq dedups). Replies
        for the edge go in batches (``node.batch_replies``); a device's stay on its own reply topic."""
        if self.batched(topic):
            await self.batcher.send(msg)  # type: ignore[union-attr, arg-type]
            return
        await self.publish_payload(topic, wire.encode(msg))

    async def publish_payload(self, topic: str, payload: bytes) -> None:
        failures = 0
        while True:
            if not self.connected.is_set():
                if self.stopping:
                    raise aiomqtt.MqttError("not connected and the node is stopping")
                await self.connected.wait()
            assert self.client is not None
            try:
                await self.client.publish(topic, payload, qos=1)
                return
            except aiomqtt.MqttError as exc:
                # Retry (seq/id make a duplicate harmless). The connection flag is the session's to clear: a
                # PUBACK that merely took > 10 s ("Operation timed out") on a live link must not stop every
                # later publish while beats still say "online".
                log.debug("node %s: publish failed (%s); retrying", self.id, exc)
                failures += 1
                await asyncio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))
