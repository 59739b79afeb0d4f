"""End to end through README's own commands: ``make demo`` (with ARGS) and ``claw chat``, as subprocesses.

What a newcomer does: start the demo, ask from a second terminal, see the answer stream, Ctrl-C. Real
processes, real sockets on free 127.0.0.1 ports, the real embedded broker over TLS, the real node.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CLAW = [sys.executable, "-m", "claw.cli"]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def readme_commands() -> list[str]:
    """The commands of the first fenced block under '## The two commands'."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The two commands", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_names_exactly_two_commands() -> None:
    assert readme_commands() == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call README's test command"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAW_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def demo(tmp: Path, llm: str, *, via_make: bool = True) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    http, mqtt = free_port(), free_port()
    args = f"--http 127.0.0.1:{http} --mqtt 127.0.0.1:{mqtt} --data {tmp / 'data'} --llm {llm}"
    log = tmp / "demo.log"
    if via_make and shutil.which("make") and (ROOT / ".venv" / "bin" / "claw").exists():
        cmd = ["make", "-s", "demo", f"ARGS={args}"]
    else:  # pytest run outside `make test`: the same program without make's install step
        cmd = [*CLAW, "demo", *args.split()]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=_env(),
                                start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"demo exited early:\n{log.read_text()}"
            try:
                r = httpx.get(f"{url}/healthz", timeout=1)
                if r.status_code == 200 and r.json()["node_online"]:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"demo not ready in 60 s:\n{log.read_text()}"
            time.sleep(0.2)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal goes to the whole process group
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
                pytest.fail(f"demo did not stop on Ctrl-C within 15 s:\n{log.read_text()}")


def chat(url: str, *question: str, user: str = "readme") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLAW, "chat", "--url", url, "--user", user, *question], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)


def test_make_demo_then_claw_chat_uses_the_demo_model_when_lm_studio_is_absent(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: LM Studio "not running"
    with demo(tmp_path, dead) as (url, proc, log):
        page = httpx.get(url + "/", timeout=5)
        assert page.status_code == 200 and "智控未来" in page.text
        r = chat(url, "你好，请介绍一下你自己")
        assert r.returncode == 0, r.stderr
        assert "演示模型" in r.stdout and "你好，请介绍一下你自己" in r.stdout
        # the answer is stored in LMDB and listed in the user's history
        token = httpx.post(url + "/api/login", json={"dev_user": "readme"}, timeout=5).json()["token"]
        tasks = httpx.get(url + "/api/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        assert tasks["tasks"][0]["status"] == "ok" and "演示模型" in tasks["tasks"][0]["answer"]
        # the banner's terminal command works as printed, from a shell without the venv on PATH
        printed = re.search(r"终端聊天:\s+(.+?) chat --url (\S+)", log.read_text())
        assert printed is not None, log.read_text()
        env = {**_env(), "PATH": "/usr/bin:/bin"}
        env.pop("VIRTUAL_ENV", None)
        r = subprocess.run(f"{printed.group(1)} chat --url {printed.group(2)} --user banner 你好", shell=True,
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (printed.group(0), r.stderr)
        assert "演示模型" in r.stdout
    text = log.read_text()
    assert "BUILT-IN DEMO MODEL" in text and "内置演示模型" in text
    assert proc.returncode in (0, 130, 2, -signal.SIGINT), text  # make itself dies of the SIGINT too
    assert "Traceback" not in text, text


@pytest.mark.asyncio
async def test_claw_demo_uses_lm_studio_when_it_answers_and_ctrl_c_stops_an_answer(tmp_path: Path) -> None:
    from fakes.llm import FakeLLMConfig, run_fake_llm

    cfg = FakeLLMConfig(reply="真正的模型回答。" * 200, tokens_per_s=40, token_chars=4)
    async with run_fake_llm(cfg) as fake:
        import asyncio

        def scenario() -> None:
            with demo(tmp_path, fake.url, via_make=False) as (url, _proc, log):
                # 1) a real (fake LM Studio) answer, not the demo model
                r = chat(url, "第一个问题")
                assert r.returncode == 0, r.stderr
                assert "真正的模型回答。" in r.stdout and "演示模型" not in r.stdout
                # 2) Ctrl-C while the answer streams: the answer stops, LM Studio's stream is closed
                p = subprocess.Popen([*CLAW, "chat", "--url", url, "--user", "ctrlc", "第二个问题"], cwd=ROOT,
                                     env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                assert p.stdout is not None
                first = p.stdout.read(8)  # wait until text is streaming
                assert first
                p.send_signal(signal.SIGINT)
                out, err = p.communicate(timeout=20)
                assert p.returncode == 130, err  # Ctrl-C exits 130 (docs/api.md)
                assert "[已停止]" in out
                assert "LM Studio at " + fake.url in log.read_text() and "fake-model" in log.read_text()

        await asyncio.to_thread(scenario)
        assert fake.stats.client_closed >= 1
