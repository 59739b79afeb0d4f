"""Markdown → WeCom text, and splitting into numbered parts of at most 2048 UTF-8 bytes (pure)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.wecom.shape import CODE_CONT, LIMIT, Progressive, nbytes, shape_answer, to_plain

NUM = re.compile(r"^\((\d+)(?:/(\d+))?\) ")


def strip_numbers(parts: list[str]) -> list[str]:
    return [NUM.sub("", p, count=1) for p in parts]


def squash(text: str) -> str:
    """Text without whitespace and continuation marks: what must survive splitting unchanged."""
    return re.sub(r"\s+", "", text.replace(CODE_CONT, ""))


# ---- markdown → plain text ---------------------------------------------------------------------

def test_headers_emphasis_links() -> None:
    out = to_plain("# 总结\n## 细节\n### 小节\n这是**粗体**、*斜体*、~~删除~~和`a_b*c*`，见[文档](https://x.cn/a)。")
    assert out.split("\n\n") == ["【总结】", "【细节】", "小节",
                                 "这是粗体、斜体、删除和a_b*c*，见文档 (https://x.cn/a)。"]


def test_identifiers_and_arithmetic_keep_their_marks() -> None:
    assert to_plain("snake_case_name 和 2*3*4 不变") == "snake_case_name 和 2*3*4 不变"
    assert to_plain(r"转义 \*星号\*") == "转义 *星号*"


def test_lists_nested_numbered_and_tasks() -> None:
    out = to_plain("- 一\n  - 子\n    - 孙\n1. 第一\n2) 第二\n- [x] 完成\n- [ ] 待办")
    assert out.split("\n") == ["• 一", "  • 子", "    • 孙", "1. 第一", "2. 第二", "• ☑ 完成", "• ☐ 待办"]


def test_table_becomes_one_line_per_row() -> None:
    out = to_plain("| 名称 | 数量 |\n|:---|---:|\n| 苹果 | 3 |\n| 香蕉 | **5** |\n\n后文")
    assert out == "名称: 苹果；数量: 3\n名称: 香蕉；数量: 5\n\n后文"


def test_code_block_kept_line_for_line_and_indented() -> None:
    md = "看代码：\n\n```python\ndef f(x):\n\n    return x * 2  # **not bold**\n```\n结束"
    out = to_plain(md)
    assert "代码（python）：\n    def f(x):\n\n        return x * 2  # **not bold**" in out
    assert "```" not in out and out.endswith("结束")


def test_unclosed_code_block_runs_to_the_end() -> None:
    assert to_plain("```\nx = 1\ny = 2") == "代码：\n    x = 1\n    y = 2"


def test_quote_rule_setext() -> None:
    assert to_plain("> 引用\n\n---\n\n标题\n====\n内容") == "│ 引用\n\n————————\n\n【标题】\n\n内容"


# ---- splitting ---------------------------------------------------------------------------------

def test_short_answer_is_one_unnumbered_part() -> None:
    assert shape_answer("**你好**！") == ["你好！"]
    assert shape_answer("  \n\n ") == []


def test_long_chinese_answer_with_code_block() -> None:
    code = "```python\ndef 求和(a, b):\n    # 把两个数相加\n    return a + b\n\nprint(求和(1, 2))\n```"
    para = "这是一个很长的回答中的一段，用来测试分段发送是否正确。" * 8
    md = "\n\n".join([f"## 第{i}部分\n\n{para}" for i in range(1, 7)] + [code] + [para] * 6)
    parts = shape_answer(md)
    n = len(parts)
    assert n >= 4 and all(nbytes(p) <= LIMIT for p in parts)
    assert [p.split(" ", 1)[0] for p in parts] == [f"({i}/{n})" for i in range(1, n + 1)]
    [with_code] = [p for p in parts if "def 求和" in p]
    assert "    def 求和(a, b):\n        # 把两个数相加\n        return a + b\n\n    print(求和(1, 2))" in with_code
    assert squash("".join(strip_numbers(parts))) == squash(to_plain(md))
    # a heading is never left at the end of a part without its paragraph
    assert not any(p.rstrip().endswith("】") for p in parts)


def test_paragraph_without_breaks_is_cut_at_sentences_then_characters() -> None:
    sentences = "这一句话有点长，但是它以句号结束。" * 300
    parts = shape_answer(sentences)
    assert all(nbytes(p) <= LIMIT for p in parts)
    assert all(p.endswith("。") for p in parts)  # cut after a sentence, not inside one
    run_on = "没有任何标点的文字" * 1000
    parts = shape_answer(run_on)
    assert all(nbytes(p) <= LIMIT for p in parts) and len(parts) > 10
    assert "".join(strip_numbers(parts)) == run_on  # no character lost or broken


def test_code_block_bigger_than_a_part_is_cut_between_lines() -> None:
    lines = [f"value_{i} = compute({i}, '{'数' * 20}')" for i in range(150)]
    md = "前言\n\n```\n" + "\n".join(lines) + "\n```\n\n后记"
    parts = shape_answer(md)
    assert all(nbytes(p) <= LIMIT for p in parts) and len(parts) > 2
    body = [ln.strip() for p in strip_numbers(parts) for ln in p.split("\n")]
    assert [ln for ln in body if ln.startswith("value_")] == lines  # every line whole, in order
    assert all(p.startswith(CODE_CONT) for p in strip_numbers(parts)[1:-1])


def test_number_width_is_accounted_for() -> None:
    md = "\n\n".join(["甲" * 680] * 12)  # 2040-byte paragraphs: the "(i/n) " prefix must move text along
    parts = shape_answer(md)
    assert all(nbytes(p) <= LIMIT for p in parts)
    assert squash("".join(strip_numbers(parts))) == squash(md)


_md_piece = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=400),
    st.sampled_from(["# 标题", "## 二级", "- 项目", "1. 第一", "| a | b |\n|---|---|\n| 1 | 2 |", "> 引用",
                     "```py\nx = '数据'\n```", "**粗**", "---", "😀🎉" * 50, "a" * 3000, "中文。" * 700]),
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(_md_piece, max_size=12), st.sampled_from(["\n\n", "\n", " "]))
def test_property_parts_fit_and_lose_nothing(pieces: list[str], sep: str) -> None:
    md = sep.join(pieces)
    parts = shape_answer(md)
    assert all(nbytes(p) <= LIMIT for p in parts)
    for p in parts:
        p.encode("utf-8")  # never a broken character
    n = len(parts)
    if n > 1:
        assert [NUM.match(p).groups() for p in parts] == [(str(i), str(n)) for i in range(1, n + 1)]  # type: ignore[union-attr]
    assert squash("".join(strip_numbers(parts))) == squash(to_plain(md))


# ---- progressive -------------------------------------------------------------------------------

def _stream(md: str, size: int, prog: Progressive) -> list[list[str]]:
    out = [prog.feed(md[i:i + size]) for i in range(0, len(md), size)]
    out.append(prog.finish())
    return out


def test_progressive_releases_finished_paragraphs_and_numbers_them() -> None:
    paras = [f"第{i}段：" + "内容" * 120 for i in range(6)]
    md = "\n\n".join(paras)
    batches = _stream(md, 7, Progressive(min_bytes=600))
    msgs = [m for b in batches for m in b]
    assert len(msgs) >= 3 and all(nbytes(m) <= LIMIT for m in msgs)
    assert [NUM.match(m).group(1) for m in msgs] == [str(i) for i in range(1, len(msgs) + 1)]  # type: ignore[union-attr]
    assert msgs[-1].startswith(f"({len(msgs)}/{len(msgs)}) ")
    assert squash("".join(strip_numbers(msgs))) == squash(to_plain(md))
    first_release = next(i for i, b in enumerate(batches) if b)
    assert first_release < len(batches) - 1  # something went out before the end


def test_progressive_never_releases_an_open_code_block() -> None:
    md = "介绍" * 300 + "\n\n```\n" + "\n\n".join(f"line{i}" for i in range(50)) + "\n```\n\n结尾。"
    prog = Progressive(min_bytes=100)
    for i in range(0, len(md), 5):
        for m in prog.feed(md[i:i + 5]):
            assert m.count("代码：") == 0 or "line49" in m  # a code block only goes out whole
    msgs = prog.finish()
    assert msgs[-1].endswith("结尾。")


def test_progressive_short_answer_equals_whole_mode() -> None:
    md = "简短的回答。\n\n第二段。"
    assert [m for b in _stream(md, 3, Progressive(min_bytes=600)) for m in b] == shape_answer(md)


def test_hostile_inline_markdown_is_bounded_and_loses_nothing() -> None:
    """Unclosed brackets/emphasis used to make the inline regexes quadratic (seconds per answer)."""
    for unit in ("[a](", "![a](", "**a ", "_a ", "~~a ", "[", "`"):
        md = "\n".join([unit * (3990 // len(unit))] * 3) + "\n\n" + unit * 20000
        parts = shape_answer(md)
        assert all(nbytes(p) <= LIMIT for p in parts)
        assert squash("".join(strip_numbers(parts))) == squash(to_plain(md))


def test_placeholder_bytes_in_llm_output_are_harmless() -> None:
    assert to_plain("a \x000\x00 b `x` \x019\x01 c") == "a 0 b x 9 c"


def test_progressive_keeps_a_heading_with_its_paragraph_and_numbers_the_last() -> None:
    prog = Progressive(min_bytes=100)
    out = prog.feed("正文。" * 80 + "\n\n## 小结\n\n") + prog.feed("小结的内容。" * 5 + "\n\n") + prog.finish()
    assert len(out) == 2 and out[0].startswith("(1) ") and out[1].startswith("(2/2) 【小结】\n\n小结的内容")


def test_progressive_streaming_stays_linear_in_a_long_code_block() -> None:
    """Each line is scanned once (it used to rescan the buffer per blank line on every delta: minutes
    for this input, now milliseconds; the suite's timeout guards it, no timing assertion here)."""
    code = "```python\n" + "\n\n".join(f"x{i} = {i}" for i in range(2000)) + "\n```\n\n结束。"
    prog = Progressive(min_bytes=100)
    msgs = [m for i in range(0, len(code), 4) for m in prog.feed(code[i:i + 4])] + prog.finish()
    assert prog._scan <= len(prog.buf) + 1
    assert squash("".join(strip_numbers(msgs))) == squash(to_plain(code))


@pytest.mark.parametrize("chunk", [7, 50, 333])
def test_progressive_resumed_from_consumed_sends_the_rest_once(chunk: int) -> None:
    """An edge restart mid-answer: a new Progressive(sent=k) fed the answer from ``consumed`` on continues
    the numbering and, with the parts already sent, covers the answer exactly once."""
    answer = "\n\n".join(f"第{i}段：" + "要点与解释。" * 40 for i in range(1, 9))
    pieces = [answer[i:i + chunk] for i in range(0, len(answer), chunk)]
    first = Progressive(min_bytes=400)
    sent: list[str] = []
    for p in pieces:
        sent += first.feed(p)
        if len(sent) >= 2:
            break
    assert len(sent) >= 2
    again = Progressive(min_bytes=400, sent=first.sent)
    rest = answer[first.consumed:]
    out: list[str] = []
    for i in range(0, len(rest), chunk):
        out += again.feed(rest[i:i + chunk])
    out += again.finish()
    msgs = sent + out
    n = len(msgs)
    assert [m.split(" ", 1)[0] for m in msgs] == [f"({i})" for i in range(1, n)] + [f"({n}/{n})"]
    body = "".join(m.split(" ", 1)[1] for m in msgs)
    assert "".join(body.split()) == "".join(to_plain(answer).split())
