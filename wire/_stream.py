"""Receiver-side state of one task's reply stream (pure).

Rule: everything that affects the state machine lives in this file. ``TaskStream.feed(msg)``
takes an ``Accept``, ``Delta`` or ``Done`` for its task and returns the events it implies:
in-order text is released at once, early chunks are held until the gap before them is filled,
duplicates are flagged and dropped, and a ``Done`` is only trusted (``Finished``) once every
seq up to it has arrived.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

from ._errors import WireError
from ._messages import Accept, Delta, Done, Err, Timing


class State(enum.Enum):
    PENDING = "pending"  # recorded/published, no node has said anything
    ACCEPTED = "accepted"  # a node has it (queued or running)
    STREAMING = "streaming"  # text is flowing
    FINISHED = "finished"  # a trusted Done was seen


# (state, message type) -> next state.  A missing entry is an illegal move.
TRANSITIONS: dict[State, dict[type, State]] = {
    State.PENDING: {Accept: State.ACCEPTED, Delta: State.STREAMING, Done: State.PENDING},
    State.ACCEPTED: {Accept: State.ACCEPTED, Delta: State.STREAMING, Done: State.ACCEPTED},
    State.STREAMING: {Accept: State.STREAMING, Delta: State.STREAMING, Done: State.STREAMING},
    State.FINISHED: {},
}


@dataclass(frozen=True, slots=True)
class Accepted:
    node: str
    queue: int


@dataclass(frozen=True, slots=True)
class Text:
    seq: int
    text: str
    # The Delta's ``timing`` (e.g. the node's publish time ``n_pub``), passed through untouched so a
    # receiver can trace per-chunk latency (``claw bench tunnel``); None when the Delta had none.
    timing: Timing | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    seq: int


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs ``first..last`` (inclusive) are missing; ask the sender to replay them.

    Each missing seq is announced once, by the message that reveals it: a chunk held ahead of
    the stream reveals the seqs between the highest seq seen so far and itself, a ``Done``
    reveals those after the highest seq seen up to its own.
    """

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Finished:
    status: str
    seq: int
    err: Err | None = None
    usage: dict[str, int] | None = None
    timing: Timing | None = None


@dataclass(frozen=True, slots=True)
class Late:
    """A message that arrived after the stream finished (ignored)."""

    kind: str
    seq: int


Event = Union[Accepted, Text, Duplicate, Gap, Finished, Late]


@dataclass(slots=True)
class TaskStream:
    id: bytes
    max_ahead: int = 4096  # chunks held while waiting for a gap to fill
    state: State = State.PENDING
    next_seq: int = 1
    node: str | None = None
    queue: int | None = None
    held: dict[int, str] = field(default_factory=dict)
    held_timing: dict[int, Timing] = field(default_factory=dict)  # timing of held chunks that carried one
    pending_done: Done | None = None
    finished: Finished | None = None
    parts: list[str] = field(default_factory=list)
    high: int = 0  # highest seq held or named by a Done; a Gap only announces seqs above it and next_seq - 1

    @property
    def text(self) -> str:
        """All in-order text released so far."""
        return "".join(self.parts)

    @property
    def missing(self) -> bool:
        """Chunks are known to be missing: some are held behind a gap, or a Done waits for earlier seqs."""
        return bool(self.held) or self.pending_done is not None

    @property
    def untouched(self) -> bool:
        """No chunk has been released, held or named by a Done yet (nothing of the answer was seen)."""
        return self.next_seq == 1 and self.high == 0

    def keep_only(self, parts: list[str]) -> None:
        """Make ``parts`` (a copy) the released text and resume after them: a receiver that refuses what a
        second run of the task sends keeps exactly what it had shown (later reads and resumes see that)."""
        self.parts = list(parts)
        self.next_seq = len(self.parts) + 1

    def feed(self, msg: Accept | Delta | Done) -> list[Event]:
        if getattr(msg, "id", None) != self.id:
            raise WireError("message for another task fed to this stream", hint="wrong_task")
        kind = type(msg)
        if self.state is State.FINISHED:
            if kind in (Accept, Delta, Done):
                return [Late(kind.__name__.lower(), getattr(msg, "seq", 0))]
        try:
            nxt = TRANSITIONS[self.state][kind]
        except KeyError:
            raise WireError(
                f"can't handle {kind.__name__} in state {self.state.value}", hint="bad_transition"
            ) from None
        if isinstance(msg, Accept):
            changed = (msg.node, msg.queue) != (self.node, self.queue)  # first Accept, or news
            self.node, self.queue = msg.node, msg.queue
            self.state = nxt
            return [Accepted(msg.node, msg.queue)] if changed else []
        if isinstance(msg, Delta):
            self.state = nxt
            return self._delta(msg)
        return self._done(msg)

    def _delta(self, msg: Delta) -> list[Event]:
        seq = msg.seq
        if seq < self.next_seq or seq in self.held:
            return [Duplicate(seq)]
        if self.pending_done is not None and seq > self.pending_done.seq:
            raise WireError(f"delta seq {seq} after done seq {self.pending_done.seq}", hint="bad_seq")
        if seq > self.next_seq:
            if len(self.held) >= self.max_ahead:
                raise WireError(f"more than {self.max_ahead} chunks held behind a gap", hint="gap_overflow")
            self.held[seq] = msg.text
            if msg.timing is not None:
                self.held_timing[seq] = msg.timing
            return self._reveal(seq - 1, seq)
        events: list[Event] = []
        self._release(seq, msg.text, events, msg.timing)
        while self.next_seq in self.held:
            nxt = self.next_seq
            self._release(nxt, self.held.pop(nxt), events, self.held_timing.pop(nxt, None))
        self._maybe_finish(events)
        return events

    def _release(self, seq: int, text: str, events: list[Event], timing: Timing | None = None) -> None:
        self.parts.append(text)
        self.next_seq = seq + 1
        events.append(Text(seq, text, timing))

    def _reveal(self, last: int, seen: int) -> list[Event]:
        """Announce the missing seqs up to ``last`` that no earlier Gap covered; ``seen`` just arrived."""
        first = max(self.high, self.next_seq - 1) + 1
        self.high = max(self.high, seen)
        return [Gap(first, last)] if first <= last else []

    def _done(self, msg: Done) -> list[Event]:
        if self.pending_done is not None:
            return [Duplicate(msg.seq)]
        if msg.seq < max(self.high, self.next_seq - 1):  # high >= every held seq
            raise WireError(f"done seq {msg.seq} below chunks already received", hint="bad_seq")
        self.pending_done = msg
        events: list[Event] = []
        self._maybe_finish(events)
        if not events:
            events = self._reveal(msg.seq, msg.seq)
        return events

    def _maybe_finish(self, events: list[Event]) -> None:
        done = self.pending_done
        if done is not None and self.next_seq == done.seq + 1:
            self.state = State.FINISHED
            self.finished = Finished(done.status, done.seq, done.err, done.usage, done.timing)
            events.append(self.finished)
