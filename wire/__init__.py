"""SmartClaw wire protocol v1: sans-IO message types, CBOR codec, topics and stream state.

No sockets, no clocks, no logging: callers bring bytes in and take bytes out. Every
malformed or invalid input raises :class:`WireError` and nothing else.
"""

from ._codec import decode, encode, validate
from ._errors import WireError
from ._messages import (
    ID_LEN,
    MAX_BATCH,
    MAX_PAYLOAD,
    MAX_TEXT,
    MESSAGE_TYPES,
    WIRE_MAJOR,
    Accept,
    Batch,
    Beat,
    Cancel,
    Delta,
    Done,
    Err,
    Message,
    Task,
)
from ._stream import Accepted, Duplicate, Event, Finished, Gap, Late, State, TaskStream, Text
from ._topics import (
    BATCH_FILTER,
    CHANNELS,
    NODE_FILTER,
    PREFIX,
    REPLY_FILTER,
    SHARED_TASK_FILTER,
    TASK_FILTER,
    TopicInfo,
    batch_topic,
    check_node_id,
    check_uid,
    is_node_id,
    is_uid,
    node_topic,
    parse_topic,
    reply_topic,
    task_topic,
)

__all__ = [
    "BATCH_FILTER", "CHANNELS", "ID_LEN", "MAX_BATCH", "MAX_PAYLOAD", "MAX_TEXT", "MESSAGE_TYPES", "NODE_FILTER", "PREFIX", "REPLY_FILTER",
    "SHARED_TASK_FILTER", "TASK_FILTER", "WIRE_MAJOR",
    "Accept", "Accepted", "Batch", "Beat", "Cancel", "Delta", "Done", "Duplicate", "Err", "Event", "Finished", "Gap",
    "Late", "Message", "State", "Task", "TaskStream", "Text", "TopicInfo", "WireError",
    "batch_topic", "check_node_id", "check_uid", "decode", "encode", "is_node_id", "is_uid", "node_topic", "parse_topic",
    "reply_topic", "task_topic", "validate",
]
