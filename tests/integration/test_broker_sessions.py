"""Session semantics and the device publish rate of the embedded broker (broker/session.py, broker/ratelimit.py).

Each test starts its own broker (real TLS, real LMDB credentials) on 127.0.0.1 port 0 and talks to it with real
clients: a raw MQTT 3.1.1 client over TLS where the exact packets matter (DUP flag, packet ids, no PUBACK),
paho-mqtt for the session-present flag, aiomqtt elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from broker.app import run_broker
from broker.creds import CredentialStore
from broker.session import OUTBOX_KEY, Outbox
from core.config import load_settings
from core.pki import issue_server_cert
from tests.conftest import wait_until
from tests.integration.test_broker import Env, next_message

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPLY = "claw/v1/reply/dev.alice"


@contextlib.asynccontextmanager
async def broker_env(tmp_path: Path, **broker: object) -> AsyncIterator[Env]:
    pki = issue_server_cert(tmp_path / "pki", ["localhost", "127.0.0.1"])
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path),
                                                "broker": {"listen": "127.0.0.1:0", **broker}})
    async with run_broker(settings) as h:
        yield Env(h, CredentialStore(tmp_path), pki.ca_cert, tmp_path)


# -- a raw MQTT 3.1.1 client: every packet under the test's control ------------------------------------------


def _s(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | 0x80 if n else byte)
        if not n:
            return bytes((first,)) + bytes(length) + body


@dataclass
class Pub:
    topic: str
    payload: bytes
    qos: int
    dup: bool
    packet_id: int


class Raw:
    """A minimal MQTT 3.1.1 client over TLS that never acknowledges anything by itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session_present: bool | None = None
        self._next_id = 0

    @classmethod
    async def connect(cls, env: Env, user: str, password: str, client_id: str, *, clean: bool) -> Raw:
        ctx = ssl.create_default_context(cafile=str(env.ca))
        reader, writer = await asyncio.open_connection("127.0.0.1", env.h.tls_port, ssl=ctx)
        raw = cls(reader, writer)
        flags = 0x80 | 0x40 | (0x02 if clean else 0)
        body = _s(b"MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + _s(client_id.encode()) + \
            _s(user.encode()) + _s(password.encode())
        writer.write(_packet(0x10, body))
        first, data = await raw.read()
        assert first == 0x20 and data[1] == 0, f"CONNACK refused: {data!r}"
        raw.session_present = bool(data[0] & 1)
        return raw

    async def read(self, timeout: float = 5.0) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            first = (await self.reader.readexactly(1))[0]
            mult, length = 1, 0
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length += (byte & 0x7F) * mult
                mult *= 128
                if not byte & 0x80:
                    break
            return first, await self.reader.readexactly(length)

    async def subscribe(self, topic_filter: str, qos: int) -> int:
        self._next_id += 1
        self.writer.write(_packet(0x82, self._next_id.to_bytes(2, "big") + _s(topic_filter.encode()) +
                                  bytes([qos])))
        first, data = await self.read()
        assert first == 0x90 and int.from_bytes(data[:2], "big") == self._next_id
        return data[2]  # granted QoS (or 0x80)

    async def next_publish(self, timeout: float = 5.0) -> Pub:
        while True:
            first, data = await self.read(timeout)
            if first >> 4 == 3:
                qos = (first >> 1) & 3
                n = int.from_bytes(data[:2], "big")
                topic, rest = data[2:2 + n].decode(), data[2 + n:]
                packet_id = int.from_bytes(rest[:2], "big") if qos else 0
                return Pub(topic, rest[2:] if qos else rest, qos, bool(first & 0x08), packet_id)

    def puback(self, packet_id: int) -> None:
        self.writer.write(b"\x40\x02" + packet_id.to_bytes(2, "big"))

    def drop(self) -> None:
        """Close the TCP connection without a DISCONNECT (a link loss)."""
        self.writer.transport.abort()


def _outbox(env: Env, client_id: str) -> Outbox:
    outbox = env.h.broker.sessions[client_id][0].attributes.get(OUTBOX_KEY)
    assert isinstance(outbox, Outbox)
    return outbox


def _state(env: Env, client_id: str) -> str | None:
    entry = env.h.broker.sessions.get(client_id)
    return entry[0].transitions.state if entry else None


# -- 1. unacknowledged QoS 1 messages are re-sent on resume, offline messages are queued (bounded) ----------


async def test_unacked_qos1_resent_with_dup_on_resume_then_offline_then_new(tmp_path: Path) -> None:
    """MQTT-4.4.0-1: chunks 11-13 in flight when the link drops come again with DUP=1 and their packet ids,
    before the chunks published while offline, before new ones, in order."""
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        dev = await Raw.connect(env, du, dpw, "dev.alice:r", clean=False)
        assert dev.session_present is False
        assert await dev.subscribe(REPLY, 1) == 1
        async with env.tls_client(nu, npw) as node:
            for i in range(1, 14):
                await node.publish(REPLY, f"c{i:02}".encode(), qos=1)
            first = [await dev.next_publish() for _ in range(13)]
            assert [p.payload for p in first] == [f"c{i:02}".encode() for i in range(1, 14)]
            assert all(p.qos == 1 and not p.dup for p in first)
            for p in first[:10]:
                dev.puback(p.packet_id)
            await wait_until(lambda: len(_outbox(env, "dev.alice:r").inflight) == 3, 5)
            dev.drop()
            await wait_until(lambda: _state(env, "dev.alice:r") == "disconnected", 5)
            for i in range(14, 17):  # published while the device is offline
                await node.publish(REPLY, f"c{i:02}".encode(), qos=1)
            await wait_until(lambda: len(_outbox(env, "dev.alice:r").queue) == 3, 5)

            dev = await Raw.connect(env, du, dpw, "dev.alice:r", clean=False)
            assert dev.session_present is True
            again = [await dev.next_publish() for _ in range(3)]
            assert [(p.payload, p.dup, p.packet_id) for p in again] == \
                [(p.payload, True, p.packet_id) for p in first[10:]]
            await node.publish(REPLY, b"c17", qos=1)
            rest = [await dev.next_publish() for _ in range(4)]
            assert [(p.payload, p.dup) for p in rest] == [(f"c{i:02}".encode(), False) for i in range(14, 18)]
            for p in again + rest:
                dev.puback(p.packet_id)
            await wait_until(lambda: not _outbox(env, "dev.alice:r").inflight, 5)
            dev.drop()


async def test_offline_queue_is_bounded(tmp_path: Path) -> None:
    async with broker_env(tmp_path, max_queued=5) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        dev = await Raw.connect(env, du, dpw, "dev.alice:b", clean=False)
        await dev.subscribe(REPLY, 1)
        dev.drop()
        await wait_until(lambda: _state(env, "dev.alice:b") == "disconnected", 5)
        async with env.tls_client(nu, npw) as node:
            for i in range(8):
                await node.publish(REPLY, f"q{i}".encode(), qos=1)
            await wait_until(lambda: _outbox(env, "dev.alice:b").dropped == 3, 5)
            assert len(_outbox(env, "dev.alice:b").queue) == 5
            dev = await Raw.connect(env, du, dpw, "dev.alice:b", clean=False)
            got = [await dev.next_publish() for _ in range(5)]
            assert [p.payload for p in got] == [f"q{i}".encode() for i in range(5)]  # the oldest five, in order
            for p in got:
                dev.puback(p.packet_id)
            await node.publish(REPLY, b"after", qos=1)
            assert (await dev.next_publish()).payload == b"after"
            dev.drop()


async def test_inflight_window_waits_for_pubacks_and_never_times_out(tmp_path: Path) -> None:
    """At most broker.max_inflight unacknowledged messages; the rest wait, in order; no 5 s PUBACK timeout."""
    async with broker_env(tmp_path, max_inflight=4) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        dev = await Raw.connect(env, du, dpw, "dev.alice:w", clean=True)
        await dev.subscribe(REPLY, 1)
        async with env.tls_client(nu, npw) as node:
            for i in range(10):
                await node.publish(REPLY, f"w{i}".encode(), qos=1)
            first = [await dev.next_publish() for _ in range(4)]
            await wait_until(lambda: len(_outbox(env, "dev.alice:w").queue) == 6, 5)
            assert len(_outbox(env, "dev.alice:w").inflight) == 4
            dev.puback(first[0].packet_id)
            nxt = await dev.next_publish()
            assert nxt.payload == b"w4" and len(_outbox(env, "dev.alice:w").inflight) == 4
            got = [nxt]
            for p in first[1:] + got:
                dev.puback(p.packet_id)
            while len(got) < 6:
                p = await dev.next_publish()
                dev.puback(p.packet_id)
                got.append(p)
            assert [p.payload for p in got] == [f"w{i}".encode() for i in range(4, 10)]
            await wait_until(lambda: not _outbox(env, "dev.alice:w").inflight, 5)
        dev.drop()


# -- 2. a clean-session connection's session ends with it ---------------------------------------------------


async def _paho_connect(env: Env, user: str, password: str, client_id: str, clean: bool,
                        on_message: object = None) -> tuple[paho.Client, bool]:
    """Connect with paho-mqtt; returns the client (network loop running) and CONNACK's session-present flag."""
    got: dict[str, bool] = {}
    done = threading.Event()

    def on_connect(client: paho.Client, userdata: object, flags: paho.ConnectFlags, rc: object,
                   props: object) -> None:
        got["present"] = flags.session_present
        got["ok"] = not getattr(rc, "is_failure", False)
        done.set()

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                    protocol=paho.MQTTv311)
    c.username_pw_set(user, password)
    c.tls_set(ca_certs=str(env.ca))
    c.on_connect = on_connect
    if on_message is not None:
        c.on_message = on_message  # type: ignore[assignment]
    c.connect_async("127.0.0.1", env.h.tls_port or 0, keepalive=30)  # (the broker runs in this thread's loop)
    c.loop_start()
    assert await asyncio.to_thread(done.wait, 10), "no CONNACK"
    assert got["ok"]
    return c, got["present"]


async def _paho_close(c: paho.Client) -> None:
    c.disconnect()
    await asyncio.to_thread(c.loop_stop)


async def test_clean_session_is_discarded_when_its_connection_ends(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        c, present = await _paho_connect(env, du, dpw, "dev.alice:c", clean=True)
        assert present is False
        await _paho_close(c)
        await wait_until(lambda: _state(env, "dev.alice:c") != "connected", 5)
        # right after: no session to resume (amqtt kept it until its monitor ran and reported present = 1)
        c, present = await _paho_connect(env, du, dpw, "dev.alice:c", clean=False)
        assert present is False
        c.subscribe(REPLY, qos=1)
        await wait_until(lambda: REPLY in env.h.broker.subscriptions and env.h.broker.subscriptions[REPLY], 5)
        await _paho_close(c)
        await wait_until(lambda: _state(env, "dev.alice:c") == "disconnected", 5)
        async with env.tls_client(nu, npw) as node:
            await node.publish(REPLY, b"kept", qos=1)  # queued: this session is a persistent one
            await wait_until(lambda: len(_outbox(env, "dev.alice:c").queue) == 1, 5)
        async with env.tls_client(du, dpw, identifier="dev.alice:c", clean_session=False) as dev:
            assert (await next_message(dev)).payload == b"kept"


async def test_clean_session_taken_over_by_a_persistent_one_is_not_resumed(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "alice")
        old = await Raw.connect(env, du, dpw, "dev.alice:t", clean=True)
        await old.subscribe(REPLY, 1)
        c, present = await _paho_connect(env, du, dpw, "dev.alice:t", clean=False)
        assert present is False
        subs = env.h.broker.subscriptions.get(REPLY) or []
        assert all(s.client_id != "dev.alice:t" for s, _ in subs)  # the old clean session's subscription is gone
        await _paho_close(c)
        old.drop()


async def test_paho_offline_message_queueing(tmp_path: Path) -> None:
    """The paho interoperability suite's offline queueing scenario: subscribe (QoS 2 asked, 1 granted) with
    clean session 0, disconnect, messages at QoS 0, 1 and 2 are published; on reconnect the QoS 1 and 2 ones
    arrive (at QoS 1), the QoS 0 one is not queued."""
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        granted: list[int] = []
        subscribed = threading.Event()
        c, present = await _paho_connect(env, du, dpw, "dev.alice:o", clean=False)
        assert present is False

        def on_subscribe(client: paho.Client, userdata: object, mid: int, codes: list[object],
                         props: object) -> None:
            granted.extend(int(getattr(rc, "value", rc)) for rc in codes)  # type: ignore[call-overload]
            subscribed.set()

        c.on_subscribe = on_subscribe
        c.subscribe(REPLY, qos=2)
        assert await asyncio.to_thread(subscribed.wait, 10) and granted == [1]
        await _paho_close(c)
        await wait_until(lambda: _state(env, "dev.alice:o") == "disconnected", 5)
        async with env.tls_client(nu, npw) as node:
            for qos in (0, 1, 2):
                await node.publish(REPLY, f"qos{qos}".encode(), qos=qos)
            await wait_until(lambda: len(_outbox(env, "dev.alice:o").queue) == 2, 5)
            got: list[tuple[bytes, int]] = []
            arrived = threading.Event()

            def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
                got.append((msg.payload, msg.qos))
                if len(got) == 2:
                    arrived.set()

            c, present = await _paho_connect(env, du, dpw, "dev.alice:o", clean=False, on_message=on_message)
            assert present is True
            assert await asyncio.to_thread(arrived.wait, 10)
            await node.publish(REPLY, b"marker", qos=1)  # anything queued would have come before it
            await wait_until(lambda: len(got) == 3, 5)
            assert got == [(b"qos1", 1), (b"qos2", 1), (b"marker", 1)]
            await _paho_close(c)


# -- 3. delivery QoS = min(publish QoS, granted QoS); at most QoS 1 is granted ------------------------------


async def test_delivery_qos_is_the_minimum_of_publish_and_subscription(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        dev = await Raw.connect(env, du, dpw, "dev.alice:q", clean=True)
        assert await dev.subscribe(REPLY, 1) == 1
        async with env.tls_client(nu, npw) as node:
            await node.publish(REPLY, b"zero", qos=0)
            p = await dev.next_publish()
            assert (p.payload, p.qos) == (b"zero", 0)  # MQTT-3.8.4-6 (amqtt delivered it at QoS 1)
            await node.publish(REPLY, b"one", qos=1)
            p = await dev.next_publish()
            assert (p.payload, p.qos) == (b"one", 1)
            dev.puback(p.packet_id)
            assert await dev.subscribe(REPLY, 2) == 1  # QoS 2 is not offered: granted 1
            await node.publish(REPLY, b"two", qos=2)
            p = await dev.next_publish()
            assert (p.payload, p.qos) == (b"two", 1)
            dev.puback(p.packet_id)
            assert await dev.subscribe(REPLY, 0) == 0
            await node.publish(REPLY, b"one-to-zero", qos=1)
            p = await dev.next_publish()
            assert (p.payload, p.qos) == (b"one-to-zero", 0)
        dev.drop()


async def test_aiomqtt_subscriber_sees_the_publish_qos(tmp_path: Path) -> None:
    async with broker_env(tmp_path) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        async with env.tls_client(du, dpw) as dev, env.tls_client(nu, npw) as node:
            await dev.subscribe(REPLY, qos=1)
            await node.publish(REPLY, b"a", qos=0)
            await node.publish(REPLY, b"b", qos=1)
            got = [await next_message(dev), await next_message(dev)]
            assert [(m.payload, m.qos) for m in got] == [(b"a", 0), (b"b", 1)]


# -- 4. per-device publish rate -----------------------------------------------------------------------------


async def test_device_flood_is_bounded_and_other_devices_and_nodes_are_not(tmp_path: Path) -> None:
    rate, burst, flood = 2.0, 5, 60
    async with broker_env(tmp_path, device_publish_rate=rate, device_publish_burst=burst) as env:
        au, apw = env.store.add("device", "flood")
        bu, bpw = env.store.add("device", "calm")
        nu, npw = env.store.add("node", "n1")
        got: dict[str, int] = {}
        async with env.tls_client(nu, npw) as node, env.tls_client(au, apw) as a, \
                env.tls_client(bu, bpw) as b:
            await node.subscribe("claw/v1/task/+", qos=1)
            await a.subscribe(f"claw/v1/reply/{au}", qos=1)

            async def count() -> None:
                async for m in node.messages:
                    got[str(m.topic)] = got.get(str(m.topic), 0) + 1

            counter = asyncio.create_task(count())
            t0 = time.monotonic()
            for i in range(flood):  # every one is acknowledged (QoS 1), most are dropped
                await a.publish(f"claw/v1/task/{au}", f"t{i}".encode(), qos=1)
            elapsed = time.monotonic() - t0
            for i in range(3):
                await b.publish(f"claw/v1/task/{bu}", f"b{i}".encode(), qos=1)
            # the calm device's messages come after the flood's in the broker's order: once they are all in,
            # every flood message that was let through is in too
            await wait_until(lambda: got.get(f"claw/v1/task/{bu}") == 3, 10)
            passed = got.get(f"claw/v1/task/{au}", 0)
            assert burst <= passed <= burst + rate * elapsed + 1, (passed, elapsed)
            limiter = env.h.broker.device_limiter
            assert limiter.dropped_for(au) == flood - passed and limiter.dropped_for(bu) == 0
            # nodes are not limited: 50 replies at once all reach the device
            for i in range(50):
                await node.publish(f"claw/v1/reply/{au}", f"r{i}".encode(), qos=1)
            replies = [await next_message(a) for _ in range(50)]
            assert [m.payload for m in replies] == [f"r{i}".encode() for i in range(50)]
            counter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counter


async def test_rate_limit_can_be_turned_off(tmp_path: Path) -> None:
    async with broker_env(tmp_path, device_publish_rate=0, device_publish_burst=1) as env:
        au, apw = env.store.add("device", "busy")
        nu, npw = env.store.add("node", "n1")
        async with env.tls_client(nu, npw) as node, env.tls_client(au, apw) as a:
            await node.subscribe("claw/v1/task/+", qos=1)
            for i in range(30):
                await a.publish(f"claw/v1/task/{au}", f"t{i}".encode(), qos=1)
            got = [await next_message(node) for _ in range(30)]
            assert [m.payload for m in got] == [f"t{i}".encode() for i in range(30)]



async def test_a_reader_that_stalls_costs_a_bounded_queue_and_keeps_the_order(tmp_path: Path) -> None:
    """A subscriber that stops reading: the broker stops writing above its write-buffer mark, queues up to
    broker.max_queued, drops (and counts) the rest, and delivers the queue in order once the reader goes on."""
    n, size = 300, 60_000
    async with broker_env(tmp_path, max_queued=20) as env:
        du, dpw = env.store.add("device", "alice")
        nu, npw = env.store.add("node", "n1")
        dev = await Raw.connect(env, du, dpw, "dev.alice:s", clean=True)
        await dev.subscribe(REPLY, 0)
        async with env.tls_client(nu, npw) as node:
            for i in range(n):  # the device reads nothing meanwhile
                await node.publish(REPLY, i.to_bytes(4, "big") + bytes(size), qos=0)
            outbox = _outbox(env, "dev.alice:s")
            await wait_until(lambda: outbox.sent + len(outbox.queue) + outbox.dropped == n, 20)
            assert outbox.dropped > 0 and len(outbox.queue) == 20
            got = [int.from_bytes((await dev.next_publish(10)).payload[:4], "big") for _ in range(n - outbox.dropped)]
            assert got == sorted(got) and len(set(got)) == len(got) and got[0] == 0
            assert not outbox.queue
            await node.publish(REPLY, b"\xff" * 4, qos=0)  # and the connection is healthy
            assert (await dev.next_publish()).payload == b"\xff" * 4
        dev.drop()


def test_token_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    from broker.ratelimit import RateLimiter

    now = [100.0]
    lim = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [lim.allow("dev.a") for _ in range(4)] == [True, True, True, False]
    assert lim.allow("dev.b")  # another device has its own bucket
    now[0] += 0.5  # one token back
    assert [lim.allow("dev.a") for _ in range(2)] == [True, False]
    now[0] += 60  # refilled, but never above the burst
    assert [lim.allow("dev.a") for _ in range(4)] == [True, True, True, False]
    assert lim.dropped == 3 and lim.dropped_for("dev.a") == 3 and lim.dropped_for("dev.b") == 0
    assert all(RateLimiter(0, 1).allow("x") for _ in range(100))  # rate 0: no limit
