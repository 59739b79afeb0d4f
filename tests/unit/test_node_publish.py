"""node.worker.Node._publish_payload: a publish that timed out (no PUBACK within aiomqtt's 10 s, link still up)
is retried; it must not stop every later publish (it used to clear the connection flag for good)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt

from core.config import load_settings
from node.worker import Node


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


async def test_a_timed_out_publish_is_retried_and_later_ones_go_through(tmp_path: Path) -> None:
    node = Node(load_settings(env={}, overrides={"data_dir": str(tmp_path)}))
    client = OnceTimedOut()
    node._client = client  # type: ignore[assignment]
    node._connected.set()
    await asyncio.wait_for(node._publish_payload("claw/v1/batch/node1", b"x"), 3)
    await asyncio.wait_for(node._publish_payload("claw/v1/batch/node1", b"y"), 3)
    assert client.calls == 3 and len(client.ok) == 2 and node._connected.is_set()
