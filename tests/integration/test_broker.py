"""The embedded broker (broker.app.run_broker) with real aiomqtt 2.5 clients over TLS and loopback.

Each test starts its own broker on 127.0.0.1 port 0 with a fresh data dir and PKI. Every amqtt trap that
broker/amqtt_overrides.py fixes is pinned here or in test_broker_sessions.py (see that module's docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
import pytest

from broker.app import BrokerHandle, BrokerStartError, run_broker
from broker.creds import CredentialStore
from core.config import Settings, load_settings
from core.pki import ensure_ca, issue_server_cert
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
MAX_PACKET = 4096


@dataclass
class Env:
    h: BrokerHandle
    store: CredentialStore
    ca: Path
    data: Path

    def tls_client(self, username: str | None, password: str | None, *, ca: Path | None = None,
                   **kw: object) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", self.h.tls_port or 0, username=username, password=password,
            tls_context=ssl.create_default_context(cafile=str(ca or self.ca)),
            protocol=aiomqtt.ProtocolVersion.V311, socket_options=NODELAY, timeout=5, **kw)  # type: ignore[arg-type]

    async def raw_node_with_will(self, client_id: str, username: str, password: str,
                                 keepalive: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw TLS connection whose CONNECT (``b"offline"`` as its will on claw/v1/node/n1) was accepted."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        reader, writer = await asyncio.open_connection("127.0.0.1", self.h.tls_port, ssl=ctx)
        writer.write(raw_connect_packet(client_id, username, password, keepalive=keepalive,
                                        will=("claw/v1/node/n1", b"offline")))
        await writer.drain()
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"  # CONNACK accepted
        return reader, writer

    @contextlib.asynccontextmanager
    async def node_and_device(self) -> AsyncIterator[tuple[aiomqtt.Client, aiomqtt.Client]]:
        """Clients of two new credentials, node.n1 and dev.alice, both connected over TLS."""
        nu, npw = self.store.add("node", "n1")
        du, dpw = self.store.add("device", "alice")
        async with self.tls_client(nu, npw) as node, self.tls_client(du, dpw) as dev:
            yield node, dev

    def edge_client(self, **kw: object) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.h.local_host, self.h.local_port, username=self.h.internal_user,
            password=self.h.internal_password, protocol=aiomqtt.ProtocolVersion.V311,
            socket_options=NODELAY, timeout=5, **kw)  # type: ignore[arg-type]


def _settings(data: Path, **broker: object) -> Settings:
    return load_settings(env={}, overrides={"data_dir": str(data),
                                            "broker": {"listen": "127.0.0.1:0", "max_packet": MAX_PACKET,
                                                       **broker}})


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    pki = issue_server_cert(tmp_path / "pki", ["localhost", "127.0.0.1"])
    async with run_broker(_settings(tmp_path)) as h:
        yield Env(h, CredentialStore(tmp_path), pki.ca_cert, tmp_path)


async def next_message(client: aiomqtt.Client, timeout: float = 3.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            return msg
    raise AssertionError("unreachable")


async def assert_disconnected(client: aiomqtt.Client, timeout: float = 3.0) -> None:
    """The broker closed the client's connection (message iteration ends with MqttError)."""
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                raise AssertionError(f"unexpected delivery on {msg.topic}")


@contextlib.contextmanager
def refused(rc: str = "Not authorized") -> Iterator[None]:
    """The broker answered CONNECT with ``rc`` (not a TLS or network failure)."""
    with pytest.raises(MqttConnectError) as info:
        yield
    assert str(info.value.rc) == rc


def _mqtt_str(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def raw_connect_packet(client_id: str, username: str, password: str, keepalive: int,
                       will: tuple[str, bytes] | None = None, level: int = 4) -> bytes:
    """A hand-built MQTT 3.1.1 (level 4) or 5 CONNECT (clean session, no properties)."""
    flags = 0x80 | 0x40 | 0x02 | (0x04 | 0x08 if will else 0)  # user, password, clean, will qos 1
    payload = _mqtt_str(client_id.encode())
    if will:
        payload += _mqtt_str(will[0].encode()) + _mqtt_str(will[1])
    payload += _mqtt_str(username.encode()) + _mqtt_str(password.encode())
    props = b"\x00" if level == 5 else b""
    body = _mqtt_str(b"MQTT") + bytes([level, flags]) + keepalive.to_bytes(2, "big") + props + payload
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


# -- authentication ------------------------------------------------------------------------------------------

async def test_wrong_password_refused(env: Env) -> None:
    user, pw = env.store.add("node", "n1")
    with refused():
        async with env.tls_client(user, pw[:-1] + ("A" if pw[-1] != "A" else "B")):
            pass


async def test_unknown_user_refused(env: Env) -> None:
    with refused():
        async with env.tls_client("node.ghost", "whatever-password"):
            pass


@pytest.mark.parametrize(("user", "pw"), [(None, None), ("node.n1", None), ("", "")])
async def test_no_credentials_refused(env: Env, user: str | None, pw: str | None) -> None:
    env.store.add("node", "n1")
    with refused():
        async with env.tls_client(user, pw):
            pass


async def test_internal_user_only_with_its_password(env: Env) -> None:
    with refused():
        async with aiomqtt.Client(env.h.local_host, env.h.local_port, username="edge", password="guess",
                                  protocol=aiomqtt.ProtocolVersion.V311, timeout=5):
            pass
    assert env.h.internal_password not in repr(env.h)


async def test_node_connects_over_tls_and_subscribes_tasks(env: Env) -> None:
    assert env.h.broker.inline_acl  # ACL evaluated inline, not via amqtt's plugin tasks
    user, pw = env.store.add("node", "n1")
    async with env.tls_client(user, pw) as node:
        rc = await node.subscribe("claw/v1/task/+", qos=1)
        assert not rc[0].is_failure and rc[0].value == 1
        async with env.edge_client() as edge:
            await edge.publish("claw/v1/task/wc.bob", b"task", qos=1)
            msg = await next_message(node)
            assert msg.topic.value == "claw/v1/task/wc.bob" and msg.payload == b"task"


async def test_tls_with_other_ca_fails_verification(env: Env, tmp_path: Path) -> None:
    other = ensure_ca(tmp_path / "other-pki")
    user, pw = env.store.add("node", "n1")
    with pytest.raises(aiomqtt.MqttError, match="(?i)certificate"):
        async with env.tls_client(user, pw, ca=other.ca_cert):
            pass


async def test_internal_edge_user_on_local_listener(env: Env) -> None:
    async with env.edge_client() as edge:
        for f in ("claw/v1/reply/+", "claw/v1/node/+"):
            rc = await edge.subscribe(f, qos=1)
            assert not rc[0].is_failure
        user, pw = env.store.add("node", "n1")
        async with env.tls_client(user, pw) as node:
            await node.publish("claw/v1/reply/wc.bob", b"delta", qos=1)
            msg = await next_message(edge)
            assert msg.topic.value == "claw/v1/reply/wc.bob" and msg.payload == b"delta"
            await node.publish("claw/v1/node/n1", b"beat", qos=1)
            assert (await next_message(edge)).topic.value == "claw/v1/node/n1"


async def test_revoked_credential_refused_on_next_connect(env: Env) -> None:
    user, pw = env.store.add("device", "d1")
    async with env.tls_client(user, pw):
        pass
    assert CredentialStore(env.data).revoke("d1")
    with refused():
        async with env.tls_client(user, pw):
            pass


# -- topic ACL -----------------------------------------------------------------------------------------------

async def test_device_publishes_own_task_and_node_receives(env: Env) -> None:
    async with env.node_and_device() as (node, dev):
        await node.subscribe("claw/v1/task/+", qos=1)
        await dev.publish("claw/v1/task/dev.alice", b"hello", qos=1)
        msg = await next_message(node)
        assert msg.topic.value == "claw/v1/task/dev.alice" and msg.payload == b"hello"
        # the reply comes back to the device on its own topic
        rc = await dev.subscribe("claw/v1/reply/dev.alice", qos=1)
        assert not rc[0].is_failure
        await node.publish("claw/v1/reply/dev.alice", b"answer", qos=1)
        assert (await next_message(dev)).payload == b"answer"


async def test_device_cannot_subscribe_to_other_reply_topics(env: Env) -> None:
    async with env.node_and_device() as (node, dev):
        for f in ("claw/v1/reply/wc.bob", "claw/v1/reply/+", "claw/#", "#"):
            rc = await dev.subscribe(f, qos=1)
            assert rc[0].is_failure, f
        await node.publish("claw/v1/reply/wc.bob", b"secret", qos=1)
        await dev.subscribe("claw/v1/reply/dev.alice", qos=1)
        await node.publish("claw/v1/reply/dev.alice", b"marker", qos=1)
        assert (await next_message(dev)).payload == b"marker"  # first: the secret, sent before it, never came


async def test_device_publish_to_other_task_topic_delivers_nothing(env: Env) -> None:
    async with env.node_and_device() as (node, dev):
        await node.subscribe("claw/v1/task/+", qos=1)
        await dev.publish("claw/v1/task/wc.bob", b"forged", qos=1)
        await dev.publish("claw/v1/reply/wc.bob", b"forged", qos=1)
        await dev.publish("claw/v1/task/dev.alice", b"ok", qos=1)  # the connection still works ...
        assert (await next_message(node)).payload == b"ok"  # ... and the forged ones, sent before, never came


async def test_device_will_on_other_topic_refused(env: Env) -> None:
    du, dpw = env.store.add("device", "alice")
    with refused():
        async with env.tls_client(du, dpw, will=aiomqtt.Will("claw/v1/reply/wc.bob", b"forged")):
            pass
    async with env.tls_client(du, dpw, will=aiomqtt.Will("claw/v1/task/dev.alice", b"bye")):
        pass  # a will on its own task topic is fine


async def test_node_will_on_own_beat_topic_fires(env: Env) -> None:
    nu, npw = env.store.add("node", "n1")
    async with env.edge_client() as edge:
        await edge.subscribe("claw/v1/node/+", qos=1)
        reader, writer = await env.raw_node_with_will("node.n1:will", nu, npw, keepalive=60)
        writer.transport.abort()  # abnormal close: no DISCONNECT
        msg = await next_message(edge)
        assert msg.topic.value == "claw/v1/node/n1" and msg.payload == b"offline"


# -- amqtt traps ---------------------------------------------------------------------------------------------

async def test_retained_message_not_replayed(env: Env) -> None:
    """(a) amqtt sent every retained message to every connecting client, with no ACL check."""
    nu, npw = env.store.add("node", "n1")
    du, dpw = env.store.add("device", "alice")
    async with env.tls_client(nu, npw, identifier="node.n1:a") as node, env.edge_client() as edge:
        await node.subscribe("claw/v1/task/+", qos=1)
        await edge.publish("claw/v1/task/wc.bob", b"retained-secret", qos=1, retain=True)
        live = await next_message(node)
        assert live.payload == b"retained-secret" and live.retain is False  # delivered live, RETAIN cleared
        async with env.tls_client(du, dpw) as dev, env.tls_client(nu, npw, identifier="node.n1:b") as node2:
            await dev.subscribe("claw/v1/reply/dev.alice", qos=1)
            await node2.subscribe("claw/v1/task/+", qos=1)
            # markers, published after both connected and subscribed: each is the first thing its client gets
            # (a retained message would have been sent on connecting or subscribing, before them)
            await node.publish("claw/v1/reply/dev.alice", b"marker", qos=1)
            await edge.publish("claw/v1/task/wc.bob", b"marker", qos=1)
            assert (await next_message(dev)).payload == b"marker"
            assert (await next_message(node2)).payload == b"marker"
        assert env.h.broker.retained_messages == {}


async def test_publish_to_sys_topic_closes_connection(env: Env) -> None:
    """(b) amqtt left such a client half-dead (no more PUBLISH/SUBACK processing) instead of closing it."""
    nu, npw = env.store.add("node", "n1")
    async with env.tls_client(nu, npw) as node:
        await node.subscribe("claw/v1/task/+", qos=1)
        await node.publish("$SYS/x", b"x", qos=0)
        await assert_disconnected(node)
    await wait_until(lambda: not any(s.transitions.is_connected() for s, _ in env.h.broker.sessions.values()), 5)


async def test_clean_session_takeover_closes_old_connection(env: Env) -> None:
    """(c) amqtt left the old connection open as a zombie on a clean-session takeover."""
    nu, npw = env.store.add("node", "n1")
    async with env.edge_client() as edge:
        async with env.tls_client(nu, npw, identifier="node.n1") as old:
            await old.subscribe("claw/v1/task/+", qos=1)
            async with env.tls_client(nu, npw, identifier="node.n1") as new:
                await assert_disconnected(old)
                await new.subscribe("claw/v1/task/+", qos=1)
                await edge.publish("claw/v1/task/wc.bob", b"t", qos=1)
                assert (await next_message(new)).payload == b"t"
                await edge.publish("claw/v1/task/wc.bob", b"marker", qos=1)
                assert (await next_message(new)).payload == b"marker"  # "t" came once: the old subscription is gone


async def test_persistent_session_takeover(env: Env) -> None:
    nu, npw = env.store.add("node", "n1")
    async with env.edge_client() as edge:
        async with env.tls_client(nu, npw, identifier="node.n1:p", clean_session=False) as old:
            await old.subscribe("claw/v1/task/+", qos=1)
            async with env.tls_client(nu, npw, identifier="node.n1:p", clean_session=False) as new:
                await assert_disconnected(old)
                # the subscription survived in the taken-over session and the new connection is live
                await edge.publish("claw/v1/task/wc.bob", b"p", qos=1)
                assert (await next_message(new)).payload == b"p"


async def test_offline_queued_messages_arrive_without_retain_flag(env: Env) -> None:
    """amqtt sent messages queued for an offline persistent session with RETAIN=1."""
    nu, npw = env.store.add("node", "n1")
    async with env.edge_client() as edge:
        async with env.tls_client(nu, npw, identifier="node.n1:q", clean_session=False) as node:
            await node.subscribe("claw/v1/task/+", qos=1)
        await edge.publish("claw/v1/task/wc.bob", b"queued", qos=1)
        session = env.h.broker.sessions["node.n1:q"][0]
        # queued for the offline session (broker/session.py)
        await wait_until(lambda: len(getattr(session.attributes.get("claw.outbox"), "queue", ())) == 1, 5)
        async with env.tls_client(nu, npw, identifier="node.n1:q", clean_session=False) as node:
            msg = await next_message(node)
            assert msg.payload == b"queued" and msg.retain is False


async def test_exact_subscriptions_follow_subscribe_and_unsubscribe(env: Env) -> None:
    """The broadcast index (exact topics by dict, wildcard filters scanned) tracks (un)subscriptions."""
    async with env.node_and_device() as (node, dev):
        for _ in range(2):
            await dev.subscribe("claw/v1/reply/dev.alice", qos=1)
            await node.publish("claw/v1/reply/dev.alice", b"on", qos=1)
            assert (await next_message(dev)).payload == b"on"
            await dev.unsubscribe("claw/v1/reply/dev.alice")
            await node.publish("claw/v1/reply/dev.alice", b"off", qos=1)
        # subscribed again, dev's first message is "on" (the next turn's, or this marker): never an "off"
        await dev.subscribe("claw/v1/reply/dev.alice", qos=1)
        await node.publish("claw/v1/reply/dev.alice", b"marker", qos=1)
        assert (await next_message(dev)).payload == b"marker"


async def test_unauthenticated_or_foreign_connect_cannot_touch_a_session(env: Env) -> None:
    """amqtt deleted/hijacked the session of a client id *before* checking the password."""
    nu, npw = env.store.add("node", "n1")
    du, dpw = env.store.add("device", "mallory")
    async with env.edge_client() as edge, env.tls_client(nu, npw, identifier="node.n1") as node:
        await node.subscribe("claw/v1/task/+", qos=1)
        with refused():
            async with env.tls_client(nu, "wrong-password", identifier="node.n1"):
                pass
        with refused("Client identifier not valid"):  # valid credentials, but another user's client id
            async with env.tls_client(du, dpw, identifier="node.n1"):
                pass
        await edge.publish("claw/v1/task/wc.bob", b"still-here", qos=1)
        assert (await next_message(node)).payload == b"still-here"


async def test_oversize_publish_is_dropped(env: Env) -> None:
    """(d) amqtt had no max packet size on TCP. A payload above max_packet is now dropped unbuffered and the
    connection stays usable (tests/integration/test_broker_security.py has the QoS 1 and hard-cap cases)."""
    nu, npw = env.store.add("node", "n1")
    async with env.edge_client() as edge:
        await edge.subscribe("claw/v1/reply/+", qos=1)
        async with env.tls_client(nu, npw) as node:
            await node.publish("claw/v1/reply/wc.bob", b"x" * MAX_PACKET, qos=1)
            assert len((await next_message(edge)).payload) == MAX_PACKET  # type: ignore[arg-type]
            await node.publish("claw/v1/reply/wc.bob", b"x" * (MAX_PACKET * 4), qos=0)
            await node.publish("claw/v1/reply/wc.bob", b"marker", qos=1)
        assert (await next_message(edge)).payload == b"marker"  # the oversize one, sent before, never came
        assert env.h.broker.counters.oversize_dropped == 1


async def test_bare_tcp_connect_close_is_not_an_error(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """(e) amqtt logged every health check (connect, close) at ERROR."""
    caplog.set_level(logging.INFO)
    ended = env.h.broker.refusals.ended  # connections the broker is done with (logging included)
    for port in (env.h.local_port, env.h.tls_port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
    _, writer = await asyncio.open_connection("127.0.0.1", env.h.local_port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")  # garbage instead of CONNECT
    await writer.drain()
    writer.close()
    # the broker is done with both on the plain port (and logged what it had to say)
    await wait_until(lambda: env.h.broker.refusals.ended >= ended + 2, 10)
    # The TLS one ended in its handshake, before the broker's handler: a later connection on that listener, served
    # to its CONNACK, is the barrier (the bare one's end was read long before it)
    nu, npw = env.store.add("node", "n1")
    async with env.tls_client(nu, npw):
        pass
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]
    async with env.edge_client():  # the broker is fine
        pass


async def test_keepalive_is_enforced_and_will_fires(env: Env) -> None:
    """(f) amqtt never disconnected a silent client, so a half-open node's will never fired."""
    nu, npw = env.store.add("node", "n1")
    async with env.edge_client() as edge:
        await edge.subscribe("claw/v1/node/+", qos=1)
        reader, writer = await env.raw_node_with_will("node.n1:raw", nu, npw, keepalive=1)
        async with asyncio.timeout(5):  # silent: closed after 1.5 x 1 s (rounded up to 2 s)
            assert await reader.read() == b""
        msg = await next_message(edge)
        assert msg.topic.value == "claw/v1/node/n1" and msg.payload == b"offline"
        writer.close()


async def test_silent_connection_is_dropped(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that opens TCP and never sends CONNECT is closed after CONNECT_TIMEOUT (amqtt: never)."""
    import broker.amqtt_overrides

    monkeypatch.setattr(broker.amqtt_overrides, "CONNECT_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection(env.h.local_host, env.h.local_port)
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # EOF: the broker closed it
    writer.close()


async def test_mqtt5_connect_with_username_is_closed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """amqtt never answered an MQTT 5 CONNECT carrying a username; it is now dropped at CONNECT_TIMEOUT.

    (aiomqtt itself only notices at its own timeout, so this speaks raw MQTT.)
    """
    import broker.amqtt_overrides

    monkeypatch.setattr(broker.amqtt_overrides, "CONNECT_TIMEOUT", 0.3)
    user, pw = env.store.add("node", "n1")
    reader, writer = await asyncio.open_connection(env.h.local_host, env.h.local_port)
    writer.write(raw_connect_packet("v5", user, pw, keepalive=60, level=5))
    await writer.drain()
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()


# -- start-up ------------------------------------------------------------------------------------------------

async def test_port_in_use_is_a_clear_start_error(tmp_path: Path) -> None:
    issue_server_cert(tmp_path / "pki", ["localhost", "127.0.0.1"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BrokerStartError, match=f"'local'.*{port}"):
            async with run_broker(_settings(tmp_path, local_listen=f"127.0.0.1:{port}")):
                pass
        with pytest.raises(BrokerStartError, match=f"'tls'.*{port}"):
            async with run_broker(_settings(tmp_path, listen=f"127.0.0.1:{port}")):
                pass


async def test_missing_certificate_is_a_clear_start_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerStartError, match="'tls'.*server.crt"):
        async with run_broker(_settings(tmp_path)):
            pass


async def test_without_tls_listener(tmp_path: Path) -> None:
    async with run_broker(_settings(tmp_path, listen="")) as h:
        assert h.tls_port is None and h.tls_host is None and h.local_port > 0
        async with aiomqtt.Client(h.local_host, h.local_port, username=h.internal_user,
                                  password=h.internal_password, protocol=aiomqtt.ProtocolVersion.V311, timeout=5):
            pass


# ---- the in-process link (broker/local.py) ------------------------------------------------------------


async def test_local_link_receives_and_publishes_like_a_client(env: Env) -> None:
    """The edge bridge's in-process link gets what matches its filters, in order, and what it publishes
    reaches a real TLS client subscribed to it (at the subscription's QoS)."""
    from broker.local import LocalLink
    user, pw = env.store.add("node", "n1")
    got: list[tuple[str, bytes]] = []
    async with LocalLink(env.h.broker) as link, env.tls_client(user, pw) as node:
        await link.subscribe([("claw/v1/reply/+", 1), ("claw/v1/batch/+", 1)])
        five = asyncio.Event()

        def on_message(topic: str, data: bytes) -> None:
            got.append((topic, bytes(data)))
            if len(got) == 5:
                five.set()

        link.on_message = on_message
        await node.subscribe("claw/v1/task/+", qos=1)  # (the broker adds a subscription before its SUBACK)
        for i in range(5):
            await node.publish("claw/v1/reply/web.alice", f"r{i}".encode(), qos=1)
        await node.publish("claw/v1/node/n1", b"beat", qos=1)  # not subscribed: not delivered
        await link.publish("claw/v1/task/web.alice", b"task-1")
        msg = await next_message(node)
        assert msg.topic.value == "claw/v1/task/web.alice" and msg.payload == b"task-1" and msg.qos == 1
        await asyncio.wait_for(five.wait(), 5)
    assert got == [("claw/v1/reply/web.alice", f"r{i}".encode()) for i in range(5)]
    with pytest.raises(ValueError):
        env.h.broker.local_publish("claw/v1/task/+", b"x")


async def test_local_link_handler_failure_does_not_stop_the_broker(env: Env,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A message the bridge's handler chokes on is logged and counted; the next ones and every other
    subscriber still get theirs."""
    from broker.local import LocalLink
    user, pw = env.store.add("node", "n1")
    got: list[bytes] = []
    good = asyncio.Event()

    def handler(topic: str, data: bytes) -> None:
        if data == b"bad":
            raise RuntimeError("bridge bug")
        got.append(bytes(data))
        good.set()

    async with LocalLink(env.h.broker) as link, env.tls_client(user, pw) as node, \
            env.edge_client() as watcher:
        await link.subscribe([("claw/v1/reply/+", 1)])
        link.on_message = handler
        await watcher.subscribe("claw/v1/reply/+", qos=1)  # (the broker adds a subscription before its SUBACK)
        for payload in (b"bad", b"good"):
            await node.publish("claw/v1/reply/web.alice", payload, qos=1)
        assert (await next_message(watcher)).payload == b"bad"
        assert (await next_message(watcher)).payload == b"good"
        await asyncio.wait_for(good.wait(), 5)
        assert got == [b"good"] and link.failed == 1 and link.delivered == 1
    assert "bridge bug" in caplog.text


async def test_local_link_ends_when_the_broker_stops_and_shutdown_is_prompt(tmp_path: Path) -> None:
    import time

    from broker.local import LocalLink
    issue_server_cert(tmp_path / "pki", ["localhost", "127.0.0.1"])
    async with contextlib.AsyncExitStack() as stack:
        h = await stack.enter_async_context(run_broker(_settings(tmp_path)))
        link = await stack.enter_async_context(LocalLink(h.broker))
        waiter = asyncio.ensure_future(link.wait_closed())
        await asyncio.sleep(0)  # one loop pass: the waiter's first step (queued before ours) runs to its wait
        assert not waiter.done()
        t0 = time.monotonic()
        await h.broker.shutdown()
        assert time.monotonic() - t0 < 2.0  # the broadcast loop stops at once, not after amqtt's timeout
        with pytest.raises(aiomqtt.MqttError):
            await waiter
        with pytest.raises(aiomqtt.MqttError):
            link.publish_nowait("claw/v1/task/web.alice", b"x")
        stack.pop_all()  # already shut down
    with pytest.raises(aiomqtt.MqttError):
        async with LocalLink(h.broker):
            pass


async def test_a_local_link_is_refused_once_the_broker_is_stopping(tmp_path: Path) -> None:
    """A bridge reconnecting while the broker shuts down gets an error, not a link nobody will ever close."""
    from broker.local import LocalLink
    issue_server_cert(tmp_path / "pki", ["localhost", "127.0.0.1"])
    async with run_broker(_settings(tmp_path)) as h:
        h.broker.refuse_links()  # what shutdown() does first
        with pytest.raises(aiomqtt.MqttError):
            async with LocalLink(h.broker):
                pass
