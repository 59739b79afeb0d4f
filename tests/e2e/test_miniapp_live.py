"""The mini-program's own client code (miniapp/utils: api, socket, chat) against the real edge, broker and node.

``miniapp/scripts/live-check.js`` runs the code the mini-program ships, on Node with a small ``wx`` made of
fetch and the ``ws`` package: dev sign-in, an over-long question refused locally, a socket cut mid-answer and
the resumed answer equal to the edge's record, a stop mid-stream, and the history paged. ``make test`` installs
miniapp/node_modules (npm ci) before pytest runs; without them this test is skipped unless
``CLAW_REQUIRE_NODE=1`` (set by .ci/run).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from fakes.llm import FakeLLMConfig
from tests.conftest import run_system, wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "miniapp" / "scripts" / "live-check.js"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (ROOT / "miniapp" / "node_modules" / "ws").is_dir():
        if os.environ.get("CLAW_REQUIRE_NODE") == "1":
            pytest.fail("node and miniapp/node_modules are required (run `make test`, which runs npm ci)")
        pytest.skip("node or miniapp/node_modules missing (run `make test`, which runs npm ci)")
    return node


async def test_miniapp_client_code_against_the_real_system(tmp_path: Path, pki_dir: Path) -> None:
    node = _node()
    # Paced so that the cut and the stop land mid-answer: 200 tokens at 40/s is 5 s per answer.
    cfg = FakeLLMConfig(tokens_per_s=40, n_tokens=200)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_:
        proc = await asyncio.create_subprocess_exec(
            node, str(SCRIPT), sys_.http, "mpalice", cwd=ROOT / "miniapp",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text
        assert "FAIL" not in text, text
        assert text.count("ok   ") >= 9, text
        # each question reached the model once (a resume is not a second ask), and the stop closed the stream
        st = sys_.fake.stats
        assert st.chat_requests == 2, (st, text)
        await wait_until(lambda: st.client_closed == 1, 10)
        assert st.streams_completed == 1, (st, text)
