"""Broken WebSocket traffic at ``/api/ws`` while another user keeps asking and getting answers.

Raw cases go over a plain TCP socket after a real upgrade (so nothing client-side fixes them): bad opcodes,
RSV bits, unmasked client frames, lying and huge lengths, fragmented and oversized control frames, stray
continuations, invalid UTF-8, odd close frames, random and deeply nested JSON, frames over the 64 KiB
limit, binary frames, byte-mutated valid frames and random bytes. JSON cases go over one aiohttp socket:
structurally mutated ``ask``/``stop``/``resume``/``ping`` frames, each followed by a ``ping`` that must be
answered on the same socket. The edge must answer every upgrade with 101, never close with 1011 (internal
error), log no ERROR, keep its memory bounded, and the canary user must get its answers all along.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest

from fakes.llm import FakeLLMConfig
from tests.conftest import run_system
from tests.fuzz import harness
from tests.fuzz.auth import ws_auth
from tests.fuzz.ws_cases import make_raw_case, mutate_json, upgrade_request, valid_frames
from tests.integration.test_e2e import collect

pytestmark = pytest.mark.integration

RAW_WORKERS = 3
READ_S = 0.3


def _server_frames(buf: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the complete unmasked server frames in ``buf``."""
    out, i = [], 0
    while i + 2 <= len(buf):
        op, n = buf[i] & 0x0F, buf[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            if j + 2 > len(buf):
                break
            n, j = struct.unpack("!H", buf[j:j + 2])[0], j + 2
        elif n == 127:
            if j + 8 > len(buf):
                break
            n, j = struct.unpack("!Q", buf[j:j + 8])[0], j + 8
        if j + n > len(buf):
            break
        out.append((op, buf[j:j + n]))
        i = j + n
    return out


async def _raw_case(port: int, query: dict[str, str], headers: dict[str, str], key: bytes,
                    frames: list[bytes]) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request(port, urlencode(query), headers, base64.b64encode(key).decode()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = head.split(b" ", 2)[1]
        assert status == b"101", f"the upgrade was answered {head[:200]!r}"
        end, got = await harness.send_and_read(reader, writer, frames, wait=READ_S, read_size=65536,
                                               enough=lambda got: any(op == 0x8 for op, _ in _server_frames(got)))
        if end == "reset":
            return "reset"
        closes = [p for op, p in _server_frames(got) if op == 0x8]
        if closes:
            code = struct.unpack("!H", closes[0][:2])[0] if len(closes[0]) >= 2 else 1005
            return f"close:{code}"
        return "eof" if reader.at_eof() else "open"
    finally:
        await harness.close_quietly(writer)


async def test_ws_fuzz_while_another_user_is_answered(tmp_path: Path, pki_dir: Path) -> None:
    fuzz = harness.Fuzz("ws-raw")
    jfuzz = harness.Fuzz("ws-json")
    errors = harness.ErrorLog()
    cfg = FakeLLMConfig(n_tokens=5, tokens_per_s=0, token_chars=2)
    with errors.installed():
        async with run_system(tmp_path, pki_dir, fake_cfg=cfg, edge={"max_ws_per_user": 50}) as sys_, \
                aiohttp.ClientSession() as s:
            port = int(sys_.http.rsplit(":", 1)[1])
            q, h = await ws_auth(sys_, s, "canary")
            async with s.ws_connect(f"{sys_.http}/api/ws", params=q, headers=h) as cws:
                assert (await cws.receive_json())["type"] == "node"

                async def ask(n: int) -> None:
                    await cws.send_json({"type": "ask", "text": f"第{n}个问题"})
                    _, done = await collect(cws, timeout=10)
                    assert done["status"] == "ok", done

                canary = harness.Canary("web.canary", ask)
                async with canary.running():
                    rss0 = harness.rss()

                    def healthy(where: str) -> None:
                        canary.check(where)
                        harness.alive(sys_, where)
                        assert not errors.records, (f"ERROR logged; {fuzz.in_flight()}\n{jfuzz.in_flight()}\n"
                                                    f"{errors.report()}")

                    async def raw_worker(k: int) -> None:
                        for i in fuzz.indices():
                            rng = fuzz.rng(i)
                            frames, label = make_raw_case(rng)
                            q, h = await ws_auth(sys_, s, f"fz{k}")
                            where = fuzz.start(k, f"{fuzz.where(i)} {label} {[f[:200].hex() for f in frames]}")
                            outcome = await _raw_case(port, q, h, rng.randbytes(16), frames)
                            fuzz.count(f"{label}->{outcome}")
                            assert outcome != "close:1011", f"internal error {where}"
                            healthy(where)

                    async def json_worker(k: int) -> None:
                        q, h = await ws_auth(sys_, s, "fzjson")
                        async with s.ws_connect(f"{sys_.http}/api/ws", params=q, headers=h) as ws:
                            for i in jfuzz.indices():
                                rng = jfuzz.rng(i)
                                frame = mutate_json(rng, rng.choice(valid_frames(rng)))
                                data = json.dumps(frame, ensure_ascii=False)
                                where = jfuzz.start(k, f"{jfuzz.where(i)} {data[:300]!r}")
                                await ws.send_str(data)
                                await ws.send_json({"type": "ping"})
                                async with asyncio.timeout(10):
                                    while True:
                                        msg = await ws.receive()
                                        assert msg.type == aiohttp.WSMsgType.TEXT, f"socket ended: {msg} {where}"
                                        if json.loads(msg.data).get("type") == "pong":
                                            break
                                jfuzz.count("pong")
                                healthy(where)
                                await asyncio.sleep(0.005)  # one steady client, not a flood: the raw cases run too

                    fuzz.begin()
                    jfuzz.begin()
                    await harness.run_workers(RAW_WORKERS + 1,
                                              lambda k: raw_worker(k) if k < RAW_WORKERS else json_worker(k))
                    print(fuzz.summary())
                    print(jfuzz.summary())
                    healthy("after fuzzing")
                    await harness.assert_memory_settled(canary, rss0)
                    async with s.get(f"{sys_.http}/healthz") as r:
                        assert r.status == 200
                    assert fuzz.cases >= 20 and jfuzz.cases >= 20, (fuzz.summary(), jfuzz.summary())
    assert not errors.records, errors.report()
