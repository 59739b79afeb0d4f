"""node/sse.py, the pure SSE decoder: golden streams in the shapes LM Studio's and llama.cpp's servers send,
and properties (after wire/'s tests): any cut of a stream into pieces decodes to the same events, and those
are what a whole-stream reading of the SSE rules gives."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.sse import MAX_LINE, SSEDecoder, SSEError

CHUNK = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}'
STOP = b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"total_tokens":3}}'
ERR = b'{"error":{"code":500,"message":"Context size has been exceeded.","type":"server_error"}}'

GOLDEN: dict[str, tuple[bytes, list[tuple[bytes, bytes]]]] = {
    # LM Studio: "data: " lines, LF, [DONE] at the end
    "lmstudio": (b"data: " + CHUNK + b"\n\ndata: " + STOP + b"\n\ndata: [DONE]\n\n",
                 [(b"", CHUNK), (b"", STOP), (b"", b"[DONE]")]),
    # llama.cpp's server: "data: " too, and an error object in the stream
    "llamacpp-error": (b"data: " + CHUNK + b"\n\ndata: " + ERR + b"\n\n", [(b"", CHUNK), (b"", ERR)]),
    # a server writing "data:" with no space
    "no-space": (b"data:" + CHUNK + b"\n\ndata:[DONE]\n\n", [(b"", CHUNK), (b"", b"[DONE]")]),
    # only the first space goes
    "two-spaces": (b"data:  x\n\n", [(b"", b" x")]),
    "crlf": (b"data: " + CHUNK + b"\r\n\r\ndata: [DONE]\r\n\r\n", [(b"", CHUNK), (b"", b"[DONE]")]),
    "cr": (b"data: " + CHUNK + b"\r\rdata: [DONE]\r\r", [(b"", CHUNK), (b"", b"[DONE]")]),
    "mixed-line-ends": (b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\n", [(b"", b"a"), (b"", b"b"), (b"", b"c")]),
    "comments": (b": keep-alive\n\n:\ndata: a\n: in the middle\ndata: b\n\n", [(b"", b"a\nb")]),
    "multiline-data": (b"data: {\"a\":\ndata: 1}\n\n", [(b"", b'{"a":\n1}')]),
    "event-error": (b"event: error\ndata: model crashed\n\ndata: next\n\n",
                    [(b"error", b"model crashed"), (b"", b"next")]),
    "event-without-space": (b"event:error\ndata:x\n\n", [(b"error", b"x")]),
    "id-retry-unknown-ignored": (b"id: 7\nretry: 100\nfoo: bar\nnocolon\ndata: x\n\n", [(b"", b"x")]),
    "data-alone-is-an-empty-line": (b"data: a\ndata\ndata: b\n\n", [(b"", b"a\n\nb")]),
    "empty-data-not-dispatched": (b"data:\n\ndata: \n\ndata: x\n\n", [(b"", b"x")]),
    "event-type-resets": (b"event: error\n\ndata: x\n\n", [(b"", b"x")]),
    "unterminated-end-not-dispatched": (b"data: x\n\ndata: y\n", [(b"", b"x")]),
    "no-blank-line-no-event": (b"data: x", []),
    "utf8": ("data: 你好 😀\n\n".encode(), [(b"", "你好 😀".encode())]),
}


def decode(pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    d = SSEDecoder()
    return [ev for p in pieces for ev in d.feed(p)]


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden(name: str) -> None:
    stream, events = GOLDEN[name]
    assert decode([stream]) == events
    assert decode([stream[i:i + 1] for i in range(len(stream))]) == events  # one byte at a time
    assert reference(stream) == events


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_cut_at_every_offset(name: str) -> None:
    stream, events = GOLDEN[name]
    for i in range(len(stream) + 1):
        assert decode([stream[:i], b"", stream[i:]]) == events, i


def test_a_line_over_the_limit_raises_with_the_events_before_it() -> None:
    d = SSEDecoder(max_line=10)
    assert d.feed(b"data: 1234\n\n") == [(b"", b"1234")]  # 10 bytes: the limit itself is fine
    with pytest.raises(SSEError) as ei:
        d.feed(b"data: a\n\ndata: 12345\n")
    assert ei.value.events == [(b"", b"a")]
    d = SSEDecoder(max_line=10)
    with pytest.raises(SSEError):  # unterminated, growing piece by piece
        for _ in range(4):
            d.feed(b"data")
    assert MAX_LINE == 1 << 20


# --------------------------------------------------------------------------- properties


def reference(stream: bytes) -> list[tuple[bytes, bytes]]:
    """The SSE rules applied to a whole stream at once (the decoder's choices: the event type's whitespace
    dropped, an event with empty data not returned)."""
    lines = re.split(rb"\r\n|\r|\n", stream)
    lines.pop()  # the unterminated end
    out: list[tuple[bytes, bytes]] = []
    data: list[bytes] | None = None
    event = b""
    for line in lines:
        if not line:
            if data is not None and b"\n".join(data):
                out.append((event, b"\n".join(data)))
            data, event = None, b""
            continue
        if line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data = (data or []) + [value]
        elif name == b"event":
            event = value.strip()
    return out


_LINES = st.one_of(
    st.builds(lambda v: b"data: " + v, st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    st.sampled_from([b"data: [DONE]", b"data:" + CHUNK, b"event: error", b"event:x", b": comment", b"", b"",
                     b"data", b"data:", b"id: 1", b"retry: 5", b"data: \xe4\xbd\xa0\xe5\xa5\xbd"]),
)
_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
STREAMS = st.lists(st.tuples(_LINES, _ENDS), max_size=30).map(lambda ls: b"".join(a + b for a, b in ls))
PROPS = settings(max_examples=400, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(STREAMS, st.data())
def test_any_chunking_decodes_to_the_same_events(stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    pieces = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    assert decode(pieces) == decode([stream]) == reference(stream)


@PROPS
@given(st.binary(max_size=200), st.data())
def test_any_bytes_any_chunking_same_events(stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    assert decode([stream[a:b] for a, b in zip(bounds, bounds[1:])]) == reference(stream)


@PROPS
@given(st.one_of(STREAMS, st.binary(max_size=40).map(lambda b: b"data:" + b + b"\n\n")),
       st.binary(max_size=8), st.binary(max_size=8))
def test_the_one_event_fast_path_agrees_with_feed(piece: bytes, before: bytes, after: bytes) -> None:
    """``one`` reads a piece (here inside a larger buffer) only as ``feed`` would, or leaves it to ``feed``."""
    got = SSEDecoder().one(before + piece + after, len(before), len(before) + len(piece))
    if got is not None:
        assert SSEDecoder().feed(piece) == ([(b"", got)] if got else [])
    assert SSEDecoder().one(b"data: " + CHUNK + b"\n\n") == CHUNK
    pending = SSEDecoder()
    pending.feed(b"event: error\n")
    assert pending.one(b"data: " + CHUNK + b"\n\n") is None  # an event type is pending: feed() it
