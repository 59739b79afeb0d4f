"""The chat page in a real headless Chromium (Debian's ``chromium``, driven by Playwright; no browser download).

One browser and one whole system (edge + broker + node + fake LLM, ``tests/conftest.py`` run_system) per module.
The system runs in its own thread with its own event loop, so the tests use Playwright's sync API. Without
chromium (or Playwright) the tests are skipped, unless ``CLAW_REQUIRE_BROWSER=1`` (.ci/run) makes that a failure.
Screenshots go to ``$CLAW_ARTEFACTS`` (default ``tests/browser/artefacts/``, not committed).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_system

CHROMIUM = os.environ.get("CLAW_CHROMIUM", "/usr/bin/chromium")
REQUIRE = os.environ.get("CLAW_REQUIRE_BROWSER") == "1"
ARTEFACTS = Path(os.environ.get("CLAW_ARTEFACTS") or Path(__file__).with_name("artefacts"))
DEV_OPTIONS = {"dev": True, "wecom": False, "miniapp": False, "max_question": 8000}


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"CLAW_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (make install)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"no browser at {CHROMIUM} (Debian package chromium; scripts/system-deps.sh installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


class Live:
    """A whole system in a background thread: ``http`` is the edge's address, ``call`` runs a coroutine there."""

    def __init__(self, tmp: Path, pki: Path, **over: Any) -> None:
        self.tmp, self.pki, self.over = tmp, pki, over
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.sys: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> Live:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="claw-system", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the system did not start within 60 s")
        if self._error is not None:
            raise RuntimeError("the system did not start") from self._error
        return self

    async def _main(self) -> None:
        from fakes.llm import FakeLLMConfig

        try:
            async with run_system(self.tmp, self.pki, fake_cfg=FakeLLMConfig(), **self.over) as sys_:
                self.sys, self.loop, self._stop = sys_, asyncio.get_running_loop(), asyncio.Event()
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__ or __exit__
            self._error = exc
            self._ready.set()

    def __exit__(self, *exc: Any) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def http(self) -> str:
        return self.sys.http

    def call(self, fn: Callable[[], Any], timeout: float = 15) -> Any:
        """``fn()`` (a coroutine function or a plain one) run on the system's loop; its result."""
        async def run() -> Any:
            got = fn()
            return await got if asyncio.iscoroutine(got) else got
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def fake(self, **cfg: Any) -> Any:
        """Set the fake LLM's behaviour for the next questions (everything else back to its default)."""
        from fakes.llm import FakeLLMConfig

        def apply() -> Any:
            base = FakeLLMConfig()
            for name in ("ttft", "tokens_per_s", "token_chars", "reply", "n_tokens"):
                setattr(self.sys.fake.config, name, cfg.get(name, getattr(base, name)))
            return self.sys.fake.stats
        return self.call(apply)

    def close_sockets(self, uid: str, code: int) -> int:
        """Close every WebSocket of ``uid`` from the edge's side with ``code``; how many."""
        from edge.api import SESSIONS

        async def close() -> int:
            mine = [s for s in self.sys.app[SESSIONS] if s.uid == uid and not s.ws.closed]
            for s in mine:
                await s.ws.close(code=code, message=b"test")
            return len(mine)
        return self.call(close)

    def sessions(self, uid: str) -> int:
        """Open WebSockets of ``uid`` on the edge."""
        from edge.api import SESSIONS

        return self.call(lambda: sum(1 for s in self.sys.app[SESSIONS] if s.uid == uid and not s.ws.closed))

    # ---- plain HTTP from the test (urllib; loopback) ----
    def post(self, path: str, body: dict[str, Any], bearer: str | None = None) -> tuple[int, dict[str, Any]]:
        return self._req("POST", path, body, bearer)

    def get(self, path: str, bearer: str | None = None) -> tuple[int, dict[str, Any]]:
        return self._req("GET", path, None, bearer)

    def _req(self, method: str, path: str, body: Any, bearer: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def login(self, user: str) -> dict[str, Any]:
        status, got = self.post("/api/login", {"dev_user": user})
        assert status == 200, got
        return got


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path, browser: Any) -> Iterator[Live]:
    with Live(tmp_path_factory.mktemp("web"), pki_dir) as sys_:
        yield sys_


class Page:
    """One browser context + page on the edge, with what the tests watch: its WebSockets (and the frames it
    sent), and JavaScript errors."""

    def __init__(self, browser: Any, live: Live, options: dict[str, Any] | None = None, **ctx: Any) -> None:
        self.live = live
        self.context = browser.new_context(**({"viewport": {"width": 1000, "height": 760}} | ctx))
        self.page = self.context.new_page()
        self.sockets: list[Any] = []
        self.sent: list[str] = []
        self.received: list[str] = []
        self.errors: list[str] = []
        self.page.on("websocket", self._socket)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.options(options)

    def _socket(self, ws: Any) -> None:
        self.sockets.append(ws)
        ws.on("framesent", lambda payload: self.sent.append(payload if isinstance(payload, str) else ""))
        ws.on("framereceived", lambda payload: self.received.append(payload if isinstance(payload, str) else ""))

    def options(self, override: dict[str, Any] | None) -> None:
        """Answer ``GET /api/login/options`` with ``override``; without one, pass the edge's own answer through (an
        edge that does not have the endpoint yet answers 404: then what a dev-login edge says)."""
        def handle(route: Any) -> None:
            if override is not None:
                route.fulfill(json=override)
                return
            resp = route.fetch()
            if resp.status == 404:
                route.fulfill(json=DEV_OPTIONS)
            else:
                route.fulfill(response=resp)
        self.page.unroute("**/api/login/options")
        self.page.route("**/api/login/options", handle)

    def open_sockets(self) -> int:
        return sum(1 for ws in self.sockets if not ws.is_closed())

    def wait(self, cond: Callable[[], Any], timeout: float = 10, what: str = "condition") -> Any:
        """Poll ``cond`` (Python side) while letting Playwright deliver its events."""
        end = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not met within {timeout} s")
            self.page.wait_for_timeout(50)

    def shot(self, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=False)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def pages(browser: Any, live: Live) -> Iterator[Callable[..., Page]]:
    """``pages(options=None, **context_args)`` -> a new Page; all are closed after the test, which fails if one
    of them had a JavaScript error (or a console error the test did not expect: ``page.errors.clear()``)."""
    made: list[Page] = []

    def make(options: dict[str, Any] | None = None, **ctx: Any) -> Page:
        p = Page(browser, live, options, **ctx)
        made.append(p)
        return p
    yield make
    errors = [e for p in made for e in p.errors]
    for p in made:
        p.close()
    assert not errors, errors
