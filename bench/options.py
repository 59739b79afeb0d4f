"""The knobs of one bench run (``claw bench`` options): the fake LLM's answers and pace, the node's settings
under test, the levels and their timing, the broker, the event loop, and the sizes of the memory scenario."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Options"]


@dataclass
class Options:
    tokens: int = 40  # tokens per answer
    tps: float = 20.0  # tokens/s per stream (the fake LLM's pace)
    token_chars: int = 4
    ttft: float = 0.0
    coalesce_ms: float | None = None  # node.coalesce_ms (None: product default)
    batch_linger_ms: float | None = None  # node.batch_linger_ms (None: product default)
    node_slots: int = 4096  # node.concurrency: nothing queues in the node, the tunnel is measured
    levels: list[int] = field(default_factory=lambda: [1, 10, 50, 100, 200, 500, 1000, 1500, 2000])
    level_s: float = 6.0  # measured seconds per level
    warm_s: float = 2.0
    stop_at_knee: bool = True
    broker: str = "amqtt"  # amqtt | mosquitto | thin (sweep only: bench/thin.py)
    loop: str = "uvloop"
    progress: bool = True
    log_level: str = "WARNING"
    ws_idle: int = 1000  # memory: idle WebSocket clients
    mqtt_idle: int = 200  # memory: idle MQTT devices
