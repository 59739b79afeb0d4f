"""What the fuzz tests found, each as a small fixed reproducer (they run in every suite, seed or not).

Fixed: deeply nested JSON (a RecursionError, not a ValueError) on ``/api/ws`` closed the socket with an
ERROR traceback and made ``/api/login`` answer 500; a signed WeCom callback whose timestamp is made of
non-ASCII digits (``"²".isdigit()`` is true, ``int("²")`` raises), whose AgentID is not a number, or whose
CreateTime does not fit an unsigned 64-bit millisecond stamp was answered 500; a PUBLISH with both QoS
bits set left the connection open and logged a traceback at ERROR for every such packet; amqtt logged a
second CONNECT on a connection at ERROR; a WeCom text message reusing the MsgId of a command (or of an
unsupported message) was answered 500 (the dedup key holds a bare timestamp, not a task id); a PUBLISH to a
topic with a wildcard left its connection half-dead (amqtt's parser refused the topic mid-packet and read on
from there: no PUBACK, no PINGRESP, and the socket stayed open, without keepalive for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiomqtt
import pytest

from tests.conftest import System, run_system
from tests.fuzz.auth import device_credential, ws_auth
from tests.fuzz.mqtt_cases import PINGREQ, connect, publish
from tests.integration.test_wecom import AES, AGENT, CORP, TOKEN, sim, tasks_of, wecom_system

pytestmark = pytest.mark.integration


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def test_deeply_nested_json_is_bad_json_not_a_crash(tmp_path: Path, pki_dir: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_, aiohttp.ClientSession() as s:
        async with s.post(f"{sys_.http}/api/login", data=b"[" * 50000 + b"]" * 50000,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400, await r.text()
            assert (await r.json())["error"]["code"] == "bad_json"
        q, h = await ws_auth(sys_, s, "deep")
        async with s.ws_connect(f"{sys_.http}/api/ws", params=q, headers=h) as ws:
            assert (await ws.receive_json())["type"] == "node"
            for depth in (5000, 30000):  # a 64 KiB frame holds 32 K levels
                for data in ("[" * depth + "]" * depth, '{"a":' * (depth // 4) + "1" + "}" * (depth // 4)):
                    await ws.send_str(data)
                    frame = await asyncio.wait_for(ws.receive_json(), 10)
                    assert frame["type"] == "error" and frame["code"] == "bad_json", frame
            await ws.send_json({"type": "ping"})
            assert (await asyncio.wait_for(ws.receive_json(), 10)) == {"type": "pong"}
    assert not _errors(caplog)


async def test_signed_wecom_callbacks_with_odd_fields_are_refused_not_500(tmp_path: Path, pki_dir: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from fakes.wecom import WeComSim

    w = sim()
    cases = [
        (w.wrap(w.text("fzts", "你好").inner, timestamp="²"), 403),  # "²".isdigit(), int("²") raises
        (w.wrap(w.text("fzts", "你好").inner, timestamp="١٧٠٠٠٠٠٠٠٠"), 403),  # Arabic-Indic digits
        (WeComSim(TOKEN, AES, CORP, "abc").text("fzagent", "你好"), 400),  # AgentID not a number
        (w.text("fzneg", "/help", create_time=-1), 400),  # CreateTime before 1970
        (w.text("fzbig", "/new", create_time=2 ** 70), 400),  # CreateTime past any 64-bit stamp
        (w.media("fzbig", "image", create_time=2 ** 70), 400),
        (w.event("fzbig", "click", create_time=2 ** 70), 400),
    ]
    async with wecom_system(tmp_path, pki_dir, start_node=False) as (sys_, fw, url), aiohttp.ClientSession() as s:
        for cb, want in cases:
            status, _ = await cb.post(s, url)
            assert status == want, (status, cb.inner, cb.query)
        for user in ("fzts", "fzagent", "fzneg", "fzbig"):
            assert tasks_of(sys_, user) == []
        assert (await w.text("fzok", "正常的问题").post(s, url)) == (200, "")  # and a good one still goes in
        assert [t.text for t in tasks_of(sys_, "fzok")] == ["正常的问题"]
    assert not _errors(caplog)
    assert AGENT  # the configured AgentId is a number; "abc" above is the sender's


async def test_a_second_connect_closes_the_connection_will_fires_no_error(
        tmp_path: Path, pki_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """[MQTT-3.1.0-2]: amqtt logged a second CONNECT at ERROR (one line per connection, any authenticated client
    could repeat it). Now the connection is closed at once through the normal path (its will is published),
    with a WARNING at most once a minute; other clients go on."""
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_, _watcher(sys_) as watch:
        for i in range(3):  # the log line is rate-limited: one for the three
            reader, writer, user = await _mqtt_session(sys_, "twice", will=f"bye-{i}".encode())
            try:
                writer.write(connect("twice-1", user, "not-checked-again"))
                await _closed_by_peer(reader)  # the broker closes the connection
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            msg = await asyncio.wait_for(anext(watch.messages), 10)  # the will
            assert (msg.topic.value, msg.payload) == (f"claw/v1/task/{user}", f"bye-{i}".encode())
        await _still_served(sys_)
    assert not _errors(caplog), _errors(caplog)
    lines = [r for r in caplog.records if "second CONNECT" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, [r.getMessage() for r in lines]


async def _mqtt_session(sys_: System, name: str, *, will: bytes | None = None,
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """A raw TLS connection logged in as device ``name`` (CONNACK read); and its username. With ``will``: a
    will of that payload on the device's own task topic."""
    user, password = device_credential(sys_, name)
    tls = ssl.create_default_context(cafile=str(Path(sys_.settings.data_dir) / "pki" / "ca.crt"))
    reader, writer = await asyncio.open_connection("127.0.0.1", sys_.settings.mqtt.port, ssl=tls,
                                                   server_hostname="localhost")
    writer.write(connect(f"{user}:1", user, password,
                         will=None if will is None else (f"claw/v1/task/{user}", will)))
    assert (await asyncio.wait_for(reader.readexactly(4), 10)) == b"\x20\x02\x00\x00"  # CONNACK accepted
    return reader, writer, user


@contextlib.asynccontextmanager
async def _watcher(sys_: System) -> AsyncIterator[aiomqtt.Client]:
    """A node's MQTT client subscribed to every device's task topic (where the devices' wills go)."""
    from broker.creds import CredentialStore

    user, password = CredentialStore(sys_.settings.data_dir).add("node", "watch", replace=True)
    tls = ssl.create_default_context(cafile=str(Path(sys_.settings.data_dir) / "pki" / "ca.crt"))
    async with aiomqtt.Client("127.0.0.1", sys_.settings.mqtt.port, username=user, password=password,
                              identifier=f"{user}:w", tls_context=tls, tls_insecure=True,
                              protocol=aiomqtt.ProtocolVersion.V311, timeout=10) as client:
        await client.subscribe("claw/v1/task/+", qos=1)
        yield client


async def _still_served(sys_: System) -> None:
    """Another device still gets its PINGRESP and its QoS 1 PUBACK."""
    reader, writer, user = await _mqtt_session(sys_, "other")
    try:
        writer.write(publish(f"claw/v1/task/{user}", b"x", qos=1, pid=9) + PINGREQ)
        assert (await asyncio.wait_for(reader.readexactly(6), 10)) == b"\x40\x02\x00\x09\xd0\x00"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _sent_back_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  data: bytes) -> bytes:
    """Write ``data``; return all the broker sent back before it closed the connection, then close our side."""
    try:
        writer.write(data)
        got = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(1024):
                got += chunk
        return got
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _closed_by_peer(reader: asyncio.StreamReader, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await reader.read(1024):
            pass


async def test_a_publish_with_qos_3_closes_the_connection_without_a_traceback(
        tmp_path: Path, pki_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        reader, writer, user = await _mqtt_session(sys_, "qos3")
        try:
            pkt = bytearray(publish(f"claw/v1/task/{user}", b"x", qos=1))
            pkt[0] |= 0x06  # both QoS bits
            writer.write(bytes(pkt) * 3)
            await _closed_by_peer(reader)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        gc.collect()  # a failed task nobody awaited is logged when it is collected
        await asyncio.sleep(0)
    assert not _errors(caplog), _errors(caplog)


@pytest.mark.parametrize("first", ["/help", "image"])
async def test_a_text_reusing_a_commands_msgid_is_a_duplicate(tmp_path: Path, pki_dir: Path, first: str) -> None:
    """A text reusing the MsgId of a command or an unsupported message found a dedup key without a task id:
    ``TaskStore.add`` returned ``b""`` and ``get(b"")`` raised ``lmdb.BadValsizeError`` (500). It is a retry of
    the first message: 200, no task, no second answer."""
    async with wecom_system(tmp_path, pki_dir, start_node=False) as (sys_, fw, url), aiohttp.ClientSession() as s:
        w = sim()
        cb = w.text("fzdup", "/help", msg_id=777) if first == "/help" else w.media("fzdup", "image", msg_id=777)
        assert (await cb.post(s, url))[0] == 200
        await fw.wait_sends(1, user="fzdup")  # the answer to the first
        for _ in range(2):
            assert (await w.text("fzdup", "你好", msg_id=777).post(s, url)) == (200, "")  # the same MsgId
        assert tasks_of(sys_, "fzdup") == []
        assert (await w.text("fzdup", "新的问题").post(s, url)) == (200, "")  # and a new one still goes in
        assert [t.text for t in tasks_of(sys_, "fzdup")] == ["新的问题"]
        assert len(fw.delivered("fzdup")) == 1  # nothing more for the reused MsgId


@pytest.mark.parametrize("topic", ["claw/v1/+/x", "claw/v1/task/#", b"claw/v1/task/\xff\xfe", "claw/\x00", ""])
@pytest.mark.parametrize("qos", [0, 1])
async def test_a_publish_to_an_invalid_topic_closes_the_connection_will_fires(
        tmp_path: Path, pki_dir: Path, caplog: pytest.LogCaptureFixture, topic: str | bytes, qos: int) -> None:
    """amqtt's parser refused a wildcard topic in the middle of the PUBLISH and read on from there: no PUBACK,
    no PINGRESP, the connection stayed open (with keepalive 0, for good); a topic of invalid UTF-8 was taken as
    the repr of its bytes. Now the connection is closed at once through the normal path (the will fires)."""
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_, _watcher(sys_) as watch:
        reader, writer, user = await _mqtt_session(sys_, "wild", will=b"gone")
        got = await _sent_back_until_closed(reader, writer, publish(topic, b"x", qos=qos, pid=7) + PINGREQ)
        assert got == b"", got  # neither PUBACK nor PINGRESP: closed
        msg = await asyncio.wait_for(anext(watch.messages), 10)
        assert (msg.topic.value, msg.payload) == (f"claw/v1/task/{user}", b"gone")
        await _still_served(sys_)
    assert not _errors(caplog), _errors(caplog)


@pytest.mark.parametrize("kind", ["puback", "pingreq", "reserved"])
async def test_a_packet_longer_than_its_type_allows_closes_the_connection(
        tmp_path: Path, pki_dir: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """Found by the MQTT fuzz suite once its cases got past CONNECT: amqtt reads only the bytes a PUBACK,
    PINGREQ, ... has by definition and parsed the rest of a longer one as further packets (a CONNECT hidden in
    a PUBACK was logged at ERROR, a PINGREQ in a PINGREQ answered twice); a reserved type's body likewise.
    Now such a packet closes the connection through the normal path (the will fires)."""
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_, _watcher(sys_) as watch:
        reader, writer, user = await _mqtt_session(sys_, "long", will=b"gone")
        hidden = connect(f"{user}:2", user, "x") if kind == "puback" else PINGREQ
        first = {"puback": 0x40, "pingreq": 0xC0, "reserved": 0xF0}[kind]
        body = (b"\x00\x01" if kind == "puback" else b"") + hidden
        got = await _sent_back_until_closed(reader, writer, bytes([first, len(body)]) + body + PINGREQ)
        assert got == b"", got
        msg = await asyncio.wait_for(anext(watch.messages), 10)
        assert (msg.topic.value, msg.payload) == (f"claw/v1/task/{user}", b"gone")
        await _still_served(sys_)
    assert not _errors(caplog), _errors(caplog)


async def test_a_large_publish_to_a_wildcard_topic_closes_the_connection(tmp_path: Path, pki_dir: Path) -> None:
    """The same for a PUBLISH above broker.max_packet (read and dropped, not passed to amqtt): not acknowledged."""
    async with run_system(tmp_path, pki_dir, start_node=False) as sys_:
        reader, writer, _ = await _mqtt_session(sys_, "wildbig")
        try:
            big = b"x" * (sys_.settings.broker.max_packet + 1)
            writer.write(publish("claw/v1/+/x", big, qos=1, pid=7) + PINGREQ)
            got = b""
            with contextlib.suppress(ConnectionResetError):  # closed while the payload was still coming
                async with asyncio.timeout(10):
                    while chunk := await reader.read(65536):
                        got += chunk
            assert got == b"", got  # no PUBACK (a valid topic's would come, see broker.max_drop)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await _still_served(sys_)
