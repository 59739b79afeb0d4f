"""``ClawBroker``: the embedded broker's lifecycle, its in-process links and its credential sweep.

:class:`ClawBroker` is :class:`broker.amqtt_overrides.AmqttBroker` (amqtt with its traps fixed) plus what
SmartClaw adds around it: the recent-logins table loaded at construction and flushed at shutdown, the periodic
credential check (:mod:`broker.credsweep`), and the in-process links of the edge bridge (:mod:`broker.local`),
refused once shutdown has begun and closed by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from amqtt.contexts import BrokerConfig
from amqtt.errors import MQTTError

from broker.amqtt_overrides import AmqttBroker
from broker.credsweep import CredentialSweep
from broker.local import LocalLink

log = logging.getLogger(__name__)


class ClawBroker(AmqttBroker):
    """The embedded broker (see the module docstring). Build it inside a running loop."""

    def __init__(self, config: BrokerConfig | dict[str, Any], *, cred_check_interval: float = 2.0,
                 **limits: Any) -> None:
        """``limits``: the keyword arguments of :class:`~broker.amqtt_overrides.AmqttBroker` (max_packet ...)."""
        super().__init__(config, **limits)
        self.cred_check_interval = cred_check_interval
        self._sweep: CredentialSweep | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        if self.creds is not None:
            self._sweep = CredentialSweep(self.creds, lambda: self.sessions.values(), cred_check_interval)
            # the failed-login exemption of known (IP, username) pairs survives restarts
            n = self.creds.load_recent_logins()
            if n:
                log.info("loaded %d recent successful logins (failed-login throttle exemption)", n)
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.transitions.state == "started" and not self._stopping

    async def start(self) -> None:
        """amqtt's start (listeners, broadcast loop), then the credential sweep."""
        await super().start()
        if self._sweep is not None:
            self._sweep_task = asyncio.create_task(self._sweep.run(), name="broker-cred-sweep")

    def refuse_links(self) -> None:
        """From now on no new in-process link is attached (:meth:`shutdown` calls it first, so a bridge
        reconnecting while the broker stops gets an error, not a link nobody would close)."""
        self._stopping = True

    async def shutdown(self) -> None:
        """Links refused and closed, the sweep stopped, amqtt's shutdown, the recent logins flushed."""
        self.refuse_links()
        for link in list(self._local_links):
            link.close()
        self._local_links.clear()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweep_task
            self._sweep_task = None
        try:
            await super().shutdown()
        finally:
            if self.creds is not None:
                with contextlib.suppress(Exception):
                    await self.creds.flush_logins()

    # -- revoked or replaced credentials (docs/broker.md "Revoking a credential") ----------------------------

    async def check_credentials(self) -> int:
        """Close the connected sessions whose credential changed since their login; returns how many."""
        return 0 if self._sweep is None else await self._sweep.check()

    # -- the in-process link (broker/local.py) -------------------------------------------------------------

    def attach_local(self, link: LocalLink) -> None:
        if not self.running:
            raise MQTTError("the embedded broker is stopping")
        if link not in self._local_links:
            self._local_links.append(link)

    def detach_local(self, link: LocalLink) -> None:
        if link in self._local_links:
            self._local_links.remove(link)

    def local_publish(self, topic: str, data: bytes) -> None:
        """A message from the in-process link, broadcast like a client's (no wildcard, no ``$``)."""
        if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
            raise ValueError(f"not a topic to publish to: {topic[:200]!r}")
        self.enqueue_broadcast(None, topic, data, 1)
