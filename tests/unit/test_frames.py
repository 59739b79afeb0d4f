"""edge.frames: the client WebSocket frames (docs/api.md "Server → client"), byte for byte, and the only place
they are built."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edge import frames
from edge.store import TaskRecord

TASK = "0123456789abcdef0123456789abcdef"
EDGE = Path(__file__).resolve().parents[2] / "edge"


@pytest.mark.parametrize(("frame", "wire"), [
    (frames.node(True), b'{"type":"node","online":true}'),
    (frames.accepted(TASK, 0), b'{"type":"accepted","task":"%s","queue":0}' % TASK.encode()),
    (frames.accepted(TASK, None), b'{"type":"accepted","task":"%s","queue":null}' % TASK.encode()),
    (frames.delta(TASK, 3, "好"), '{"type":"delta","task":"%s","seq":3,"text":"好"}'.encode() % TASK.encode()),
    (frames.done(TASK, 2, "ok", "ab"), b'{"type":"done","task":"%s","seq":2,"status":"ok","text":"ab"}'
     % TASK.encode()),
    (frames.done(TASK, 0, "error", "", {"code": "node_lost", "msg": "m"}, {"completion_tokens": 1}),
     b'{"type":"done","task":"%s","seq":0,"status":"error","text":"","error":{"code":"node_lost","message":"m"},'
     b'"usage":{"completion_tokens":1}}' % TASK.encode()),
    (frames.error("bad_json", "x"), b'{"type":"error","code":"bad_json","message":"x"}'),
    (frames.error("not_found", "x", TASK), b'{"type":"error","code":"not_found","message":"x","task":"%s"}'
     % TASK.encode()),
    (frames.pong(), b'{"type":"pong"}'),
])
def test_each_frame_on_the_wire(frame: frames.Frame, wire: bytes) -> None:
    assert frames.encode(frame) == wire


def test_traced_adds_timing_last_and_leaves_the_frame_alone() -> None:
    frame = frames.delta(TASK, 1, "a")
    out = frames.traced(frame, {"n_pub": 5}, 7)
    assert frames.encode(out) == b'{"type":"delta","task":"%s","seq":1,"text":"a","timing":{"n_pub":5,"e_fwd":7}}' \
        % TASK.encode()
    assert "timing" not in frame


def test_done_from_a_stored_record() -> None:
    rec = TaskRecord(id=bytes.fromhex(TASK), uid="web.a", ch="web", text="q", ts=1, status="ok", answer="A",
                     usage={"total_tokens": 3})
    assert frames.encode(frames.done_from_record(rec)) == \
        b'{"type":"done","task":"%s","seq":null,"status":"ok","text":"A","usage":{"total_tokens":3}}' % TASK.encode()
    assert frames.done_from_record(rec, 4)["seq"] == 4


def test_text_of_reads_deltas_only() -> None:
    assert frames.text_of(frames.delta(TASK, 1, "x")) == "x"
    assert frames.text_of(frames.done(TASK, 1, "ok", "x")) is None


def test_no_other_edge_module_builds_a_client_frame() -> None:
    """A dict literal with a "type" key anywhere in edge/ but edge/frames.py is a frame built by hand."""
    offenders = []
    for path in sorted(EDGE.rglob("*.py")):
        if path.name == "frames.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "type"
                                                  for k in node.keys):
                offenders.append(f"{path.relative_to(EDGE.parent)}:{node.lineno}")
    assert not offenders
