"""aiomqtt client construction and the reconnect loop shared by the edge and the node.

Facts designed around (docs/broker.md): aiomqtt never reconnects by itself, a ``Client`` is
reusable but not re-entrant, Nagle's algorithm turns a QoS 1 round trip into ~88 ms unless
``TCP_NODELAY`` is set, and every publish beyond ``pending_calls_threshold`` logs a warning.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt
from aiomqtt.client import ProtocolVersion

from .config import MqttSettings
from .runtime import Backoff

log = logging.getLogger(__name__)

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def tls_context(ca_file: str | Path) -> ssl.SSLContext:
    """Client TLS context that verifies the broker against our private CA (never disabled)."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load CA file {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def make_client(
    *,
    host: str,
    port: int,
    username: str,
    password: str,
    identifier: str,
    tls: ssl.SSLContext | None = None,
    keepalive: int = 20,
    will: aiomqtt.Will | None = None,
    max_queued: int = 10000,
    clean_session: bool = True,
) -> aiomqtt.Client:
    client = aiomqtt.Client(
        hostname=host,
        port=port,
        username=username or None,
        password=password or None,
        identifier=identifier,
        protocol=ProtocolVersion.V311,
        clean_session=clean_session,
        keepalive=keepalive,
        will=will,
        tls_context=tls,
        tls_insecure=False if tls is not None else None,
        socket_options=NODELAY,
        max_queued_incoming_messages=max_queued,
        max_inflight_messages=1000,
        timeout=10,
    )
    client.pending_calls_threshold = 100000
    return client


def client_from_settings(m: MqttSettings, *, identifier: str, data_dir: str | Path,
                         will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    from core.guard import client_id_ok  # pure (no amqtt): the embedded broker's client-id rule

    if m.client_id and m.username and not client_id_ok(m.username, m.client_id):
        log.warning("mqtt.client_id %r is neither the username %r nor '%s:<suffix>': the embedded broker refuses "
                    "it (CONNACK 2, identifier rejected)", m.client_id, m.username, m.username)
    tls = tls_context(m.ca_file or Path(data_dir) / "pki" / "ca.crt") if m.tls else None
    return make_client(host=m.host, port=m.port, username=m.username, password=m.password,
                       identifier=m.client_id or identifier, tls=tls, keepalive=m.keepalive, will=will,
                       max_queued=m.max_queued)


async def run_forever(
    client: aiomqtt.Client,
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    *,
    name: str,
    backoff: Backoff,
    on_disconnect: Callable[[], None] | None = None,
) -> None:
    """Run ``session(client)`` inside ``async with client`` forever, reconnecting with backoff."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            async with client:
                log.info("%s: connected to MQTT broker %s:%s", name, client._hostname, client._port)
                await session(client)
        except aiomqtt.MqttCodeError as exc:
            rc = getattr(exc, "rc", None)
            hint = ""
            if rc in (4, 5, 134, 135):
                hint = " (bad username/password or not authorised)"
            elif rc in (2, 133):
                hint = (" (client id rejected: it must be the username or '<username>:<suffix>'; check "
                        "mqtt.client_id)")
            elif rc in (3, 136):
                hint = " (server unavailable: busy, or too many failed logins; retrying)"
            log.warning("%s: MQTT connection refused or lost: %s%s", name, exc, hint)
        except aiomqtt.MqttError as exc:
            log.warning("%s: MQTT connection lost: %s", name, exc)
        finally:
            if on_disconnect is not None:
                on_disconnect()
        if loop.time() - started > 10:
            backoff.reset()
        delay = backoff.next()
        log.info("%s: reconnecting in %.1f s", name, delay)
        await asyncio.sleep(delay)
