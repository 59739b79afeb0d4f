"""Answer text for WeCom ``text`` messages: markdown → readable plain text, split into numbered parts.

Pure functions, no I/O. WeCom shows ``text`` messages to everybody (markdown does not render for
WeChat-plugin users) and cuts them silently beyond 2048 UTF-8 bytes, so an answer becomes:

- plain text: headers on their own lines (levels 1–2 as ``【标题】``), emphasis marks removed, lists as
  ``•`` items (numbers kept, nesting indented), tables one line per row (``列: 值；列: 值``), links as
  ``text (url)``, code blocks kept line for line, indented by four spaces under a ``代码：`` line;
- parts of at most :data:`LIMIT` bytes *including* the ``(i/n) `` number, cut at paragraph, then line,
  then sentence boundaries, never inside a character and never inside a code block (a code block
  larger than one part is cut only between its lines, each continuation starting ``（代码续）``).

:class:`Progressive` does the same incrementally while an answer streams in: it releases finished
paragraphs (never an open code block) once at least ``min_bytes`` are ready.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LIMIT = 2048  # WeCom text message limit in UTF-8 bytes
CODE_HEAD = "代码："
CODE_CONT = "（代码续）"
INDENT = "    "

_FENCE = re.compile(r"^(\s{0,3})(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_HR = re.compile(r"^\s{0,3}([-*_])(?:\s*\1){2,}\s*$")
_LIST = re.compile(r"^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$")
_TASK = re.compile(r"^\[([ xX])\]\s+")
_QUOTE = re.compile(r"^\s{0,3}>\s?(.*)$")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$")
# Every variable-length part is bounded, so a hostile or broken line costs O(length x bound), not O(length^2).
_IMAGE = re.compile(r"!\[([^\]]{0,300})\]\(\s{0,3}<?([^)\s>]{0,500})>?(?:\s{1,3}\"[^\"]{0,300}\")?\s{0,3}\)")
_LINK = re.compile(r"\[([^\]]{1,300})\]\(\s{0,3}<?([^)\s>]{1,500})>?(?:\s{1,3}\"[^\"]{0,300}\")?\s{0,3}\)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]{1,1000})>")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.{1,300}?)(?<=\S)\1")
_STRIKE = re.compile(r"~~(?=\S)(.{1,300}?)(?<=\S)~~")
# emphasis next to CJK text is common ("和*斜体*"), so only ASCII letters/digits block it (snake_case, 2*3*4)
_ITALIC_STAR = re.compile(r"(?<![*A-Za-z0-9])\*(?=[^\s*])(.{1,300}?)(?<=[^\s*])\*(?![*A-Za-z0-9])")
_ITALIC_UND = re.compile(r"(?<![_A-Za-z0-9])_(?=[^\s_])(.{1,300}?)(?<=[^\s_])_(?![_A-Za-z0-9])")
_CODE_SPAN = re.compile(r"(`{1,10})(.{1,500}?)\1", re.S)
INLINE_MAX = 4000  # a longer line is kept as it is (no inline markdown): bounded work per answer
_PLACEHOLDER = re.compile(r"[\x00\x01]")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")
_BR = re.compile(r"<br\s*/?>", re.I)
_SENTENCE = re.compile(r"(?<=[。！？；!?;…])|(?<=[.])(?=\s)")


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


# ---- markdown → blocks ----------------------------------------------------------------------

@dataclass(slots=True)
class Block:
    """A unit of the plain-text answer: a paragraph (may be cut at lines/sentences) or code (only
    between lines). ``sticky`` (headings) stays with the block that follows it."""

    text: str
    code: bool = False
    sticky: bool = False


def _inline(text: str) -> str:
    """Inline markdown → plain text; the contents of code spans are kept verbatim."""
    if len(text) > INLINE_MAX:
        return text
    text = _PLACEHOLDER.sub("", text)  # the placeholders below must not occur in the input
    spans: list[str] = []

    def keep(m: re.Match[str]) -> str:
        spans.append(m.group(2).strip() if m.group(2).strip() else m.group(2))
        return f"\x00{len(spans) - 1}\x00"

    text = _CODE_SPAN.sub(keep, text)
    escapes: list[str] = []

    def esc(m: re.Match[str]) -> str:
        escapes.append(m.group(1))
        return f"\x01{len(escapes) - 1}\x01"

    text = _ESCAPE.sub(esc, text)
    text = _BR.sub("\n", text)
    text = _IMAGE.sub(lambda m: f"{m.group(1)} ({m.group(2)})" if m.group(1) else m.group(2), text)
    text = _LINK.sub(lambda m: m.group(2) if m.group(1) == m.group(2) else f"{m.group(1)} ({m.group(2)})", text)
    text = _AUTOLINK.sub(r"\1", text)
    for _ in range(2):  # nested emphasis (***x***) needs a second pass
        text = _BOLD.sub(r"\2", text)
        text = _STRIKE.sub(r"\1", text)
        text = _ITALIC_STAR.sub(r"\1", text)
        text = _ITALIC_UND.sub(r"\1", text)
    text = re.sub(r"\x01(\d+)\x01", lambda m: escapes[int(m.group(1))], text)
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], text)


def _cells(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return [_inline(c.strip()) for c in re.split(r"(?<!\\)\|", s)]


def _table_rows(header: list[str], rows: list[list[str]]) -> str:
    out = []
    for row in rows:
        pairs = []
        for i, cell in enumerate(row):
            name = header[i] if i < len(header) else ""
            if not cell and not name:
                continue
            pairs.append(f"{name}: {cell}" if name else cell)
        if pairs:
            out.append("；".join(pairs))
    if not out:  # a table with a header only
        out.append("；".join(h for h in header if h))
    return "\n".join(out)


def markdown_blocks(md: str) -> list[Block]:
    """Turn markdown into plain-text blocks (see the module docstring for the rules)."""
    lines = md.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[Block] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            text = "\n".join(para).strip("\n")
            if text.strip():
                blocks.append(Block(text))
            para.clear()

    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            indent, mark, lang = fence.group(1), fence.group(2), fence.group(3)
            body: list[str] = []
            i += 1
            while i < n:
                close = lines[i].strip()
                if close.startswith(mark[0] * len(mark)) and set(close) <= {mark[0]}:
                    i += 1
                    break
                raw = lines[i]
                if indent and raw.startswith(indent):
                    raw = raw[len(indent):]
                body.append(raw)
                i += 1
            head = f"代码（{lang}）：" if lang else CODE_HEAD
            text = "\n".join([head] + [INDENT + b if b.strip() else "" for b in body])
            blocks.append(Block(text, code=True))
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            level, title = len(heading.group(1)), _inline(heading.group(2))
            if title:
                blocks.append(Block(f"【{title}】" if level <= 2 else title, sticky=True))
            i += 1
            continue
        underline = line.strip()
        if para and len(underline) >= 2 and set(underline) <= {"="} | ({"-"} if "-" in underline else set()) \
                and len(set(underline)) == 1:  # setext heading: the line above is the title
            title = para.pop()
            flush()
            blocks.append(Block(f"【{title.strip()}】", sticky=True))
            i += 1
            continue
        if _HR.match(line):
            flush()
            blocks.append(Block("————————"))
            i += 1
            continue
        if "|" in line and i + 1 < n and _TABLE_SEP.match(lines[i + 1]) and "-" in lines[i + 1]:
            flush()
            header = _cells(line)
            rows: list[list[str]] = []
            i += 2
            while i < n and lines[i].strip() and "|" in lines[i]:
                rows.append(_cells(lines[i]))
                i += 1
            blocks.append(Block(_table_rows(header, rows)))
            continue
        quote = _QUOTE.match(line)
        if quote:
            para.append("│ " + _inline(quote.group(1)))
            i += 1
            continue
        item = _LIST.match(line)
        if item:
            lead = item.group(1).replace("\t", "    ")
            level = len(lead) // 2
            marker, rest = item.group(2), item.group(3)
            task = _TASK.match(rest)
            if task:
                rest = ("☑ " if task.group(1) in "xX" else "☐ ") + rest[task.end():]
            bullet = "• " if marker in "-*+" else marker[:-1] + ". "
            para.append("  " * min(level, 6) + bullet + _inline(rest))
            i += 1
            continue
        para.append(_inline(line.rstrip()))
        i += 1
    flush()
    return blocks


def to_plain(md: str) -> str:
    """The whole answer as plain text (blocks separated by blank lines)."""
    return "\n\n".join(b.text for b in markdown_blocks(md))


# ---- splitting ------------------------------------------------------------------------------

def hard_cut(text: str, budget: int) -> list[str]:
    """Cut at UTF-8 character boundaries into pieces of at most ``budget`` bytes."""
    out, cur, size = [], [], 0
    for ch in text:
        b = nbytes(ch)
        if size + b > budget and cur:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += b
    if cur:
        out.append("".join(cur))
    return out


def _units(text: str, budget: int) -> list[tuple[str, str]]:
    """A paragraph as ``(separator, piece)`` units of at most ``budget`` bytes: its lines, an
    over-long line cut into sentences, an over-long sentence cut at characters."""
    out: list[tuple[str, str]] = []
    for ln, line in enumerate(text.split("\n")):
        sep = "\n" if ln else ""
        if nbytes(line) <= budget:
            out.append((sep, line))
            continue
        for sn, sentence in enumerate(s for s in _SENTENCE.split(line) if s):
            ssep = sep if sn == 0 else ""
            if nbytes(sentence) <= budget:
                out.append((ssep, sentence))
            else:
                out.extend((ssep if k == 0 else "", piece) for k, piece in enumerate(hard_cut(sentence, budget)))
    return out


def _code_units(text: str, budget: int) -> list[tuple[str, str]]:
    """A code block as its lines; a line longer than a part (rare) is cut at characters."""
    room = budget - nbytes(CODE_CONT) - 1
    out: list[tuple[str, str]] = []
    for ln, line in enumerate(text.split("\n")):
        sep = "\n" if ln else ""
        pieces = [line] if nbytes(line) <= room else hard_cut(line, room)
        out.extend((sep if k == 0 else "\n", piece) for k, piece in enumerate(pieces))
    return out


def _pack_units(units: list[tuple[str, str]], budget: int, first: int, cont: str = "") -> list[str]:
    """Pack units greedily: the first part gets ``first`` bytes (it may come out empty when nothing
    fits), the others ``budget``; every part after the first starts with ``cont``."""
    out: list[str] = []
    cur, room = "", first
    for sep, piece in units:
        cand = cur + sep + piece if cur else piece
        if nbytes(cand) <= room:
            cur = cand
            continue
        out.append(cur.rstrip() if cont else cur.strip())
        cur, room = (cont + piece.lstrip("\n")) if cont else piece.lstrip(), budget
    out.append(cur.rstrip() if cont else cur.strip())
    return out


def split_blocks(blocks: list[Block], budget: int) -> list[str]:
    """Greedy packing of blocks into parts of at most ``budget`` bytes, blocks joined by a blank line.

    A block that fits in a part is never cut (it moves to the next part instead); a bigger one fills
    the current part and goes on in the next ones, cut as :func:`_units` / :func:`_code_units` allow.
    """
    parts: list[str] = []
    cur: list[str] = []
    sticky: list[bool] = []
    used = [0]  # bytes of the texts in cur (without separators)

    def size() -> int:
        return used[0] + 2 * max(0, len(cur) - 1)

    def add(text: str, is_sticky: bool) -> None:
        cur.append(text)
        sticky.append(is_sticky)
        used[0] += nbytes(text)

    def emit() -> None:
        text = "\n\n".join(t for t in cur if t)
        if text.strip():
            parts.append(text)
        cur.clear()
        sticky.clear()
        used[0] = 0

    for block in blocks:
        need = nbytes(block.text) + (2 if cur else 0)
        if size() + need <= budget:
            add(block.text, block.sticky)
            continue
        if nbytes(block.text) <= budget:  # fits in a part of its own: start the next part with it
            carry = []
            while cur and sticky[-1]:  # a heading goes with what follows it
                sticky.pop()
                carry.insert(0, cur.pop())
            emit()
            for text in carry:
                add(text, True)
            if size() + nbytes(block.text) + (2 if cur else 0) > budget:
                emit()
            add(block.text, block.sticky)
            continue
        room = budget - size() - 2 if cur else budget
        if block.code:
            pieces = _pack_units(_code_units(block.text, budget), budget, room, CODE_CONT + "\n")
        else:
            pieces = _pack_units(_units(block.text, budget), budget, room)
        first, *rest = pieces
        if first:
            add(first, False)
        for piece in rest:
            emit()
            add(piece, False)
    emit()
    return parts


def _prefix(i: int, n: int) -> str:
    return f"({i}/{n}) "


def number_parts(texts: list[str]) -> list[str]:
    n = len(texts)
    return texts if n <= 1 else [_prefix(i, n) + t for i, t in enumerate(texts, 1)]


def shape_answer(md: str, limit: int = LIMIT) -> list[str]:
    """Markdown answer → ordered plain-text messages of at most ``limit`` UTF-8 bytes each, numbered
    ``(i/n) `` when there is more than one."""
    blocks = markdown_blocks(md)
    parts = split_blocks(blocks, limit)
    width = 0
    while len(parts) > 1 and nbytes(_prefix(len(parts), len(parts))) > width:
        # the number takes room: repack with room for it (n only grows, so this ends)
        width = nbytes(_prefix(len(parts), len(parts)))
        parts = split_blocks(blocks, limit - width)
    return number_parts(parts)


# ---- progressive delivery -------------------------------------------------------------------

class Progressive:
    """Incremental shaping: ``feed`` deltas, get finished paragraphs once ``min_bytes`` are ready.

    Messages are numbered ``(1) ``, ``(2) `` … while the total is unknown; ``finish`` returns the rest,
    the last numbered ``(n/n) ``. An answer that never released anything comes out exactly as
    :func:`shape_answer` would shape it.
    """

    _RESERVE = nbytes("(9999/9999) ")

    def __init__(self, limit: int = LIMIT, min_bytes: int = 600, sent: int = 0) -> None:
        self.limit = limit
        self.min_bytes = max(1, min(min_bytes, limit - self._RESERVE))
        self.buf = ""
        self.sent = sent  # parts released so far (> 0: resuming an answer whose first parts went out before)
        self.fed = 0  # characters fed
        self.whole: list[str] = []  # the full answer (for the unreleased case)
        # incremental scan of ``buf`` (each line is looked at once: streaming stays linear)
        self._scan = 0  # buf[:_scan] has been scanned, line by line
        self._fence: str | None = None  # the open code fence's marker, if inside one
        self._para_lines = 0  # lines of the paragraph being scanned
        self._para_heading = False  # ... and whether it is a lone heading line
        self._cut = -1  # end of the last complete paragraph outside a code block (not a lone heading)
        self._checked = -1  # the cut whose text was found smaller than min_bytes

    def _advance(self) -> None:
        end = self.buf.rfind("\n")
        while self._scan <= end:
            nl = self.buf.index("\n", self._scan)
            line = self.buf[self._scan:nl]
            start, self._scan = self._scan, nl + 1
            if self._fence is not None:
                stripped = line.strip()
                if stripped.startswith(self._fence[0] * len(self._fence)) and set(stripped) <= {self._fence[0]}:
                    self._fence = None
                    self._cut = nl  # a closed code block is a finished block
                continue
            m = _FENCE.match(line)
            if m:
                self._fence = m.group(2)
                self._para_lines, self._para_heading = 0, False
                continue
            if line.strip():
                self._para_lines += 1
                self._para_heading = self._para_lines == 1 and bool(_HEADING.match(line))
                continue
            if self._para_lines and not self._para_heading:  # a blank line ends a paragraph
                self._cut = start
            self._para_lines, self._para_heading = 0, False

    @property
    def consumed(self) -> int:
        """Characters of the answer (as fed) that released parts cover: resuming after a restart feeds a new
        ``Progressive(sent=...)`` the answer from here on, so no part goes out twice."""
        return self.fed - len(self.buf)

    def feed(self, delta: str) -> list[str]:
        self.fed += len(delta)
        self.buf += delta
        self.whole.append(delta)
        self._advance()
        cut = self._cut
        if cut <= 0 or cut == self._checked or not self.buf[cut:].strip():
            return []  # nothing finished yet, too little, or nothing after it (finish() numbers the last)
        blocks = markdown_blocks(self.buf[:cut])
        if sum(nbytes(b.text) for b in blocks) < self.min_bytes:
            self._checked = cut
            return []
        rest = self.buf[cut:].lstrip("\n")
        self._scan -= len(self.buf) - len(rest)
        self.buf, self._cut, self._checked = rest, -1, -1
        parts = split_blocks(blocks, self.limit - self._RESERVE)
        out = []
        for p in parts:
            self.sent += 1
            out.append(f"({self.sent}) {p}")
        return out

    def finish(self) -> list[str]:
        if self.sent == 0:
            self.buf = ""
            return shape_answer("".join(self.whole), self.limit)
        parts = split_blocks(markdown_blocks(self.buf), self.limit - self._RESERVE)
        self.buf = ""
        out = []
        for i, p in enumerate(parts):
            self.sent += 1
            out.append(f"({self.sent}/{self.sent}) {p}" if i == len(parts) - 1 else f"({self.sent}) {p}")
        return out
