"""A ``text/event-stream`` (SSE) decoder, sans-IO: bytes in, ``(event type, data)`` pairs out.

:class:`SSEDecoder` is fed the body of a stream in pieces cut anywhere (inside a line, between ``\\r`` and
``\\n``, inside a UTF-8 character) and returns the events each piece completes, as the SSE rules read them:
lines end with CRLF, LF or CR; a line starting with ``:`` is a comment; ``data:`` lines (one space after the
colon dropped) are joined with ``\\n``; ``event:`` names the event type; ``id:``, ``retry:`` and unknown fields
are ignored; a blank line ends an event. An event whose data is empty (a proxy's keep-alive ``data:``) is not
returned, and what is left unterminated at the end of the stream is not an event. It knows nothing of JSON,
``[DONE]`` or LM Studio's chunk objects: the data is returned as bytes, as it came.

A line longer than ``max_line`` bytes raises :class:`SSEError` (with the events completed before it), so a
stream that never ends a line cannot make the decoder buffer without end.
"""

from __future__ import annotations

__all__ = ["MAX_LINE", "SSEDecoder", "SSEError"]

MAX_LINE = 1 << 20  # bytes of one line at most (1 MiB)

Event = tuple[bytes, bytes]  # (event type, b"" when none was named; data)


class SSEError(ValueError):
    """The stream is not one this decoder reads (a line over ``max_line``). ``events``: the events the
    same ``feed`` completed before the fault."""

    def __init__(self, message: str, events: list[Event]) -> None:
        super().__init__(message)
        self.events = events


class SSEDecoder:
    """Decodes one stream; :meth:`feed` each piece of the body as it comes."""

    __slots__ = ("max_line", "_rest", "_data", "_event", "_cr")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._rest = b""  # the unterminated end of the last piece (never holds a line end)
        self._data: list[bytes] = []  # the current event's data lines
        self._event = b""  # the current event's type
        self._cr = False  # the last piece ended with CR: an LF starting the next one ends no further line

    def one(self, buf: bytes, start: int = 0, end: int | None = None) -> bytes | None:
        """The data of the piece ``buf[start:end]`` when it is, with nothing pending, exactly one event of one
        ``data:`` line (LF line ends): b"" for an empty one (no event); None for any other piece (:meth:`feed`
        it)."""
        if self._rest or self._data or self._cr or self._event:
            return None
        if end is None:
            end = len(buf)
        n = end - 2
        if buf.startswith(b"data:", start) and buf.find(b"\n", start + 5, end) == n and buf[n + 1:end] == b"\n" \
                and n - start <= self.max_line and buf.find(b"\r", start, end) < 0:
            return buf[start + 6:n] if buf[start + 5] == 32 else buf[start + 5:n]
        return None

    def feed(self, chunk: bytes) -> list[Event]:
        """The events ``chunk`` completes, in order; raises SSEError on a line over ``max_line``."""
        if self._cr and chunk:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        v = self.one(chunk)
        if v is not None:
            return [(b"", v)] if v else []
        buf = self._rest + chunk if self._rest else chunk
        if b"\r" in buf:  # CRLF or a lone CR: the same line end as LF
            if buf[-1:] == b"\r":
                self._cr = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        rest = lines.pop()
        events: list[Event] = []
        max_line = self.max_line
        for line in lines:
            if line:
                if len(line) > max_line:
                    self._rest = b""
                    raise SSEError(f"an SSE line longer than {max_line} bytes", events)
                if line[:5] == b"data:":
                    v = line[5:]
                    self._data.append(v[1:] if v[:1] == b" " else v)
                elif line[:1] == b":":
                    pass  # a comment
                else:
                    name, _, value = line.partition(b":")
                    if name == b"event":
                        self._event = value.strip()
                    elif name == b"data":  # "data" alone: an empty data line
                        self._data.append(b"")
                continue
            data = self._data
            if data:
                joined = data[0] if len(data) == 1 else b"\n".join(data)
                self._data = []
                if joined:
                    events.append((self._event, joined))
            self._event = b""
        if len(rest) > max_line:
            self._rest = b""
            raise SSEError(f"an SSE line longer than {max_line} bytes", events)
        self._rest = rest
        return events
