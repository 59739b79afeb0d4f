"""Fuzzing wire.decode. The rule (after h11's fuzz/afl-server.py): whatever bytes arrive, decode()
either returns a valid message or raises WireError -- never any other exception. A message it
returns re-encodes to an equivalent payload (same message back, same bytes again)."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import cbor2
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import wire
from wire import WireError, decode, encode, validate
from wire_samples import all_samples, budget

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.cbor"))
SEEDS = [p.read_bytes() for p in GOLDEN] + [encode(m) for m in all_samples().values()]
TAGS = ["task", "cancel", "accept", "delta", "done", "beat", "batch"]


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def check(payload: bytes) -> wire.Message | None:
    """Decode ``payload`` under the fuzz rule; return the message, or None after a WireError."""
    try:
        msg = decode(payload)
    except WireError as exc:
        assert isinstance(exc.hint, str) and exc.hint
        return None
    except BaseException as exc:  # noqa: BLE001 - anything but WireError is a bug
        pytest.fail(f"{type(exc).__name__} escaped decode(): {exc!r}\npayload: {payload.hex()}")
    assert isinstance(msg, wire.MESSAGE_TYPES)
    data = encode(msg)
    again = decode(data)
    assert type(again) is type(msg)
    assert encode(again) == data
    assert encode(validate(msg)) == data
    if not _has_nan(getattr(msg, "opts", None)):
        assert again == msg
        assert validate(msg) == msg
    return msg


# --------------------------------------------------------------------------------------------- raw bytes

@budget(1000)
@given(st.binary(max_size=300))
def test_random_bytes(payload: bytes) -> None:
    check(payload)


@budget(300)
@given(st.lists(st.sampled_from(range(256)), max_size=60).map(bytes) |
       st.lists(st.sampled_from([0xA1, 0xA2, 0xA5, 0x61, 0x76, 0x74, 0x01, 0x50, 0x5F, 0x7F, 0x9F, 0xBF, 0xFF,
                                 0xC1, 0xC2, 0xD8, 0x1C, 0x1D, 0x1B, 0xF9, 0xFB, 0xF7, 0x00]), max_size=60).map(bytes))
def test_random_cbor_like_bytes(payload: bytes) -> None:
    check(payload)


# --------------------------------------------------------------------------------------------- mutations

@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_single_bit_flip_and_byte_deletion(seed: int) -> None:
    data = SEEDS[seed]
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            check(bytes(flipped))
        check(data[:i] + data[i + 1:])
        for byte in (0x00, 0xFF, 0x1B, 0x5F, 0x7F, 0x9F, 0xBF, 0xC2, 0xD8, 0xF7):
            check(data[:i] + bytes([byte]) + data[i:])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    payload = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice", "repeat"]))
        at = draw(st.integers(0, max(len(payload) - 1, 0)))
        if op == "flip" and payload:
            payload[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and payload:
            payload[at] = draw(st.integers(0, 255))
        elif op == "insert":
            payload[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del payload[at:at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del payload[at:]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            cut = draw(st.integers(0, len(other)))
            payload[at:] = other[cut:]
        elif op == "repeat":
            payload[at:at] = payload[at:at + draw(st.integers(1, 16))]
    return bytes(payload)


@budget(1500)
@given(mutated())
def test_mutated_valid_payloads(payload: bytes) -> None:
    check(payload)


# --------------------------------------------------------------------------------------------- random maps

UTC = dt.timezone.utc
plain_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=12), st.binary(max_size=20),
)
exotic_leaf = st.one_of(
    st.integers(), st.datetimes(timezones=st.just(UTC)), st.uuids(), st.fractions(max_denominator=1000),
    st.just(cbor2.undefined), st.sampled_from([cbor2.CBORSimpleValue(v) for v in (0, 16, 19, 32, 99, 255)]),
    st.builds(cbor2.CBORTag, st.sampled_from([6, 7, 24, 32, 33, 40, 99, 1000, 55799, 2**32]), plain_leaf),
    st.frozensets(st.integers(0, 9), max_size=3), st.decimals(allow_nan=False, allow_infinity=False, places=2),
)
leaf = plain_leaf | exotic_leaf
keys = st.text(max_size=6) | st.sampled_from(["v", "t", "id", "seq", "text", "opts", "node", "uid"])
any_value = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys | st.integers(0, 3), inner, max_size=4),
    max_leaves=20,
)
plain_json = st.recursive(
    plain_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


@budget(400)
@given(
    body=st.dictionaries(keys, any_value, max_size=8),
    t=st.sampled_from(TAGS) | any_value,
    v=st.just(1) | any_value,
    drop=st.sampled_from(["", "t", "v"]),
)
def test_random_maps(body: dict[str, Any], t: Any, v: Any, drop: str) -> None:
    body = {**body, "v": v, "t": t}
    body.pop(drop, None)
    msg = check(cbor2.dumps(body))
    if msg is not None:
        assert body["v"] == 1 and type(body["v"]) is int
        assert body["t"] == msg.__struct_config__.tag


INT64 = st.integers(-(2**63), 2**63 - 1)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.binary(min_size=16, max_size=16),
    "uid": st.from_regex(r"(wc|mp|dev|web)\.[A-Za-z0-9_.@-]{1,20}", fullmatch=True),
    "ch": st.sampled_from(["wc", "mp", "dev", "web"]),
    "text": st.text(max_size=20),
    "ts": INT64,
    "conv": st.text(max_size=10),
    "opts": st.dictionaries(st.text(max_size=6), plain_json, max_size=3),
    "timing": st.dictionaries(st.text(max_size=6), INT64, max_size=3),
    "node": st.from_regex(r"[A-Za-z0-9_-]{1,10}", fullmatch=True),
    "queue": st.integers(0, 2**31),
    "active": st.integers(0, 2**31),
    "capacity": st.integers(0, 2**31),
    "seq": st.integers(0, 2**53),
    "replay": st.integers(1, 2**53),
    "status": st.sampled_from(["ok", "error", "cancelled"]),
    "err": st.fixed_dictionaries({"code": st.text(max_size=8), "msg": st.text(max_size=8)}),
    "usage": st.dictionaries(st.text(max_size=6), INT64, max_size=3),
    "state": st.sampled_from(["online", "draining", "offline"]),
    "models": st.lists(st.text(max_size=8), max_size=3),
    "items": st.lists(st.sampled_from([
        {"t": "delta", "id": bytes(16), "seq": 1, "text": "x"},
        {"t": "accept", "id": bytes(16), "node": "n1"},
        {"t": "done", "id": bytes(16), "seq": 0, "status": "ok"},
        {"t": "beat", "node": "n1", "state": "online"},  # not a reply: the batch is refused
        {"t": "delta", "id": bytes(3), "seq": 1, "text": "x"},
    ]), max_size=3),
}
REQUIRED = {cls.__struct_config__.tag: cls.__struct_fields__[:len(cls.__struct_fields__) - len(cls.__struct_defaults__)]
            for cls in wire.MESSAGE_TYPES}  # type: ignore[attr-defined]
SHAPES = {cls.__struct_config__.tag: cls.__struct_fields__ for cls in wire.MESSAGE_TYPES}  # type: ignore[attr-defined]


@st.composite
def near_valid_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed map of a random type with up to two keys made wrong (wild value or left out)."""
    tag = draw(st.sampled_from(TAGS))
    fields = SHAPES[tag]
    body: dict[str, Any] = {"v": 1, "t": tag}
    body.update({name: draw(FIELDS[name]) for name in fields if draw(st.booleans()) or name in REQUIRED[tag]})
    for name in draw(st.lists(st.sampled_from(["v", "t", *fields]), max_size=2, unique=True)):
        if draw(st.booleans()):
            body[name] = draw(any_value)
        else:
            body.pop(name, None)
    body.update(draw(st.dictionaries(st.text(max_size=6), any_value, max_size=2)))  # unknown keys
    return body


@budget(600)
@given(near_valid_maps())
def test_near_valid_maps(body: dict[str, Any]) -> None:
    msg = check(cbor2.dumps(body))
    if msg is not None:
        for name in msg.__struct_fields__:
            value = getattr(msg, name)
            if name in body and not _has_nan(value):
                assert msg_value_matches(value, body[name]), name


def msg_value_matches(value: Any, raw: Any) -> bool:
    if isinstance(value, wire.Err):
        return {"code": value.code, "msg": value.msg} == raw
    if isinstance(value, list) and value and isinstance(value[0], msgspec.Struct):  # Batch.items
        return [msgspec.to_builtins(v, builtin_types=(bytes,)) for v in value] == raw
    return bool(value == raw)


@budget(200)
@given(st.sampled_from(SEEDS), st.binary(min_size=1, max_size=16))
def test_trailing_bytes_never_accepted(seed: bytes, tail: bytes) -> None:
    with pytest.raises(WireError):
        decode(seed + tail)


def test_seeds_are_valid() -> None:
    assert len(SEEDS) >= 12
    for seed in SEEDS:
        assert check(seed) is not None


def test_exotic_values_really_are_cbor_able() -> None:
    # the strategies above feed cbor2.dumps directly; make sure each exotic kind encodes
    for value in (dt.datetime(2024, 1, 1, tzinfo=UTC), uuid.UUID(int=1), Fraction(1, 3), frozenset({1}),
                  cbor2.undefined, cbor2.CBORSimpleValue(99), cbor2.CBORTag(99, 1), 2**70):
        body = {"v": 1, "t": "task", "id": bytes(16), "uid": "wc.a", "ch": "wc", "text": "", "ts": 0,
                "opts": {"x": value}}
        with pytest.raises(WireError):
            decode(cbor2.dumps(body))


@budget(300)
@given(opts=st.dictionaries(st.text(max_size=6), any_value, max_size=4),
       base=st.sampled_from(["task-min", "task-full"]))
def test_task_opts_with_any_value(opts: dict[str, Any], base: str) -> None:
    """opts is the one field typed Any: whatever it holds must survive the round trip or be refused."""
    body = cbor2.loads(encode(all_samples()[base]))
    body["opts"] = opts
    msg = check(cbor2.dumps(body))
    if msg is not None and not _has_nan(msg.opts):  # type: ignore[union-attr]
        assert msg.opts == cbor2.loads(cbor2.dumps(opts))  # type: ignore[union-attr]  # (tag 55799 is a no-op)
