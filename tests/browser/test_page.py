"""The chat page (edge/static) in headless Chromium against a real edge, broker, node and fake LLM: sign-in,
streaming, stop, reload mid-answer, one WebSocket, the question limit, Markdown, the phone viewport."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from edge.keys import TOKENS

from .conftest import DEV_OPTIONS, Live, Page

pytestmark = pytest.mark.integration

CONNECTED = "已连接"
WXWORK_UA = ("Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
             "Mobile Safari/537.36 wxwork/4.1.20 MicroMessenger/7.0.1 Language/zh ColorScheme/Light")


def expect(*a: Any, **k: Any) -> Any:
    from playwright.sync_api import expect as pw_expect
    return pw_expect(*a, **k)


def sign_in(p: Page, name: str) -> None:
    p.page.goto(p.live.http + "/")
    p.page.fill("#user", name)
    p.page.click("#loginBtn")
    expect(p.page.locator("#status")).to_contain_text(CONNECTED, timeout=10_000)


def ask(p: Page, text: str) -> Any:
    """Type and send a question; the locator of its answer bubble (the last one)."""
    n = p.page.locator(".msg.bot").count()
    p.page.fill("#q", text)
    p.page.press("#q", "Enter")
    expect(p.page.locator(".msg.bot")).to_have_count(n + 1, timeout=10_000)
    bot = p.page.locator(".msg.bot").last
    expect(bot).to_have_attribute("data-task", _HEX32)
    return p.page.locator(f'.msg.bot[data-task="{bot.get_attribute("data-task")}"]')


_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def body_text(loc: Any) -> str:
    return loc.locator(".body").inner_text()


def norm(s: str) -> str:
    return " ".join(s.split())


def watch_growth(p: Page, bot: Any, until: str, timeout: float = 15) -> list[int]:
    """The answer's length seen every 50 ms until its meta reads ``until``: the distinct lengths, in order."""
    seen: list[int] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = len(body_text(bot))
        if not seen or n != seen[-1]:
            seen.append(n)
        if until in (bot.locator(".meta").all_inner_texts() or [""])[0]:
            return seen
        p.page.wait_for_timeout(50)
    raise AssertionError(f"the answer did not reach {until!r}; lengths seen {seen}")


def api_task(live: Live, user: str, task: str) -> dict[str, Any]:
    status, got = live.get(f"/api/tasks/{task}", bearer=live.login(user)["token"])
    assert status == 200, got
    return got


# ---- streaming, stop, reload -------------------------------------------------------------------------
def test_answer_streams_in_and_equals_the_stored_answer(pages: Any, live: Live) -> None:
    live.fake(tokens_per_s=25, n_tokens=60)  # ~2.4 s
    p = pages()
    sign_in(p, "alice")
    p.page.evaluate("""() => {  // count the renders of answers: each changes a bubble's body in one task
      window.__renders = 0;
      new MutationObserver((recs) => {
        if (recs.some((r) => r.target.closest('.msg.bot .body'))) window.__renders++;
      }).observe(document.getElementById('log'), {childList: true, subtree: true});
    }""")
    t0 = time.monotonic()
    bot = ask(p, "hello, stream please")
    lengths = watch_growth(p, bot, "完成")
    elapsed = time.monotonic() - t0
    grew = [n for n in lengths if n > 0]
    assert len(grew) >= 4 and grew == sorted(grew), lengths  # seen growing over several observations
    deltas = sum(1 for f in p.received if '"delta"' in f)
    renders = p.page.evaluate("window.__renders")
    assert 3 <= renders <= 10 * elapsed + 3 and renders < deltas, (renders, deltas, elapsed)  # throttled
    task = bot.get_attribute("data-task")
    got = api_task(live, "alice", task)
    assert got["status"] == "ok" and norm(body_text(bot)) == norm(got["answer"])
    assert p.open_sockets() == 1
    p.shot("stream-done")


def test_stop_cancels_end_to_end(pages: Any, live: Live) -> None:
    stats = live.fake(tokens_per_s=12, n_tokens=400)  # ~33 s unless stopped
    closed_before, completed_before = stats.client_closed, stats.streams_completed
    p = pages()
    sign_in(p, "bob")
    bot = ask(p, "a long answer to stop")
    p.wait(lambda: len(body_text(bot)) > 8, what="some text before stop")
    expect(p.page.locator("#stop")).to_be_enabled()
    p.page.click("#stop")
    expect(bot.locator(".meta")).to_have_text("已停止", timeout=10_000)
    p.wait(lambda: live.call(lambda: live.sys.fake.stats.client_closed) > closed_before, what="the LLM stream closed")
    assert live.call(lambda: live.sys.fake.stats.streams_completed) == completed_before  # it did not run to the end
    got = api_task(live, "bob", bot.get_attribute("data-task"))
    assert got["status"] == "cancelled"
    assert norm(body_text(bot)) == norm(got["answer"])
    expect(p.page.locator("#stop")).to_be_disabled()
    expect(p.page.locator("#q")).to_be_enabled()
    p.shot("stopped")


def test_reload_mid_answer_shows_history_and_the_answer_completes(pages: Any, live: Live) -> None:
    live.fake(tokens_per_s=0, n_tokens=12)  # the first answer at once
    p = pages()
    sign_in(p, "carol")
    first = ask(p, "first question")
    expect(first.locator(".meta")).to_contain_text("完成", timeout=10_000)
    first_task = first.get_attribute("data-task")
    live.fake(tokens_per_s=15, n_tokens=60)  # ~4 s
    second = ask(p, "second question, reloaded mid-answer")
    task = second.get_attribute("data-task")
    p.wait(lambda: len(body_text(second)) > 10, what="some text before the reload")
    before = len(body_text(second))
    sockets_before = len(p.sockets)
    p.page.reload()
    # history, oldest first: both questions and the first answer; the running answer comes back and goes on
    expect(p.page.locator(".msg.me")).to_have_count(2, timeout=10_000)
    assert p.page.locator(".msg.me .body").all_inner_texts() == ["first question", "second question, reloaded mid-answer"]
    bot = p.page.locator(f'.msg.bot[data-task="{task}"]')
    expect(bot).to_have_count(1)
    lengths = watch_growth(p, bot, "完成")
    assert len([n for n in lengths if n > 0]) >= 2, lengths  # it went on streaming after the reload
    got = api_task(live, "carol", task)
    assert got["status"] == "ok" and len(got["answer"]) > before
    assert norm(body_text(bot)) == norm(got["answer"])  # nothing lost, nothing twice
    first_after = p.page.locator(".msg.bot").first
    assert first_after.get_attribute("data-task") == first_task
    assert norm(body_text(first_after)) == norm(api_task(live, "carol", first_task)["answer"])
    assert len(p.sockets) == sockets_before + 1  # the reloaded page opened one (the old one went with its page)
    p.wait(lambda: live.sessions("web.carol") == 1, what="one socket on the edge")
    resumes = [json.loads(f) for f in p.sent if '"resume"' in f]
    assert [r["task"] for r in resumes] == [task]  # only the unfinished one
    p.shot("reloaded")


def test_a_dropped_socket_reconnects_and_resumes_without_loss_or_repeats(pages: Any, live: Live) -> None:
    live.fake(tokens_per_s=20, n_tokens=64)  # ~3 s
    p = pages()
    sign_in(p, "olga")
    bot = ask(p, "an answer across a dropped connection")
    p.wait(lambda: len(body_text(bot)) > 20, what="some text before the drop")
    shown = max(json.loads(f)["seq"] for f in p.received if '"delta"' in f)
    assert live.close_sockets("web.olga", 1013) == 1  # the edge drops a slow reader like this
    p.wait(lambda: [f for f in p.sent if '"resume"' in f], what="a resume on the new socket")
    resume = json.loads([f for f in p.sent if '"resume"' in f][0])
    assert resume["task"] == bot.get_attribute("data-task") and resume["seq"] >= shown
    expect(bot.locator(".meta")).to_contain_text("完成", timeout=15_000)
    got = api_task(live, "olga", resume["task"])
    assert norm(body_text(bot)) == norm(got["answer"])
    assert len(p.sockets) == 2 and p.open_sockets() == 1


def test_a_silent_socket_is_replaced(pages: Any, live: Live) -> None:
    """A socket that brings nothing for 60 s (dead without a close) is dropped and a new one opened. The page's
    clock is Playwright's, moved forward; the socket itself stays up (the edge knows nothing)."""
    p = pages()
    p.page.clock.install()
    sign_in(p, "sam")
    expect(p.page.locator("#status")).to_contain_text(CONNECTED)
    p.page.clock.fast_forward(30_000)  # one ping, answered
    p.wait(lambda: any('"pong"' in f for f in p.received), what="a pong")
    assert p.open_sockets() == 1 and len(p.sockets) == 1
    p.page.clock.fast_forward(61_000)  # the next check finds no frame for over 60 s
    p.wait(lambda: len(p.sockets) == 2, what="a new socket")
    expect(p.page.locator("#status")).to_contain_text(CONNECTED, timeout=10_000)
    p.wait(lambda: p.open_sockets() == 1, what="the silent socket closed")


def test_revoked_session_signs_the_page_out(pages: Any, live: Live) -> None:
    live.fake()
    p = pages()
    sign_in(p, "trudy")
    live.call(lambda: live.sys.app[TOKENS].revocations.revoke("web.trudy"))
    assert live.close_sockets("web.trudy", 4401) == 1  # what the edge's revocation watcher does
    expect(p.page.locator("#status")).to_contain_text("登录已被撤销", timeout=10_000)
    expect(p.page.locator("#q")).to_be_disabled()
    p.page.wait_for_timeout(700)
    assert len(p.sockets) == 1 and p.page.evaluate("localStorage.getItem('claw_refresh')") is None  # no retry loop


# ---- one socket ------------------------------------------------------------------------------------------
def test_ten_login_clicks_leave_exactly_one_websocket(pages: Any, live: Live) -> None:
    live.fake()
    p = pages()
    sign_in(p, "dave")
    for _ in range(5):  # quick clicks, each starting a new session before the last one is connected
        p.page.click("#loginBtn")
    expect(p.page.locator("#status")).to_contain_text(CONNECTED, timeout=10_000)
    for _ in range(5):  # and clicks each waiting for its connection
        p.page.click("#loginBtn")
        expect(p.page.locator("#status")).not_to_contain_text(CONNECTED, timeout=5_000)
        expect(p.page.locator("#status")).to_contain_text(CONNECTED, timeout=10_000)
    p.wait(lambda: p.open_sockets() == 1, what="one socket open in the page")
    p.wait(lambda: live.sessions("web.dave") == 1, what="one socket on the edge")
    assert 6 <= len(p.sockets) <= 11, len(p.sockets)
    expect(p.page.locator("#q")).to_be_enabled()
    bot = ask(p, "still works")
    expect(bot.locator(".meta")).to_contain_text("完成", timeout=10_000)


def test_too_many_sockets_is_explained_and_the_page_recovers(pages: Any, live: Live) -> None:
    import aiohttp

    live.fake()
    max_ws = live.sys.settings.edge.max_ws_per_user
    held: list[Any] = []

    async def hold() -> None:  # the user's other tabs: every socket the edge allows
        s = aiohttp.ClientSession()
        held.append(s)
        token = (await (await s.post(f"{live.http}/api/login", json={"dev_user": "erin"})).json())["token"]
        for _ in range(max_ws):
            held.append(await s.ws_connect(f"{live.http}/api/ws", headers={"Authorization": f"Bearer {token}"}))

    async def release() -> None:
        for x in reversed(held):
            await x.close()

    live.call(hold)
    try:
        p = pages()
        p.page.goto(live.http + "/")
        p.page.fill("#user", "erin")
        p.page.click("#loginBtn")
        expect(p.page.locator("#status")).to_contain_text("连接过多", timeout=10_000)
        expect(p.page.locator("#q")).to_be_enabled()  # never stuck with the input disabled
        p.page.fill("#q", "asked while refused")  # waits, and is sent once a socket is open
        p.page.press("#q", "Enter")
        expect(p.page.locator(".msg.me .meta")).to_have_text("未连接：连接恢复后自动发送")
        p.shot("too-many-sockets")
    finally:
        live.call(release)
    expect(p.page.locator("#status")).to_contain_text(CONNECTED, timeout=20_000)  # the backoff retries by itself
    expect(p.page.locator(".msg.bot .meta")).to_contain_text("完成", timeout=10_000)
    expect(p.page.locator(".msg.me .meta")).to_have_count(0)
    assert len([f for f in p.sent if '"ask"' in f]) == 1
    p.errors.clear()  # the refused handshakes were logged by the browser, as expected


# ---- the question limit ----------------------------------------------------------------------------------
def test_over_limit_question_is_refused_before_sending_and_kept(pages: Any, live: Live) -> None:
    live.fake()
    p = pages()
    sign_in(p, "frank")
    paste = "问" * 80_000
    p.page.fill("#q", paste)
    p.page.press("#q", "Enter")
    expect(p.page.locator("#hint")).to_contain_text("问题过长", timeout=5_000)
    expect(p.page.locator("#hint")).to_contain_text("80000")
    expect(p.page.locator("#hint")).to_contain_text("8000")
    assert p.page.eval_on_selector("#q", "e => e.value.length") == 80_000  # the text stays in the box
    p.page.click("#send")
    assert not [f for f in p.sent if '"ask"' in f]  # nothing was sent
    assert p.open_sockets() == 1 and p.page.locator(".msg.me").count() == 0
    p.shot("over-limit")
    # the limit counts characters as the edge does: 8000 emoji (16 000 UTF-16 units) are allowed, 8001 are not
    p.page.fill("#q", "😀" * 8001)
    p.page.press("#q", "Enter")
    expect(p.page.locator("#hint")).to_contain_text("8001")
    p.page.fill("#q", "😀" * 8000)
    p.page.press("#q", "Enter")
    bot = p.page.locator(".msg.bot").last
    expect(bot.locator(".meta")).to_contain_text("完成", timeout=10_000)
    assert p.page.eval_on_selector("#q", "e => e.value") == ""


# ---- Markdown --------------------------------------------------------------------------------------------
MD_REPLY = """# 标题

**粗体** 和 *斜体*，`inline()` 代码。

| 名称 | 数量 |
|:---|---:|
| 苹果 | 3 |
| 香蕉 | 12 |

```python
print("<b>not bold</b>")
```

- 一
- 二
  1. 二.一

<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">
[好链接](https://example.com/a?b=1&c=2) [坏链接](javascript:window.__pwned=3)
"""


def test_markdown_is_rendered_and_html_is_shown_as_text(pages: Any, live: Live) -> None:
    live.fake(reply=MD_REPLY, tokens_per_s=200, token_chars=6)
    p = pages()
    sign_in(p, "mallory")
    bot = ask(p, "markdown please")
    expect(bot.locator(".meta")).to_contain_text("完成", timeout=10_000)
    md = bot.locator(".body")
    expect(md.locator("h1")).to_have_text("标题")
    expect(md.locator("strong")).to_have_text("粗体")
    expect(md.locator("em")).to_have_text("斜体")
    expect(md.locator("p code")).to_have_text("inline()")
    assert md.locator("table th").all_inner_texts() == ["名称", "数量"]
    assert md.locator("table td").all_inner_texts() == ["苹果", "3", "香蕉", "12"]
    assert md.locator("table td").nth(1).evaluate("e => getComputedStyle(e).textAlign") == "right"
    expect(md.locator("pre code")).to_have_text('print("<b>not bold</b>")')
    assert md.locator("ul > li").count() == 2 and md.locator("ul ol > li").all_inner_texts() == ["二.一"]
    # HTML in the answer is text, never markup
    assert md.locator("script, img, b").count() == 0
    assert "<script>window.__pwned = 1</script>" in md.inner_text()
    links = md.locator("a")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == "https://example.com/a?b=1&c=2"
    assert links.get_attribute("rel") == "noopener noreferrer" and links.get_attribute("target") == "_blank"
    assert p.page.evaluate("window.__pwned") is None
    p.shot("markdown")


def test_markdown_renderer_output_is_always_safe(pages: Any, live: Live) -> None:
    """The renderer on a few thousand random strings of Markdown and HTML syntax: only the renderer's own tags
    and attributes ever come out, every link is http(s), and the text survives."""
    p = pages(options=DEV_OPTIONS)
    p.page.goto(live.http + "/")
    result = p.page.evaluate("""() => {
      const ALPHABET = ['<', '>', '&', '"', "'", '`', '*', '_', '~', '[', ']', '(', ')', '|', '-', '#', '>', ' ',
        '\\n', '\\n\\n', '  ', '1. ', '- ', '```', '|---|', 'javascript:', 'http://x', 'https://y.z/"q', 'a', '字',
        '<script>', '<img src=x onerror=1>', '\\\\', '\\u0000', '&lt;', ':', '!', '[a](https://ok.example/)',
        '[b](javascript:1)', '<a href="javascript:1">'];
      const TAGS = new Set(['P','H1','H2','H3','H4','H5','H6','UL','OL','LI','PRE','CODE','STRONG','EM','DEL','A','BR',
        'HR','BLOCKQUOTE','TABLE','THEAD','TBODY','TR','TH','TD','DIV']);
      const ATTRS = new Set(['href', 'rel', 'target', 'class', 'start']);
      let seed = 12345;
      const rnd = (n) => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n; };
      const bad = [];
      const t0 = performance.now();
      for (let i = 0; i < 3000; i++) {
        let s = '';
        const len = 1 + rnd(40);
        for (let k = 0; k < len; k++) s += ALPHABET[rnd(ALPHABET.length)];
        const div = document.createElement('div');
        div.innerHTML = window.ClawMarkdown.render(s);
        for (const el of div.querySelectorAll('*')) {
          if (!TAGS.has(el.tagName)) bad.push([s, el.tagName]);
          for (const a of el.attributes) {
            if (!ATTRS.has(a.name)) bad.push([s, a.name]);
            if (a.name === 'href' && !/^https?:\\/\\//.test(a.value)) bad.push([s, a.value]);
          }
        }
        if (div.textContent.includes('<script>') !== s.includes('<script>')) bad.push([s, 'lost <script> text']);
      }
      // streaming: what was rendered up to each safe cut, plus the rest, is what the whole text renders to
      const BLOCKS = ['# h', 'para **b** `c`', 'line\\nnext', '- a\\n- b', '- a\\n\\n  more', '1. x\\n2. y', '- a\\n  - b',
        '```js\\nx\\n\\ny\\n```', '~~~\\n- z\\n\\nq\\n~~~', '> q\\n> r', '| a | b |\\n|---|:-:|\\n| 1 | 2 |', '---', '    code',
        'text\\n- item', '[l](https://e.x/)', '<b>x</b>'];
      const norm = (h) => h.replace(/>\\n</g, '><');
      for (let i = 0; i < 400; i++) {
        let text = '';
        const n = 1 + rnd(8);
        for (let k = 0; k < n; k++) text += BLOCKS[rnd(BLOCKS.length)] + ['\\n', '\\n\\n', '\\n\\n\\n'][rnd(3)];
        let stable = 0, html = '';
        for (let end = 1; end <= text.length; end += 1 + rnd(7)) {
          const cut = window.ClawMarkdown.safeCut(text.slice(0, end), stable);
          if (cut > stable) { html += window.ClawMarkdown.render(text.slice(stable, cut)); stable = cut; }
        }
        const cut = window.ClawMarkdown.safeCut(text, stable);
        if (cut > stable) { html += window.ClawMarkdown.render(text.slice(stable, cut)); stable = cut; }
        html += window.ClawMarkdown.render(text.slice(stable));
        if (norm(html) !== norm(window.ClawMarkdown.render(text))) bad.push([text, 'streamed rendering differs']);
      }
      // a long hostile answer renders in bounded time (no quadratic regular expressions)
      const sp = ' '.repeat(30000);
      const big = '**a '.repeat(16000) + '`x '.repeat(16000) + '[y]('.repeat(8000) + '- '.repeat(4000) + '> '.repeat(4000)
        + '\\n# ' + sp + 'x\\n```' + sp + '`\\n|' + sp + 'x\\n|-' + sp + 'x\\n- - -' + sp + 'x\\n[a](' + sp + 'x\\n' + sp + '#';
      const t1 = performance.now();
      window.ClawMarkdown.render(big);
      return {bad: bad.slice(0, 5), fuzzMs: t1 - t0, bigMs: performance.now() - t1};
    }""")
    assert result["bad"] == [], result["bad"]
    assert result["bigMs"] < 3000, result  # generous: a few ms on a laptop


# ---- phone -------------------------------------------------------------------------------------------------
def test_phone_viewport_nothing_wraps_and_the_input_is_visible(pages: Any, live: Live) -> None:
    live.fake(reply=MD_REPLY, tokens_per_s=0)
    p = pages(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    sign_in(p, "grace")
    bot = ask(p, "手机上看一看：一个表格和一段代码")
    expect(bot.locator(".meta")).to_contain_text("完成", timeout=10_000)
    boxes = p.page.evaluate("""() => {
      const r = (sel) => { const e = document.querySelector(sel); const b = e.getBoundingClientRect();
        const lh = parseFloat(getComputedStyle(e).lineHeight) || parseFloat(getComputedStyle(e).fontSize) * 1.6;
        return {sel, top: b.top, bottom: b.bottom, left: b.left, right: b.right, h: b.height, lh,
                sh: e.scrollHeight, ch: e.clientHeight, sw: e.scrollWidth, cw: e.clientWidth}; };
      return {items: ['header h1', '#newBtn', '#logoutBtn', '#loginBtn', '#send', '#stop', '#q', '#composer'].map(r),
              docW: document.documentElement.scrollWidth, vw: innerWidth, vh: innerHeight,
              font: getComputedStyle(document.body).fontFamily,
              hit: (() => { const b = document.querySelector('#q').getBoundingClientRect();
                            return document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2).id; })()};
    }""")
    items = {b["sel"]: b for b in boxes["items"]}
    assert boxes["vw"] == 390 and boxes["docW"] <= 390, boxes  # no sideways scrolling
    for sel in ("header h1", "#newBtn", "#logoutBtn", "#loginBtn", "#send", "#stop"):
        b = items[sel]
        assert b["h"] < 1.5 * b["lh"] or b["sh"] <= b["ch"] + 1, b  # one line: the title and buttons do not wrap
        assert b["left"] >= 0 and b["right"] <= 390, b
    head = [items[s] for s in ("header h1", "#newBtn", "#logoutBtn")]
    assert max(abs((b["top"] + b["bottom"]) / 2 - (head[0]["top"] + head[0]["bottom"]) / 2) for b in head) < 4, head
    q, composer = items["#q"], items["#composer"]
    assert q["left"] >= 0 and q["right"] <= 390 and q["top"] >= 0 and q["bottom"] <= 844, q  # fully visible
    assert composer["bottom"] <= 844 + 0.5, composer
    assert boxes["hit"] == "q", boxes["hit"]  # nothing covers it
    for font in ("PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", "Noto Sans CJK SC", "Source Han Sans SC",
                 "WenQuanYi Micro Hei"):
        assert font in boxes["font"], boxes["font"]
    p.shot("phone-390x844")


# ---- sign-in without dev login -----------------------------------------------------------------------------
PROD = {"dev": False, "wecom": True, "miniapp": True, "max_question": 8000}


def test_production_outside_wecom_explains_how_to_sign_in(pages: Any, live: Live) -> None:
    p = pages(options=PROD)
    p.page.goto(live.http + "/")
    signin = p.page.locator("#signin")
    expect(signin).to_be_visible()
    expect(signin).to_contain_text("企业微信")
    expect(signin).to_contain_text("小程序")
    expect(signin).to_contain_text("不支持匿名")
    expect(p.page.locator("#devbar")).to_be_hidden()
    expect(p.page.locator("#q")).to_be_disabled()
    expect(p.page.locator("#wecomLink")).to_be_hidden()
    p.page.wait_for_timeout(300)
    assert p.page.url.rstrip("/") == live.http and not p.sockets  # no redirect, no socket: nobody is anonymous
    p.shot("prod-outside-wecom")


def test_inside_wecom_the_page_goes_to_wecom_oauth(pages: Any, live: Live) -> None:
    p = pages(options=PROD, user_agent=WXWORK_UA)
    p.page.route("**/auth/wecom", lambda route: route.fulfill(body="oauth", content_type="text/plain"))
    p.page.goto(live.http + "/")
    p.page.wait_for_url("**/auth/wecom", timeout=10_000)


def test_login_error_fragment_shows_the_message_and_does_not_loop(pages: Any, live: Live) -> None:
    p = pages(options=PROD, user_agent=WXWORK_UA)
    went: list[str] = []
    p.page.route("**/auth/wecom", lambda route: (went.append(route.request.url), route.fulfill(body="oauth")))
    p.page.goto(live.http + "/#login_error=wecom_state")
    expect(p.page.locator("#signinError")).to_contain_text("登录已过期或无法验证请求来源")
    expect(p.page.locator("#status")).to_contain_text("登录已过期")
    expect(p.page.locator("#wecomLink")).to_be_visible()  # a way to try again, by hand
    assert p.page.evaluate("location.hash") == ""
    p.page.wait_for_timeout(300)
    assert not went  # the error page does not send the user straight back into OAuth
    for code, words in (("wecom_not_member", "不是本企业的成员"), ("wecom_busy", "繁忙"),
                        ("<b>x</b>", "登录失败（bxb）")):
        p.page.goto(live.http + "/#login_error=" + code)
        expect(p.page.locator("#signinError")).to_contain_text(words)


def test_dev_login_needs_a_name(pages: Any, live: Live) -> None:
    p = pages()
    p.page.goto(live.http + "/")
    expect(p.page.locator("#devbar")).to_be_visible()
    assert p.page.input_value("#user") == ""  # no default name, no shared guest
    p.page.click("#loginBtn")
    p.page.wait_for_timeout(300)
    assert not p.sockets and p.page.evaluate("localStorage.getItem('claw_refresh')") is None
    expect(p.page.locator("#q")).to_be_disabled()


def test_new_conversation_starts_a_new_conv(pages: Any, live: Live) -> None:
    live.fake()
    p = pages()
    sign_in(p, "ivan")
    ask(p, "one")
    expect(p.page.locator(".msg.bot .meta").last).to_contain_text("完成", timeout=10_000)
    p.page.click("#newBtn")
    expect(p.page.locator(".msg")).to_have_count(0)
    ask(p, "two")
    expect(p.page.locator(".msg.bot .meta").last).to_contain_text("完成", timeout=10_000)
    convs = [json.loads(f)["conv"] for f in p.sent if '"ask"' in f]
    assert len(convs) == 2 and convs[0] != convs[1], convs



def test_a_signed_in_load_makes_no_failed_request(pages: Any, live: Live) -> None:
    """Every request of a sign-in and a reload answers below 400: a missing or renamed page file shows here. (The
    page names its icon inline, ``data:,``, so a browser that asks for one gets no 404 either; headless Chromium
    asks for none.)"""
    live.fake()
    p = pages()
    failed: list[str] = []
    p.page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    p.page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
    sign_in(p, "quinn")
    p.page.reload()
    expect(p.page.locator("#status")).to_contain_text(CONNECTED, timeout=10_000)
    p.page.wait_for_load_state("networkidle")
    assert not failed, failed
