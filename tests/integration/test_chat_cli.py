"""``claw chat`` as a user runs it: a subprocess against the real edge (embedded broker over TLS, the real node,
a fake LM Studio), everything on 127.0.0.1.

Pinned here: an edge restart mid-answer (the client reconnects and resumes; the printed answer is complete and
not repeated; a question typed while disconnected is sent after the reconnect; a deadline when the edge stays
away), a question over the edge's limit (refused before sending, with the limit named; the edge's own error
frame is shown), an empty question (refused, exit 2) and Ctrl-C (stops an interactive answer; exits 130 at the
prompt and in one-question mode). Every wait is for output or an event, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fakes.llm import FakeLLMConfig, run_fake_llm
from tests.conftest import free_port, run_system, system_settings

ROOT = Path(__file__).resolve().parents[2]
CLAW = [sys.executable, "-m", "claw.cli"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120),
              pytest.mark.skipif(sys.platform == "win32", reason="signals")]


def numbered(n: int, brackets: str = "<>") -> str:
    """A reply of ``n`` distinct five-character tokens ("<000>", "<001>", ...): a lost or repeated chunk shows."""
    return "".join(f"{brackets[0]}{i:03d}{brackets[1]}" for i in range(n))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAW_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Chat:
    """``claw chat`` as a subprocess; its output is collected as it comes, and waited for with deadlines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._out = bytearray()
        self._err = bytearray()
        self._changed = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self._pumps = [asyncio.create_task(self._pump(proc.stdout, self._out)),
                       asyncio.create_task(self._pump(proc.stderr, self._err))]

    @classmethod
    async def start(cls, url: str, *question: str, user: str = "cli", interactive: bool = False,
                    options: tuple[str, ...] = ()) -> Chat:
        proc = await asyncio.create_subprocess_exec(
            *CLAW, "chat", "--url", url, "--user", user, *options, *question, cwd=ROOT, env=_env(),
            stdin=asyncio.subprocess.PIPE if interactive else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _pump(self, stream: asyncio.StreamReader, buf: bytearray) -> None:
        while data := await stream.read(65536):
            buf += data
            self._changed.set()
        self._changed.set()

    @property
    def out(self) -> str:
        return self._out.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self._err.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<claw chat rc={self.proc.returncode}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}>"

    async def wait_for(self, cond: Callable[[Chat], bool], timeout: float = 20, what: str = "") -> None:
        try:
            async with asyncio.timeout(timeout):
                while not cond(self):
                    if all(p.done() for p in self._pumps):
                        raise AssertionError(f"claw chat ended before {what or cond}: {self!r}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {what or cond} within {timeout} s: {self!r}") from None

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def eof(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def sigint(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    async def exit_code(self, timeout: float = 20) -> int:
        try:
            async with asyncio.timeout(timeout):
                rc = await self.proc.wait()
                await asyncio.gather(*self._pumps)
        except TimeoutError:
            raise AssertionError(f"claw chat did not exit within {timeout} s: {self!r}") from None
        assert "Traceback" not in self.err, self
        return rc

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for p in self._pumps:
            p.cancel()


@contextlib.asynccontextmanager
async def chat_proc(*args: Any, **kw: Any) -> AsyncIterator[Chat]:
    c = await Chat.start(*args, **kw)
    try:
        yield c
    finally:
        await c.kill()


async def task_count(http: str, user: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{http}/api/login", json={"dev_user": user}) as r:
            token = (await r.json())["token"]
        async with s.get(f"{http}/api/tasks", headers={"Authorization": f"Bearer {token}"}) as r:
            return len((await r.json())["tasks"])


def prompts(c: Chat) -> int:
    return c.out.count("你> ")


def answer_so_far(c: Chat) -> str:
    """The text after the last "助手> " ("" before the first one)."""
    return c.out.rpartition("助手> ")[2] if "助手> " in c.out else ""


# ---- an edge that can be restarted: `claw edge` in its own process, the node and LM Studio here ---------------
class EdgeProcess:
    """Server A as a ``claw edge`` process on fixed ports and a data dir that outlive it (restartable)."""

    def __init__(self, tmp: Path, env: dict[str, str], http: str) -> None:
        self.tmp = tmp
        self.env = env
        self.http = http
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        log = open(self.tmp / f"edge-{self.starts}.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = await asyncio.create_subprocess_exec(
            *CLAW, "--log-level", "WARNING", "edge", cwd=self.tmp, env={**_env(), **self.env},
            stdout=asyncio.subprocess.DEVNULL, stderr=log)
        log.close()

    async def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        async with asyncio.timeout(20):
            await self.proc.wait()

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until /healthz says the node is online (polled: another process's state, with a deadline)."""
        async with aiohttp.ClientSession() as s, asyncio.timeout(timeout):
            while True:
                assert self.proc is not None and self.proc.returncode is None, self.logs()
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with s.get(f"{self.http}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200 and (await r.json())["node_online"]:
                            return
                await asyncio.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("edge-*.log")))


@contextlib.asynccontextmanager
async def restartable_system(tmp: Path, pki: Path, cfg: FakeLLMConfig) -> AsyncIterator[tuple[EdgeProcess, Any]]:
    from broker.creds import CredentialStore
    from node.worker import Node

    async with run_fake_llm(cfg) as fake:
        a_settings, tls_port = system_settings(tmp / "a", pki, fake.url)
        http = f"http://127.0.0.1:{free_port()}"
        user, password = CredentialStore(a_settings.data_dir).add("node", "t1", replace=True)
        env = {"CLAW_DATA_DIR": str(tmp / "a"), "CLAW_BROKER__LISTEN": f"127.0.0.1:{tls_port}",
               "CLAW_BROKER__LOCAL_LISTEN": "127.0.0.1:0", "CLAW_EDGE__HTTP": http.removeprefix("http://"),
               "CLAW_EDGE__DEV_LOGIN": "true", "CLAW_EDGE__REPUBLISH_S": "1", "CLAW_EDGE__NODE_TIMEOUT_S": "3"}
        node_settings, _ = system_settings(tmp / "b", pki, fake.url, mqtt={
            "port": tls_port, "username": user, "password": password})
        edge = EdgeProcess(tmp, env, http)
        await edge.start()
        node = Node(node_settings)
        node_task = asyncio.create_task(node.run())
        try:
            await edge.wait_ready()
            yield edge, fake
        finally:
            node_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await node_task
            if edge.proc is not None and edge.proc.returncode is None:
                edge.proc.kill()
                await edge.proc.wait()


# ---- 1. an edge restart mid-answer -----------------------------------------------------------------------------
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "restarted"])
async def test_edge_restart_mid_answer_the_answer_completes_once(tmp_path: Path, pki_dir: Path, how: int) -> None:
    answer = numbered(150)  # 750 characters at 30 tokens/s: ~5 s of streaming
    cfg = FakeLLMConfig(reply=answer, token_chars=5, tokens_per_s=30)
    async with restartable_system(tmp_path, pki_dir, cfg) as (edge, _fake), \
            chat_proc(edge.http, "讲一个长故事", user="restart") as c:
        await c.wait_for(lambda c: len(c.out) >= 50, what="the answer streaming")
        await edge.stop(how)
        await c.wait_for(lambda c: "连接已断开，正在重连…" in c.err, what="the disconnect notice")
        shown = len(c.out)
        assert shown < len(answer), c  # the edge went away mid-answer
        await edge.start()
        assert await c.exit_code(60) == 0, c
    assert c.out == answer + "\n", c  # every chunk once, in order: nothing lost, nothing repeated
    assert "已重新连接" in c.err, c


async def test_interactive_reconnects_resumes_and_sends_a_question_typed_while_disconnected(
        tmp_path: Path, pki_dir: Path) -> None:
    first, second = numbered(120), numbered(20, "[]")
    cfg = FakeLLMConfig(reply=first, token_chars=5, tokens_per_s=30)
    async with restartable_system(tmp_path, pki_dir, cfg) as (edge, _fake), \
            chat_proc(edge.http, user="inter", interactive=True) as c:
        await c.wait_for(lambda c: prompts(c) == 1, what="the prompt")
        await c.send("第一个问题")
        await c.wait_for(lambda c: len(answer_so_far(c)) >= 50, what="the answer streaming")
        await edge.stop(signal.SIGTERM)  # the edge restarts mid-answer
        await c.wait_for(lambda c: c.err.count("连接已断开") == 1, what="the disconnect notice")
        assert len(answer_so_far(c)) < len(first), c
        await edge.start()
        await c.wait_for(lambda c: prompts(c) >= 2 and c.out.rstrip().endswith("你>"), what="the next prompt")
        # idle at the prompt, the edge goes away again; a question typed now is sent once it is back
        await edge.stop(signal.SIGKILL)
        await c.wait_for(lambda c: c.err.count("连接已断开") == 2, what="the second disconnect notice")
        cfg.reply = second
        await c.send("第二个问题")
        await c.wait_for(lambda c: "重新连接后发送" in c.err, what="the queued notice")
        await edge.start()
        await c.wait_for(lambda c: second in c.out, timeout=40, what="the second answer")
        await c.wait_for(lambda c: c.out.rstrip().endswith("你>"), what="the prompt after the second answer")
        c.eof()  # Ctrl-D
        assert await c.exit_code() == 0, c
    answers = re.findall(r"助手> (.*?)\n", c.out, re.S)
    assert answers == [first, second], c  # each answer complete and once


async def test_edge_gone_for_good_says_so_and_exits_1(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(reply=numbered(150), token_chars=5, tokens_per_s=30)
    async with restartable_system(tmp_path, pki_dir, cfg) as (edge, _fake), \
            chat_proc(edge.http, "问题", user="gone", options=("--reconnect-timeout", "2")) as c:
        await c.wait_for(lambda c: len(c.out) >= 20, what="the answer streaming")
        await edge.stop(signal.SIGKILL)
        assert await c.exit_code(30) == 1, c
    assert "连接已断开，正在重连…" in c.err and "无法连接服务器" in c.err and "2 秒" in c.err, c


# ---- 2. a question over the limit ------------------------------------------------------------------------------
async def test_too_long_question_is_refused_before_sending_naming_the_limit(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir) as sys_:
        async with chat_proc(sys_.http, "长" * 30000, user="long") as c:
            rc = await c.exit_code()
        assert rc == 2, c
        assert "问题过长" in c.err and "8000" in c.err and "30000" in c.err, c
        assert c.out == "", c
        assert await task_count(sys_.http, "long") == 0  # nothing was sent


async def test_question_at_the_limit_is_asked_even_in_four_byte_characters(tmp_path: Path, pki_dir: Path) -> None:
    """8000 emoji: as \\u escapes (12 bytes each) the frame would pass the edge's 64 KiB limit and the edge
    would close the socket; sent as UTF-8 (4 bytes each) it is an ordinary question."""
    cfg = FakeLLMConfig(reply="收到。", token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_:
        async with chat_proc(sys_.http, "😀" * 8000, user="emoji") as c:
            rc = await c.exit_code()
        assert rc == 0 and c.out == "收到。\n", c


async def test_the_edges_error_frame_is_shown(tmp_path: Path, pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the edge refuse a question the client let through (another limit, an older client), its error
    message is shown and the exit code is 1 (the client in this process, its own check lifted)."""
    from claw import chat

    monkeypatch.setattr(chat, "MAX_ASK_CHARS", 10**6)
    async with run_system(tmp_path, pki_dir) as sys_:
        out, err = io.StringIO(), io.StringIO()
        rc = await asyncio.wait_for(chat.chat(sys_.http, "frame", "问" * 12000, out=out, err=err), 20)
    assert rc == 1, (out.getvalue(), err.getvalue())
    assert "问题过长（最多 8000 字）" in err.getvalue(), err.getvalue()


def test_client_limit_is_the_edges() -> None:
    from claw.chat import MAX_ASK_CHARS
    from edge.api import MAX_ASK_CHARS as EDGE_MAX

    assert MAX_ASK_CHARS == EDGE_MAX


# ---- 3. an empty question --------------------------------------------------------------------------------------
@pytest.mark.parametrize("question", ["", "   "], ids=["empty", "blank"])
async def test_empty_question_is_a_usage_error(tmp_path: Path, pki_dir: Path, question: str) -> None:
    async with run_system(tmp_path, pki_dir) as sys_:
        async with chat_proc(sys_.http, question, user="empty") as c:  # stdin is /dev/null
            rc = await c.exit_code()
        assert rc == 2, c
        assert "问题不能为空" in c.err and "智控未来" not in c.out, c  # not taken for interactive mode
        assert await task_count(sys_.http, "empty") == 0


async def test_unreachable_edge_at_start_is_one_clear_line(tmp_path: Path) -> None:
    async with chat_proc(f"http://127.0.0.1:{free_port()}", "你好") as c:
        rc = await c.exit_code()
    assert rc == 1 and "无法连接" in c.err, c


# ---- 4. Ctrl-C and end of input ----------------------------------------------------------------------------------
async def test_ctrl_c_in_one_question_mode_stops_the_answer_and_exits_130(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(reply=numbered(400), token_chars=5, tokens_per_s=40)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_:
        async with chat_proc(sys_.http, "很长的回答", user="sigint1") as c:
            await c.wait_for(lambda c: len(c.out) >= 10, what="the answer streaming")
            c.sigint()
            rc = await c.exit_code()
        assert rc == 130, c
        assert c.out.rstrip().endswith("[已停止]"), c  # the edge confirmed the stop before the exit
        assert sys_.fake.stats.client_closed >= 1  # LM Studio's stream was closed


async def test_ctrl_c_interactive_stops_the_answer_then_exits_130_at_the_prompt(tmp_path: Path,
                                                                               pki_dir: Path) -> None:
    cfg = FakeLLMConfig(reply=numbered(400), token_chars=5, tokens_per_s=40)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_:
        async with chat_proc(sys_.http, user="sigint2", interactive=True) as c:
            await c.wait_for(lambda c: prompts(c) == 1, what="the prompt")
            await c.send("很长的回答")
            await c.wait_for(lambda c: len(answer_so_far(c)) >= 10, what="the answer streaming")
            c.sigint()  # stops this answer, back to the prompt
            await c.wait_for(lambda c: "[已停止]" in c.out and prompts(c) == 2, what="[已停止] and the prompt")
            assert c.proc.returncode is None, c
            cfg.reply, cfg.tokens_per_s = "第二个回答。", 0
            await c.send("第二个问题")
            await c.wait_for(lambda c: "第二个回答。" in c.out and prompts(c) == 3, what="the second answer")
            c.sigint()  # at the prompt: exit
            rc = await c.exit_code()
        assert rc == 130, c


async def test_end_of_input_at_the_prompt_exits_0(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="好的。", token_chars=2)) as sys_:
        async with chat_proc(sys_.http, user="eof", interactive=True) as c:
            await c.send("你好")
            await c.wait_for(lambda c: "好的。" in c.out and prompts(c) == 2, what="the answer")
            c.eof()
            assert await c.exit_code() == 0, c


async def test_closed_stdout_ends_the_client_instead_of_reconnecting(tmp_path: Path, pki_dir: Path) -> None:
    """``claw chat Q | head -1``: writing the answer to the closed pipe raised BrokenPipeError inside the socket
    reader, which took it for a lost connection: the client reconnected and resumed the answer over and over
    (measured: 46 reconnections, a new ticket and WebSocket each) and then exited 0. Now it exits 1 at once."""
    cfg = FakeLLMConfig(reply=numbered(300), token_chars=5, tokens_per_s=200)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_:
        rd, wr = os.pipe()
        proc = await asyncio.create_subprocess_exec(
            *CLAW, "chat", "--url", sys_.http, "--user", "pipe", "很长的回答", cwd=ROOT, env=_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=wr, stderr=asyncio.subprocess.PIPE)
        os.close(wr)
        try:
            first = await asyncio.wait_for(asyncio.to_thread(os.read, rd, 10), 30)
            assert first
        finally:
            os.close(rd)  # like head -c 10: the reader is gone
        assert proc.stderr is not None
        try:
            err = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
            rc = await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert rc == 1 and "连接已断开" not in err, (rc, err)
