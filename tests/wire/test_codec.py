"""wire.encode / wire.decode / wire.validate: round trips and every way a payload can be wrong."""

from __future__ import annotations

import array
import datetime as dt
from decimal import Decimal
from typing import Any, Callable

import cbor2
import pytest

import wire
from wire import MAX_PAYLOAD, MAX_TEXT, WireError, decode, encode, validate
from wire_samples import ID, all_samples, full_messages, minimal_messages

SAMPLES = all_samples()
TAGS = {wire.Task: "task", wire.Cancel: "cancel", wire.Accept: "accept", wire.Delta: "delta",
        wire.Done: "done", wire.Beat: "beat", wire.Batch: "batch"}
REQUIRED = {
    "task": ["id", "uid", "ch", "text", "ts"],
    "cancel": ["id"],
    "accept": ["id", "node"],
    "delta": ["id", "seq", "text"],
    "done": ["id", "seq", "status"],
    "beat": ["node", "state"],
    "batch": ["node", "items"],
}


def as_map(msg: wire.Message) -> dict[str, Any]:
    out = cbor2.loads(encode(msg))
    assert isinstance(out, dict)
    return out


def nest(n: int) -> Any:
    """``[[...[1]...]]`` with ``n`` lists."""
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


def bad(payload: bytes, hint: str = "bad_message") -> WireError:
    with pytest.raises(WireError) as info:
        decode(payload)
    assert info.value.hint == hint, info.value
    return info.value


# --------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(name: str) -> None:
    msg = SAMPLES[name]
    data = encode(msg)
    assert isinstance(data, bytes)
    got = decode(data)
    assert got == msg
    assert type(got) is type(msg)
    assert decode(bytearray(data)) == msg
    assert decode(memoryview(data)) == msg
    assert encode(got) == data  # deterministic


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_map_has_version_and_type_first(name: str) -> None:
    msg = SAMPLES[name]
    body = as_map(msg)
    assert body["v"] == wire.WIRE_MAJOR == 1
    assert body["t"] == TAGS[type(msg)]
    assert list(body)[:2] == ["v", "t"]
    assert all(isinstance(k, str) for k in body)


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_minimal_message_carries_only_required_keys(kind: str) -> None:
    """None and default-valued optional fields are omitted from the map."""
    assert set(as_map(minimal_messages()[kind])) == {"v", "t", *REQUIRED[kind]}


def test_message_types_and_tags() -> None:
    assert set(wire.MESSAGE_TYPES) == set(TAGS)
    for cls, tag in TAGS.items():
        assert cls.__struct_config__.tag == tag
        assert cls.__struct_config__.tag_field == "t"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_validate_accepts_good_messages(name: str) -> None:
    assert validate(SAMPLES[name]) == SAMPLES[name]


# --------------------------------------------------------------------------------------------- forward compat

@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("extra", [
    {"zz": 1},
    {"future_field": "x", "another": [1, 2, {"a": None}]},
    {"when": cbor2.CBORTag(1, 1_700_000_000)},  # a tag in an unknown key is ignored too
    {"blob": b"\x00" * 100, "f": 1.5, "neg": -(2**63)},
    {"deep": [[[[[[[[[[1]]]]]]]]]]},
])
def test_unknown_keys_are_ignored(name: str, extra: dict[str, Any]) -> None:
    msg = SAMPLES[name]
    assert decode(cbor2.dumps({**as_map(msg), **extra})) == msg


def test_unknown_keys_before_v_and_t() -> None:
    body = as_map(SAMPLES["delta-min"])
    assert decode(cbor2.dumps({"x": 0, **{k: body[k] for k in reversed(list(body))}})) == SAMPLES["delta-min"]


# --------------------------------------------------------------------------------------------- version

@pytest.mark.parametrize("v", [2, 3, 255, 0, -1, 2**64 - 1, 2**64, -(2**64), "1", 1.0, True, False, None,
                               b"\x01", [1], {"major": 1}, cbor2.CBORTag(2, b"\x02"),
                               cbor2.CBORTag(1, 1), cbor2.CBORTag(4242, 1)])
def test_bad_version(v: Any) -> None:
    body = as_map(SAMPLES["delta-min"])
    body["v"] = v
    bad(cbor2.dumps(body), "bad_version")


def test_missing_version() -> None:
    body = as_map(SAMPLES["cancel-min"])
    del body["v"]
    bad(cbor2.dumps(body), "bad_version")


# --------------------------------------------------------------------------------------------- required keys

@pytest.mark.parametrize("kind,key", [(k, f) for k, fields in sorted(REQUIRED.items()) for f in fields])
def test_missing_required_key(kind: str, key: str) -> None:
    body = as_map(minimal_messages()[kind])
    del body[key]
    bad(cbor2.dumps(body))


@pytest.mark.parametrize("t", ["nope", "Task", "TASK", "", "err", "beats", 1, None, True, b"task", ["task"]])
def test_unknown_or_ill_typed_t(t: Any) -> None:
    body = as_map(SAMPLES["cancel-min"])
    body["t"] = t
    bad(cbor2.dumps(body))


def test_missing_t() -> None:
    body = as_map(SAMPLES["cancel-min"])
    del body["t"]
    bad(cbor2.dumps(body))


# --------------------------------------------------------------------------------------------- field types

def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        body[key] = value
    return mutate


LONG_UID = "wc." + "a" * 126  # 129 characters
BAD_FIELDS: list[tuple[str, str, Any]] = [
    # (message, key, value)
    ("delta-min", "seq", "1"),
    ("delta-min", "seq", 1.0),
    ("delta-min", "seq", True),
    ("delta-min", "seq", -1),
    ("delta-min", "seq", 0),  # deltas count from 1
    ("delta-min", "seq", 2**53 + 1),
    ("delta-min", "seq", 2**64 - 1),
    ("delta-min", "seq", 2**64),  # bignum, tag 2
    ("delta-min", "seq", 2**200),
    ("delta-min", "seq", -(2**64) - 1),  # negative bignum, tag 3
    ("delta-min", "seq", None),
    ("delta-min", "id", bytes(15)),
    ("delta-min", "id", bytes(17)),
    ("delta-min", "id", b""),
    ("delta-min", "id", "0123456789abcdef"),
    ("delta-min", "id", list(range(16))),
    ("delta-min", "id", None),
    ("delta-min", "text", "x" * (MAX_TEXT + 1)),
    ("delta-min", "text", b"bytes"),
    ("delta-min", "text", 5),
    ("delta-min", "text", None),
    ("delta-min", "timing", {"x" * 33: 1}),
    ("delta-min", "timing", {"a": 2**63}),
    ("delta-min", "timing", {"a": 1.5}),
    ("delta-min", "timing", [1]),
    ("done-min", "seq", -1),
    ("done-min", "seq", "3"),
    ("done-min", "status", "done"),
    ("done-min", "status", "OK"),
    ("done-min", "status", 0),
    ("done-min", "err", {"code": "x"}),
    ("done-min", "err", "boom"),
    ("done-min", "err", {"code": "x", "msg": "m" * 4097}),
    ("done-min", "err", {"code": 1, "msg": "m"}),
    ("done-min", "usage", {"tokens": "1"}),
    ("done-min", "usage", {"tokens": True}),
    ("done-min", "usage", {"tokens": 2**64}),
    ("task-min", "uid", "xx.a"),
    ("task-min", "uid", "wc."),
    ("task-min", "uid", "wc"),
    ("task-min", "uid", ""),
    ("task-min", "uid", ".a"),
    ("task-min", "uid", "WC.a"),
    ("task-min", "uid", "wc.a b"),
    ("task-min", "uid", "wc.a/b"),
    ("task-min", "uid", "wc.a+"),
    ("task-min", "uid", "wc.#"),
    ("task-min", "uid", "wc.a\n"),  # '$' in a regex would let this one through
    ("task-min", "uid", "wc.a\x00"),
    ("task-min", "uid", "wc.张三"),
    ("task-min", "uid", LONG_UID),
    ("task-min", "uid", 1),
    ("task-min", "ch", "xx"),
    ("task-min", "ch", "WC"),
    ("task-min", "ch", None),
    ("task-min", "ts", 1.5),
    ("task-min", "ts", "1700000000000"),
    ("task-min", "ts", True),
    ("task-min", "ts", 2**63),
    ("task-min", "ts", 2**64),
    ("task-min", "ts", cbor2.CBORTag(1, 1_700_000_000)),  # tag 1, epoch datetime
    ("task-min", "ts", dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)),  # tag 0, string datetime
    ("task-min", "conv", "c" * 257),
    ("task-min", "conv", 42),
    ("task-min", "opts", ["model", "x"]),
    ("task-min", "opts", {"k" * 257: 1}),
    ("task-min", "opts", {"when": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)}),
    ("task-min", "opts", {"d": Decimal("1.5")}),
    ("task-min", "opts", {"t": cbor2.CBORTag(4242, [1, 2])}),
    ("task-min", "opts", {"u": cbor2.undefined}),
    ("task-min", "opts", {"s": cbor2.CBORSimpleValue(99)}),
    ("task-min", "opts", {"big": 2**64}),
    ("task-min", "opts", {"big": -(2**64) - 1}),
    ("task-min", "opts", {"nested": {"set": {1, 2}}}),
    ("task-min", "opts", {"nested": {b"bytes-key": 1}}),
    ("accept-min", "queue", -1),
    ("accept-min", "queue", 2**31 + 1),
    ("accept-min", "queue", False),
    ("accept-min", "node", ""),
    ("accept-min", "node", "node 1"),
    ("accept-min", "node", "node.1"),
    ("accept-min", "node", "n" * 65),
    ("accept-min", "node", "node\n"),
    ("task-min", "replay", 0),  # seqs start at 1
    ("task-min", "replay", -1),
    ("task-min", "replay", "2"),
    ("task-min", "replay", 2**53 + 1),
    ("beat-min", "state", "busy"),
    ("beat-min", "state", None),
    ("beat-min", "active", -1),
    ("beat-min", "capacity", "4"),
    ("beat-min", "models", "qwen"),
    ("beat-min", "models", ["m" * 257]),
    ("beat-min", "models", [1]),
]


@pytest.mark.parametrize("name,key,value", BAD_FIELDS, ids=[f"{n}.{k}={str(v)[:20]!r}" for n, k, v in BAD_FIELDS])
def test_bad_field(name: str, key: str, value: Any) -> None:
    body = as_map(SAMPLES[name])
    body[key] = value
    bad(cbor2.dumps(body))


@pytest.mark.parametrize("name,key,value", [
    ("delta-min", "seq", 2**53),
    ("delta-min", "text", "x" * MAX_TEXT),
    ("delta-min", "text", "字" * MAX_TEXT),  # the limit counts characters, not bytes
    ("delta-min", "text", ""),
    ("done-min", "seq", 0),
    ("task-min", "uid", "wc." + "a" * 125),  # exactly 128
    ("task-min", "uid", "dev.a.b@c-d_e"),
    ("task-min", "uid", "web.."),
    ("task-min", "ts", 2**63 - 1),
    ("task-min", "ts", -(2**63)),
    ("task-min", "opts", {"deep": nest(30)}),
    ("task-min", "opts", {"max": 2**64 - 1, "min": -(2**64), "nan": 1e308, "b": b"", "n": None, "t": True}),
    ("accept-min", "queue", 2**31),
    ("accept-min", "node", "n" * 64),
    ("task-min", "replay", 1),
    ("task-min", "replay", 2**53),
])
def test_boundary_values_accepted(name: str, key: str, value: Any) -> None:
    body = as_map(SAMPLES[name])
    body[key] = value
    msg = decode(cbor2.dumps(body))
    assert getattr(msg, key) == value
    assert decode(encode(msg)) == msg


def test_opts_nesting_limit() -> None:
    body = as_map(SAMPLES["task-min"])
    body["opts"] = {"x": nest(30)}  # opts map, value, 30 lists: 32 levels
    assert decode(cbor2.dumps(body)).opts == {"x": nest(30)}  # type: ignore[union-attr]
    body["opts"] = {"x": nest(31)}
    bad(cbor2.dumps(body))


def test_opts_cycle_via_shared_reference() -> None:
    # {"v":1,"t":"task",...,"opts":{"loop": 28([29(0)])}}: a list that contains itself
    body = as_map(SAMPLES["task-min"])
    head = cbor2.dumps({**body, "opts": {"loop": 0}})[:-1]  # drop the encoded 0
    payload = head + bytes.fromhex("d81c81d81d00")
    loop = cbor2.loads(payload)["opts"]["loop"]
    assert loop[0] is loop  # the fixture really is cyclic
    bad(payload)


def test_cycle_in_unknown_key_is_ignored() -> None:
    body = as_map(SAMPLES["cancel-min"])
    payload = cbor2.dumps({**body, "zz": 0})[:-1] + bytes.fromhex("d81c81d81d00")
    assert decode(payload) == SAMPLES["cancel-min"]


def test_duplicate_keys_rejected() -> None:
    # {"v":1, "t":"cancel", "id":..., "v":2}: which "v" wins must not be up to the parser
    body = cbor2.dumps(as_map(SAMPLES["cancel-min"]))
    assert body[0] == 0xA3
    payload = bytes([0xA4]) + body[1:] + cbor2.dumps("v") + cbor2.dumps(2)
    bad(payload)


def test_non_text_map_keys_rejected() -> None:
    body = cbor2.dumps(as_map(SAMPLES["cancel-min"]))
    bad(bytes([0xA4]) + body[1:] + cbor2.dumps(7) + cbor2.dumps(0))  # int key
    bad(bytes([0xA4]) + body[1:] + bytes.fromhex("8101") + cbor2.dumps(0))  # array key
    bad(cbor2.dumps({b"v": 1, b"t": "cancel", b"id": ID}), "bad_version")  # byte-string keys are not names


def test_invalid_utf8_text() -> None:
    body = as_map(SAMPLES["delta-min"])
    payload = cbor2.dumps({**body, "text": "ab"})
    bad(payload.replace(b"\x62ab", b"\x62\xc3\x28"))


def test_indefinite_length_items_are_fine() -> None:
    # {_ "v": 1, "t": "cancel", "id": (_ h'0001..07', h'08..0f') }
    payload = (bytes.fromhex("bf") + cbor2.dumps("v") + cbor2.dumps(1) + cbor2.dumps("t") + cbor2.dumps("cancel")
               + cbor2.dumps("id") + b"\x5f" + cbor2.dumps(ID[:8]) + cbor2.dumps(ID[8:]) + b"\xff" + b"\xff")
    assert decode(payload) == wire.Cancel(id=ID)


# --------------------------------------------------------------------------------------------- not a message

@pytest.mark.parametrize("value", [[1, 2], [], 0, -5, 2**70, "task", "", b"\xa1", None, True, 1.5,
                                   cbor2.undefined, cbor2.CBORTag(1, 0), [{"v": 1, "t": "cancel", "id": ID}]])
def test_non_map_payloads(value: Any) -> None:
    bad(cbor2.dumps(value))


def test_empty_map() -> None:
    bad(cbor2.dumps({}), "bad_version")


def test_empty_bytes() -> None:
    bad(b"")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_fails(name: str) -> None:
    data = encode(SAMPLES[name])
    for cut in range(len(data)):
        bad(data[:cut])


@pytest.mark.parametrize("tail", [b"\x00", b"\xff", b"\x81", b"\xa0", b"garbage", b"\x00" * 1000])
def test_trailing_bytes_rejected(tail: bytes) -> None:
    bad(encode(SAMPLES["delta-min"]) + tail)


def test_two_messages_back_to_back_rejected() -> None:
    bad(encode(SAMPLES["delta-min"]) + encode(SAMPLES["done-min"]))


@pytest.mark.parametrize("depth", [401, 1000, 100_000])
def test_deep_nesting_rejected(depth: int) -> None:
    body = cbor2.dumps(as_map(SAMPLES["cancel-min"]))
    bad(bytes([0xA4]) + body[1:] + cbor2.dumps("deep") + b"\x81" * depth + b"\x00")
    bad(b"\x81" * depth + b"\x00")
    bad(b"\xa1\x61a" * min(depth, 80_000) + b"\x00")  # {"a": {"a": ...}}


@pytest.mark.parametrize("header", [
    "9a10000000",  # array of 2**28 items, none present
    "9b0000001000000000",  # array of 2**36 items
    "bb7fffffffffffffff",  # map of 2**63-1 pairs
    "5a7fffffff",  # byte string of 2**31-1 bytes
    "7b7fffffffffffffff",  # text string of 2**63-1 bytes
    "c2",  # tag with no content
    "ff",  # lone break
    "1c",  # reserved additional info
    "f818",  # reserved simple value encoding
])
def test_lying_headers_rejected(header: str) -> None:
    bad(bytes.fromhex(header))


# --------------------------------------------------------------------------------------------- size

def test_oversize_payload_rejected_before_parsing() -> None:
    junk = b"\xff" * (MAX_PAYLOAD + 1)  # not CBOR at all: too_large proves the size check runs first
    bad(junk, "too_large")


def test_oversize_valid_message_rejected() -> None:
    body = as_map(SAMPLES["cancel-min"])
    payload = cbor2.dumps({**body, "pad": b"\x00" * MAX_PAYLOAD})
    bad(payload, "too_large")


def test_payload_of_exactly_max_size_accepted() -> None:
    body = as_map(SAMPLES["cancel-min"])
    overhead = len(cbor2.dumps({**body, "pad": b"\x00" * 100_000})) - 100_000
    payload = cbor2.dumps({**body, "pad": b"\x00" * (MAX_PAYLOAD - overhead)})
    assert len(payload) == MAX_PAYLOAD
    assert decode(payload) == SAMPLES["cancel-min"]


def test_oversize_memoryview_counts_bytes_not_items() -> None:
    view = memoryview(array.array("i", [0]) * (MAX_PAYLOAD // 4 + 1))
    assert len(view) <= MAX_PAYLOAD < view.nbytes  # 4-byte items: len() is a quarter of the byte size
    bad(view, "too_large")  # type: ignore[arg-type]


def test_encode_refuses_oversize() -> None:
    msg = wire.Delta(id=ID, seq=1, text="😀" * MAX_TEXT)  # 4 bytes per character
    with pytest.raises(WireError) as info:
        encode(msg)
    assert info.value.hint == "too_large"


# --------------------------------------------------------------------------------------------- non-bytes input

@pytest.mark.parametrize("value", [None, "", "a1617601", 0, 1.0, [0xA0], {"v": 1}, SAMPLES["cancel-min"],
                                   iter([b"\xa0"])])
def test_non_bytes_input(value: Any) -> None:
    with pytest.raises(WireError):
        decode(value)


# --------------------------------------------------------------------------------------------- validate / encode

@pytest.mark.parametrize("msg", [
    wire.Delta(id=ID, seq=0, text="x"),
    wire.Delta(id=ID, seq=-3, text="x"),
    wire.Delta(id=ID[:15], seq=1, text="x"),
    wire.Delta(id=ID, seq=1, text="x" * (MAX_TEXT + 1)),
    wire.Cancel(id="0123456789abcdef"),  # type: ignore[arg-type]
    wire.Task(id=ID, uid="xx.a", ch="wc", text="", ts=0),
    wire.Task(id=ID, uid="wc.a", ch="zz", text="", ts=0),  # type: ignore[arg-type]
    wire.Task(id=ID, uid="wc.a", ch="wc", text="", ts=2**64),
    wire.Done(id=ID, seq=1, status="finished"),  # type: ignore[arg-type]
    wire.Beat(node="a b", state="online"),
    wire.Accept(id=ID, node="n", queue=-1),
    wire.Task(id=ID, uid="wc.a", ch="wc", text="", ts=0, opts={"big": 2**70}),  # decode would refuse these opts
    wire.Task(id=ID, uid="wc.a", ch="wc", text="", ts=0, opts={"deep": nest(33)}),
])
def test_validate_refuses_hand_built_bad_messages(msg: wire.Message) -> None:
    with pytest.raises(WireError) as info:
        validate(msg)
    assert info.value.hint == "bad_message"


@pytest.mark.parametrize("value", [None, {"v": 1, "t": "cancel", "id": ID}, wire.Err(code="a", msg="b"), "x", b"",
                                   1, wire.TaskStream(id=ID), wire.Accepted(node="n", queue=0)])
def test_encode_and_validate_refuse_non_messages(value: Any) -> None:
    with pytest.raises(WireError):
        encode(value)
    with pytest.raises(WireError):
        validate(value)


@pytest.mark.parametrize("msg", [
    wire.Task(id=ID, uid="wc.a", ch="wc", text="", ts=0, opts={"x": object()}),
    wire.Delta(id=ID, seq=1, text="\ud800"),  # a lone surrogate is not UTF-8
])
def test_encode_wraps_unencodable_values(msg: wire.Message) -> None:
    with pytest.raises(WireError):
        encode(msg)


# --------------------------------------------------------------------------------------------- the error type

def test_wire_error_shape() -> None:
    assert issubclass(WireError, ValueError)
    assert WireError("x").hint == "bad_message"
    assert WireError("x", hint="too_large").hint == "too_large"
    assert str(WireError("boom")) == "boom"


def test_cbor_errors_are_chained() -> None:
    err = bad(b"\xff")
    assert isinstance(err.__cause__, cbor2.CBORDecodeError)


def test_full_samples_cover_every_optional_field() -> None:
    for name, msg in full_messages().items():
        for field in msg.__struct_fields__:
            assert getattr(msg, field) not in (None, 0), f"{name}.{field} left at its default"
