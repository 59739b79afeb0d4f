"""The embedded MQTT broker (amqtt 0.12.1, pinned ``>=0.12,<0.13``) with SmartClaw's hardening.

:func:`run_broker` builds the config from :class:`core.config.Settings`, starts :class:`ClawBroker` and yields a
:class:`BrokerHandle` with the actual bound ports (port 0 works for both listeners: amqtt passes it straight to
``asyncio.start_server`` and we read the port back from ``Server.instance.sockets``).

Listeners: ``default`` is an unbound template (amqtt copies its fields into every other listener);
``local`` is plain MQTT on ``broker.local_listen`` (loopback) for the edge's own client; ``tls`` is MQTT over
TLS on ``broker.listen`` (if non-empty) for nodes and devices. Plugins: only ours (auth + topic ACL); no
loggers, no ``$SYS``.

amqtt traps (docs/broker.md) and what :class:`ClawBroker` does about them, each pinned by a test in
``tests/integration/test_broker.py``:

(a) Retained messages leak to every connecting client without an ACL check -> retained messages are disabled:
    :meth:`ClawBroker.retain_message` drops them (logged once) and the retained-on-subscribe/connect replay is
    a no-op. A retained publish is still delivered live, with RETAIN=0. Offline-queued messages (persistent
    sessions) are sent with RETAIN=0 instead of amqtt's RETAIN=1.
(b) A PUBLISH to a ``$…``/wildcard/empty topic left a half-dead zombie connection -> the connection is closed
    (through the normal disconnect path, so the will fires and the session is marked disconnected).
(c) Takeover: amqtt ran the session logic *before* authentication, so an unauthenticated CONNECT reusing a
    client id deleted (clean session) or hijacked (persistent session) the victim's session, and a clean-session
    takeover left the old connection open as a zombie. -> ``_initialize_client_session`` authenticates first;
    a client id must belong to the credential (:func:`core.guard.client_id_ok`: the username or
    ``<username>:<suffix>``; an empty one gets ``<username>:<random>``), else CONNACK 2; on takeover it closes
    the old connection and waits until its session is disconnected (will sent) before the new one is set up.
(d) No maximum packet size on TCP (256 MB), and amqtt reads a packet in many small reads -> the socket is read
    through :class:`broker.reader.PacketReader`, which checks every packet's remaining length before reading its
    body (CONNECT and other control packets 64 KiB; a PUBLISH payload ``broker.max_packet``: a bigger one up to
    ``broker.max_drop`` is read, dropped and acknowledged, beyond that the connection is closed).
(e) A bare TCP connect-and-close (health check) was logged at ERROR -> logged at DEBUG by our own
    ``_client_connected``; a :class:`logging.Filter` on the ``amqtt.broker`` logger demotes amqtt's own line
    should it still be emitted. A client that sends no CONNECT within ``CONNECT_TIMEOUT`` s is dropped (an
    MQTT 5 CONNECT, which amqtt misparses and never answers, ends this way too).
(f) Keepalive was not enforced (half-open clients stayed forever, their will never fired) -> a client silent
    for 1.5 x its keepalive is disconnected and its will published (:class:`_ClawHandler`).

(g) Session semantics (MQTT 3.1.1): unacknowledged QoS 1 messages were forgotten after a 5 s PUBACK timeout
    and never re-sent on resume; offline queues were unbounded; a clean-session connection's session outlived
    it (a clean-session-0 CONNECT right after reported session present = 1 and resumed it); delivery used the
    subscription's QoS instead of min(publish QoS, granted QoS). -> outgoing messages go through one
    :class:`broker.session.Outbox` per session (window ``broker.max_inflight``, queue ``broker.max_queued``,
    re-send with DUP=1 on resume, in order); a clean session is discarded when its connection ends; delivery
    QoS is min(publish, granted) and the broker grants at most QoS 1.
(h) A device could flood the nodes with tasks -> per-device token bucket (:mod:`broker.ratelimit`,
    ``broker.device_publish_rate`` / ``broker.device_publish_burst``): over the rate a PUBLISH is
    acknowledged and dropped. (g) and (h) are pinned in ``tests/integration/test_broker_sessions.py``.

Connection hygiene (docs/broker.md "Limits"): a keepalive of 0 or above ``broker.max_keepalive`` is treated as
``max_keepalive``; ``broker.max_connections``/``max_connections_per_ip`` close extra connections at once
(amqtt's own ``max_connections`` makes them hang: not set); failed logins are throttled and the number of
password checks waiting is bounded (:class:`core.guard.AuthThrottle`, CONNACK 3); full outgoing queues, oversize
drops and refusals are counted (:attr:`ClawBroker.counters`) and logged at most once a minute per kind.

Revoked or replaced credentials (docs/broker.md "Revoking a credential"): every ``broker.cred_check_interval`` s
the broker reads the credential store's generation counter (bumped by ``claw cred add/revoke`` in any process);
after a change, connected sessions whose credential record is gone or different from the one read at their
login are closed through the normal disconnect path (:meth:`ClawBroker.check_credentials`). The edge's own user
is exempt.

Not fixed here (documented in docs/broker.md): no session survives a broker restart, ``max_connections`` makes
extra clients hang (we do not set it), MQTT 5 / ``$share`` are unsupported, outgoing QoS 2 is not offered.

Performance: the topic ACL is evaluated inline (no amqtt task per plugin call), memoised in
:func:`broker.acl.allowed`; a publish looks up exact-topic subscriptions by dict and scans only wildcard
filters, instead of every filter of every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import OutgoingApplicationMessage, Session

from broker import acl
from broker.creds import CredentialStore
from core.guard import CLIENT_ID_RULE, ConnectionLimiter, Counters, LogBudget, RateLimitedLog, client_id_ok
from broker.local import LocalLink
from broker.plugins import REFUSE_KEY, ROLE_KEY
from broker.plugins.acl import ClawTopicPlugin
from broker.plugins.auth import ClawAuthPlugin
from broker.ratelimit import RateLimiter
from broker.reader import PacketReader, PacketTooLargeError, ProtocolViolation
from broker.session import MAX_QOS, OUTBOX_KEY, Outbox
from core.config import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds a new connection may take to send its CONNECT
TAKEOVER_TIMEOUT = 2.0  # seconds to wait for a taken-over connection to finish its disconnect
_PREAUTH_KEY = "claw.preauth"  # session.attributes: result of the early authentication
_CRED_KEY = "claw.cred"  # session.attributes: (credential generation, record fingerprint) read at login
LOGIN_REFRESH = 60.0  # seconds between refreshes of the connected sessions' "recent good login" entries
AUTH_PLUGIN = "broker.plugins.auth.ClawAuthPlugin"
TOPIC_PLUGIN = "broker.plugins.acl.ClawTopicPlugin"


class BrokerStartError(ValueError):
    """The broker could not start (a listener cannot bind, a certificate is missing ...); names the cause."""


class _ConnectRefused(Exception):
    """CONNECT refused and already answered/logged."""


class _NoConnect(Exception):
    """The peer never sent a usable CONNECT (health check, port scan, garbage, timeout)."""


class _ClawHandler(BrokerProtocolHandler):
    """amqtt's broker protocol handler, but a client silent for 1.5 x its keepalive is disconnected.

    amqtt's reader loop already waits for each packet with ``timeout=session.keep_alive`` and then calls
    ``handle_read_timeout()``, which amqtt leaves empty; we set ``keep_alive`` to 1.5 x the client's value
    [MQTT-3.1.2-24] and close the connection here, through the normal disconnect path (the will fires).
    """

    _expiry_task: asyncio.Task[None] | None = None

    def handle_read_timeout(self) -> None:
        if self._expiry_task is None:
            session = self.session
            log.info("client %r (user %r) silent for longer than 1.5 x keepalive: closing its connection",
                     session.client_id if session else None, session.username if session else None)
            self._expiry_task = asyncio.get_running_loop().create_task(self.handle_connection_closed())

    async def handle_publish(self, publish_packet: Any) -> None:
        # Both QoS bits set is malformed [MQTT-3.3.1-4]: close the connection. amqtt kept it open and its
        # publish task failed with a traceback logged at ERROR ("never retrieved"), one per such packet.
        if publish_packet.qos == 3:
            session = self.session
            log.info("client %r (user %r) sent a PUBLISH with QoS 3: closing its connection",
                     session.client_id if session else None, session.username if session else None)
            await self.handle_connection_closed()  # will, session disconnected (as for a bad topic) ...
            if self.writer is not None:  # ... and the socket (else it stays open until the peer closes it)
                with contextlib.suppress(Exception):
                    await self.writer.close()
            return
        await super().handle_publish(publish_packet)


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's filter -> subscribers dict, with a version bumped whenever the set of filters changes."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def __setitem__(self, key: str, value: list[tuple[Session, int]]) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.version += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> tuple[str, list[tuple[Session, int]]]:
        self.version += 1
        return super().popitem()

    def setdefault(self, key: str, default: Any = None) -> Any:
        self.version += 1
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)


class _HealthCheckNoise(logging.Filter):
    """Demote amqtt's ERROR/WARNING lines for connections that never sent a CONNECT to DEBUG."""

    _PREFIXES = ("No data from", "Failed to initialize client session: No more data",
                 "Failed to initialize client session: No data")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and isinstance(record.msg, str) and \
                record.msg.startswith(self._PREFIXES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class _HandlerNoise(logging.Filter):
    """Demote amqtt's per-event lines that ClawBroker counts and logs rate-limited itself (a PUBACK timeout per
    message; the close after an oversize or malformed packet) to DEBUG."""

    _MARKS = ("Timeout waiting for PUBACK", "PacketTooLargeError", "ProtocolViolation")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and isinstance(record.msg, str) and \
                any(m in record.msg for m in self._MARKS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class _AmqttFlood(logging.Filter):
    """At most 5 WARNING-or-worse lines a minute per amqtt logger and level (10 at once): amqtt logs some
    events a client can repeat at will (a corrupt TLS record, a protocol error) once per connection, with the
    exception in the text. Lines left out are counted in the next line let through."""

    def __init__(self) -> None:
        super().__init__()
        self._budgets: dict[int, LogBudget] = {}  # per level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        budget = self._budgets.get(record.levelno)
        if budget is None:
            budget = self._budgets[record.levelno] = LogBudget(None, per_minute=5, burst=10)
        left_out = budget.take()
        if left_out is None:
            return False
        if left_out:
            record.msg = f"{record.getMessage()} ({left_out} similar lines left out before this one)"
            record.args = None
        return True


def install_log_filter() -> None:
    """Demote health-check noise on ``amqtt.broker`` and counted events on amqtt's protocol handler; quiet
    ``transitions`` (INFO lines on every CONNECT) unless the application configured that logger itself."""
    amqtt_log = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _HealthCheckNoise) for f in amqtt_log.filters):
        amqtt_log.addFilter(_HealthCheckNoise())
    handler_log = logging.getLogger("amqtt.mqtt.protocol.handler")
    if not any(isinstance(f, _HandlerNoise) for f in handler_log.filters):
        handler_log.addFilter(_HandlerNoise())
    for name in [n for n in list(logging.root.manager.loggerDict) if n == "amqtt" or n.startswith("amqtt.")]:
        amqtt_logger = logging.getLogger(name)
        if not any(isinstance(f, _AmqttFlood) for f in amqtt_logger.filters):
            amqtt_logger.addFilter(_AmqttFlood())  # after the demotions above
    transitions_log = logging.getLogger("transitions")
    if transitions_log.level == logging.NOTSET:
        transitions_log.setLevel(logging.WARNING)


BROADCAST_YIELD_EVERY = 16  # the broadcast loop lets the event loop run at least this often while a backlog drains


class ClawBroker(Broker):
    """amqtt Broker with the traps listed in the module docstring fixed. Build it inside a running loop."""

    def __init__(self, config: BrokerConfig | dict[str, Any], *, max_packet: int = 1024 * 1024,
                 max_drop: int = 16 * 1024 * 1024, max_keepalive: int = 300, max_connections: int = 0,
                 max_connections_per_ip: int = 0, max_inflight: int = 32, max_queued: int = 1000,
                 device_publish_rate: float = 0.0, device_publish_burst: int = 20,
                 cred_check_interval: float = 2.0) -> None:
        super().__init__(config)
        self.max_packet = max_packet
        self.max_drop = max_drop
        self.max_keepalive = max_keepalive
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.device_limiter = RateLimiter(device_publish_rate, device_publish_burst)
        self.counters = Counters()
        self._ratelog = RateLimitedLog(log)
        self._refusal_log = LogBudget(log)  # refused client ids: 20 lines a minute at most
        self._limiter = ConnectionLimiter(max_connections, max_connections_per_ip)
        self.cred_check_interval = cred_check_interval
        self._creds: CredentialStore | None = None
        self._internal_user: str | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        for plugin in self.plugins_manager.plugins:
            if isinstance(plugin, ClawAuthPlugin):
                plugin.counters = self.counters  # one set of counters for the whole broker
                self._creds, self._internal_user = plugin.store, plugin.internal_user
        if self._creds is not None:  # the failed-login exemption of known (IP, username) pairs survives restarts
            n = self._creds.load_recent_logins()
            if n:
                log.info("loaded %d recent successful logins (failed-login throttle exemption)", n)
        self._subscriptions = _Subscriptions()
        self._wild: list[str] = []
        self._wild_version = -1
        self._retain_warned = False
        topic_plugins = [p for p in self.plugins_manager.plugins if isinstance(p, BaseTopicPlugin)]
        # evaluate the ACL inline when ours is the only topic plugin (amqtt makes a task per plugin per check)
        self._fast_acl = bool(topic_plugins) and all(isinstance(p, ClawTopicPlugin) for p in topic_plugins)
        self._local_links: list[LocalLink] = []
        self._stopping = False

    # -- the in-process link (broker/local.py) -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.transitions.state == "started" and not self._stopping

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
        self._broadcast_queue.put_nowait({"session": None, "topic": topic, "data": data, "qos": 1})

    async def start(self) -> None:
        await super().start()
        if self._creds is not None:
            self._sweep_task = asyncio.create_task(self._cred_sweep(), name="broker-cred-sweep")

    async def shutdown(self) -> None:
        self._stopping = True  # no new in-process link from here on (a reconnecting bridge is refused)
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
            if self._creds is not None:
                with contextlib.suppress(Exception):
                    await self._creds.flush_logins()

    # -- revoked or replaced credentials (docs/broker.md "Revoking a credential") ----------------------------

    async def _cred_sweep(self) -> None:
        """Every ``cred_check_interval`` s: one LMDB read of the credential generation; connected sessions that
        logged in before the last change are re-checked, and closed if their credential was revoked or
        replaced. Once a minute the connected sessions also refresh their "recent good login" entries."""
        last_refresh = time.monotonic()
        failed = False
        while True:
            await asyncio.sleep(self.cred_check_interval)
            try:
                await self.check_credentials()
                if time.monotonic() - last_refresh >= LOGIN_REFRESH:
                    last_refresh = time.monotonic()
                    self._refresh_logins()
                failed = False
            except Exception:  # e.g. LMDB unreadable: keep trying, log once per failure streak
                if not failed:
                    log.exception("broker: checking the connected sessions' credentials failed")
                failed = True

    async def check_credentials(self) -> int:
        """Close the connected sessions whose credential changed since their login; returns how many."""
        store = self._creds
        if store is None:
            return 0
        gen = store.generation()
        stale: list[tuple[Session, BrokerProtocolHandler, bool]] = []
        for session, handler in list(self._sessions.values()):
            seen = session.attributes.get(_CRED_KEY)
            if seen is None or seen[0] == gen or not session.transitions.is_connected():
                continue
            now = store.state(session.username or "")
            if now[1] == seen[1]:
                session.attributes[_CRED_KEY] = now  # unchanged: not re-read until the next change
            else:
                stale.append((session, handler, now[1] is None))
        for session, handler, revoked in stale:
            if not session.transitions.is_connected() or handler is None:
                continue
            log.warning("closing connection of client %r (user %r) from %s: its credential was %s",
                        session.client_id, session.username, session.remote_address,
                        "revoked" if revoked else "replaced")
            await handler.handle_connection_closed()  # the normal path: will, session disconnected
            if handler.writer is not None:
                with contextlib.suppress(Exception):
                    await handler.writer.close()
        return len(stale)

    def _refresh_logins(self) -> None:
        store = self._creds
        if store is None:
            return
        for session, _ in list(self._sessions.values()):
            if session.attributes.get(_CRED_KEY) is not None and session.transitions.is_connected() and \
                    session.username and session.remote_address:
                store.throttle.remember(str(session.remote_address), session.username)
                store.note_login(str(session.remote_address), session.username)

    # -- listeners -----------------------------------------------------------------------------------------

    @classmethod
    def _split_bindaddr_port(cls, port_str: str, default_port: int) -> tuple[str | None, int]:
        address, port = super()._split_bindaddr_port(port_str, default_port)
        if address and address.startswith("[") and address.endswith("]"):
            address = address[1:-1]  # "[::1]:0" -> "::1" for asyncio.start_server
        return address, port

    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType, address: str | None,
                                      port: int, ssl_context: ssl.SSLContext | None) -> Any:
        try:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        except OSError as exc:
            msg = f"listener {listener_name!r} cannot listen on {address}:{port}: {exc.strerror or exc}"
            raise BrokerError(msg) from exc

    async def _start_listeners(self) -> None:
        try:
            await super()._start_listeners()
        except BaseException:
            # amqtt leaves the listeners that did start open when a later one fails
            for server in self._servers.values():
                with contextlib.suppress(Exception):
                    await server.close_instance()
            self._servers.clear()
            raise

    def bound_address(self, listener_name: str) -> tuple[str, int] | None:
        """(host, port) the listener actually bound (port 0 resolved), or None if it is not listening."""
        server = self._servers.get(listener_name)
        sockets = getattr(getattr(server, "instance", None), "sockets", None)
        if not sockets:
            return None
        host, port = sockets[0].getsockname()[:2]
        return host, port

    # -- connections -----------------------------------------------------------------------------------------

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        peer = writer.get_extra_info("peername")
        peer_str = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        refused = self._limiter.acquire(ip)
        if refused is not None:  # closed at once: amqtt's own cap made extra clients hang
            if refused == "global":
                self.counters.conn_refused_global += 1
                what = f"broker.max_connections={self._limiter.max_total} reached"
            else:
                self.counters.conn_refused_ip += 1
                what = f"broker.max_connections_per_ip={self._limiter.max_per_ip} reached for {ip}"
            self._ratelog.log("conn-" + refused, logging.WARNING, "connection from %s on %r closed: %s",
                              peer_str, listener_name, what)
            writer.transport.abort()
            return
        try:
            packets = PacketReader(reader, writer, max_packet=self.max_packet, drop_max=self.max_drop,
                                   peer=peer_str, counters=self.counters, ratelog=self._ratelog)
            await self._client_connected(listener_name, packets, StreamWriterAdapter(writer))
        finally:
            self._limiter.release(ip)

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        server = self._servers.get(listener_name)
        if not server:
            msg = f"Invalid listener name '{listener_name}'"
            raise BrokerError(msg)
        await server.acquire_connection()
        try:
            remote_info = writer.get_peer_info()
            if remote_info is None:
                await writer.close()
                return
            remote_address, remote_port = remote_info
            try:
                handler, client_session = await self._initialize_client_session(
                    reader, writer, remote_address, remote_port)
            except _ConnectRefused:
                return
            except _NoConnect as exc:
                log.debug("connection from %s:%s on %r closed without a CONNECT: %s",
                          remote_address, remote_port, listener_name, exc)
                return
            try:
                await self._handle_client_session(reader, writer, client_session, handler, server, listener_name)
            except (AMQTTError, MQTTError, NoDataError) as exc:
                log.warning("error while handling client %r: %s", client_session.client_id, exc)
        finally:
            server.release_connection()

    async def _initialize_client_session(self, reader: ReaderAdapter, writer: WriterAdapter,
                                         remote_address: str, remote_port: int,
                                         ) -> tuple[BrokerProtocolHandler, Session]:
        """Read CONNECT, authenticate, *then* resolve the session (amqtt resolved it before authenticating)."""
        try:
            handler, incoming = await asyncio.wait_for(
                _ClawHandler.init_from_connect(reader, writer, self.plugins_manager), CONNECT_TIMEOUT)
        except Exception as exc:  # EOF, timeout, garbage, wrong protocol level (already answered), too large
            with contextlib.suppress(Exception):
                await writer.close()
            if isinstance(exc, (NoDataError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError)):
                reason = "timeout" if isinstance(exc, asyncio.TimeoutError) else "closed"
                raise _NoConnect(reason) from None
            if isinstance(exc, (PacketTooLargeError, ProtocolViolation)):
                raise _NoConnect(str(exc)) from None  # counted and logged (rate-limited) by the reader
            log.info("bad CONNECT from %s:%s: %s: %s", remote_address, remote_port, type(exc).__name__, exc)
            raise _NoConnect(str(exc)) from None

        ok = await self._authenticate(incoming, None)  # type: ignore[arg-type]
        code = incoming.attributes.pop(REFUSE_KEY, NOT_AUTHORIZED)
        username = incoming.username or ""
        if ok:
            sent_id = getattr(reader, "connect_client_id", None)
            if sent_id == "":  # no client id (clean session only; amqtt refused it otherwise): one of the user's
                incoming.client_id = f"{username}:{secrets.token_hex(8)}"
            elif not client_id_ok(username, incoming.client_id):
                self.counters.client_id_refused += 1
                self._refusal_log.log(
                    logging.WARNING, "MQTT CONNECT refused (CONNACK 2, identifier rejected): user %r, client id %r "
                    "from %s:%s: %s", username[:100], (incoming.client_id or "")[:100], remote_address, remote_port,
                    CLIENT_ID_RULE)
                ok, code = False, IDENTIFIER_REJECTED
        client_id = incoming.client_id
        existing = self._sessions.get(client_id) if client_id else None
        if ok and existing is not None and existing[0].username != incoming.username:  # cannot happen any more
            log.warning("MQTT CONNECT refused: user %r, client id %r from %s:%s: client id in use by another user",
                        username[:100], client_id[:100], remote_address, remote_port)
            ok = False
        if not ok:
            with contextlib.suppress(Exception):
                await ConnackPacket.build(0, code).to_stream(writer)
            with contextlib.suppress(Exception):
                await writer.close()
            raise _ConnectRefused
        incoming.password = None  # verified; do not keep it around
        incoming.attributes[_PREAUTH_KEY] = True
        if isinstance(reader, PacketReader):
            reader.who = f"client {client_id[:100]!r} (user {username[:100]!r}) at {remote_address}:{remote_port}"
        if existing is not None and existing[0].transitions.is_connected():
            await self._take_over(existing[0], existing[1])
        keep_alive = incoming.keep_alive
        if keep_alive <= 0 or keep_alive > self.max_keepalive:  # 0 = "never" would keep a dead client forever
            keep_alive = self.max_keepalive
        incoming.keep_alive = (keep_alive * 3 + 1) // 2  # 1.5 x, see _ClawHandler

        # -- from here on as amqtt's _initialize_client_session --
        if incoming.clean_session:
            await self._delete_session(client_id)
            incoming.parent = 0
            client_session = incoming
        elif client_id in self._sessions:
            client_session = self._sessions[client_id][0]
            client_session.will_flag = incoming.will_flag
            client_session.will_message = incoming.will_message
            client_session.will_topic = incoming.will_topic
            client_session.will_qos = incoming.will_qos
            client_session.will_retain = incoming.will_retain
            client_session.keep_alive = incoming.keep_alive
            client_session.username = incoming.username
            client_session.password = None
            client_session.remote_address = incoming.remote_address
            client_session.remote_port = incoming.remote_port
            client_session.ssl_object = incoming.ssl_object
            client_session.attributes.update(incoming.attributes)
            client_session.parent = 1
        else:
            incoming.parent = 0
            client_session = incoming
        return handler, client_session

    async def _take_over(self, old_session: Session, old_handler: BrokerProtocolHandler) -> None:
        """Close the connection currently holding a session and wait until it has fully disconnected."""
        log.info("client id %r connects again: closing its previous connection", old_session.client_id)
        await old_handler.handle_connection_closed()  # wakes its message loop: will, stop handler, disconnect
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TAKEOVER_TIMEOUT
        while old_session.transitions.is_connected() and loop.time() < deadline:
            await asyncio.sleep(0.005)
        if old_session.transitions.is_connected():  # its loop was not running yet: force it
            self._detach_outbox(old_session, old_handler)
            with contextlib.suppress(Exception):
                await self._stop_handler(old_handler)
            old_session.transitions.disconnect()
            await self._discard_clean_session(old_session)

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        pre = session.attributes.pop(_PREAUTH_KEY, None)
        if pre is not None:
            return bool(pre)
        store, username = self._creds, session.username
        # read before the password check: a change after this read is seen by the sweep (check_credentials)
        seen = store.state(username) if store is not None and username and username != self._internal_user \
            else None
        ok = await super()._authenticate(session, listener)
        if ok and seen is not None:
            session.attributes[_CRED_KEY] = seen
        return ok

    # -- messages --------------------------------------------------------------------------------------------

    async def _handle_message_delivery(self, client_session: Session, handler: BrokerProtocolHandler,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        """amqtt's step for a PUBLISH received from a client, keeping the publish QoS for the delivery
        (amqtt dropped it) and applying the device rate limit (broker/ratelimit.py)."""
        app_message = wait_deliver.result()
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id,
                                              message=app_message)
        if app_message is None:
            return True
        topic = app_message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            # amqtt would stop reading but leave the socket open. Close it through the normal disconnect path
            # instead (will, handler stop, session disconnected).
            log.warning("closing connection of client %r (user %r): PUBLISH to an invalid topic",
                        client_session.client_id, client_session.username)
            await handler.handle_connection_closed()
            return True
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            log.info("client %r (user %r) may not publish to %r: dropped", client_session.client_id,
                     client_session.username, topic[:200])
            return True
        limiter = self.device_limiter
        if limiter.enabled and client_session.attributes.get(ROLE_KEY) == "device" and \
                not limiter.allow(client_session.username or ""):
            return True  # acknowledged (amqtt sent the PUBACK on reading it) and dropped
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id,
                                              message=app_message)
        self._broadcast_queue.put_nowait({"session": client_session, "topic": topic, "data": app_message.data,
                                          "qos": app_message.qos or 0})
        if app_message.publish_packet and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)
        return True

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self._fast_acl:
            role = session.attributes.get(ROLE_KEY) if session is not None else None
            return role is not None and acl.allowed(role, session.username or "", topic, str(action))
        return await super()._topic_filtering(session, topic, action)

    def _wild_filters(self) -> list[str]:
        subs = self._subscriptions
        version = subs.version if isinstance(subs, _Subscriptions) else -2
        if version != self._wild_version or version == -2:
            self._wild = [f for f in subs if "+" in f or "#" in f]
            self._wild_version = version
        return self._wild

    async def _broadcast_loop(self) -> None:
        """amqtt's broadcast loop without its task and ``asyncio.wait`` per message: one message after the
        other in this task; shutdown (``_broadcast_shutdown_waiter``) cancels it."""
        running_tasks = self._tasks_queue
        me = asyncio.current_task()
        waiter = self._broadcast_shutdown_waiter
        if me is not None:
            waiter.add_done_callback(lambda _: me.cancel())
        n = 0
        try:
            while not waiter.done():
                n += 1
                if not n % BROADCAST_YIELD_EVERY and not self._broadcast_queue.empty():
                    await asyncio.sleep(0)  # a backlog is drained fairly: other tasks (clients, timers) run too
                while running_tasks and running_tasks[0].done():
                    task = running_tasks.popleft()
                    try:
                        task.result()
                    except asyncio.CancelledError:
                        pass
                    except Exception:  # a delivery failed: it must not stop the broker
                        log.exception("broker: a delivery task failed")
                try:
                    await self._run_broadcast(running_tasks)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one bad broadcast must not stop every later one
                    log.exception("broker: broadcasting a message failed")
        finally:
            for task in running_tasks:
                if not task.done():
                    task.cancel()

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """amqtt's broadcast step with an exact-topic dict lookup, inline ACL and no per-filter log formatting."""
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data = broadcast["data"]
        subs = self._subscriptions

        for link in self._local_links:  # the edge bridge in this process (broker/local.py)
            if link.wants(topic, self._matches):
                link.deliver(topic, data)

        targets: list[tuple[Session, int]] = []
        exact = subs.get(topic)
        if exact:
            targets.extend(exact)
        for a_filter in self._wild_filters():
            if self._matches(topic, a_filter):
                matched = subs.get(a_filter)
                if matched:
                    targets.extend(matched)
        if not targets:
            return

        pub_qos = broadcast.get("qos")
        if pub_qos is None:
            pub_qos = MAX_QOS
        fast = self._fast_acl
        for target_session, sub_qos in targets:
            qos = min(pub_qos, sub_qos, MAX_QOS)  # MQTT-3.8.4-6: never above what was published
            if fast:
                role = target_session.attributes.get(ROLE_KEY)
                sendable = role is not None and acl.allowed(role, target_session.username or "", topic, "receive")
            else:
                sendable = await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE)
            if not sendable:
                continue
            if target_session.transitions.state == "connected":
                self._outbox(target_session).push(topic, data, qos)
            elif not target_session.clean_session and qos and not target_session.is_anonymous:
                # queued for a disconnected persistent session (MQTT 3.1.2.4), bounded by broker.max_queued
                self._outbox(target_session).push(topic, data, qos, online=False)

    # -- sessions: outgoing delivery, resume, end of a clean session (broker/session.py) ----------------------

    def _outbox(self, session: Session) -> Outbox:
        outbox = session.attributes.get(OUTBOX_KEY)
        if outbox is None:
            outbox = session.attributes[OUTBOX_KEY] = Outbox(session.client_id, max_inflight=self.max_inflight,
                                                             max_queued=self.max_queued, counters=self.counters)
        return outbox

    @staticmethod
    def _detach_outbox(session: Session, handler: BrokerProtocolHandler | None) -> None:
        outbox = session.attributes.get(OUTBOX_KEY)
        if outbox is not None:
            outbox.detach(handler)

    async def _discard_clean_session(self, session: Session) -> None:
        """A clean-session connection ended: its session ends with it [MQTT-3.1.2-6], so a later CONNECT with
        clean session 0 and the same client id gets session present = 0 and a fresh session (amqtt kept it
        until its monitor ran, up to a second later, and resumed it)."""
        if not session.clean_session or not session.client_id:
            return
        entry = self._sessions.get(session.client_id)
        if entry is None or entry[0] is not session:
            return  # already replaced by a newer connection's session
        del self._sessions[session.client_id]
        outbox = session.attributes.pop(OUTBOX_KEY, None)
        if outbox is not None:
            outbox.clear()
        await self._del_all_subscriptions(session)
        session.clear_queues()

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Grant at most QoS 1 (the broker does not deliver with QoS 2); a repeated filter takes the new QoS."""
        topic_filter, qos = subscription
        granted = await super().add_subscription((topic_filter, min(qos, MAX_QOS)), session)
        if granted <= MAX_QOS:  # the same filter again replaces the subscription's QoS [MQTT-3.8.4-3]
            subs = self._subscriptions.get(topic_filter, [])
            for i, (sub_session, _) in enumerate(subs):
                if sub_session.client_id == session.client_id:
                    subs[i] = (session, granted)
        return granted

    async def _handle_client_session(self, reader: ReaderAdapter, writer: WriterAdapter, client_session: Session,
                                     handler: BrokerProtocolHandler, server: Any, listener_name: str) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)
        finally:  # also when the connection failed before its message loop ran
            self._detach_outbox(client_session, handler)
            if not client_session.transitions.is_connected():
                await self._discard_clean_session(client_session)

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        self._detach_outbox(client_session, handler)  # nothing more is written to this connection
        # before the session is marked disconnected: a takeover waiting for that must find it gone
        await self._discard_clean_session(client_session)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """Retained messages are disabled (amqtt replays them to every client without an ACL check)."""
        if not self._retain_warned and data:
            self._retain_warned = True
            who = source_session.client_id if source_session is not None else "the broker"
            log.warning("retained messages are disabled: dropped the RETAIN flag of a message on %r from %r "
                        "(logged once)", topic_name, who)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        return  # nothing is ever retained

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Called by amqtt right after CONNACK (and its handler start): the session's outbox starts writing to
        this connection -- first the re-sends of what was in flight (DUP=1), then what was queued, in order."""
        handler = self._get_handler(session)
        if handler is None:
            return
        outbox = self._outbox(session)
        while not session.retained_messages.empty():  # amqtt's own offline queue (unused by our broadcast)
            queued = session.retained_messages.get_nowait()
            outbox.push(queued.topic, queued.data, min(queued.qos or 0, MAX_QOS))
        outbox.attach(handler)


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
