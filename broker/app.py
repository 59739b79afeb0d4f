"""``run_broker(settings)``: build, start and stop the embedded MQTT broker; its :class:`BrokerHandle`.

:func:`run_broker` installs the amqtt log filters (:mod:`broker.logfilters`), builds the config from
:class:`core.config.Settings` (:mod:`broker.listeners`), starts a :class:`broker.clawbroker.ClawBroker` with the
``broker.*`` limits and a fresh password for the edge's own user, and yields a :class:`BrokerHandle` with the
ports the listeners actually bound (port 0 works for both: amqtt passes it straight to ``asyncio.start_server``).
Every failure to start is a :class:`BrokerStartError` naming the listener and the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from amqtt.errors import BrokerError

from broker.clawbroker import ClawBroker
from broker.listeners import BrokerStartError, build_config
from broker.logfilters import install_log_filter
from core.config import Settings

log = logging.getLogger(__name__)

__all__ = ["INTERNAL_USER", "BrokerHandle", "BrokerStartError", "ClawBroker", "run_broker"]


@dataclass(frozen=True)
class BrokerHandle:
    broker: ClawBroker
    local_host: str
    local_port: int  # plain loopback listener for the edge's own client
    tls_host: str | None
    tls_port: int | None  # actual bound port of the TLS listener
    internal_user: str
    internal_password: str  # edge's in-process credential (never logged)

    def __repr__(self) -> str:
        return (f"BrokerHandle(local={self.local_host}:{self.local_port}, tls={self.tls_host}:{self.tls_port}, "
                f"internal_user={self.internal_user!r}, internal_password='***')")


INTERNAL_USER = "edge"


@contextlib.asynccontextmanager
async def run_broker(settings: Settings) -> AsyncIterator[BrokerHandle]:
    """Start the broker for ``settings``, yield its handle, shut it down on exit.

    Raises BrokerStartError (a ValueError) naming the listener and the cause when it cannot start.
    """
    install_log_filter()
    internal_password = secrets.token_urlsafe(32)
    internal_hash = hashlib.sha256(internal_password.encode()).hexdigest()
    cfg = build_config(settings, internal_user=INTERNAL_USER, internal_hash=internal_hash)
    try:
        b = settings.broker
        broker = ClawBroker(cfg, max_packet=b.max_packet, max_drop=b.max_drop, max_keepalive=b.max_keepalive,
                            max_connections=b.max_connections, max_connections_per_ip=b.max_connections_per_ip,
                            max_inflight=b.max_inflight, max_queued=b.max_queued,
                            device_publish_rate=b.device_publish_rate,
                            device_publish_burst=b.device_publish_burst,
                            cred_check_interval=b.cred_check_interval)
    except Exception as exc:  # plugin load (e.g. LMDB cannot be opened)
        raise BrokerStartError(f"broker cannot be created: {exc}") from exc
    try:
        await broker.start()
    except BrokerError as exc:
        with contextlib.suppress(Exception):
            await broker.plugins_manager.close()
        raise BrokerStartError(f"broker failed to start: {exc.__cause__ or exc}") from exc

    try:
        local = broker.bound_address("local")
        tls = broker.bound_address("tls") if settings.broker.listen else None
        if local is None or (settings.broker.listen and tls is None):
            raise BrokerStartError("broker started but a listener has no bound socket")
        handle = BrokerHandle(broker=broker, local_host=local[0], local_port=local[1],
                              tls_host=tls[0] if tls else None, tls_port=tls[1] if tls else None,
                              internal_user=INTERNAL_USER, internal_password=internal_password)
        log.info("MQTT broker listening: local %s:%s%s", local[0], local[1],
                 f", TLS {tls[0]}:{tls[1]}" if tls else " (no TLS listener)")
        yield handle
    finally:
        await broker.shutdown()
        log.info("MQTT broker stopped")
