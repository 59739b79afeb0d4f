"""Broken MQTT at the embedded broker's TLS port, while a real device keeps asking the real node.

Each case is one fresh TLS connection carrying random bytes, a mutated CONNECT (truncated, extended, bit
flips, wrong remaining length, huge remaining length, wrong protocol name/level, bad flags), a packet before
CONNECT, or a good CONNECT (a real device credential) followed by mutated PUBLISH / SUBSCRIBE / UNSUBSCRIBE /
PINGREQ / DISCONNECT / PUBACK packets and bad UTF-8 topics; a few cases are plain TCP garbage at the TLS
port, and a burst of connections is held open at once. Meanwhile, and after, the canary device ``dev.lamp``
publishes tasks and gets ``done`` answers from the node; the node never loses its link; no ERROR log record
is written; the process's memory stays bounded; every fuzz connection is gone from the broker at the end.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest

import wire
from fakes.llm import FakeLLMConfig
from tests.conftest import System, run_system, wait_until
from tests.fuzz import harness
from tests.fuzz.auth import device_credential
from tests.fuzz.mqtt_cases import PINGREQ, connect, make_case

pytestmark = pytest.mark.integration

WORKERS = 4
READ_S = 0.25  # how long a case waits for the broker's answer (or its close) before closing itself
BURST = 100  # connections held open at once


def _connected(sys_: System) -> list[str]:
    from edge.keys import BROKER

    broker = sys_.app[BROKER]
    return [cid for cid, (sess, _) in broker.sessions.items() if sess.transitions.is_connected()]


async def _send_case(port: int, tls: ssl.SSLContext | None, pkts: list[bytes]) -> str:
    """Send one case on a fresh connection; the outcome: how the broker reacted."""
    return (await _exchange(port, tls, pkts))[0]


async def _exchange(port: int, tls: ssl.SSLContext | None, pkts: list[bytes]) -> tuple[str, bytes]:
    """Send ``pkts`` on a fresh connection: (outcome, the bytes the broker sent back)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None), 5)
    except (OSError, asyncio.TimeoutError) as exc:
        raise AssertionError(f"the broker's TLS port refused a connection: {exc!r}") from exc
    try:
        end, got = await harness.send_and_read(reader, writer, pkts, wait=READ_S, read_size=4096)
        if end == "closed":
            return ("closed" if not got else f"answered+closed:{got[0] >> 4}"), got
        if end == "open":
            return ("open" if not got else f"answered:{got[0] >> 4}"), got
        return end, got
    finally:
        await harness.close_quietly(writer)


async def test_mqtt_fuzz_at_the_tls_port_while_a_device_is_answered(tmp_path: Path, pki_dir: Path) -> None:
    from edge.keys import BRIDGE, BROKER

    fuzz = harness.Fuzz("mqtt")
    errors = harness.ErrorLog()  # no ERROR line at all (a second CONNECT is closed by broker/reader.py)
    cfg = FakeLLMConfig(n_tokens=5, tokens_per_s=0, token_chars=2)
    with errors.installed():
        # the canary asks up to ~15 times a second, over broker.device_publish_rate's default of 5/s: its task
        # would be dropped (acknowledged, never answered). 50/s keeps the limiter in play for the fuzz device.
        async with run_system(tmp_path, pki_dir, fake_cfg=cfg, broker={"device_publish_rate": 50}) as sys_:
            port = sys_.settings.mqtt.port
            tls = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
            from core.mqtt import make_client

            lamp_user, lamp_pw = device_credential(sys_, "lamp")
            cred = device_credential(sys_, "fuzz")
            spare = device_credential(sys_, "fuzz2")  # for the CONNECTs that fail: cred is never throttled
            dev = make_client(host="localhost", port=port, username=lamp_user, password=lamp_pw,
                              identifier=lamp_user, tls=tls)
            node, bridge = sys_.node, sys_.app[BRIDGE]
            async with dev:
                await dev.subscribe(wire.reply_topic(lamp_user), qos=1)

                async def ask(n: int) -> None:
                    tid = os.urandom(16)
                    task = wire.Task(id=tid, uid=lamp_user, ch="dev", text=f"第{n}个问题", ts=1)
                    await dev.publish(wire.task_topic(lamp_user), wire.encode(task), qos=1)
                    async with asyncio.timeout(10):
                        async for m in dev.messages:
                            msg = wire.decode(m.payload)  # type: ignore[arg-type]
                            if isinstance(msg, wire.Done) and msg.id == tid:
                                assert msg.status == "ok", msg
                                return

                canary = harness.Canary("dev.lamp", ask)
                async with canary.running():
                    base_reconnects = node.stats.reconnects
                    base_sessions = set(_connected(sys_))
                    rss0 = harness.rss()

                    def healthy(where: str) -> None:
                        canary.check(where)
                        assert bridge.node_online, f"the node went offline {where}"
                        assert node.stats.reconnects == base_reconnects, f"the node lost its link {where}"
                        harness.alive(sys_, where)

                    # many connections at once: half with the first bytes of a CONNECT, half silent
                    async def hold(k: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost")
                        if k % 2:
                            w.write(connect(f"burst-{k}", *cred)[:3])
                        return r, w

                    held = await asyncio.gather(*(hold(k) for k in range(BURST)))
                    await canary.wait_rounds(2)
                    healthy("with 100 connections open")
                    for _, w in held:
                        w.close()
                    rss_burst = harness.rss()  # the burst's TLS buffers stay with the allocator: count from here

                    async def worker(k: int) -> None:
                        for i in fuzz.indices():
                            rng = fuzz.rng(i)
                            pkts, label = make_case(rng, cred, spare)
                            plain = rng.random() < 0.03  # TCP garbage at the TLS port
                            where = fuzz.start(k, f"{fuzz.where(i)} {label}{' (plain TCP)' if plain else ''} "
                                                  f"{[p.hex() for p in pkts]}")
                            outcome = await _send_case(port, None if plain else tls, pkts)
                            fuzz.count(outcome.split(":")[0])
                            healthy(where)
                            assert not errors.records, f"ERROR logged; {fuzz.in_flight()}\n{errors.report()}"

                    fuzz.begin()
                    await harness.run_workers(WORKERS, worker)
                    print(fuzz.summary())
                    healthy("after fuzzing")
                    await canary.wait_rounds(2)
                    rss1 = harness.rss()
                    broker = sys_.app[BROKER]
                    print(canary.stats(), f"rss {rss0} -> {rss_burst} (after the burst) -> {rss1}; "
                          f"{len(broker.sessions)} broker sessions kept, {len(asyncio.all_tasks())} tasks")
                    if rss_burst and rss1:
                        assert rss1 - rss_burst < harness.RSS_GROWTH_MAX, (rss0, rss_burst, rss1)
                    # every fuzz connection is gone (none half-open, none keeping a session connected)
                    await wait_until(lambda: set(_connected(sys_)) <= base_sessions, 15)
                    # a fresh, well-behaved connection still gets its CONNACK and PINGRESP
                    _, got = await _exchange(port, tls, [connect(f"{cred[0]}:final", *cred), PINGREQ])
                    assert got == b"\x20\x02\x00\x00\xd0\x00", got.hex()
                    assert fuzz.cases >= 20, fuzz.summary()
    assert not errors.records, errors.report()
