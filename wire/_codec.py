"""CBOR codec: ``encode(msg) -> bytes`` and ``decode(bytes) -> Message``; every failure is WireError."""

from __future__ import annotations

from typing import Any

import cbor2
import msgspec

from ._errors import WireError
from ._messages import MAX_PAYLOAD, MESSAGE_TYPES, WIRE_MAJOR, Message


def _to_map(msg: Message) -> dict[str, Any]:
    if not isinstance(msg, MESSAGE_TYPES):
        raise WireError(f"not a wire message: {type(msg).__name__}", hint="bad_message")
    body: dict[str, Any] = msgspec.to_builtins(msg, builtin_types=(bytes,))
    return {"v": WIRE_MAJOR, **body}


def validate(msg: Message) -> Message:
    """Check a hand-built message against its type's constraints (raises WireError)."""
    try:
        return msgspec.convert(_to_map(msg), type=Message)  # type: ignore[arg-type]
    except msgspec.ValidationError as exc:
        raise WireError(f"invalid {type(msg).__name__}: {exc}", hint="bad_message") from exc


def encode(msg: Message) -> bytes:
    """Encode one message as a CBOR map ``{"v": 1, "t": type, ...}`` (None fields omitted)."""
    data = cbor2.dumps(_to_map(msg))
    if len(data) > MAX_PAYLOAD:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_PAYLOAD}", hint="too_large")
    return data


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode and validate one message. Unknown keys are ignored; everything else that is off raises WireError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("payload must be bytes", hint="bad_message")
    if len(data) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD}", hint="too_large")
    if not data:
        raise WireError("empty payload", hint="bad_message")
    try:
        raw = cbor2.loads(bytes(data))
    except Exception as exc:  # cbor2 raises CBORDecodeError, but also ValueError/TypeError/... on odd input
        raise WireError(f"not CBOR: {exc}", hint="bad_message") from exc
    if not isinstance(raw, dict):
        raise WireError("payload is not a CBOR map", hint="bad_message")
    version = raw.get("v")
    if type(version) is not int:
        raise WireError("missing or non-integer 'v' (major version)", hint="bad_version")
    if version != WIRE_MAJOR:
        raise WireError(f"unsupported major version {version} (this side speaks {WIRE_MAJOR})", hint="bad_version")
    try:
        return msgspec.convert(raw, type=Message)  # type: ignore[arg-type]
    except (msgspec.ValidationError, TypeError, ValueError, RecursionError) as exc:
        raise WireError(f"invalid message: {exc}", hint="bad_message") from exc
