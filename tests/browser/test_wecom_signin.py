"""The page's WeCom web sign-in in Chromium, end to end: the page opened with WeCom's user agent goes to
``/auth/wecom``, the fake WeCom's authorize page sends it back to the callback, and the page trades the
HttpOnly sign-in cookie for a session (``POST /auth/wecom/session``) -- the member's own uid ``wc.{userid}``.
A link carrying someone else's refresh token (``/#refresh=…``: login CSRF) signs nobody in."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, run_system

from .conftest import Live, Page
from .test_page import CONNECTED, WXWORK_UA, ask, expect

pytestmark = pytest.mark.integration

TOKEN, AES, CORP, AGENT = "QDG6eK", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wx5823bf96d3bd56c7", 1000002
SECRET = "test-secret-Zq8wX1"


class WeComLive(Live):
    """A production-like edge (no dev login) with WeCom web sign-in pointed at the fake WeCom."""

    async def _main(self) -> None:
        from fakes.wecom import FakeWeComConfig, run_fake_wecom
        from fakes.llm import FakeLLMConfig

        @contextlib.asynccontextmanager
        async def system() -> AsyncIterator[Any]:
            port = free_port()
            async with run_fake_wecom(FakeWeComConfig(corp_id=CORP, secret=SECRET, agent_id=AGENT)) as fw, \
                    run_system(self.tmp, self.pki, fake_cfg=FakeLLMConfig(n_tokens=8), edge={
                        "http": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}", "dev_login": False},
                        wecom={"corp_id": CORP, "agent_id": AGENT, "secret": SECRET, "token": TOKEN,
                               "encoding_aes_key": AES, "api_base": fw.url, "oauth_base": fw.url}) as sys_:
                self.fw = fw
                yield sys_

        import asyncio
        try:
            async with system() as sys_:
                self.sys, self.loop, self._stop = sys_, asyncio.get_running_loop(), asyncio.Event()
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self._error = exc
            self._ready.set()


@pytest.fixture(scope="module")
def wlive(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path, browser: Any) -> Iterator[WeComLive]:
    with WeComLive(tmp_path_factory.mktemp("wecom-web"), pki_dir) as sys_:
        yield sys_


def _page(browser: Any, live: WeComLive, made: list[Page], **ctx: Any) -> Page:
    p = Page(browser, live, None, **ctx)  # the edge's own /api/login/options
    made.append(p)
    return p


@pytest.fixture
def wpages(browser: Any, wlive: WeComLive) -> Iterator[Any]:
    made: list[Page] = []
    yield lambda **ctx: _page(browser, wlive, made, **ctx)
    errors = [e for p in made for e in p.errors]
    for p in made:
        p.close()
    assert not errors, errors


def test_inside_wecom_the_page_signs_the_member_in(wpages: Any, wlive: WeComLive) -> None:
    wlive.call(lambda: setattr(wlive.fw, "oauth_user", ("userid", "zhangsan")))
    p = wpages(user_agent=WXWORK_UA, viewport={"width": 390, "height": 844})
    p.page.goto(wlive.http + "/")
    expect(p.page.locator("#status")).to_contain_text(CONNECTED + " · wc.zhangsan", timeout=15_000)
    assert p.page.evaluate("location.hash") == "" and p.page.url == wlive.http + "/"
    # the sign-in cookie was HttpOnly (the page never saw it) and is spent
    assert "claw_wecom" not in p.page.evaluate("document.cookie")
    names = {c["name"] for c in p.context.cookies()}
    assert "claw_wecom_signin" not in names and "claw_wecom_state" not in names, names
    bot = ask(p, "网页里问一个问题")
    expect(bot.locator(".meta")).to_contain_text("完成", timeout=10_000)
    p.shot("wecom-signed-in")
    p.page.click("#logoutBtn")  # 退出: signed out, and not sent straight back into WeCom's sign-in
    expect(p.page.locator("#signin")).to_be_visible()
    expect(p.page.locator("#q")).to_be_disabled()
    p.wait(lambda: p.open_sockets() == 0, what="the socket closed on 退出")
    assert p.page.evaluate("localStorage.getItem('claw_refresh')") is None
    assert p.page.url == wlive.http + "/"


def test_a_link_with_someone_elses_refresh_token_signs_nobody_in(wpages: Any, wlive: WeComLive) -> None:
    """Login CSRF: the attacker signs in (here: through the same WeCom flow as member "mallory") and sends a
    victim ``/#refresh=<mallory's refresh token>``. The page ignores it: the victim is not mallory."""
    wlive.call(lambda: setattr(wlive.fw, "oauth_user", ("userid", "mallory")))
    attacker = wpages(user_agent=WXWORK_UA)
    attacker.page.goto(wlive.http + "/")
    expect(attacker.page.locator("#status")).to_contain_text("wc.mallory", timeout=15_000)
    stolen = attacker.page.evaluate("localStorage.getItem('claw_refresh')")
    assert stolen

    victim = wpages()  # outside WeCom: no automatic sign-in, so the page's answer to the link shows
    victim.page.goto(f"{wlive.http}/#refresh={stolen}")
    expect(victim.page.locator("#signin")).to_be_visible(timeout=10_000)
    assert victim.page.evaluate("location.hash") == ""
    assert victim.page.evaluate("localStorage.getItem('claw_refresh')") is None
    assert "mallory" not in victim.page.locator("#status").inner_text()
    assert victim.open_sockets() == 0
    # and a forged "#signin=wecom" without the HttpOnly cookie is refused with a message, nothing more
    forged = wpages()
    forged.page.goto(f"{wlive.http}/#signin=wecom")
    expect(forged.page.locator("#signinError")).to_contain_text("企业微信登录已失效", timeout=10_000)
    assert forged.page.evaluate("localStorage.getItem('claw_refresh')") is None
    forged.errors.clear()  # the 401 of /auth/wecom/session is the expected console error
