"""Process plumbing: logging set-up, uvloop, signal-driven stop."""

from __future__ import annotations

import asyncio
import gc
import logging.config
import os
import random
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


def configure_logging(level: str = "INFO") -> None:
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                 "datefmt": "%H:%M:%S"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "amqtt": {"level": "WARNING"},
            "transitions": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},
            "aiohttp.access": {"level": "WARNING"},
        },
    })


# A server process allocates a few dicts and objects per relayed chunk; with Python's default (700, 10, 10) the
# cyclic collector runs a young collection every 700 net allocations and a full one every 100 of those, walking
# every live object (amqtt's, aiohttp's, the live tasks'). These thresholds still collect young garbage every
# 50 000 allocations and run a full collection at most every 100 M (the A/B figures: docs/performance.md).
GC_THRESHOLD = (50_000, 20, 100)


def tune_gc() -> None:
    """The collector thresholds of a server process (edge, node, the bench's processes)."""
    gc.set_threshold(*GC_THRESHOLD)


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch (the unit of every timestamp on the wire)."""
    return time.time_ns() // 1000


def loop_factory(kind: str = "uvloop") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``kind``: ``"uvloop"`` where it is installed (Linux/macOS), else ``None`` (the
    default asyncio loop, e.g. on Windows or with ``kind="asyncio"``)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # Windows
            return None
        return uvloop.new_event_loop
    return None


def run(main: Callable[[], Awaitable[T]], kind: str = "uvloop") -> T:
    """Run ``main()`` on :func:`loop_factory` ``(kind)``'s loop with the server's collector thresholds
    (:func:`tune_gc`)."""
    tune_gc()
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main())  # type: ignore[arg-type]


def stop_event() -> asyncio.Event:
    """An event set by SIGINT/SIGTERM (Ctrl-C on Windows raises KeyboardInterrupt instead)."""
    ev = asyncio.Event()
    loop = asyncio.get_running_loop()
    if sys.platform != "win32":
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, ev.set)
    return ev


async def start_http(app: web.Application, listen: str, what: str,
                     on_setup: Callable[[web.AppRunner], None] | None = None,
                     **server_kwargs: Any) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``listen`` (``HOST:PORT``, port 0 = any free one): (its runner, the bound port).
    An address in use (or not ours) is a RuntimeError naming ``what``, never a traceback. ``server_kwargs`` go
    to aiohttp's request handler (e.g. ``keepalive_timeout``, ``logger``); ``on_setup(runner)`` runs before
    the socket is bound."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **server_kwargs)
    await runner.setup()
    if on_setup is not None:
        on_setup(runner)
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host, int(port), reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise RuntimeError(f"{what}: cannot listen on {listen}: {exc.strerror}") from None
    sockets = getattr(site._server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1] if sockets else int(port)


class Backoff:
    """Exponential backoff with full jitter, reset after a connection that lasted."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi, self.n = lo, hi, 0

    def next(self) -> float:
        delay = min(self.hi, self.lo * (2 ** self.n))
        self.n = min(self.n + 1, 30)
        return random.uniform(self.lo, delay) if delay > self.lo else delay

    def reset(self) -> None:
        self.n = 0


def claw_command() -> str:
    """How the user can run ``claw`` again from the shell this process was started from.

    ``claw`` when the ``claw`` on PATH is this very program; else the path of the running script (relative
    to the working directory when it is under it, e.g. ``.venv/bin/claw`` after ``make demo``); else, when
    started as ``python -m claw.cli``, that command with this interpreter.
    """
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.stem == "claw" and script.exists():
        on_path = shutil.which("claw")
        if on_path is not None and Path(on_path).resolve() == script.resolve():
            return "claw"
        return _shell_path(script.absolute(), Path.cwd())
    return f"{_shell_path(Path(sys.executable), Path.cwd())} -m claw.cli"


def _shell_path(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when it is inside it (``.venv/bin/claw``), else absolute; quoted for a shell."""
    try:
        text = str(path.relative_to(cwd))
        if os.sep not in text:
            text = f".{os.sep}{text}"  # a bare name would be looked up on PATH
    except ValueError:
        text = str(path)
    if os.name == "nt":
        return f'"{text}"' if " " in text else text
    return shlex.quote(text)
