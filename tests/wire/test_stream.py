"""TaskStream (wire/_stream.py): the receiver-side state machine of one task's reply stream."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import wire
from wire import (
    Accept, Accepted, Beat, Cancel, Delta, Done, Duplicate, Err, Finished, Gap, Late, State, Task, TaskStream,
    Text, WireError,
)
from wire._stream import TRANSITIONS
from wire_samples import ID, ID2, budget


def A(node: str = "node-1", queue: int = 0, id: bytes = ID) -> Accept:
    return Accept(id=id, node=node, queue=queue)


def D(seq: int, text: str | None = None, id: bytes = ID) -> Delta:
    return Delta(id=id, seq=seq, text=f"<{seq}>" if text is None else text)


def F(seq: int, status: str = "ok", **kw: Any) -> Done:
    return Done(id=ID, seq=seq, status=status, **kw)  # type: ignore[arg-type]


def T(seq: int) -> Text:
    return Text(seq, f"<{seq}>")


def fin(seq: int, status: str = "ok") -> Finished:
    return Finished(status, seq)


def run(steps: list[tuple[Any, list[Any]]], stream: TaskStream | None = None) -> TaskStream:
    stream = stream or TaskStream(id=ID)
    for i, (msg, expected) in enumerate(steps):
        assert stream.feed(msg) == expected, f"step {i}: {msg!r}"
    return stream


# --------------------------------------------------------------------------------------------- table

CASES: dict[str, tuple[list[tuple[Any, list[Any]]], State, str]] = {
    # name: ([(message, events it yields), ...], final state, final text)
    "in order": ([(D(1), [T(1)]), (D(2), [T(2)]), (D(3), [T(3)]), (F(3), [fin(3)])], State.FINISHED, "<1><2><3>"),
    "accept then in order": ([(A(), [Accepted("node-1", 0)]), (D(1), [T(1)]), (F(1), [fin(1)])],
                             State.FINISHED, "<1>"),
    "queued accept then running": ([(A(queue=2), [Accepted("node-1", 2)]), (A(queue=0), [Accepted("node-1", 0)]),
                                    (D(1), [T(1)])], State.STREAMING, "<1>"),
    "accept duplicate is silent": ([(A(), [Accepted("node-1", 0)]), (A(), [])], State.ACCEPTED, ""),
    "accept by another node": ([(A(), [Accepted("node-1", 0)]), (A("node-2"), [Accepted("node-2", 0)])],
                               State.ACCEPTED, ""),
    "accept after text": ([(D(1), [T(1)]), (A(), [Accepted("node-1", 0)]), (A(), [])], State.STREAMING, "<1>"),
    "duplicate delta": ([(D(1), [T(1)]), (D(1), [Duplicate(1)]), (D(2), [T(2)]), (D(1), [Duplicate(1)])],
                        State.STREAMING, "<1><2>"),
    "duplicate held delta": ([(D(3), [Gap(1, 2)]), (D(3), [Duplicate(3)])], State.STREAMING, ""),
    "duplicate text is dropped, not compared": ([(D(1), [T(1)]), (D(1, "other"), [Duplicate(1)])],
                                                State.STREAMING, "<1>"),
    "out of order": ([(D(2), [Gap(1, 1)]), (D(3), []), (D(1), [T(1), T(2), T(3)]), (F(3), [fin(3)])],
                     State.FINISHED, "<1><2><3>"),
    "reverse order": ([(D(4), [Gap(1, 3)]), (D(3), []), (D(2), []), (D(1), [T(1), T(2), T(3), T(4)])],
                      State.STREAMING, "<1><2><3><4>"),
    "two gaps announced once each": ([(D(3), [Gap(1, 2)]), (D(5), [Gap(4, 4)]), (D(8), [Gap(6, 7)]), (D(4), []),
                                      (D(1), [T(1)]), (D(2), [T(2), T(3), T(4), T(5)])], State.STREAMING,
                                     "<1><2><3><4><5>"),
    "gap after released text": ([(D(1), [T(1)]), (D(4), [Gap(2, 3)]), (D(2), [T(2)]), (D(3), [T(3), T(4)])],
                                State.STREAMING, "<1><2><3><4>"),
    "done before the last deltas": ([(D(1), [T(1)]), (F(3), [Gap(2, 3)]), (D(3), []), (D(2), [T(2), T(3), fin(3)])],
                                    State.FINISHED, "<1><2><3>"),
    "done first": ([(F(2), [Gap(1, 2)]), (D(2), []), (D(1), [T(1), T(2), fin(2)])], State.FINISHED, "<1><2>"),
    "done after accept": ([(A(), [Accepted("node-1", 0)]), (F(1), [Gap(1, 1)]), (D(1), [T(1), fin(1)])],
                          State.FINISHED, "<1>"),
    "done names seqs already announced": ([(D(3), [Gap(1, 2)]), (F(3), []), (D(1), [T(1)]),
                                           (D(2), [T(2), T(3), fin(3)])], State.FINISHED, "<1><2><3>"),
    "done reveals the tail after held chunks": ([(D(3), [Gap(1, 2)]), (F(5), [Gap(4, 5)]), (D(5), []), (D(4), []),
                                                 (D(2), []), (D(1), [T(1), T(2), T(3), T(4), T(5), fin(5)])],
                                                State.FINISHED, "<1><2><3><4><5>"),
    "done seq 0, no deltas": ([(F(0), [fin(0)])], State.FINISHED, ""),
    "cancelled before any text": ([(A(), [Accepted("node-1", 0)]), (F(0, "cancelled"), [fin(0, "cancelled")])],
                                  State.FINISHED, ""),
    "duplicate done while waiting": ([(F(2), [Gap(1, 2)]), (F(2), [Duplicate(2)]), (D(1), [T(1)]),
                                      (D(2), [T(2), fin(2)])], State.FINISHED, "<1><2>"),
    "late messages": ([(D(1), [T(1)]), (F(1), [fin(1)]), (D(1), [Late("delta", 1)]), (D(2), [Late("delta", 2)]),
                       (F(1), [Late("done", 1)]), (F(9, "error"), [Late("done", 9)]), (A(), [Late("accept", 0)])],
                      State.FINISHED, "<1>"),
    "empty chunks": ([(D(1, ""), [Text(1, "")]), (D(2, "x"), [Text(2, "x")]), (F(2), [fin(2)])], State.FINISHED,
                     "x"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stream_table(name: str) -> None:
    steps, state, text = CASES[name]
    stream = run(steps)
    assert stream.state is state
    assert stream.text == text
    released = [e.text for _, events in steps for e in events if isinstance(e, Text)]
    assert stream.text == "".join(released)
    finished = [e for _, events in steps for e in events if isinstance(e, Finished)]
    assert len(finished) == (state is State.FINISHED)
    assert stream.finished == (finished[0] if finished else None)


def test_finished_carries_done_details() -> None:
    err = Err(code="llm_down", msg="no answer")
    done = F(1, "error", err=err, usage={"completion_tokens": 1}, timing={"total": 5})
    stream = run([(D(1), [T(1)])])
    assert stream.feed(done) == [Finished("error", 1, err, {"completion_tokens": 1}, {"total": 5})]


def test_accept_records_node_and_queue() -> None:
    stream = run([(A("gpu-2", 4), [Accepted("gpu-2", 4)])])
    assert (stream.node, stream.queue) == ("gpu-2", 4)
    assert stream.state is State.ACCEPTED


def test_new_stream() -> None:
    stream = TaskStream(id=ID)
    assert stream.state is State.PENDING
    assert stream.text == "" and stream.finished is None and stream.next_seq == 1 and not stream.held


def test_missing_and_untouched() -> None:
    stream = TaskStream(id=ID)
    assert stream.untouched and not stream.missing
    stream.feed(A())
    assert stream.untouched and not stream.missing  # an Accept shows nothing of the answer
    stream.feed(D(2))
    assert stream.missing and not stream.untouched  # held behind the gap at seq 1
    stream.feed(D(1))
    assert not stream.missing
    stream.feed(F(4))
    assert stream.missing  # the Done names seqs 3 and 4, not arrived
    late = TaskStream(id=ID)
    late.feed(F(1))
    assert late.missing and not late.untouched  # a Done naming one chunk: something was seen


def test_keep_only_replaces_the_released_text() -> None:
    stream = run([(D(1), [T(1)]), (D(2), [T(2)]), (D(3), [T(3)])])
    shown = ["A", "B"]
    stream.keep_only(shown)
    shown.append("C")  # a copy was kept
    assert stream.parts == ["A", "B"] and stream.text == "AB" and stream.next_seq == 3
    assert stream.feed(D(3)) == [T(3)]  # the stream goes on after the kept text


# --------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("msg", [D(1, id=ID2), A(id=ID2), Done(id=ID2, seq=0, status="ok"),
                                 Beat(node="n", state="online"), None, "delta", {"id": ID}])
def test_wrong_task(msg: Any) -> None:
    stream = TaskStream(id=ID)
    with pytest.raises(WireError) as info:
        stream.feed(msg)
    assert info.value.hint == "wrong_task"
    assert stream.state is State.PENDING


def test_delta_beyond_done_seq() -> None:
    stream = run([(D(1), [T(1)]), (F(2), [Gap(2, 2)])])
    with pytest.raises(WireError) as info:
        stream.feed(D(3))
    assert info.value.hint == "bad_seq"
    assert stream.feed(D(2)) == [T(2), fin(2)]  # the stream is still usable


@pytest.mark.parametrize("before,done", [
    ([D(1), D(2)], F(1)),  # done names fewer chunks than were released
    ([D(1), D(2)], F(0)),
    ([D(3)], F(2)),  # a held chunk lies beyond done
    ([D(1), D(5)], F(4)),
])
def test_done_below_chunks_received(before: list[Delta], done: Done) -> None:
    stream = TaskStream(id=ID)
    for msg in before:
        stream.feed(msg)
    with pytest.raises(WireError) as info:
        stream.feed(done)
    assert info.value.hint == "bad_seq"
    assert stream.pending_done is None


def test_max_ahead_overflow() -> None:
    stream = run([(D(2), [Gap(1, 1)]), (D(3), []), (D(4), [])], TaskStream(id=ID, max_ahead=3))
    with pytest.raises(WireError) as info:
        stream.feed(D(6))
    assert info.value.hint == "gap_overflow"
    assert stream.feed(D(3)) == [Duplicate(3)]  # duplicates of held chunks are still recognised
    assert stream.feed(D(1)) == [T(1), T(2), T(3), T(4)]  # and filling the gap drains the buffer
    assert stream.feed(D(6)) == [Gap(5, 5)]


def test_max_ahead_default_holds_4096() -> None:
    stream = TaskStream(id=ID)
    for seq in range(2, 4098):
        stream.feed(D(seq, "x"))
    with pytest.raises(WireError):
        stream.feed(D(5000, "x"))
    events = stream.feed(D(1, "x"))
    assert [e.seq for e in events] == list(range(1, 4098))  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------- transitions

SETUP: dict[State, list[Any]] = {
    State.PENDING: [],
    State.ACCEPTED: [A()],
    State.STREAMING: [D(1)],
    State.FINISHED: [F(0)],
}
PROBE: dict[type, Any] = {Accept: A("node-2", 1), Delta: D(2), Done: F(3)}  # none of these can finish a stream
ALL_PAIRS = [(state, kind) for state, row in TRANSITIONS.items() for kind in row]


def _stream_in(state: State) -> TaskStream:
    stream = TaskStream(id=ID)
    for msg in SETUP[state]:
        stream.feed(msg)
    assert stream.state is state
    return stream


def test_transition_table_shape() -> None:
    assert set(TRANSITIONS) == set(State) == set(SETUP)
    assert TRANSITIONS[State.FINISHED] == {}
    for row in TRANSITIONS.values():
        assert set(row) <= {Accept, Delta, Done}
        assert all(isinstance(nxt, State) for nxt in row.values())


@pytest.mark.parametrize("state,kind", ALL_PAIRS, ids=[f"{s.value}-{k.__name__}" for s, k in ALL_PAIRS])
def test_every_transition(state: State, kind: type) -> None:
    stream = _stream_in(state)
    stream.feed(PROBE[kind])
    assert stream.state is TRANSITIONS[state][kind]


@pytest.mark.parametrize("kind", [Accept, Delta, Done])
def test_finished_turns_table_messages_into_late(kind: type) -> None:
    stream = _stream_in(State.FINISHED)
    [event] = stream.feed(PROBE[kind])
    assert isinstance(event, Late) and event.kind == kind.__name__.lower()
    assert stream.state is State.FINISHED


ILLEGAL = [Task(id=ID, uid="wc.a", ch="wc", text="", ts=0), Cancel(id=ID)]


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("msg", ILLEGAL, ids=lambda m: type(m).__name__)
def test_illegal_transition(state: State, msg: Any) -> None:
    stream = _stream_in(state)
    assert type(msg) not in TRANSITIONS[state]
    with pytest.raises(WireError) as info:
        stream.feed(msg)
    assert info.value.hint == "bad_transition"
    assert stream.state is state


# --------------------------------------------------------------------------------------------- properties

def _check_gaps(stream: TaskStream, gaps: list[Gap], received: set[int]) -> None:
    """Gaps are disjoint, name only seqs not received when announced, and together cover every hole."""
    covered: set[int] = set()
    for gap in gaps:
        seqs = set(range(gap.first, gap.last + 1))
        assert gap.first <= gap.last
        assert not seqs & covered, f"{gap} announced twice"
        covered |= seqs
    if stream.state is not State.FINISHED:
        horizon = max([*stream.held, stream.pending_done.seq if stream.pending_done else 0, 0])
        holes = set(range(stream.next_seq, horizon + 1)) - set(stream.held)
        assert holes <= covered, f"holes {sorted(holes - covered)} never announced"


@budget(300)
@given(data=st.data(), n=st.integers(0, 25))
def test_any_order_with_duplicates(data: st.DataObject, n: int) -> None:
    texts = data.draw(st.lists(st.text(max_size=3), min_size=n, max_size=n), label="texts")
    originals: list[Any] = [D(i + 1, texts[i]) for i in range(n)] + [F(n)]
    extra = data.draw(st.lists(st.sampled_from(originals), max_size=10), label="duplicates")
    accepts = data.draw(st.lists(st.builds(A, st.sampled_from(["n1", "n2"]), st.integers(0, 2)), max_size=3))
    order = data.draw(st.permutations(originals + extra + accepts), label="order")

    stream = TaskStream(id=ID)
    events: list[Any] = []
    gaps: list[Gap] = []
    seen: set[int] = set()  # delta seqs fed so far
    done_seen = False
    for msg in order:
        was_finished = stream.state is State.FINISHED
        out = stream.feed(msg)
        if was_finished:
            assert len(out) == 1 and isinstance(out[0], Late)
        elif isinstance(msg, Delta):
            assert (out == [Duplicate(msg.seq)]) == (msg.seq in seen)
            seen.add(msg.seq)
        elif isinstance(msg, Done):
            assert (out == [Duplicate(msg.seq)]) == done_seen
            done_seen = True
        gaps += [e for e in out if isinstance(e, Gap)]
        _check_gaps(stream, gaps, seen)
        events += out
        assert stream.text == "".join(e.text for e in events if isinstance(e, Text))

    text_events = [e for e in events if isinstance(e, Text)]
    assert [e.seq for e in text_events] == list(range(1, n + 1))
    assert [e.text for e in text_events] == texts
    finished = [e for e in events if isinstance(e, Finished)]
    assert finished == [Finished("ok", n)]
    assert stream.state is State.FINISHED
    assert stream.text == "".join(texts)
    assert not stream.held
    after = events[events.index(finished[0]) + 1:]
    assert all(isinstance(e, Late) for e in after)


message = st.one_of(
    st.builds(A, st.sampled_from(["n1", "n2"]), st.integers(0, 3)),
    st.builds(D, st.integers(1, 12), st.just("x")),
    st.builds(F, st.integers(0, 12), st.sampled_from(["ok", "error", "cancelled"])),
    st.builds(D, st.integers(1, 3), st.just("x"), st.just(ID2)),
    st.just(Cancel(id=ID)),
)


@budget(300)
@given(msgs=st.lists(message, max_size=30), max_ahead=st.integers(1, 6))
def test_random_feeds_raise_only_wire_error(msgs: list[Any], max_ahead: int) -> None:
    """Whatever a peer sends, feed() returns events or raises WireError, and the invariants hold."""
    stream = TaskStream(id=ID, max_ahead=max_ahead)
    events: list[Any] = []
    for msg in msgs:
        try:
            events += stream.feed(msg)
        except WireError:
            pass
        assert len(stream.held) <= max_ahead
        assert all(seq > stream.next_seq for seq in stream.held)
        assert stream.text == "".join(e.text for e in events if isinstance(e, Text))
    texts = [e.seq for e in events if isinstance(e, Text)]
    assert texts == list(range(1, len(texts) + 1))
    assert len([e for e in events if isinstance(e, Finished)]) == (stream.state is State.FINISHED)
    assert len([e for e in events if isinstance(e, Accepted)]) <= len([m for m in msgs if isinstance(m, Accept)])
