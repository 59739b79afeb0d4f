"""Typed wire messages of protocol v1: frozen msgspec Structs forming one tagged union.

Constraints live in the types, so a message that violates them cannot be decoded (and
``validate()`` refuses to encode one that was built by hand with bad values).
Within major version 1 only optional fields may be added; unknown keys are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

WIRE_MAJOR = 1
MAX_PAYLOAD = 256 * 1024  # bytes of one encoded message
MAX_TEXT = 64 * 1024  # characters of one text field
ID_LEN = 16

TaskId = Annotated[bytes, msgspec.Meta(min_length=ID_LEN, max_length=ID_LEN)]
# patterns end in \Z, not $: "$" also matches before a trailing newline
Uid = Annotated[str, msgspec.Meta(pattern=r"^(wc|mp|dev|web)\.[A-Za-z0-9_.@-]+\Z", max_length=128)]
NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+\Z", min_length=1, max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Short = Annotated[str, msgspec.Meta(max_length=256)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # CBOR native ints, no bignum tags
Channel = Literal["wc", "mp", "dev", "web"]
Status = Literal["ok", "error", "cancelled"]
NodeState = Literal["online", "draining", "offline"]
# timing: stage name -> wall-clock microseconds (bench/trace); usage: token counts
Timing = dict[Annotated[str, msgspec.Meta(max_length=32)], Int64]


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="t", omit_defaults=True):
    pass


class Task(_Msg, tag="task"):
    """A user's question. ``id`` (16 random bytes) is the idempotency key end to end."""

    id: TaskId
    uid: Uid
    ch: Channel
    text: Text
    ts: Int64  # edge receive time, milliseconds since the epoch
    conv: Short | None = None  # conversation id; None = the user's default conversation
    opts: dict[Short, Any] | None = None
    timing: Timing | None = None
    # A replay request, not a dispatch: the sender has every chunk below this seq and misses the rest.
    # A node that has the task (running or in its reply log) re-sends its chunks from this seq (and the
    # Done if finished); a node that does not have it ignores the message and never runs the task for it.
    replay: Annotated[int, msgspec.Meta(ge=1, le=2**53)] | None = None


class Cancel(_Msg, tag="cancel"):
    id: TaskId


class Accept(_Msg, tag="accept"):
    """The node has the task; ``queue`` is its position (0 = running)."""

    id: TaskId
    node: NodeId
    queue: Count = 0


class Delta(_Msg, tag="delta"):
    """A chunk of answer text; ``seq`` starts at 1 and rises by one per chunk of a task."""

    id: TaskId
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    text: Text
    timing: Timing | None = None


class Err(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why a task failed: ``code`` (machine-readable), ``msg`` (for the user, Simplified Chinese) and, for a
    request refused as malformed (``bad_request``), ``hint``: what was wrong with it, in English, for the
    integrator."""

    code: Short
    msg: Annotated[str, msgspec.Meta(max_length=4096)]
    hint: Short | None = None


class Done(_Msg, tag="done"):
    """The end of a task. ``seq`` is the last delta's seq (0 when there was none)."""

    id: TaskId
    seq: Seq
    status: Status
    err: Err | None = None
    usage: dict[Short, Int64] | None = None
    timing: Timing | None = None


class Beat(_Msg, tag="beat"):
    """Node presence, every few seconds; the node's last will is a Beat with state offline."""

    node: NodeId
    state: NodeState
    active: Count = 0
    capacity: Count = 0
    models: list[Short] | None = None


MAX_BATCH = 4096  # replies in one Batch


class Batch(_Msg, tag="batch"):
    """Replies (``accept``/``delta``/``done``) of many tasks in one MQTT message, node → edge only, on
    ``claw/v1/batch/{node}``; in order (per task, the order they were produced). Devices never see batches:
    a device's replies stay on its own ``claw/v1/reply/{uid}``."""

    node: NodeId
    items: Annotated[list[Union[Accept, Delta, Done]], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


Message = Union[Task, Cancel, Accept, Delta, Done, Beat, Batch]
MESSAGE_TYPES: tuple[type, ...] = (Task, Cancel, Accept, Delta, Done, Beat, Batch)
