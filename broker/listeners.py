"""The embedded broker's listeners: the amqtt ``BrokerConfig`` for :class:`core.config.Settings`.

Listeners: ``default`` is an unbound template (amqtt copies its fields into every other listener); ``local`` is
plain MQTT on ``broker.local_listen`` (loopback) for local tools and tests; ``tls`` is MQTT over TLS on
``broker.listen`` (if non-empty) for nodes and devices, its certificate and key checked here so a missing or
broken file is a clear :class:`BrokerStartError`. Plugins: only ours (auth + topic ACL); no loggers, no ``$SYS``.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Any

from amqtt.contexts import BrokerConfig

from core.config import Settings

log = logging.getLogger(__name__)

AUTH_PLUGIN = "broker.plugins.auth.ClawAuthPlugin"
TOPIC_PLUGIN = "broker.plugins.acl.ClawTopicPlugin"


class BrokerStartError(ValueError):
    """The broker could not start (a listener cannot bind, a certificate is missing ...); names the cause."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_config(settings: Settings, *, internal_user: str, internal_hash: str) -> BrokerConfig:
    """The amqtt BrokerConfig for ``settings`` (checks the TLS files; raises BrokerStartError)."""
    b = settings.broker
    data_dir = Path(settings.data_dir)
    listeners: dict[str, dict[str, Any]] = {
        "default": {"type": "tcp", "bind": None},  # unbound template: other listeners inherit unset fields
        "local": {"type": "tcp", "bind": b.local_listen},
    }
    host = b.local_listen.rpartition(":")[0]
    if not _is_loopback(host):
        log.warning("broker.local_listen %s is not a loopback address: plain MQTT (passwords in clear) is "
                    "reachable from the network", b.local_listen)
    if b.listen:
        cert = Path(b.cert_file) if b.cert_file else data_dir / "pki" / "server.crt"
        key = Path(b.key_file) if b.key_file else data_dir / "pki" / "server.key"
        for what, path in (("certificate", cert), ("key", key)):
            if not path.is_file():
                raise BrokerStartError(f"TLS listener 'tls' ({b.listen}): {what} file {path} not found "
                                       f"(set broker.cert_file/broker.key_file or create the PKI)")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerStartError(f"TLS listener 'tls' ({b.listen}): cannot load certificate {cert} "
                                   f"with key {key}: {exc}") from None
        listeners["tls"] = {"type": "tcp", "bind": b.listen, "ssl": True, "certfile": str(cert),
                            "keyfile": str(key)}
    cfg = BrokerConfig.from_dict({
        "listeners": listeners,
        "session_expiry_interval": b.session_expiry,
        "plugins": {
            AUTH_PLUGIN: {"data_dir": str(data_dir), "internal_user": internal_user,
                          "internal_hash": internal_hash, "auth_queue": b.auth_queue},
            TOPIC_PLUGIN: {},
        },
    })
    # ListenerConfig.apply() replaces any field equal to its dataclass default with the template's value, so
    # a bind of exactly "0.0.0.0:1883" would become None (unbound): set the binds again explicitly.
    for name, spec in listeners.items():
        if name != "default":
            cfg.listeners[name].bind = spec["bind"]
    return cfg
