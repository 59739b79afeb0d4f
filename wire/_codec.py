"""CBOR codec: ``encode(msg) -> bytes`` and ``decode(bytes) -> Message``; every failure is WireError.

The v1 data model is plain CBOR: maps with text keys, arrays, text and byte strings, integers,
floats, booleans and null. Payloads are read strictly: exactly one CBOR item (no trailing bytes),
no duplicate map keys, text or byte strings as map keys only, nesting at most cbor2's default
depth. Values that reach the message through ``Task.opts`` must be plain data as well (no tags,
no shared references, integers within CBOR's native 64-bit range), so every decoded message
re-encodes to an equal one.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2
import msgspec

from ._errors import WireError
from ._messages import MAX_PAYLOAD, MESSAGE_TYPES, WIRE_MAJOR, Message, Task

_OPTS_DEPTH = 32  # nesting allowed inside Task.opts
_CBOR_INT_MIN, _CBOR_INT_MAX = -(2**64), 2**64 - 1  # beyond this cbor2 uses bignum tags


def _to_map(msg: Message) -> dict[str, Any]:
    if not isinstance(msg, MESSAGE_TYPES):
        raise WireError(f"not a wire message: {type(msg).__name__}", hint="bad_message")
    try:
        body: dict[str, Any] = msgspec.to_builtins(msg, builtin_types=(bytes,))
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. opts holding an object() or a cycle
        raise WireError(f"can't encode {type(msg).__name__}: {exc}", hint="bad_message") from exc
    return {"v": WIRE_MAJOR, **body}


def validate(msg: Message) -> Message:
    """Check a hand-built message against its type's constraints (raises WireError).

    Whatever passes here also passes ``decode(encode(msg))``.
    """
    try:
        checked = msgspec.convert(_to_map(msg), type=Message)  # type: ignore[arg-type]
    except msgspec.ValidationError as exc:
        raise WireError(f"invalid {type(msg).__name__}: {exc}", hint="bad_message") from exc
    if type(checked) is Task and checked.opts is not None:
        _check_plain(checked.opts, 1)
    return checked  # type: ignore[no-any-return]


def encode(msg: Message) -> bytes:
    """Encode one message as a CBOR map ``{"v": 1, "t": type, ...}`` (None fields omitted)."""
    body = _to_map(msg)
    try:
        data = cbor2.dumps(body)
    except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:  # e.g. a lone surrogate
        raise WireError(f"can't encode {type(msg).__name__}: {exc}", hint="bad_message") from exc
    if len(data) > MAX_PAYLOAD:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_PAYLOAD}", hint="too_large")
    return data


def _check_plain(value: Any, depth: int) -> None:
    """Raise WireError unless ``value`` is plain CBOR data (see the module docstring)."""
    if depth > _OPTS_DEPTH:
        raise WireError("opts nested too deeply (or cyclic)", hint="bad_message")
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise WireError("opts map keys must be text", hint="bad_message")
            _check_plain(item, depth + 1)
    elif kind is list:
        for item in value:
            _check_plain(item, depth + 1)
    elif kind is int:
        if not _CBOR_INT_MIN <= value <= _CBOR_INT_MAX:
            raise WireError("opts integer out of the 64-bit range", hint="bad_message")
    elif value is not None and kind not in (str, bytes, float, bool):
        raise WireError(f"opts may not hold {kind.__name__}", hint="bad_message")


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode and validate one message. Unknown keys are ignored; everything else that is off raises WireError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("payload must be bytes", hint="bad_message")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > MAX_PAYLOAD:
        raise WireError(f"payload of {size} bytes exceeds {MAX_PAYLOAD}", hint="too_large")
    if not size:
        raise WireError("empty payload", hint="bad_message")
    try:
        buf = io.BytesIO(bytes(data))
        raw = cbor2.CBORDecoder(buf, allow_duplicate_keys=False, strict_hashable_types=True).decode()
    except Exception as exc:  # cbor2 raises CBORDecodeError, but also ValueError/TypeError/... on odd input
        raise WireError(f"not CBOR: {exc}", hint="bad_message") from exc
    if buf.tell() != size:
        raise WireError(f"{size - buf.tell()} trailing bytes after the CBOR item", hint="bad_message")
    if not isinstance(raw, dict):
        raise WireError("payload is not a CBOR map", hint="bad_message")
    version = raw.get("v")
    if type(version) is not int:
        raise WireError("missing or non-integer 'v' (major version)", hint="bad_version")
    if version != WIRE_MAJOR:
        raise WireError(f"unsupported major version {version} (this side speaks {WIRE_MAJOR})", hint="bad_version")
    try:
        msg = msgspec.convert(raw, type=Message)  # type: ignore[arg-type]
    except (msgspec.ValidationError, TypeError, ValueError, RecursionError) as exc:
        raise WireError(f"invalid message: {exc}", hint="bad_message") from exc
    if type(msg) is Task and msg.opts is not None:
        _check_plain(msg.opts, 1)
    return msg  # type: ignore[no-any-return]
