"""The client WebSocket frames the edge sends (docs/api.md, "Server → client"): their schema and their encoder.

This is the only place such frames are built. A frame is a plain dict (a ``TypedDict`` per kind below, keys in
the order they go on the wire), so a sink pushes and encodes it with no conversion on the hot path; one
``ENCODER`` turns any of them into the JSON text of one WebSocket frame.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict, Union

import msgspec

from .store import FINAL, TaskRecord

ENCODER = msgspec.json.Encoder()  # the one encoder of client frames: ENCODER.encode(frame) -> JSON bytes
encode = ENCODER.encode

Timing = dict[str, int]


class NodeFrame(TypedDict):
    type: Literal["node"]
    online: bool


class AcceptedFrame(TypedDict):
    type: Literal["accepted"]
    task: str
    queue: int | None


class _DeltaFrame(TypedDict):
    type: Literal["delta"]
    task: str
    seq: int
    text: str


class DeltaFrame(_DeltaFrame, total=False):
    timing: Timing  # only to sockets whose ask had "trace": true


class ErrorBody(TypedDict):
    code: str
    message: str


class _DoneFrame(TypedDict):
    type: Literal["done"]
    task: str
    seq: int | None  # None: a finished task answered from the store (no stream to count)
    status: str
    text: str


class DoneFrame(_DoneFrame, total=False):
    error: ErrorBody
    usage: dict[str, int]
    timing: Timing


class _ErrorFrame(TypedDict):
    type: Literal["error"]
    code: str
    message: str


class ErrorFrame(_ErrorFrame, total=False):
    task: Any  # the task named by the client frame, as it was sent


class PongFrame(TypedDict):
    type: Literal["pong"]


Frame = Union[NodeFrame, AcceptedFrame, DeltaFrame, DoneFrame, ErrorFrame, PongFrame]


def node(online: bool) -> NodeFrame:
    return {"type": "node", "online": online}


def accepted(task: str, queue: int | None) -> AcceptedFrame:
    return {"type": "accepted", "task": task, "queue": queue}


def delta(task: str, seq: int, text: str) -> DeltaFrame:
    return {"type": "delta", "task": task, "seq": seq, "text": text}


def done(task: str, seq: int | None, status: str, text: str, err: dict[str, str] | None = None,
         usage: dict[str, int] | None = None) -> DoneFrame:
    """The end of a task; ``err`` is the stored ``{"code", "msg"}`` (sent as ``error: {code, message}``)."""
    frame: DoneFrame = {"type": "done", "task": task, "seq": seq, "status": status, "text": text}
    if err:
        frame["error"] = {"code": err.get("code", ""), "message": err.get("msg", "")}
    if usage:
        frame["usage"] = usage
    return frame


def done_from_record(rec: TaskRecord, seq: int | None = None) -> DoneFrame:
    """The ``done`` frame of a finished task loaded from the store (a resume after the fact: ``seq`` None)."""
    assert rec.status in FINAL
    return done(rec.id.hex(), seq, rec.status, rec.answer, rec.err, rec.usage)


def traced(frame: DeltaFrame | DoneFrame, timing: Timing, e_fwd: int) -> DeltaFrame | DoneFrame:
    """The same frame for a tracing socket: the reply's ``timing`` plus ``e_fwd`` (when the edge forwarded it)."""
    return {**frame, "timing": {**timing, "e_fwd": e_fwd}}  # type: ignore[return-value]


_NO_TASK: Any = object()


def error(code: str, message: str, task: Any = _NO_TASK) -> ErrorFrame:
    """A frame-level problem; ``task`` (when given) names the client's task as it was sent."""
    frame: ErrorFrame = {"type": "error", "code": code, "message": message}
    if task is not _NO_TASK:
        frame["task"] = task
    return frame


def pong() -> PongFrame:
    return {"type": "pong"}


def is_delta(frame: Frame) -> bool:
    return frame["type"] == "delta"


def text_of(frame: Frame) -> str | None:
    """The text a ``delta`` frame carries; None for any other kind."""
    return frame["text"] if frame["type"] == "delta" else None  # type: ignore[typeddict-item]
