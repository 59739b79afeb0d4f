"""Shared sample messages and hypothesis settings for the wire/ tests.

Hypothesis runs derandomized with a fixed example budget so the suite is reproducible and fast.
Set ``WIRE_FUZZ_EXAMPLES=5000`` (and optionally ``WIRE_FUZZ_RANDOM=1``) to explore more.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

import wire

_SCALE = int(os.environ.get("WIRE_FUZZ_EXAMPLES", "0"))
_RANDOM = os.environ.get("WIRE_FUZZ_RANDOM") == "1"


def budget(n: int) -> settings:
    """Hypothesis settings with ``n`` examples (or WIRE_FUZZ_EXAMPLES), deterministic unless WIRE_FUZZ_RANDOM=1."""
    return settings(
        max_examples=_SCALE or n, derandomize=not _RANDOM, deadline=None, print_blob=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


ID = bytes(range(16))
ID2 = bytes(range(16, 32))


def minimal_messages() -> dict[str, wire.Message]:
    """One message of each type with only the required fields."""
    return {
        "task": wire.Task(id=ID, uid="wc.zhangsan", ch="wc", text="你好, claw", ts=1_700_000_000_000),
        "cancel": wire.Cancel(id=ID),
        "accept": wire.Accept(id=ID, node="node-1"),
        "delta": wire.Delta(id=ID, seq=1, text="Hello"),
        "done": wire.Done(id=ID, seq=3, status="ok"),
        "beat": wire.Beat(node="node-1", state="online"),
        "batch": wire.Batch(node="node-1", items=[wire.Delta(id=ID, seq=1, text="Hello")]),
    }


def full_messages() -> dict[str, wire.Message]:
    """One message of each type with every optional field set."""
    return {
        "task": wire.Task(
            id=ID, uid="mp.oABC-123_x@y.z", ch="mp", text="Explain MQTT QoS 1.", ts=1_700_000_000_123,
            conv="c-42", opts={"model": "qwen2.5-7b", "temperature": 0.5, "max_tokens": 512, "stream": True,
                               "stop": ["\n\n"], "extra": {"seed": None, "raw": b"\x00\xff"}},
            timing={"edge_rx": 1_700_000_000_123_000}, replay=5,
        ),
        "cancel": wire.Cancel(id=ID2),
        "accept": wire.Accept(id=ID, node="gpu_box-2", queue=3),
        "delta": wire.Delta(id=ID, seq=2**53, text="x" * 100, timing={"llm": 12, "node_tx": -1}),
        "done": wire.Done(
            id=ID, seq=7, status="error", err=wire.Err(code="llm_down", msg="LM Studio did not answer"),
            usage={"prompt_tokens": 12, "completion_tokens": 0}, timing={"total": 1234567},
        ),
        "beat": wire.Beat(node="node-1", state="draining", active=2, capacity=4, models=["qwen2.5-7b", "demo"]),
        "batch": wire.Batch(node="gpu_box-2", items=[
            wire.Accept(id=ID2, node="gpu_box-2", queue=1), wire.Delta(id=ID, seq=7, text="你好", timing={"n_pub": 1}),
            wire.Done(id=ID, seq=7, status="error", err=wire.Err(code="x", msg="y"))]),
    }


def all_samples() -> dict[str, wire.Message]:
    """``{"task-min": ..., "task-full": ..., ...}``: every type, with and without optional fields."""
    out: dict[str, wire.Message] = {}
    for name, msg in minimal_messages().items():
        out[f"{name}-min"] = msg
    for name, msg in full_messages().items():
        out[f"{name}-full"] = msg
    return out
