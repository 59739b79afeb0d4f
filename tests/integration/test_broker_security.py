"""Broker authentication and connection hygiene, with real brokers, TLS, LMDB and MQTT clients.

- client ids belong to credentials: a device cannot hold, take over or squat the node's (or another device's) id;
- failed logins are throttled and the verification queue is bounded: a flood of bad passwords does not starve a
  legitimate login, nor evict it from the cache;
- every packet's size is checked before its body is read (CONNECT, SUBSCRIBE, PUBLISH); an oversize PUBLISH is
  dropped and acknowledged instead of closing the connection (which made clients resend it on every reconnect);
- keepalive 0 is not "forever"; connection caps refuse at once; PUBACK timeouts are counted, not tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError

from broker.app import BrokerHandle, run_broker
from broker.creds import CredentialStore
from core.config import Settings, load_settings
from core.pki import issue_server_cert
from tests.conftest import run_system, wait_until
from tests.fuzz.mqtt_cases import rl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
MAX_PACKET = 4096
CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_UNAVAILABLE = b"\x20\x02\x00\x03"
CONNACK_NOT_AUTHORIZED = b"\x20\x02\x00\x05"
ID_REJECTED = 133  # paho's reason code for CONNACK 2 "identifier rejected"


# -- helpers -------------------------------------------------------------------------------------------------------

@dataclass
class Env:
    h: BrokerHandle
    store: CredentialStore
    ca: Path

    def client(self, username: str, password: str, **kw: object) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", self.h.tls_port or 0, username=username, password=password,
            tls_context=ssl.create_default_context(cafile=str(self.ca)),
            protocol=aiomqtt.ProtocolVersion.V311, socket_options=NODELAY, timeout=5, **kw)  # type: ignore[arg-type]

    def edge(self) -> aiomqtt.Client:
        return aiomqtt.Client(self.h.local_host, self.h.local_port, username=self.h.internal_user,
                              password=self.h.internal_password, protocol=aiomqtt.ProtocolVersion.V311,
                              socket_options=NODELAY, timeout=5)

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return await asyncio.open_connection("127.0.0.1", self.h.tls_port, ssl=ctx)


@contextlib.asynccontextmanager
async def broker_env(tmp: Path, **broker: object) -> AsyncIterator[Env]:
    pki = issue_server_cert(tmp / "pki", ["localhost", "127.0.0.1"])
    settings = load_settings(env={}, overrides={"data_dir": str(tmp), "broker": {
        "listen": "127.0.0.1:0", "max_packet": MAX_PACKET, **broker}})
    async with run_broker(settings) as h:
        yield Env(h, CredentialStore(tmp), pki.ca_cert)


def _str(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def connect_packet(client_id: str, username: str, password: str, *, keepalive: int = 60,
                   clean: bool = True) -> bytes:
    flags = 0x80 | 0x40 | (0x02 if clean else 0)
    body = (_str(b"MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + _str(client_id.encode())
            + _str(username.encode()) + _str(password.encode()))
    return b"\x10" + rl(len(body)) + body


async def raw_login(env: Env, client_id: str, username: str, password: str, **kw: object
                    ) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await env.raw()
    writer.write(connect_packet(client_id, username, password, **kw))  # type: ignore[arg-type]
    await writer.drain()
    async with asyncio.timeout(20):
        return await reader.readexactly(4), reader, writer


async def assert_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while await reader.read(65536):
            pass


def _bad_pw(i: int) -> str:
    return f"wrong-{i}-" + os.urandom(6).hex()


# -- 1. client ids belong to credentials ---------------------------------------------------------------------------

async def test_device_cannot_take_or_squat_the_nodes_client_id(tmp_path: Path, pki_dir: Path) -> None:
    """A device credential used the node's predictable client id: it took over the node's connection (or held
    the id while the node reconnected), and the node stayed offline. Now that id is refused with CONNACK 2."""
    from edge.keys import BRIDGE, BROKER
    from node.worker import Node

    async with run_system(tmp_path, pki_dir) as sys_:
        bridge = sys_.app[BRIDGE]
        broker = sys_.app[BROKER]  # the embedded broker
        node_id = sys_.node.link.client.identifier  # "node.t1", its username (was "node-t1")
        du, dpw = CredentialStore(sys_.settings.data_dir).add("device", "mallory")
        ca = Path(sys_.settings.data_dir) / "pki" / "ca.crt"
        port = sys_.settings.mqtt.port

        def device(cid: str, clean: bool = True) -> aiomqtt.Client:
            return aiomqtt.Client("localhost", port, username=du, password=dpw, identifier=cid, clean_session=clean,
                                  tls_context=ssl.create_default_context(cafile=str(ca)),
                                  protocol=aiomqtt.ProtocolVersion.V311, timeout=5)

        ids = sorted({node_id, "node.t1", "node-t1", "node.t1:x", "dev.mallory-x"})
        rcs = []
        for cid in ids:  # while the node is connected: no takeover
            with pytest.raises(MqttConnectError) as info:
                async with device(cid):
                    pass
            rcs.append(info.value.rc)
        assert broker.sessions[node_id][0].transitions.is_connected() and bridge.node_online

        # the node goes away; the device tries to squat its ids with persistent sessions
        assert sys_.node_task is not None
        sys_.node_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sys_.node_task
        # the node's clean session ends with its connection (it is discarded, broker/session.py)
            await wait_until(lambda: node_id not in broker.sessions
                             or not broker.sessions[node_id][0].transitions.is_connected(), 10)
        for cid in ids:
            with pytest.raises(MqttConnectError) as info:
                async with device(cid, clean=False):
                    pass
            rcs.append(info.value.rc)
        assert rcs == [ID_REJECTED] * (2 * len(ids))  # CONNACK 2 "identifier rejected", not "not authorized"
        assert all(s.username != du for s, _ in broker.sessions.values())
        async with device(""), device(f"{du}:spare"):  # its own ids are fine
            pass

        node = Node(sys_.node.s)  # the node comes back under its id
        sys_.node, sys_.node_task = node, asyncio.create_task(node.run())
        await wait_until(lambda: node_id in broker.sessions and broker.sessions[node_id][0].transitions.is_connected(),
                             10)
        await wait_until(lambda: bridge.node_online, 10)
        assert node_id == "node.t1" and broker.counters.client_id_refused == 2 * len(ids)


async def test_device_cannot_squat_another_devices_persistent_session(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        au, apw = env.store.add("device", "alice")
        mu, mpw = env.store.add("device", "mallory")
        nu, npw = env.store.add("node", "n1")
        async with env.client(au, apw, identifier=au, clean_session=False) as alice:
            await alice.subscribe(f"claw/v1/reply/{au}", qos=1)
        for cid in (au, f"{au}:1"):  # alice is offline: her persistent session waits for her
            with pytest.raises(MqttConnectError) as info:
                async with env.client(mu, mpw, identifier=cid, clean_session=False):
                    pass
            assert info.value.rc == ID_REJECTED
        assert env.h.broker.sessions[au][0].username == au
        async with env.client(nu, npw) as node:
            await node.publish(f"claw/v1/reply/{au}", b"queued", qos=1)
        async with env.client(au, apw, identifier=au, clean_session=False) as alice:
            async with asyncio.timeout(5):
                async for msg in alice.messages:
                    assert msg.payload == b"queued"
                    break


async def test_empty_client_id_gets_one_of_the_users(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "d1")
        async with env.client(du, dpw), env.client(du, dpw):  # paho sends an empty id for MQTT 3.1.1
            ids = [cid for cid, (s, _) in env.h.broker.sessions.items() if s.transitions.is_connected()]
            assert len(ids) == 2 and all(cid.startswith(f"{du}:") for cid in ids), ids


async def test_node_with_a_foreign_client_id_logs_the_real_cause(tmp_path: Path, pki_dir: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """``mqtt.client_id`` must obey the rule too; the node's log names the cause (not "bad username/password")."""
    from node.worker import Node

    caplog.set_level(logging.INFO)
    async with run_system(tmp_path, pki_dir, start_node=False, mqtt={"client_id": "node-t1"}) as sys_:
        node = Node(sys_.node.s)
        sys_.node, sys_.node_task = node, asyncio.create_task(node.run())

        def logged(text: str) -> bool:
            return any(text in r.getMessage() for r in caplog.records)

        await wait_until(lambda: logged("client id rejected"), 10)
        assert logged("mqtt.client_id 'node-t1' is neither the username")
        assert logged("MQTT CONNECT refused (CONNACK 2, identifier rejected): user 'node.t1', client id 'node-t1'")
        assert not logged("bad username/password")


# -- 2. failed-login throttling ------------------------------------------------------------------------------------

async def _connack(opening: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]], client_id: str,
                   username: str, password: str, *, timeout: float, sent: list[int] | None = None) -> bytes:
    """One CONNECT on the raw connection ``opening`` makes: the CONNACK it got (b"" if closed). ``sent[0]``
    counts the CONNECTs written."""
    try:
        reader, writer = await opening
        writer.write(connect_packet(client_id, username, password))
        await writer.drain()
        if sent is not None:
            sent[0] += 1
        async with asyncio.timeout(timeout):
            ack = await reader.readexactly(4)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        return b""
    writer.close()
    return ack


async def _flood(env: Env, username: str, n: int, sent: list[int] | None = None) -> list[bytes]:
    """``n`` concurrent CONNECTs with wrong passwords; the CONNACK each got (b"" if closed). ``sent[0]`` counts
    the CONNECTs written so far."""
    async def one(i: int) -> bytes:
        return await _connack(env.raw(), f"{username}:f{i}", username, _bad_pw(i), timeout=30, sent=sent)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_bad_password_flood_does_not_starve_a_legitimate_login(tmp_path: Path) -> None:
    """300 concurrent bad-password CONNECTs used to queue 300 scrypt checks (two at a time) ahead of a
    legitimate login, which then timed out. Now all but a few are refused at once with CONNACK 3."""
    async with broker_env(tmp_path) as env:
        nu, npw = env.store.add("node", "n1")
        du, _ = env.store.add("device", "victim")
        loop = asyncio.get_running_loop()
        sent = [0]
        flood = asyncio.create_task(_flood(env, du, 300, sent))
        await wait_until(lambda: sent[0] == 300, 30)  # all 300 CONNECTs are on their way
        t0 = loop.time()
        async with env.client(nu, npw):  # first login: needs scrypt, from the same IP
            took = loop.time() - t0
        acks = await flood
        assert took < 5, f"legitimate login took {took:.1f} s during the flood"
        assert acks.count(CONNACK_UNAVAILABLE) >= 280, {a: acks.count(a) for a in set(acks)}
        assert acks.count(CONNACK_OK) == 0


async def test_good_login_survives_a_flood_on_its_own_username(tmp_path: Path) -> None:
    """A flood of wrong passwords for the node's own username, from the node's IP, exhausts that (IP, username)
    bucket, but the node's remembered good login needs no scrypt and still gets in at once."""
    async with broker_env(tmp_path) as env:
        nu, npw = env.store.add("node", "n1")
        async with env.client(nu, npw):
            pass
        acks = await _flood(env, nu, 300)
        assert acks.count(CONNACK_UNAVAILABLE) >= 290 and acks.count(CONNACK_NOT_AUTHORIZED) <= 10
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with env.client(nu, npw):
            assert loop.time() - t0 < 2
        with pytest.raises(MqttConnectError):  # and the throttle still holds for wrong passwords
            async with env.client(nu, _bad_pw(-1)):
                pass


async def test_verification_queue_is_bounded(tmp_path: Path) -> None:
    """With more password checks waiting than broker.auth_queue, the next one is refused at once (CONNACK 3)."""
    async with broker_env(tmp_path, auth_queue=2) as env:
        users = [env.store.add("device", f"d{i}") for i in range(6)]
        acks = await asyncio.gather(*(raw_login(env, u, u, pw) for u, pw in users))
        codes = [a for a, _, _ in acks]
        for _, _, w in acks:
            w.close()
        assert codes.count(CONNACK_OK) >= 2 and codes.count(CONNACK_UNAVAILABLE) >= 1, codes
        assert env.h.broker.counters.auth_busy == codes.count(CONNACK_UNAVAILABLE)
        u, pw = users[-1]
        async with env.client(u, pw):  # later, with the queue empty again, fine
            pass


# -- 3. packet sizes, keepalive, connection caps, PUBACK timeouts --------------------------------------------------

async def test_oversize_connect_is_closed_before_its_body_is_read(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        reader, writer = await env.raw()
        writer.write(b"\x10" + rl(10 * 1024 * 1024) + b"\x00\x04MQTT\x04\xc2")  # 10 MiB announced
        await writer.drain()
        await assert_closed(reader)
        assert env.h.broker.counters.oversize_closed == 1


async def test_oversize_subscribe_is_closed_before_its_body_is_read(tmp_path: Path) -> None:
    """A 38 MiB SUBSCRIBE (many small topic filters) was read and accepted; now the header alone closes it."""
    async with broker_env(tmp_path) as env:
        nu, npw = env.store.add("node", "n1")
        ack, reader, writer = await raw_login(env, nu, nu, npw)
        assert ack == CONNACK_OK
        body = b"\x00\x01" + (_str(b"claw/v1/task/+") + b"\x01") * 4000  # the first ~68 KiB of it
        writer.write(b"\x82" + rl(38 * 1024 * 1024) + body)
        await writer.drain()
        await assert_closed(reader)
        assert env.h.broker.counters.oversize_closed == 1


async def test_oversize_qos1_publish_is_acknowledged_and_dropped(tmp_path: Path) -> None:
    """An oversize PUBLISH got a bare disconnect, and paho sent it again after every reconnect. Now it is read,
    dropped and acknowledged: the client's publish completes, the connection stays usable, nothing repeats."""
    async with broker_env(tmp_path) as env:
        nu, npw = env.store.add("node", "n1")
        async with env.edge() as edge:
            await edge.subscribe("claw/v1/reply/+", qos=1)
            async with env.client(nu, npw) as node:
                async with asyncio.timeout(10):
                    await node.publish("claw/v1/reply/wc.bob", b"x" * (MAX_PACKET * 64), qos=1)  # 256 KiB
                await node.publish("claw/v1/reply/wc.bob", b"after", qos=1)
                async with asyncio.timeout(5):
                    async for msg in edge.messages:
                        assert msg.payload == b"after"
                        break
                await node.publish("claw/v1/reply/wc.bob", b"again", qos=1)  # still the same connection
        assert env.h.broker.counters.oversize_dropped == 1
        assert env.h.broker.counters.oversize_closed == 0


async def test_publish_above_max_drop_closes_the_connection(tmp_path: Path) -> None:
    async with broker_env(tmp_path, max_drop=MAX_PACKET * 4) as env:
        nu, npw = env.store.add("node", "n1")
        ack, reader, writer = await raw_login(env, nu, nu, npw)
        assert ack == CONNACK_OK
        topic = _str(b"claw/v1/reply/wc.bob")
        writer.write(b"\x30" + rl(len(topic) + MAX_PACKET * 100) + topic + b"x" * 1000)  # 400 KiB announced
        await writer.drain()
        await assert_closed(reader)
        assert env.h.broker.counters.oversize_closed == 1


async def test_keepalive_zero_gets_the_servers_maximum(tmp_path: Path) -> None:
    """keepalive=0 meant "never drop me": a half-open client stayed for ever. Now 0 counts as max_keepalive."""
    async with broker_env(tmp_path, max_keepalive=1) as env:
        nu, npw = env.store.add("node", "n1")
        ack, reader, writer = await raw_login(env, nu, nu, npw, keepalive=0)
        assert ack == CONNACK_OK
        await assert_closed(reader, timeout=10)  # silent: closed after 1.5 x 1 s
        writer.close()


async def test_connection_caps_refuse_at_once(tmp_path: Path) -> None:
    async with broker_env(tmp_path, max_connections_per_ip=2) as env:
        nu, npw = env.store.add("node", "n1")
        a = await raw_login(env, nu, nu, f"{npw}")
        b = await raw_login(env, f"{nu}:b", nu, npw)
        assert a[0] == b[0] == CONNACK_OK
        reader, writer = await env.raw()  # the third from this IP: closed without waiting for a CONNECT
        await assert_closed(reader, timeout=3)
        writer.close()
        assert env.h.broker.counters.conn_refused_ip == 1
        a[2].close()
        await wait_until(lambda: env.h.broker.refusals.open == 1, 5)
        c = await raw_login(env, f"{nu}:c", nu, npw)
        assert c[0] == CONNACK_OK
        for _, _, w in (b, c):
            w.close()
    async with broker_env(tmp_path / "g", max_connections=1) as env:
        nu, npw = env.store.add("node", "n1")
        a = await raw_login(env, nu, nu, npw)
        reader, writer = await env.raw()
        await assert_closed(reader, timeout=3)
        assert env.h.broker.counters.conn_refused_global == 1
        for w in (a[2], writer):
            w.close()


async def test_a_non_acking_client_costs_a_bounded_queue_and_one_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One device that never acknowledged made an ERROR traceback per message (amqtt's PUBACK timeout); now its
    messages wait in flight (bounded), then in its session's queue (bounded), the rest are counted and logged once."""
    caplog.set_level(logging.INFO)
    async with broker_env(tmp_path, max_inflight=4, max_queued=6) as env:
        du, dpw = env.store.add("device", "mute")
        ack, reader, writer = await raw_login(env, du, du, dpw)
        assert ack == CONNACK_OK
        topic = f"claw/v1/reply/{du}".encode()
        sub = b"\x00\x01" + _str(topic) + b"\x01"
        writer.write(b"\x82" + rl(len(sub)) + sub)
        await writer.drain()
        assert await reader.readexactly(5) == b"\x90\x03\x00\x01\x01"  # SUBACK QoS 1
        nu, npw = env.store.add("node", "n1")
        async with env.client(nu, npw) as node:
            for i in range(30):
                await node.publish(f"claw/v1/reply/{du}", f"m{i}".encode(), qos=1)
            await wait_until(lambda: env.h.broker.counters.queue_dropped == 30 - 4 - 6, 20)  # never acknowledged
        writer.close()
    lines = [r for r in caplog.records if "outgoing queue full" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_limits_are_validated() -> None:
    from core.config import ConfigError

    for bad in ({"max_drop": 1024, "max_packet": 4096}, {"max_keepalive": 0}, {"max_connections": -1},
                {"auth_queue": 0}):
        with pytest.raises(ConfigError):
            load_settings(env={}, overrides={"broker": bad})
    s: Settings = load_settings(env={})
    assert (s.broker.max_keepalive, s.broker.auth_queue) == (300, 64)


async def test_refused_connects_cannot_flood_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every refused CONNECT was one WARNING: a credential holder (foreign client ids) or a stranger (ever new
    usernames) could write lines without limit. Now at most a burst of 20 per kind, then 20 a minute."""
    caplog.set_level(logging.INFO)
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "noisy")
        for i in range(60):
            ack, _, writer = await raw_login(env, f"node.b{i}", du, dpw)
            assert ack == b"\x20\x02\x00\x02"  # identifier rejected, every time
            writer.close()
        for i in range(60):
            ack, _, writer = await raw_login(env, f"dev.nobody{i}", f"dev.nobody{i}", "x")
            assert ack in (b"\x20\x02\x00\x05", b"\x20\x02\x00\x03")  # not authorised (or throttled)
            writer.close()
        assert env.h.broker.counters.client_id_refused == 60
    refusals = [r for r in caplog.records if "MQTT CONNECT refused" in r.getMessage()]
    assert len([r for r in refusals if "identifier rejected" in r.getMessage()]) <= 21
    assert len([r for r in refusals if "identifier rejected" not in r.getMessage()]) <= 21


# -- 4. the failed-login exemption survives a restart; revoked credentials lose their open sessions --------------

async def _raw_from(env: Env, source_ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the broker from ``source_ip`` (any 127/8 address: Linux routes it all to lo)."""
    ctx = ssl.create_default_context(cafile=str(env.ca))
    return await asyncio.open_connection("127.0.0.1", env.h.tls_port, ssl=ctx, local_addr=(source_ip, 0))


async def _login_from(env: Env, source_ip: str, client_id: str, username: str, password: str) -> bytes:
    return await _connack(_raw_from(env, source_ip), client_id, username, password, timeout=20)


async def test_good_login_exemption_survives_a_broker_restart(tmp_path: Path) -> None:
    """Audit: after a restart, 40 source IPs spraying wrong passwords for ``node.b1`` emptied its per-username
    bucket and kept the node (right password, usual address) out with CONNACK 3 for the whole attack: the
    "(IP, username) logged in recently" exemption lived only in memory. It is now persisted in broker.lmdb."""
    async with broker_env(tmp_path) as env:
        nu, npw = env.store.add("node", "b1")
        assert await _login_from(env, "127.0.0.1", nu, nu, npw) == CONNACK_OK
    # a new broker on the same data dir: empty login cache, empty buckets
    async with broker_env(tmp_path) as env:
        # the buckets' clock stands still: the per-username bucket refills 1 token every 2 s, and on a loaded
        # machine the spray can take that long (the right password would then get in on the refilled token)
        assert env.h.broker.creds is not None
        throttle = env.h.broker.creds.throttle
        frozen = throttle.clock()
        throttle.clock = lambda: frozen

        async def spray(i: int) -> list[bytes]:
            ip = f"127.0.1.{i}"
            return [await _login_from(env, ip, f"{nu}:s{i}-{k}", nu, _bad_pw(k)) for k in range(3)]

        acks = [a for per_ip in await asyncio.gather(*(spray(i) for i in range(1, 41))) for a in per_ip]
        assert acks.count(CONNACK_OK) == 0
        assert acks.count(CONNACK_UNAVAILABLE) >= 60, {a: acks.count(a) for a in set(acks)}  # user bucket empty
        # the right password from an address without a recent success is refused too (the documented limit) ...
        assert await _login_from(env, "127.0.2.1", f"{nu}:other", nu, npw) == CONNACK_UNAVAILABLE
        # ... but not from the node's usual address
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await _login_from(env, "127.0.0.1", nu, nu, npw) == CONNACK_OK
        assert loop.time() - t0 < 3


async def test_recent_logins_are_persisted_at_most_once_per_interval(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        nu, npw = env.store.add("node", "n1")
        auth = next(p for p in env.h.broker.plugins_manager.plugins if hasattr(p, "store"))
        writes: list[int] = []
        real = auth.store._write_logins  # noqa: SLF001

        def counting(batch: dict[tuple[str, str], float]) -> None:
            writes.append(len(batch))
            real(batch)

        auth.store._write_logins = counting  # noqa: SLF001
        for _ in range(5):  # a reconnect storm: one write
            assert (await raw_login(env, nu, nu, npw))[0] == CONNACK_OK
        await auth.store.flush_logins()
        assert writes == [1]


async def _run_claw(tmp: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "claw"), "cred", *args, "--data", str(tmp),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_revoke_disconnects_open_sessions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Audit: ``claw cred revoke`` refused only new CONNECTs; a revoked device kept receiving replies and a
    compromised node would have kept receiving every task. Now the running broker closes their connections
    within a few seconds (broker.cred_check_interval), through the normal path (the will is sent)."""
    caplog.set_level(logging.INFO)
    async with broker_env(tmp_path) as env:  # broker.cred_check_interval: the default 2 s
        du, dpw = env.store.add("device", "d1")
        nu, npw = env.store.add("node", "n1")
        ou, opw = env.store.add("device", "other")
        _, dev_r, dev_w = await raw_login(env, du, du, dpw)  # the writers are kept: collected, they close
        _, other_r, other_w = await raw_login(env, ou, ou, opw)
        async with env.edge() as edge, env.client(nu, npw, identifier=nu, will=aiomqtt.Will("claw/v1/node/n1",
                                                                             b"gone", qos=1)):
            await edge.subscribe("claw/v1/node/+", qos=1)
            await wait_until(lambda: env.h.broker.sessions.get(nu) is not None
                             and env.h.broker.sessions[nu][0].transitions.is_connected(), 10)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await _run_claw(tmp_path, "revoke", du)
            await assert_closed(dev_r, 10)
            await _run_claw(tmp_path, "revoke", "n1")
            async with asyncio.timeout(10):
                async for msg in edge.messages:  # the node's connection was closed: its will fired
                    assert msg.payload == b"gone"
                    break
            assert loop.time() - t0 < 20
        # the other device is untouched (the broker still answers its PINGREQ), the revoked ones cannot come back
        other_w.write(b"\xc0\x00")
        await other_w.drain()
        async with asyncio.timeout(10):
            assert await other_r.readexactly(2) == b"\xd0\x00"  # PINGRESP
        assert env.h.broker.sessions[ou][0].transitions.is_connected()
        assert (await raw_login(env, du, du, dpw))[0] == CONNACK_NOT_AUTHORIZED
        assert (await raw_login(env, nu, nu, npw))[0] == CONNACK_NOT_AUTHORIZED
        lines = [r.getMessage() for r in caplog.records if "its credential was revoked" in r.getMessage()]
        assert len(lines) == 2 and all(dpw not in x and npw not in x for x in lines), lines
        dev_w.close()
        other_w.close()


async def test_replace_disconnects_the_old_password_and_the_new_one_works(tmp_path: Path) -> None:
    async with broker_env(tmp_path, cred_check_interval=0.5) as env:
        du, old = env.store.add("device", "d1")
        _, dev_r, dev_w = await raw_login(env, du, du, old)
        out = await _run_claw(tmp_path, "add", "device", "d1", "--replace")
        new = next(line.split()[-1] for line in out.splitlines() if line.startswith("password:"))
        await assert_closed(dev_r, 10)
        assert (await raw_login(env, du, du, old))[0] == CONNACK_NOT_AUTHORIZED
        ack, new_r, new_w = await raw_login(env, du, du, new)
        assert ack == CONNACK_OK
        assert await env.h.broker.check_credentials() == 0  # the new session is not closed
        assert not new_r.at_eof() and env.h.broker.sessions[du][0].transitions.is_connected()
        dev_w.close()
        new_w.close()
