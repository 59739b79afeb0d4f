"""MQTT topic names for protocol v1: builders, parsers and validators (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ._errors import WireError

PREFIX = "claw/v1"
TASK_FILTER = f"{PREFIX}/task/+"
REPLY_FILTER = f"{PREFIX}/reply/+"
NODE_FILTER = f"{PREFIX}/node/+"
BATCH_FILTER = f"{PREFIX}/batch/+"
SHARED_TASK_FILTER = f"$share/claw/{TASK_FILTER}"

CHANNELS = frozenset({"wc", "mp", "dev", "web"})
MAX_UID = 128
MAX_NODE_ID = 64

_UID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_NODE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

TopicKind = Literal["task", "reply", "node", "batch"]
_KINDS: frozenset[str] = frozenset({"task", "reply", "node", "batch"})
_NODE_KINDS = frozenset({"node", "batch"})  # topics keyed by a node id (the others by a uid)


def is_uid(uid: object) -> bool:
    """``{channel}.{id}`` with a known channel, ``[A-Za-z0-9_.@-]``, at most 128 characters."""
    if not isinstance(uid, str) or _UID_RE.fullmatch(uid) is None:
        return False
    channel, dot, rest = uid.partition(".")
    return bool(dot) and channel in CHANNELS and bool(rest)


def is_node_id(node_id: object) -> bool:
    return isinstance(node_id, str) and _NODE_RE.fullmatch(node_id) is not None


def check_uid(uid: str) -> str:
    if not is_uid(uid):
        raise WireError(f"invalid uid {uid!r}: want '<wc|mp|dev|web>.<id>' of [A-Za-z0-9_.@-], max {MAX_UID}",
                        hint="bad_uid")
    return uid


def check_node_id(node_id: str) -> str:
    if not is_node_id(node_id):
        raise WireError(f"invalid node id {node_id!r}: want [A-Za-z0-9_-], max {MAX_NODE_ID}", hint="bad_node")
    return node_id


def task_topic(uid: str) -> str:
    return f"{PREFIX}/task/{check_uid(uid)}"


def reply_topic(uid: str) -> str:
    return f"{PREFIX}/reply/{check_uid(uid)}"


def node_topic(node_id: str) -> str:
    return f"{PREFIX}/node/{check_node_id(node_id)}"


def batch_topic(node_id: str) -> str:
    """Where a node publishes :class:`Batch` messages of replies for the edge."""
    return f"{PREFIX}/batch/{check_node_id(node_id)}"


@dataclass(frozen=True, slots=True)
class TopicInfo:
    kind: TopicKind
    key: str  # the uid for task/reply, the node id for node/batch


def parse_topic(topic: str) -> TopicInfo:
    """Parse a concrete (wildcard-free) v1 topic; anything else raises WireError."""
    if not isinstance(topic, str):
        raise WireError("topic must be a string", hint="bad_topic")
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "claw" or parts[1] != "v1" or parts[2] not in _KINDS:
        raise WireError(f"not a claw/v1 topic: {topic[:200]!r}", hint="bad_topic")
    kind, key = parts[2], parts[3]
    if kind in _NODE_KINDS:
        check_node_id(key)
    else:
        check_uid(key)
    return TopicInfo(kind, key)  # type: ignore[arg-type]
