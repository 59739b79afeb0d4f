"""A rate limit for repeated warnings: at most one record per ``every`` seconds per kind, the next one saying
how many were left out (refused or malformed input must not flood the node's log)."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["LOG_EVERY_S", "LogLimit"]

LOG_EVERY_S = 10.0  # a warning about refused or malformed input is logged at most this often per kind


class LogLimit:
    """At most one record per ``every`` seconds per kind, to ``logger``; the next one says how many were left
    out."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY_S) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, fmt, *args)

    def info(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.INFO, kind, fmt, *args)

    def log(self, level: int, kind: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        last, skipped = self._last.get(kind, (float("-inf"), 0))
        if now - last < self.every:
            self._last[kind] = (last, skipped + 1)
            return
        self._last[kind] = (now, 0)
        if skipped:
            fmt += " (%d more like it in the last %.0f s not logged)"
            args = (*args, skipped, now - last)
        self.logger.log(level, fmt, *args)
