"""The progress display on stderr: a one-line bar while a level runs, a line per finished step."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "ticker"]


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def bar(self, label: str, done: float, total: float, extra: str = "") -> None:
        if not self.enabled or not self.tty:
            return
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        n = int(frac * 30)
        sys.stderr.write(f"\r  {label:<28} [{'#' * n}{'.' * (30 - n)}] {frac * 100:5.1f}% {extra:<40}")
        sys.stderr.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
        sys.stderr.write(f"  {text}\n")
        sys.stderr.flush()


async def ticker(p: Progress, label: str, total: float, extra: Callable[[], str]) -> None:
    t0 = time.monotonic()
    while True:
        p.bar(label, time.monotonic() - t0, total, extra())
        await asyncio.sleep(0.25)
