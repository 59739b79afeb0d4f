"""Node presence: the nodes' beats, whether any node is online, and which nodes are lost.

A node is gone when it said so (an offline beat, or its last will) or its beats stopped for
``edge.node_timeout_s`` (this also catches a half-open connection). ``NodeWatch`` only tells; the bridge
decides what happens to a lost node's tasks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import wire


@dataclass
class NodeInfo:
    state: str
    last_seen: float
    active: int = 0
    capacity: int = 0
    models: list[str] | None = None


class NodeWatch:
    def __init__(self, timeout_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self.timeout_s = timeout_s
        self._loop = loop
        self.nodes: dict[str, NodeInfo] = {}
        self.online = False  # as last reported by changed()
        self._lost: set[str] = set()  # nodes already reported lost (until they beat online again)

    def beat(self, msg: wire.Beat) -> None:
        self.nodes[msg.node] = NodeInfo(msg.state, self._loop.time(), msg.active, msg.capacity, msg.models)

    def state(self, node: NodeInfo) -> str:
        """The state the node's last beat gave, or ``silent`` when an ``online`` node's beats stopped for
        ``edge.node_timeout_s`` (it counts as offline; /healthz)."""
        if node.state == "online" and node.last_seen < self._loop.time() - self.timeout_s:
            return "silent"
        return node.state

    def newly_lost(self) -> list[str]:
        """The nodes gone since the last call (each reported once, until it beats online again)."""
        horizon = self._loop.time() - self.timeout_s
        lost = []
        for nid, info in self.nodes.items():
            gone = info.state == "offline" or info.last_seen < horizon
            if gone and nid not in self._lost:
                self._lost.add(nid)
                lost.append(nid)
            elif not gone:
                self._lost.discard(nid)
        return lost

    def changed(self) -> bool | None:
        """Whether any node is online now, if that changed since the last call; else None."""
        horizon = self._loop.time() - self.timeout_s
        online = any(n.state == "online" and n.last_seen >= horizon for n in self.nodes.values())
        if online == self.online:
            return None
        self.online = online
        return online
