"""core.runtime is the one place that picks the event loop and reads the wall clock in microseconds."""

from __future__ import annotations

import sys
import time

import pytest

from core.runtime import loop_factory, now_us


def test_loop_factory_uvloop_where_installed_else_default() -> None:
    assert loop_factory("asyncio") is None
    factory = loop_factory()
    if sys.platform == "win32":
        assert factory is None
    else:
        uvloop = pytest.importorskip("uvloop")
        assert factory is uvloop.new_event_loop
        loop = factory()
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_now_us_is_the_wall_clock_in_microseconds() -> None:
    before = time.time_ns() // 1000
    got = now_us()
    after = time.time_ns() // 1000
    assert isinstance(got, int) and before <= got <= after
