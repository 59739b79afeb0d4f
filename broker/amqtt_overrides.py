"""Every override of amqtt's private API, in one module: what amqtt 0.12.1 gets wrong, replaced.

amqtt is pinned exactly (``amqtt==0.12.1`` in pyproject.toml): the methods below replace private members of
amqtt's ``Broker`` and ``BrokerProtocolHandler`` and read their private state (``_sessions``, ``_servers``,
``_subscriptions``, ``_broadcast_queue``, a handler's ``_puback_waiters`` ...). Nothing else in broker/ touches
amqtt's private members. ``tests/unit/test_broker_amqtt.py`` checks the installed version against the pin and
every member named here against the signature it had when this was written, so an upgrade fails there, loudly.
Each override names the amqtt behaviour it replaces and the test that pins it (docs/broker.md, "amqtt traps"):

(a) retained messages reach every client without an ACL check: none are kept (a retained publish is delivered
    live with RETAIN=0; offline-queued messages go out with RETAIN=0 too);
(b) a PUBLISH to a ``$…``/wildcard/empty topic left a half-dead connection: it is closed through the normal
    disconnect path (will, session disconnected);
(c) the session was resolved before authentication (an unauthenticated CONNECT could delete or hijack a
    session) and a takeover left a zombie: authentication first, the client id must belong to the credential,
    the old connection is closed and waited for;
(d) no maximum packet size: the socket is read by :class:`broker.reader.PacketReader`;
(e) a bare TCP connect-and-close was logged at ERROR: DEBUG; a client silent before CONNECT is dropped;
(f) keepalive was not enforced: a client silent for 1.5 x its keepalive is disconnected (:class:`ClawHandler`);
(g) session semantics: outgoing messages go through one :class:`broker.session.Outbox` per session, a clean
    session ends with its connection, delivery QoS is min(publish, granted) and at most 1;
(h) a device could flood the nodes: a per-device token bucket (:mod:`broker.ratelimit`).

Performance: the topic ACL is evaluated inline (no amqtt task per plugin call) when ours is the only topic
plugin; a publish looks up exact-topic subscriptions by dict and scans only wildcard filters; the broadcast loop
delivers one message after the other in one task.

:class:`AmqttBroker` is the overridden ``Broker``; :class:`broker.clawbroker.ClawBroker` builds on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections import deque
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import OutgoingApplicationMessage, Session

from broker import acl
from broker.creds import CredentialStore
from broker.credsweep import CRED_KEY
from broker.local import LocalLink
from broker.plugins import REFUSE_KEY, ROLE_KEY
from broker.plugins.acl import ClawTopicPlugin
from broker.plugins.auth import ClawAuthPlugin
from broker.ratelimit import RateLimiter
from broker.reader import PacketReader, PacketTooLargeError, ProtocolViolation
from broker.refusals import Refusals
from broker.session import MAX_QOS, OUTBOX_KEY, Outbox
from core.guard import client_id_ok

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds a new connection may take to send its CONNECT
TAKEOVER_TIMEOUT = 2.0  # seconds to wait for a taken-over connection to finish its disconnect
BROADCAST_YIELD_EVERY = 16  # the broadcast loop lets the event loop run at least this often while a backlog drains
_PREAUTH_KEY = "claw.preauth"  # session.attributes: result of the early authentication


class _ConnectRefused(Exception):
    """CONNECT refused and already answered/logged."""


class _NoConnect(Exception):
    """The peer never sent a usable CONNECT (health check, port scan, garbage, timeout)."""


class ClawHandler(BrokerProtocolHandler):
    """amqtt's broker protocol handler, with keepalive enforced and a QoS 3 PUBLISH closing the connection."""

    _expiry_task: asyncio.Task[None] | None = None

    # Replaces: amqtt's reader waits for each packet with timeout=session.keep_alive, then calls this hook,
    # which it leaves empty (f). keep_alive is set to 1.5 x the client's [MQTT-3.1.2-24]: close through the
    # normal disconnect path (the will fires). Pinned by test_broker.py::test_keepalive_is_enforced_and_will_fires.
    def handle_read_timeout(self) -> None:
        if self._expiry_task is None:
            session = self.session
            log.info("client %r (user %r) silent for longer than 1.5 x keepalive: closing its connection",
                     session.client_id if session else None, session.username if session else None)
            self._expiry_task = asyncio.get_running_loop().create_task(self.handle_connection_closed())

    # Replaces: amqtt kept a connection open after a PUBLISH with both QoS bits set (malformed,
    # [MQTT-3.3.1-4]) and logged a traceback at ERROR per packet. Pinned by
    # test_findings.py::test_a_publish_with_qos_3_closes_the_connection_without_a_traceback.
    async def handle_publish(self, publish_packet: Any) -> None:
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


class Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's filter -> subscribers dict (``Broker._subscriptions``), with a version bumped whenever the set of
    filters changes, so the broadcast step rescans its wildcard filters only then. Pinned by
    test_broker.py::test_exact_subscriptions_follow_subscribe_and_unsubscribe."""

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


def attach_outbox(outbox: Outbox, handler: BrokerProtocolHandler) -> None:
    """Start ``outbox`` writing to ``handler``'s connection. Reads amqtt's private state: the handler's PUBACK
    futures (``ProtocolHandler._puback_waiters``, resolved by its reader) and the socket behind its
    ``StreamWriterAdapter._writer`` (for the write-buffer size). Pinned by test_broker_sessions.py::
    test_inflight_window_waits_for_pubacks_and_never_times_out and
    test_a_reader_that_stalls_costs_a_bounded_queue_and_keeps_the_order."""
    inner = getattr(handler.writer, "_writer", None)  # StreamWriterAdapter -> asyncio.StreamWriter
    outbox.attach(handler, getattr(inner, "transport", None), handler._puback_waiters)


class AmqttBroker(Broker):
    """amqtt's Broker with traps (a)-(h) of the module docstring fixed. Build it inside a running loop."""

    def __init__(self, config: BrokerConfig | dict[str, Any], *, max_packet: int = 1024 * 1024,
                 max_drop: int = 16 * 1024 * 1024, max_keepalive: int = 300, max_connections: int = 0,
                 max_connections_per_ip: int = 0, max_inflight: int = 32, max_queued: int = 1000,
                 device_publish_rate: float = 0.0, device_publish_burst: int = 20) -> None:
        super().__init__(config)
        self.max_packet = max_packet
        self.max_drop = max_drop
        self.max_keepalive = max_keepalive
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.device_limiter = RateLimiter(device_publish_rate, device_publish_burst)
        self.refusals = Refusals(max_connections=max_connections, max_connections_per_ip=max_connections_per_ip)
        self.counters = self.refusals.counters
        self.creds: CredentialStore | None = None
        self.internal_user: str | None = None
        for plugin in self.plugins_manager.plugins:
            if isinstance(plugin, ClawAuthPlugin):
                plugin.counters = self.counters  # one set of counters for the whole broker
                self.creds, self.internal_user = plugin.store, plugin.internal_user
        # Replaces Broker._subscriptions (a plain dict) by one that knows when its set of filters changed.
        self._subscriptions = Subscriptions()
        self._wild: list[str] = []
        self._wild_version = -1
        self._retain_warned = False
        topic_plugins = [p for p in self.plugins_manager.plugins if isinstance(p, BaseTopicPlugin)]
        # evaluate the ACL inline when ours is the only topic plugin (amqtt makes a task per plugin per check)
        self.inline_acl = bool(topic_plugins) and all(isinstance(p, ClawTopicPlugin) for p in topic_plugins)
        self._local_links: list[LocalLink] = []  # in-process subscribers, fed by the broadcast step

    def enqueue_broadcast(self, session: Session | None, topic: str, data: Any, qos: int) -> None:
        """Put one message into amqtt's broadcast queue (``session`` None: from the broker itself)."""
        self._broadcast_queue.put_nowait({"session": session, "topic": topic, "data": data, "qos": qos})

    # -- listeners -----------------------------------------------------------------------------------------

    # Replaces: amqtt kept the brackets of "[::1]:0", which asyncio.start_server cannot bind. Pinned by
    # test_broker_amqtt.py::test_bracketed_ipv6_bind_address_loses_its_brackets.
    @classmethod
    def _split_bindaddr_port(cls, port_str: str, default_port: int) -> tuple[str | None, int]:
        address, port = super()._split_bindaddr_port(port_str, default_port)
        if address and address.startswith("[") and address.endswith("]"):
            address = address[1:-1]  # "[::1]:0" -> "::1" for asyncio.start_server
        return address, port

    # Replaces: amqtt let a bind failure escape as a bare OSError; a BrokerError naming the listener instead.
    # Pinned by test_broker.py::test_port_in_use_is_a_clear_start_error.
    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType, address: str | None,
                                      port: int, ssl_context: ssl.SSLContext | None) -> Any:
        try:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        except OSError as exc:
            msg = f"listener {listener_name!r} cannot listen on {address}:{port}: {exc.strerror or exc}"
            raise BrokerError(msg) from exc

    # Replaces: amqtt left the listeners that did start open when a later one failed. Pinned by
    # test_broker.py::test_port_in_use_is_a_clear_start_error (the local port is free again afterwards).
    async def _start_listeners(self) -> None:
        try:
            await super()._start_listeners()
        except BaseException:
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

    # Replaces: amqtt's own socket reader (no packet size limit, (d)) and its max_connections (extra clients
    # hang). Pinned by test_broker_security.py::test_connection_caps_refuse_at_once and
    # ::test_oversize_connect_is_closed_before_its_body_is_read.
    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        peer = writer.get_extra_info("peername")
        peer_str = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        if not self.refusals.admit(ip, peer_str, listener_name):
            writer.transport.abort()  # closed at once
            return
        try:
            packets = PacketReader(reader, writer, max_packet=self.max_packet, drop_max=self.max_drop,
                                   peer=peer_str, counters=self.counters, ratelog=self.refusals.ratelog)
            await self._client_connected(listener_name, packets, StreamWriterAdapter(writer))
        finally:
            self.refusals.release(ip)

    # Replaces: amqtt logged a connection that never sent a CONNECT (a health check) at ERROR (e). Pinned by
    # test_broker.py::test_bare_tcp_connect_close_is_not_an_error.
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

    # Replaces: amqtt resolved the session before authenticating (c), waited forever for a CONNECT (e) and
    # kept keepalive 0 as "never" (f). Pinned by test_broker.py::
    # test_unauthenticated_or_foreign_connect_cannot_touch_a_session,
    # ::test_clean_session_takeover_closes_old_connection, ::test_silent_connection_is_dropped and
    # test_broker_security.py::test_keepalive_zero_gets_the_servers_maximum,
    # ::test_empty_client_id_gets_one_of_the_users.
    async def _initialize_client_session(self, reader: ReaderAdapter, writer: WriterAdapter,
                                         remote_address: str, remote_port: int,
                                         ) -> tuple[BrokerProtocolHandler, Session]:
        """Read CONNECT, authenticate, *then* resolve the session."""
        try:
            handler, incoming = await asyncio.wait_for(
                ClawHandler.init_from_connect(reader, writer, self.plugins_manager), CONNECT_TIMEOUT)
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
                self.refusals.client_id(username, incoming.client_id, remote_address, remote_port)
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
        incoming.keep_alive = (keep_alive * 3 + 1) // 2  # 1.5 x, see ClawHandler

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

    # Replaces: amqtt authenticated inside its session setup; here the result of the early check in
    # _initialize_client_session is reused, and the credential's state is read for the sweep
    # (broker/credsweep.py). Pinned by test_broker_security.py::test_revoke_disconnects_open_sessions.
    async def _authenticate(self, session: Session, listener: Any) -> bool:
        pre = session.attributes.pop(_PREAUTH_KEY, None)
        if pre is not None:
            return bool(pre)
        store, username = self.creds, session.username
        # read before the password check: a change after this read is seen by the sweep
        seen = store.state(username) if store is not None and username and username != self.internal_user \
            else None
        ok = await super()._authenticate(session, listener)
        if ok and seen is not None:
            session.attributes[CRED_KEY] = seen
        return ok

    # -- messages --------------------------------------------------------------------------------------------

    # Replaces: amqtt dropped the publish QoS (g), left a connection that published to an invalid topic
    # half-dead (b) and had no device rate limit (h). Pinned by test_broker.py::
    # test_publish_to_sys_topic_closes_connection, test_broker_sessions.py::
    # test_delivery_qos_is_the_minimum_of_publish_and_subscription and
    # ::test_device_flood_is_bounded_and_other_devices_and_nodes_are_not.
    async def _handle_message_delivery(self, client_session: Session, handler: BrokerProtocolHandler,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
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
        self.enqueue_broadcast(client_session, topic, app_message.data, app_message.qos or 0)
        if app_message.publish_packet and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)
        return True

    # Replaces: amqtt's task per topic plugin per check, by an inline call when ours is the only one. Pinned by
    # test_broker.py::test_device_publish_to_other_task_topic_delivers_nothing.
    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self.inline_acl:
            role = session.attributes.get(ROLE_KEY) if session is not None else None
            return role is not None and acl.allowed(role, session.username or "", topic, str(action))
        return await super()._topic_filtering(session, topic, action)

    def _wild_filters(self) -> list[str]:
        subs = self._subscriptions
        version = subs.version if isinstance(subs, Subscriptions) else -2
        if version != self._wild_version or version == -2:
            self._wild = [f for f in subs if "+" in f or "#" in f]
            self._wild_version = version
        return self._wild

    # Replaces: amqtt's task and asyncio.wait per message; one message after the other in this task, a failed
    # delivery or broadcast logged without stopping the loop. Pinned by test_broker_sessions.py::
    # test_a_reader_that_stalls_costs_a_bounded_queue_and_keeps_the_order and test_broker.py::
    # test_local_link_ends_when_the_broker_stops_and_shutdown_is_prompt.
    async def _broadcast_loop(self) -> None:
        """Shutdown (``_broadcast_shutdown_waiter``) cancels it."""
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

    # Replaces: amqtt's scan of every filter of every client with per-filter log formatting and delivery at the
    # subscription's QoS (g); adds the in-process links. Pinned by test_broker_sessions.py::
    # test_delivery_qos_is_the_minimum_of_publish_and_subscription and test_broker.py::
    # test_local_link_receives_and_publishes_like_a_client.
    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
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
        fast = self.inline_acl
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

    # Replaces: amqtt granted QoS 2 and kept the first QoS of a repeated filter [MQTT-3.8.4-3]. Pinned by
    # test_broker_sessions.py::test_delivery_qos_is_the_minimum_of_publish_and_subscription.
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Grant at most QoS 1 (the broker does not deliver with QoS 2); a repeated filter takes the new QoS."""
        topic_filter, qos = subscription
        granted = await super().add_subscription((topic_filter, min(qos, MAX_QOS)), session)
        if granted <= MAX_QOS:
            subs = self._subscriptions.get(topic_filter, [])
            for i, (sub_session, _) in enumerate(subs):
                if sub_session.client_id == session.client_id:
                    subs[i] = (session, granted)
        return granted

    # Replaces: amqtt kept a clean session until its monitor ran (g). Pinned by test_broker_sessions.py::
    # test_clean_session_is_discarded_when_its_connection_ends.
    async def _handle_client_session(self, reader: ReaderAdapter, writer: WriterAdapter, client_session: Session,
                                     handler: BrokerProtocolHandler, server: Any, listener_name: str) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)
        finally:  # also when the connection failed before its message loop ran
            self._detach_outbox(client_session, handler)
            if not client_session.transitions.is_connected():
                await self._discard_clean_session(client_session)

    # Replaces: amqtt kept a clean session after its connection ended until its monitor ran (g); here it is gone
    # before the session is marked disconnected, which a takeover waits for. Pinned by test_broker_sessions.py::
    # test_clean_session_taken_over_by_a_persistent_one_is_not_resumed.
    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        self._detach_outbox(client_session, handler)  # nothing more is written to this connection
        # before the session is marked disconnected: a takeover waiting for that must find it gone
        await self._discard_clean_session(client_session)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    # Replaces: amqtt replayed retained messages to every client without an ACL check (a). Pinned by
    # test_broker.py::test_retained_message_not_replayed.
    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """Retained messages are disabled: the RETAIN flag is dropped (logged once)."""
        if not self._retain_warned and data:
            self._retain_warned = True
            who = source_session.client_id if source_session is not None else "the broker"
            log.warning("retained messages are disabled: dropped the RETAIN flag of a message on %r from %r "
                        "(logged once)", topic_name, who)

    # Replaces: the retained replay on SUBSCRIBE (a). Pinned by test_broker.py::test_retained_message_not_replayed.
    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        return  # nothing is ever retained

    # Replaces: amqtt's replay of its offline queue with RETAIN=1 and no re-send of what was in flight (a, g).
    # Pinned by test_broker.py::test_offline_queued_messages_arrive_without_retain_flag and
    # test_broker_sessions.py::test_unacked_qos1_resent_with_dup_on_resume_then_offline_then_new.
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
        attach_outbox(outbox, handler)
