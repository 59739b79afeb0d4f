"""Topic ACL for the embedded broker: pure functions, no I/O (rules: the topic table of docs/protocol.md).

``allowed(role, username, topic, action)`` with action ``subscribe`` (``topic`` is the requested filter),
``publish`` or ``receive`` (``topic`` is the concrete topic of a message about to be delivered):

========  =====================================================  ===========================================
role      publish                                                subscribe / receive
========  =====================================================  ===========================================
edge      ``claw/v1/task/<uid>``                                 ``claw/v1/{task,reply,node,batch}/+`` and
                                                                 concrete topics under them
node      ``claw/v1/reply/<uid>``, ``claw/v1/node/<own id>``,    ``claw/v1/task/+``, ``$share/claw/claw/v1/task/+``
          ``claw/v1/batch/<own id>`` (username ``node.<id>``)    and concrete task topics
device    ``claw/v1/task/<own uid>`` (username = uid ``dev.X``)  ``claw/v1/reply/<own uid>`` only
========  =====================================================  ===========================================

Everything else is denied: ``#``, ``claw/#``, ``+`` in other places, other versions, malformed uids/node ids,
extra levels, unknown roles or actions, a malformed username. The rules are per-username topic patterns, so
they port to Mosquitto/EMQX ACLs. Decisions are memoised (bounded), since ``receive`` runs per subscriber per
message.
"""

from __future__ import annotations

from functools import lru_cache

from wire import PREFIX, SHARED_TASK_FILTER, is_node_id, is_uid

ROLES = frozenset({"edge", "node", "device"})
ACTIONS = frozenset({"subscribe", "publish", "receive"})
NODE_USER_PREFIX = "node."
DEVICE_USER_PREFIX = "dev."

_KINDS = frozenset({"task", "reply", "node", "batch"})
_NODE_KINDS = frozenset({"node", "batch"})
_ROOT, _VERSION = PREFIX.split("/")
# the longest valid topic: "$share/claw/" + "claw/v1/reply/" + 128-char uid; anything longer is denied uncached
_MAX_TOPIC = len(SHARED_TASK_FILTER) + 140


def _parse(topic: str, wildcard: bool) -> tuple[str, str] | None:
    """``claw/v1/<kind>/<key>`` -> (kind, key); key ``+`` only if ``wildcard``; None if not a valid topic."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != _ROOT or parts[1] != _VERSION or parts[2] not in _KINDS:
        return None
    kind, key = parts[2], parts[3]
    if key == "+":
        return (kind, key) if wildcard else None
    ok = is_node_id(key) if kind in _NODE_KINDS else is_uid(key)
    return (kind, key) if ok else None


@lru_cache(maxsize=16384)
def _decide(role: str, username: str, topic: str, action: str) -> bool:
    if action == "subscribe":
        if topic.startswith("$"):
            # MQTT 5 shared subscription, for nodes only, and only the whole task filter
            return role == "node" and topic == SHARED_TASK_FILTER and _node_id(username) is not None
        parsed = _parse(topic, wildcard=True)
    elif action == "publish" or action == "receive":
        parsed = _parse(topic, wildcard=False)
    else:
        return False
    if parsed is None:
        return False
    kind, key = parsed

    if role == "edge":
        if action == "publish":
            return kind == "task"
        return True  # task/reply/node/batch, "+" or concrete

    if role == "node":
        node_id = _node_id(username)
        if node_id is None:
            return False
        if action == "publish":
            return kind == "reply" or (kind in _NODE_KINDS and key == node_id)
        return kind == "task"

    if role == "device":
        uid = _device_uid(username)
        if uid is None:
            return False
        if action == "publish":
            return kind == "task" and key == uid
        return kind == "reply" and key == uid

    return False


def _node_id(username: str) -> str | None:
    if username.startswith(NODE_USER_PREFIX):
        node_id = username[len(NODE_USER_PREFIX):]
        if is_node_id(node_id):
            return node_id
    return None


def _device_uid(username: str) -> str | None:
    if username.startswith(DEVICE_USER_PREFIX) and is_uid(username):
        return username
    return None


def allowed(role: str, username: str, topic: str, action: str) -> bool:
    """May a client with ``role``/``username`` do ``action`` on ``topic``? Never raises; unknown -> False."""
    if (not isinstance(role, str) or not isinstance(username, str) or not isinstance(topic, str)
            or not isinstance(action, str) or len(topic) > _MAX_TOPIC or len(username) > 200):
        return False
    # str() turns a StrEnum (amqtt's Action) into its plain value so cache keys stay simple
    return _decide(str(role), str(username), str(topic), str(action))


def will_allowed(role: str, username: str, will_topic: str | None) -> bool:
    """A last will is a publish on the client's behalf: same rule as ``publish``."""
    return will_topic is not None and allowed(role, username, will_topic, "publish")


__all__ = ["ACTIONS", "ROLES", "allowed", "will_allowed"]
