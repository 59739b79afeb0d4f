"""The edge's ``GET /metrics`` families: a collector for the bridge (with the WebSocket sessions) and one for the
embedded broker's refusal counters, in a registry of the app's own (:data:`METRICS`).

Both read the plain counters the bridge and the broker keep on their hot paths, at scrape time; the names,
labels and types are docs/api.md's. Before the app's startup made the bridge (or without an embedded broker)
a collector has nothing to say.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client.core import Metric
from prometheus_client.registry import CollectorRegistry

from core.metrics import Families, counter, counters_by, gauge, registry, stage_families

from .keys import BRIDGE, BROKER

METRICS = web.AppKey("metrics", CollectorRegistry)

# BridgeStats field -> (metric name, help)
_BRIDGE_COUNTERS = (
    ("published", "claw_edge_tasks_published_total", "Tasks published to the nodes"),
    ("republished", "claw_edge_tasks_republished_total", "Tasks published again (no node took them, or a reconnect)"),
    ("replies", "claw_edge_replies_total", "Replies (chunks and dones) received from the nodes"),
    ("batches", "claw_edge_batches_total", "Reply batch messages received from the nodes"),
    ("duplicates", "claw_edge_duplicates_total", "Replies received twice (dropped)"),
    ("gaps", "claw_edge_gaps_total", "Gaps seen in reply streams"),
    ("replay_asks", "claw_edge_replay_asks_total", "Replay requests sent to the nodes for gaps or silence"),
    ("redispatched", "claw_edge_redispatched_total", "Tasks sent again because their node was lost before any text"),
    ("bad_messages", "claw_edge_bad_messages_total", "MQTT messages the edge could not decode (dropped)"),
)


def bridge_families(app: web.Application, sessions: Callable[[], int]) -> Iterator[Metric]:
    """The bridge's counters and gauges, the WebSocket sessions (``sessions()`` counts them), and the stage
    histograms."""
    b = app.get(BRIDGE)
    if b is None:
        return
    st = b.stats
    for field, name, help in _BRIDGE_COUNTERS:
        yield counter(name, help, getattr(st, field))
    yield counters_by("claw_edge_tasks_finished_total", "Tasks finished, by status", "status", st.finished)
    yield gauge("claw_edge_live_tasks", "Tasks not finished yet (queued or running)", b.open_count)
    yield gauge("claw_edge_recent_tasks", "Live tasks plus those finished in the last 2 minutes", len(b.live))
    yield gauge("claw_edge_ws_sessions", "Open client WebSocket sessions", sessions())
    yield gauge("claw_edge_node_online", "1 while a node is online", int(b.node_online))
    yield gauge("claw_edge_mqtt_connected", "1 while the edge's MQTT link is up", int(b.connected))
    yield from stage_families(b.stages, "claw_edge_stage_seconds",
                              "Stage latency of answers seen by the edge, from the wire timing stamps (seconds)")


def broker_families(app: web.Application) -> Iterator[Metric]:
    """The embedded broker's refusal counters (docs/broker.md "Limits"); none with an external broker."""
    broker = app.get(BROKER)
    if broker is None:
        return
    counts = broker.counters.as_dict()
    counts["device_rate_dropped"] = broker.device_limiter.dropped
    yield counters_by("claw_broker_refused_total", "What the embedded broker refused or dropped, by kind", "kind",
                      counts)


def edge_registry(app: web.Application, sessions: Callable[[], int]) -> CollectorRegistry:
    """The app's own registry (set as ``app[METRICS]`` before the app starts); ``sessions()`` counts the open
    client WebSockets."""
    return registry(Families(functools.partial(bridge_families, app, sessions)),
                    Families(functools.partial(broker_families, app)))
