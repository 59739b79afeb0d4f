"""Broken WeCom callbacks at ``/wecom/callback`` (real wechatpy crypto), while a legitimate member's
messages keep being answered through the fake WeCom API.

Cases: the envelope's bytes mutated, envelopes of the wrong shape (entities, nesting, duplicates, other
encodings), bad signatures, bad timestamps signed with the real token, mutated ciphertexts signed again
(they reach the AES step), odd inner messages encrypted and signed properly (they reach the message
handling), oversized bodies with and without a Content-Length, wrong content types, junk queries, and GET
URL verifications with junk. Every answer must be one of the statuses docs/api.md lists for the callback
(200, 400, 403, 413; 503 only for a full store, which never happens here), no ERROR is logged, memory stays
bounded, and each round of the canary (a fresh member's text message) is answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from fakes.llm import FakeLLMConfig
from tests.fuzz import harness
from tests.fuzz.wecom_cases import Req, make_case
from tests.integration.test_wecom import AES, AGENT, CORP, TOKEN, sim, wecom_system

pytestmark = pytest.mark.integration

WORKERS = 3
ALLOWED = {"POST": {200, 400, 403, 413}, "GET": {200, 400, 403}}


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 16384):
        yield body[i:i + 16384]


async def _send(s: aiohttp.ClientSession, url: str, req: Req) -> tuple[int, str]:
    target = URL(f"{url}?{req.query}" if req.query else url, encoded=True)
    data: object = _chunks(req.body) if req.chunked else req.body
    async with s.request(req.method, target, data=data if req.method == "POST" else None,
                         headers=req.headers) as r:
        return r.status, await r.text(errors="replace")


async def test_wecom_callback_fuzz_while_a_member_is_answered(tmp_path: Path, pki_dir: Path) -> None:
    from fakes.wecom import WeComSim

    fuzz = harness.Fuzz("wecom")
    errors = harness.ErrorLog()
    w, other = sim(), WeComSim(TOKEN, "b" * 43, CORP, AGENT)
    assert AES != "b" * 43
    async with wecom_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="好的。", tokens_per_s=0)) as \
            (sys_, fw, url), aiohttp.ClientSession() as s:
        with errors.installed():

            async def legit(n: int) -> None:
                user = f"legit{n}"
                assert await sim().text(user, "请问今天的安排？").post(s, url) == (200, "")
                await fw.wait_sends(1, user=user, timeout=10)

            canary = harness.Canary("wc.legit", legit)
            async with canary.running():
                rss0 = harness.rss()

                async def worker(k: int) -> None:
                    for i in fuzz.indices():
                        rng = fuzz.rng(i)
                        req, label = make_case(rng, w, other)
                        where = fuzz.start(k, f"{fuzz.where(i)} {label}: {req.method} ?{req.query[:300]} "
                                              f"body {req.body[:300]!r} headers {req.headers}")
                        status, text = await _send(s, url, req)
                        fuzz.count(f"{label}->{status}")
                        assert status in ALLOWED[req.method], f"answered {status} {text[:200]!r} {where}"
                        if label == "get_ok":
                            assert status == 200, where
                        canary.check(where)
                        harness.alive(sys_, where)
                        assert not errors.records, f"ERROR logged; {fuzz.in_flight()}\n{errors.report()}"

                fuzz.begin()
                await harness.run_workers(WORKERS, worker)
                print(fuzz.summary())
                canary.check("after fuzzing")
                harness.alive(sys_, "after fuzzing")
                await harness.assert_memory_settled(canary, rss0)
                async with s.get(f"{sys_.http}/healthz") as r:
                    assert r.status == 200
                assert fuzz.cases >= 20, fuzz.summary()
        assert not errors.records, errors.report()
