"""Hostile answers (a prompt can make the LLM emit anything) against the page's Markdown renderer: inputs that cost
quadratic time or multiply into millions of DOM nodes, and link destinations with escapes and code spans."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import DEV_OPTIONS, Live
from .test_page import ask, expect, sign_in

pytestmark = pytest.mark.integration

# 30 000 blank lines between two list items: each blank line rescanned all the following ones (27 s for 50 000).
LIST_GAP = "- a\n" + "\n" * 30000 + "- b\n"
NESTED_GAP = "".join("  " * d + "- x\n" for d in range(12)) + "\n" * 20000 + "- y\n"
# 1 000 header columns and 1 000 one-character rows: a 4 KB answer, a million table cells.
TABLE_BOMB = "|a" * 1000 + "|\n|-|\n" + "|\n" * 1000


def _render(p: Any, text: str) -> dict[str, Any]:
    return p.page.evaluate("""(s) => {
      const t = performance.now();
      const html = window.ClawMarkdown.render(s);
      const ms = performance.now() - t;
      const d = document.createElement('div');
      d.innerHTML = html;
      return {ms, nodes: d.getElementsByTagName('*').length, html: html.length, text: d.textContent};
    }""", text)


def test_hostile_markdown_renders_in_bounded_time_and_size(pages: Any, live: Live) -> None:
    p = pages(options=DEV_OPTIONS)
    p.page.goto(live.http + "/")
    for name, text in (("list gap", LIST_GAP), ("nested gap", NESTED_GAP), ("table bomb", TABLE_BOMB)):
        got = _render(p, text)
        assert got["ms"] < 2000, (name, got["ms"])  # generous: ~40 ms here; 10-27 s before
        assert got["nodes"] <= 20000 and got["html"] < 40 * len(text) + 10000, (name, got["nodes"], got["html"])
    table = _render(p, "| a | b |\n|---|---|\n" + "| 1 | 2 |\n" * 6000)
    assert 10000 <= table["nodes"] <= 20000, table["nodes"]  # a long table up to the cap, the rest as text
    assert table["text"].count("1") == 6000, "rows past the cap are shown as text, not dropped"


def test_link_destinations_take_escapes_and_code_spans_back(pages: Any, live: Live) -> None:
    p = pages(options=DEV_OPTIONS)
    p.page.goto(live.http + "/")
    hrefs = p.page.evaluate("""(cases) => cases.map((s) => {
      const d = document.createElement('div');
      d.innerHTML = window.ClawMarkdown.render(s);
      return [...d.querySelectorAll('a')].map((a) => [a.getAttribute('href'), a.textContent]);
    })""", ["[a](https://x.example/\\_y)", '[a](https://x.example/`c"d`)', "[a \\*b\\*](https://x.example/\\(1\\))",
            "https://evil.example/\u202emoc.elgoog"])
    assert hrefs == [[["https://x.example/_y", "a"]], [['https://x.example/`c"d`', "a"]],
                     [["https://x.example/(1)", "a *b*"]],
                     [["https://evil.example/moc.elgoog", "https://evil.example/moc.elgoog"]]], hrefs


def test_a_hostile_answer_in_the_history_does_not_freeze_the_page(pages: Any, live: Live) -> None:
    live.fake(reply="看这个：\n\n" + LIST_GAP + "\n" + TABLE_BOMB, tokens_per_s=0, token_chars=100)  # < 2048 tokens
    p = pages()
    sign_in(p, "heidi")
    bot = ask(p, "请回答一个很长的列表")
    expect(bot.locator(".meta")).to_contain_text("完成", timeout=20_000)
    assert p.page.locator(".msg.bot .body li").all_inner_texts() == ["a", "b"]
    assert p.page.locator(".msg.bot .body table th").count() == 0  # 1 000 columns: text, not a table
    p.page.reload()
    expect(p.page.locator("#status")).to_contain_text("已连接", timeout=10_000)
    t = p.page.evaluate("() => { const t = performance.now(); document.body.offsetHeight; return performance.now() - t; }")
    assert t < 2000, t
    assert p.page.locator(".msg.bot .body li").all_inner_texts() == ["a", "b"]
    assert p.page.locator(".msg.bot .body *").count() < 20000
    p.shot("hostile-history")
