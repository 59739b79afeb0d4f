"""The bridge's counters (``/metrics`` reads them as ``claw_edge_*_total``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BridgeStats:
    published: int = 0
    republished: int = 0
    replies: int = 0
    batches: int = 0  # batch messages (each carrying many replies)
    duplicates: int = 0
    gaps: int = 0
    bad_messages: int = 0
    late: int = 0
    replay_asks: int = 0  # replay requests sent for gaps in reply streams
    redispatched: int = 0  # tasks sent again because their node was lost before any text
    finished: dict[str, int] = field(default_factory=dict)
