"""The LM Studio client's connection pool: :class:`LLMClient` opens connections (``http`` or ``https``) and
keeps the kept-alive ones, reusing the most recently used one while it has been idle less than ``IDLE_S``."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from .http1 import Conn

__all__ = ["IDLE_S", "MAX_IDLE", "LLMClient", "Key"]

IDLE_S = 2.0  # a kept-alive connection idle longer than this is closed, not reused (servers close at ~5 s)
MAX_IDLE = 1024  # kept-alive connections per server at most

Key = tuple[str, int, bool]  # (host, port, tls)


class LLMClient:
    """The node's HTTP/1.1 client for LM Studio: keep-alive connections (``http`` or ``https``), reused while
    idle less than ``IDLE_S``. Create it in the running loop; :meth:`close` when done."""

    def __init__(self) -> None:
        self._idle: dict[Key, deque[tuple[Conn, float]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self.connects = 0  # new connections opened (the rest were reused)

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn, _ in idle:
                conn.close()
        self._idle.clear()

    def _take(self, key: Key, now: float) -> Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn, since = idle.pop()
            if conn.open() and now - since < IDLE_S:
                while idle and now - idle[0][1] >= IDLE_S:  # the oldest are stale too
                    idle.popleft()[0].close()
                return conn
            conn.close()
        return None

    def take(self, key: Key, now: float) -> Conn | None:
        """A kept-alive connection to ``key`` idle less than ``IDLE_S`` at loop time ``now``, or None."""
        return self._take(key, now)

    def put(self, key: Key, conn: Conn, now: float) -> None:
        """Keep ``conn`` (done with its last response, reusable) for the next request to ``key``."""
        idle = self._idle.setdefault(key, deque())
        if len(idle) >= MAX_IDLE:
            idle.popleft()[0].close()
        idle.append((conn, now))

    async def connect(self, key: Key, timeout: float) -> Conn:
        """A new connection to ``key`` (raises OSError, ssl.SSLError, ValueError or TimeoutError)."""
        host, port, tls = key
        loop = asyncio.get_running_loop()
        ctx = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(Conn, host, port, ssl=ctx,
                                                   server_hostname=host if tls else None)
        self.connects += 1
        return conn
