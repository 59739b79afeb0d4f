"""``serve()`` for server B's node process."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from core.config import Settings

from .worker import Node

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    node = Node(settings)
    task = asyncio.create_task(node.run(), name="node")
    waiter = asyncio.create_task((stop or asyncio.Event()).wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        # Also reached when the main task is cancelled (Ctrl-C on Windows): still drain.
        log.info("node %s: stopping", settings.node.id)
        waiter.cancel()
        if not task.done():
            try:
                await node.shutdown()
            except Exception:  # a failed goodbye must not keep the process up
                log.exception("node %s: graceful stop failed", settings.node.id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("node %s: stopped", settings.node.id)
