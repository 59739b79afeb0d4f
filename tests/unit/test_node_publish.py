"""node.session.Link.publish_payload: a publish that timed out (no PUBACK within aiomqtt's 10 s, link still up)
is retried; it must not stop every later publish (it used to clear the connection flag for good)."""

from __future__ import annotations

import asyncio

import aiomqtt

import wire
from node.session import Link


class OnceTimedOut:
    """The MQTT client under the node: the first publish times out, the rest go through."""

    def __init__(self) -> None:
        self.calls = 0
        self.ok: list[str] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.calls += 1
        if self.calls == 1:
            raise aiomqtt.MqttError("Operation timed out")
        self.ok.append(topic)


def _link() -> Link:
    return Link("node1", beat_s=5.0, beat=lambda state: wire.Beat(node="node1", state=state, active=0, capacity=1),
                state=lambda: "online", on_message=lambda msg: None)


async def test_a_timed_out_publish_is_retried_and_later_ones_go_through() -> None:
    link = _link()
    client = OnceTimedOut()
    link.client = client  # type: ignore[assignment]
    link.connected.set()
    await asyncio.wait_for(link.publish_payload("claw/v1/batch/node1", b"x"), 3)
    await asyncio.wait_for(link.publish_payload("claw/v1/batch/node1", b"y"), 3)
    assert client.calls == 3 and len(client.ok) == 2 and link.connected.is_set()
