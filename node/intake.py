"""What arrives on the task topics, read: a task or a cancel of the publisher's own uid (the broker's ACL binds
the topic's uid to the publisher), a malformed message of that uid, or a message that concerns no task topic.
Pure: no I/O, no state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

import wire

__all__ = ["Inbound", "Malformed", "Unroutable", "read", "recover_id"]


@dataclass(frozen=True, slots=True)
class Inbound:
    """A task or a cancel of ``uid``."""

    uid: str
    msg: wire.Task | wire.Cancel


@dataclass(frozen=True, slots=True)
class Malformed:
    """A message on ``uid``'s task topic that is not a valid task or cancel; ``tid`` is its task id when it
    could be read."""

    uid: str
    tid: bytes | None
    hint: str


@dataclass(frozen=True, slots=True)
class Unroutable:
    """A message on no task topic: dropped. ``why`` completes "dropped a message on <topic>"."""

    topic: str
    why: str


def recover_id(payload: Any) -> bytes | None:
    """The task id of a payload ``wire.decode`` refused, if it is a CBOR map with a 16-byte ``id``."""
    if not isinstance(payload, (bytes, bytearray)):
        return None
    try:
        raw = cbor2.loads(bytes(payload))
    except Exception:  # noqa: BLE001 - not CBOR at all: no id
        return None
    tid = raw.get("id") if isinstance(raw, dict) else None
    return tid if isinstance(tid, bytes) and len(tid) == wire.ID_LEN else None


def read(topic: str, payload: Any) -> Inbound | Malformed | Unroutable:
    """The message ``payload`` published on ``topic``, read."""
    try:
        info = wire.parse_topic(topic)
    except wire.WireError as exc:
        return Unroutable(topic[:200], f": {exc}")
    if info.kind != "task":
        return Unroutable(topic, " (not a task topic)")
    uid = info.key  # the publisher's own uid (the ACL): the only user anything here may concern
    try:
        m = wire.decode(payload)
    except wire.WireError as exc:
        return Malformed(uid, None if exc.hint == "too_large" else recover_id(payload), str(exc))
    if isinstance(m, wire.Task):
        if m.uid != uid:
            return Malformed(uid, m.id, f"task uid {m.uid!r} is not its topic's uid {uid!r}")
        return Inbound(uid, m)
    if isinstance(m, wire.Cancel):
        return Inbound(uid, m)
    return Malformed(uid, getattr(m, "id", None),
                     f"a {type(m).__name__.lower()} message on a task topic (only task and cancel go there)")
