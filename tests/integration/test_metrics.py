"""Stage-latency histograms on the edge's GET /metrics and the node's (node.metrics_listen), end to end."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakes.llm import FakeLLMConfig
from tests.conftest import free_port, run_system
from tests.integration.test_e2e import collect

pytestmark = pytest.mark.integration



def parse(text: str, types: dict[str, str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """sample name -> stage -> le (or "") -> value, read by prometheus_client's parser; ``types`` gets each
    family's type. No family comes twice, and there is no ``_created`` series."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    seen: dict[str, str] = {} if types is None else types
    for family in text_string_to_metric_families(text):
        assert family.name not in seen, f"family {family.name} twice"
        seen[family.name] = family.type
        for s in family.samples:
            assert not s.name.endswith("_created"), s
            out.setdefault(s.name, {}).setdefault(s.labels.get("stage", ""), {})[s.labels.get("le", "")] = s.value
    return out


def check_family(samples: dict[str, dict[str, dict[str, float]]], name: str, stages: list[str]) -> None:
    for stage in stages:
        count = samples[f"{name}_count"][stage][""]
        assert count >= 1, (name, stage)
        buckets = samples[f"{name}_bucket"][stage]
        values = list(buckets.values())  # in exposition order: ascending le, +Inf last
        assert list(buckets)[-1] == "+Inf" and values[-1] == count
        assert values == sorted(values), f"{name}{{stage={stage}}} buckets are not cumulative"
        assert samples[f"{name}_sum"][stage][""] >= 0


async def test_stage_histograms_on_edge_and_node(tmp_path: Path, pki_dir: Path) -> None:
    port = free_port()
    cfg = FakeLLMConfig(n_tokens=40, tokens_per_s=400, token_chars=3)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"metrics_listen": f"127.0.0.1:{port}"}) as sys_, \
            aiohttp.ClientSession() as s:
        assert sys_.node.metrics_port == port
        async with sys_.chat_ws(s) as ws:
            await ws.send_json({"type": "ask", "text": "你好"})
            frames, done = await collect(ws)
        assert done["status"] == "ok"
        n_chunks = sum(1 for f in frames if f["type"] == "delta")

        async with s.get(f"{sys_.http}/metrics") as r:
            assert r.status == 200
            edge_text = await r.text()
        edge_types: dict[str, str] = {}
        edge = parse(edge_text, edge_types)
        assert edge["claw_edge_tasks_finished_total"][""] == {"": 1}  # the existing lines are still there
        assert edge["claw_edge_tasks_published_total"][""][""] == 1
        assert edge["claw_edge_replies_total"][""][""] >= n_chunks + 1
        assert edge["claw_edge_live_tasks"][""][""] == 0 and edge["claw_edge_recent_tasks"][""][""] == 1
        assert edge["claw_edge_node_online"][""][""] == 1 and edge["claw_edge_mqtt_connected"][""][""] == 1
        assert edge["claw_edge_ws_sessions"][""][""] in (0, 1)  # the socket above closes on its own time
        assert edge_types["claw_edge_stage_seconds"] == "histogram"
        assert edge_types["claw_edge_tasks_published"] == edge_types["claw_edge_stage_skew"] == "counter"
        assert edge_types["claw_edge_live_tasks"] == edge_types["claw_edge_stage_p50_seconds"] == "gauge"
        check_family(edge, "claw_edge_stage_seconds",
                     ["chunk_node_to_edge", "ask_to_first_chunk", "llm_first_token", "edge_to_node",
                      "first_token_to_publish", "done_node_to_edge"])
        assert edge["claw_edge_stage_seconds_count"]["chunk_node_to_edge"][""] == n_chunks
        assert edge["claw_edge_stage_seconds_count"]["ask_to_first_chunk"][""] == 1
        assert "claw_edge_stage_p99_seconds" in edge and "claw_edge_stage_skew_total" in edge

        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            node_types: dict[str, str] = {}
            node = parse(await r.text(), node_types)
        assert node["claw_node_tasks_total"][""][""] == 1
        assert node["claw_node_errors_total"][""][""] == 0 and "claw_node_llm_errors_total" not in node
        assert node["claw_node_capacity"][""][""] == sys_.node.cfg.concurrency
        assert node["claw_node_draining"][""][""] == 0 and node["claw_node_queued_tasks"][""][""] == 0
        assert node_types["claw_node_tasks"] == node_types["claw_node_llm_errors"] == "counter"
        assert node_types["claw_node_connected"] == "gauge" and node_types["claw_node_stage_seconds"] == "histogram"
        assert node["claw_node_ok_total"][""][""] == 1
        assert node["claw_node_chunks_total"][""][""] == n_chunks
        assert node["claw_node_connected"][""][""] == 1
        assert node["claw_node_active_tasks"][""][""] == 0
        check_family(node, "claw_node_stage_seconds", ["llm_first_token", "publish", "answer_total"])
        assert node["claw_node_stage_seconds_count"]["publish"][""] == n_chunks
    # the node's metrics server is closed with the node
    assert sys_.node.metrics_port is None
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with s.get(f"http://127.0.0.1:{port}/metrics"):
                pass


async def test_broker_refusals_are_on_the_edges_metrics(tmp_path: Path, pki_dir: Path) -> None:
    """The embedded broker's refusal counters (client id, throttling, caps, oversize, full queues, device rate)
    reach the edge's /metrics, so an operator sees an attack without reading logs."""
    import ssl

    import aiomqtt

    from broker.creds import CredentialStore
    from core.mqtt import make_client

    async with run_system(tmp_path, pki_dir, start_node=False) as sys_, aiohttp.ClientSession() as s:
        user, password = CredentialStore(sys_.settings.data_dir).add("device", "m1")
        tls = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        client = make_client(host="localhost", port=sys_.settings.mqtt.port, username=user, password=password,
                             identifier="node.b1", tls=tls)  # not this credential's client id
        with pytest.raises(aiomqtt.MqttError):
            async with client:
                pass
        async with s.get(f"{sys_.http}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        family = next(f for f in text_string_to_metric_families(text) if f.name == "claw_broker_refused")
        assert family.type == "counter"
        refused = {s.labels["kind"]: s.value for s in family.samples if s.name == "claw_broker_refused_total"}
        assert refused["client_id_refused"] == 1
        assert {"auth_throttled", "auth_busy", "oversize_dropped", "queue_dropped",
                "device_rate_dropped"} <= set(refused)
