"""Golden bytes of protocol v1: the encoding of these messages is pinned.

Every file ``golden/<name>.cbor`` is the exact encoding of ``GOLDEN[name]``. If a change to wire/
makes this test fail, the change alters v1 bytes on the wire: old peers may no longer understand
new ones (or vice versa). Within major version 1 only *optional* fields may be added (and an
existing golden must not change); anything else needs a new major version.

After an intended, reviewed change (e.g. a new golden message), regenerate with::

    .venv/bin/pytest tests/wire/test_golden.py --regen-golden

and review ``git diff tests/wire/golden``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import wire
from wire import decode, encode

GOLDEN_DIR = Path(__file__).parent / "golden"
I0 = bytes(range(16))  # 000102..0f
I1 = bytes(range(0xF0, 0x100))  # f0f1..ff

GOLDEN: dict[str, wire.Message] = {
    "task-min": wire.Task(id=I0, uid="wc.zhangsan", ch="wc", text="你好, claw", ts=1_700_000_000_000),
    "task-full": wire.Task(
        id=I0, uid="mp.oABC-123_x@y.z", ch="mp", text="Explain MQTT QoS 1.", ts=1_700_000_000_123, conv="c-42",
        opts={"model": "qwen2.5-7b", "temperature": 0.5, "max_tokens": 512, "stream": True, "stop": ["\n\n"],
              "extra": {"seed": None, "raw": b"\x00\xff"}},
        timing={"edge_rx": 1_700_000_000_123_000},
    ),
    "task-dev": wire.Task(id=I1, uid="dev.kitchen-1", ch="dev", text="", ts=0),
    "task-web": wire.Task(id=I1, uid="web.s_1", ch="web", text="x", ts=-1, conv=""),
    "task-replay": wire.Task(id=I0, uid="wc.zhangsan", ch="wc", text="你好, claw", ts=1_700_000_000_000, replay=2),
    "cancel": wire.Cancel(id=I0),
    "accept-min": wire.Accept(id=I0, node="node-1"),
    "accept-queued": wire.Accept(id=I0, node="gpu_box-2", queue=3),
    "delta-first": wire.Delta(id=I0, seq=1, text="Hello"),
    "delta-max-seq": wire.Delta(id=I0, seq=2**53, text="x" * 24, timing={"llm": 12, "node_tx": -1}),
    "delta-empty": wire.Delta(id=I1, seq=23, text=""),
    "done-ok": wire.Done(id=I0, seq=3, status="ok", usage={"prompt_tokens": 12, "completion_tokens": 40}),
    "done-no-deltas": wire.Done(id=I0, seq=0, status="cancelled"),
    "done-error": wire.Done(
        id=I0, seq=7, status="error", err=wire.Err(code="llm_down", msg="LM Studio did not answer"),
        usage={"prompt_tokens": 12, "completion_tokens": 0}, timing={"total": 1234567},
    ),
    "done-bad-request": wire.Done(
        id=I1, seq=0, status="error",
        err=wire.Err(code="bad_request", msg="请求格式错误", hint="invalid message: missing required field `ts`"),
    ),
    "beat-min": wire.Beat(node="node-1", state="online"),
    "beat-full": wire.Beat(node="node-1", state="draining", active=2, capacity=4, models=["qwen2.5-7b", "demo"]),
    "beat-last-will": wire.Beat(node="node-1", state="offline"),
    "batch": wire.Batch(node="node-1", items=[
        wire.Accept(id=I1, node="node-1", queue=0), wire.Delta(id=I0, seq=2, text="Hello", timing={"n_pub": 7}),
        wire.Done(id=I0, seq=2, status="ok")]),
}


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.cbor"


@pytest.fixture(scope="module", autouse=True)
def _maybe_regenerate(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--regen-golden"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        for stale in GOLDEN_DIR.glob("*.cbor"):
            if stale.stem not in GOLDEN:
                stale.unlink()
        for name, msg in GOLDEN.items():
            golden_path(name).write_bytes(encode(msg))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_encode_matches_golden_bytes(name: str) -> None:
    path = golden_path(name)
    assert path.exists(), f"missing {path}; run pytest {__file__} --regen-golden"
    expected = path.read_bytes()
    got = encode(GOLDEN[name])
    assert got == expected, f"v1 encoding of {name} changed:\n  golden {expected.hex()}\n  now    {got.hex()}"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_decode_golden_bytes(name: str) -> None:
    msg = decode(golden_path(name).read_bytes())
    assert msg == GOLDEN[name]
    assert type(msg) is type(GOLDEN[name])


def test_no_stray_golden_files() -> None:
    assert {p.stem for p in GOLDEN_DIR.glob("*.cbor")} == set(GOLDEN)


def test_every_message_type_has_a_golden() -> None:
    assert {type(m) for m in GOLDEN.values()} == set(wire.MESSAGE_TYPES)


# Written out by hand from RFC 8949, independent of the golden files, so a careless regeneration
# still trips over these. (a3 = map of 3; 61 76 = "v"; 01; 61 74 = "t"; 66 ... = "cancel"; ...)
HAND_CHECKED = {
    "cancel": "a3" "6176" "01" "6174" "6663616e63656c" "626964" "50" "000102030405060708090a0b0c0d0e0f",
    "delta-first": ("a5" "6176" "01" "6174" "6564656c7461" "626964" "50" "000102030405060708090a0b0c0d0e0f"
                    "63736571" "01" "6474657874" "6548656c6c6f"),
    "beat-last-will": "a4" "6176" "01" "6174" "6462656174" "646e6f6465" "666e6f64652d31" "657374617465"
                      "676f66666c696e65",
    "done-no-deltas": ("a5" "6176" "01" "6174" "64646f6e65" "626964" "50" "000102030405060708090a0b0c0d0e0f"
                       "63736571" "00" "66737461747573" "6963616e63656c6c6564"),
}


@pytest.mark.parametrize("name", sorted(HAND_CHECKED))
def test_hand_checked_bytes(name: str) -> None:
    expected = bytes.fromhex(HAND_CHECKED[name])
    assert encode(GOLDEN[name]) == expected
    assert golden_path(name).read_bytes() == expected
