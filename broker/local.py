"""The edge bridge's in-process link to the embedded broker.

With the embedded broker the bridge and the broker share one process, so the bridge need not be an MQTT
client of it over loopback: ``LocalLink`` gives the bridge what it used of ``aiomqtt.Client`` (``async
with``, ``subscribe``, ``publish``) and hands it the broker's messages by a direct call from the broker's
broadcast step. A message then costs no MQTT packet, no socket write and read, no PUBACK and no task on
either side.

Semantics are those of the loopback client it replaces, with nothing lost in between: the broker and the
bridge live and die together, so a QoS 1 acknowledgement between them promised nothing more. Publishes go
into the broker's broadcast queue like a client's (delivered to subscribers at the subscription's QoS);
the link is trusted like the internal user it replaces (no ACL check). With an external broker (Mosquitto,
``broker.enabled = false``) the bridge is an ordinary aiomqtt client, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import aiomqtt

log = logging.getLogger(__name__)

__all__ = ["LinkHost", "LocalLink"]


class LinkHost(Protocol):
    """What a link needs of the broker it is attached to (:class:`broker.clawbroker.ClawBroker` is one)."""

    @property
    def running(self) -> bool: ...

    def attach_local(self, link: LocalLink) -> None: ...

    def detach_local(self, link: LocalLink) -> None: ...

    def local_publish(self, topic: str, data: bytes) -> None: ...


class LocalLink:
    """One in-process subscriber/publisher of a running broker (a :class:`LinkHost`)."""

    def __init__(self, broker: LinkHost) -> None:
        self._broker = broker
        self._hostname = "embedded broker"  # what core.mqtt.run_forever logs
        self._port = "in-process"
        self.filters: list[str] = []
        self.on_message: Callable[[str, bytes], None] | None = None
        self.delivered = 0
        self.failed = 0  # deliveries whose handler raised (logged; the broker goes on)
        self._closed: asyncio.Future[None] | None = None

    async def __aenter__(self) -> LocalLink:
        if not self._broker.running:
            raise aiomqtt.MqttError("the embedded broker is not running")
        self._closed = asyncio.get_running_loop().create_future()
        try:
            self._broker.attach_local(self)
        except Exception as exc:
            raise aiomqtt.MqttError(f"the embedded broker refused the link: {exc}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._broker.detach_local(self)
        self.filters = []
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    @property
    def connected(self) -> bool:
        return self._closed is not None and not self._closed.done()

    async def subscribe(self, subs: list[tuple[str, int]]) -> None:
        self.filters = [f for f, _ in subs]

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.publish_nowait(topic, payload)

    def publish_nowait(self, topic: str, payload: bytes) -> None:
        if not self.connected or not self._broker.running:
            raise aiomqtt.MqttError("the embedded broker link is closed")
        self._broker.local_publish(topic, payload)

    async def wait_closed(self) -> None:
        """Until the broker stops (then MqttError, as a lost connection would raise)."""
        assert self._closed is not None
        await asyncio.shield(self._closed)
        raise aiomqtt.MqttError("the embedded broker stopped")

    def close(self) -> None:
        """Called by the broker as it stops."""
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def wants(self, topic: str, matches: Callable[[str, str], bool]) -> bool:
        return any(matches(topic, f) for f in self.filters)

    def deliver(self, topic: str, data: Any) -> None:
        handler = self.on_message
        if handler is None:
            return
        try:
            handler(topic, data)
            self.delivered += 1
        except (Exception, asyncio.CancelledError):  # never let the bridge's bug stop the broadcast step
            self.failed += 1
            log.exception("edge bridge: handling a message on %s failed", topic[:200])
