"""How an answer ends, through the real edge (WebSocket API), embedded broker and node, against the fake LM
server in the shapes real servers use: an answer is ``ok`` only when the model said it ended (finish_reason);
``length`` is ``ok`` with a note; a conversation that outgrows the model's context never locks the user out
(history trimmed to node.history_tokens, one retry without history, ``llm_context`` when the question alone is
too long); the node warns at start when the LLM server cannot be used."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fakes.llm import FakeLLMConfig, prompt_tokens, reply_tokens
from node.generate import CONTEXT_RESET_NOTE, LENGTH_NOTE
from node.history import message_tokens
from tests.conftest import free_port, run_system, wait_until
from tests.integration.test_e2e import collect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ANSWER_TOKENS = 30  # the fake's answers: 30 tokens of 4 ASCII characters (34 prompt tokens as history)


async def ask(ws: aiohttp.ClientWebSocketResponse, text: str, timeout: float = 15) -> tuple[str, dict[str, Any]]:
    """Ask one question; (the text of its deltas, its done frame)."""
    await ws.send_json({"type": "ask", "text": text})
    frames, done = await collect(ws, timeout=timeout)
    deltas = "".join(f["text"] for f in frames if f["type"] == "delta")
    assert done["text"] == deltas
    return deltas, done


def answer_of(cfg: FakeLLMConfig, question: str) -> str:
    return "".join(reply_tokens(cfg, [{"role": "user", "content": question}]))


def sent(fake: Any, n: int = 1) -> list[dict[str, str]]:
    """The messages of the n-th last chat request the fake LM server received."""
    return list(fake.stats.recent_requests)[-n]["messages"]


def node_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("node.")]


# --------------------------------------------------------------------------- finish_reason


async def test_done_without_finish_reason_is_llm_dropped_with_the_text_kept(
        tmp_path: Path, pki_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A clean [DONE] after 5 of 40 tokens and no finish_reason (llama-cpp-python's server, interrupted by
    another request) was stored as ok. Now: llm_dropped, the 5 tokens kept, the user told it was cut off, a
    warning in the node's log, and the cut answer never becomes part of the conversation."""
    caplog.set_level(logging.WARNING, logger="node")
    cfg = FakeLLMConfig(n_tokens=40, token_chars=3, done_after=5)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            text, done = await ask(ws, "讲一个很长的故事")
            assert done["status"] == "error", done
            assert done["error"]["code"] == "llm_dropped"
            assert "不完整" in done["error"]["message"]
            assert text == answer_of(cfg, "讲一个很长的故事")[:15]
            assert any("finish_reason" in w for w in node_warnings(caplog))
            sys_.fake.config.done_after = None
            text, done = await ask(ws, "再问一次")
            assert done["status"] == "ok"
            assert sent(sys_.fake) == [{"role": "system", "content": sys_.node.cfg.system_prompt},
                                       {"role": "user", "content": "再问一次"}]


async def test_length_is_ok_with_a_note_and_max_tokens_is_sent(tmp_path: Path, pki_dir: Path) -> None:
    cfg = FakeLLMConfig(n_tokens=20)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"max_tokens": 5}) as sys_, \
            aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            text, done = await ask(ws, "写一篇长文")
            assert sys_.fake.stats.last_request["max_tokens"] == 5
            assert done["status"] == "ok", done
            assert text == answer_of(cfg, "写一篇长文")[:5 * 4] + LENGTH_NOTE  # every channel shows the note
            assert done["usage"]["completion_tokens"] == 5
            await ask(ws, "继续")
            # the conversation holds the answer as the model wrote it, without the note
            assert sent(sys_.fake)[-2] == {"role": "assistant", "content": answer_of(cfg, "写一篇长文")[:5 * 4]}
        assert sys_.node.stats.length_limited == 2


async def test_max_tokens_default_is_sent(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir) as sys_, aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            _, done = await ask(ws, "你好")
        assert done["status"] == "ok"
        assert sys_.fake.stats.last_request["max_tokens"] == 2048


# --------------------------------------------------------------------------- the context window


def _conversation_ctx(system: str, cfg: FakeLLMConfig) -> tuple[list[str], int]:
    """Questions of one size, and an n_ctx that holds a prompt of one previous turn plus the answer, not two."""
    questions = [f"第{i}个问题：请回答" for i in range(1, 8)]
    sys_msg = {"role": "system", "content": system}

    def prompt(turns: int) -> list[dict[str, str]]:
        msgs = [sys_msg]
        for q in questions[:turns]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": answer_of(cfg, q)}]
        return msgs + [{"role": "user", "content": questions[turns]}]

    n_ctx = prompt_tokens(prompt(1)) + ANSWER_TOKENS + 2
    assert prompt_tokens(prompt(2)) > n_ctx  # two previous turns never fit
    return questions, n_ctx


@pytest.mark.parametrize("shape", ["http", "http500", "empty", "done", "stream"])
async def test_a_conversation_over_the_context_is_retried_without_history_and_never_locks_the_user_out(
        tmp_path: Path, pki_dir: Path, shape: str, caplog: pytest.LogCaptureFixture) -> None:
    """The fake holds one previous turn, not two, and refuses a bigger prompt the way ``shape`` says (llama.cpp's
    HTTP 400 / 500, a 200 stream with no event or just [DONE], an in-stream error object). With no history
    budget to trim by, the third question fails once and is sent again without history (the user sees only the
    answer); the fourth goes through at once (the conversation restarted from the third); a question too long
    on its own is llm_context, and the user can still ask after it."""
    caplog.set_level(logging.WARNING, logger="node")
    cfg = FakeLLMConfig(n_tokens=ANSWER_TOKENS, ctx_error=shape)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"history_tokens": 1_000_000}) as sys_, \
            aiohttp.ClientSession() as s:
        fake = sys_.fake
        questions, fake.config.n_ctx = _conversation_ctx(sys_.node.cfg.system_prompt, cfg)
        async with sys_.chat_ws(s) as ws:
            for q in questions[:2]:
                text, done = await ask(ws, q)
                assert done["status"] == "ok" and text == answer_of(cfg, q)
            assert fake.stats.chat_requests == 2 and len(sent(fake)) == 4  # system, q1, a1, q2

            text, done = await ask(ws, questions[2])
            assert done["status"] == "ok", done
            assert text == answer_of(cfg, questions[2])  # nothing of the refused attempt shows
            assert fake.stats.chat_requests == 4 and fake.stats.context_errors == 1
            assert len(sent(fake, 2)) == 6  # the refused prompt: two previous turns
            assert sent(fake)[1:] == [{"role": "user", "content": questions[2]}]  # sent again without them
            assert any("does not fit the model's context" in w for w in node_warnings(caplog))

            text, done = await ask(ws, questions[3])
            assert done["status"] == "ok"
            assert fake.stats.chat_requests == 5 and fake.stats.context_errors == 1  # at once
            assert [m["content"] for m in sent(fake)[1:]] == [questions[2], answer_of(cfg, questions[2]),
                                                             questions[3]]

            text, done = await ask(ws, "长" * fake.config.n_ctx)  # too long on its own
            assert done["status"] == "error" and done["error"]["code"] == "llm_context", done
            assert "太长" in done["error"]["message"] or "上下文" in done["error"]["message"]
            assert text == ""
            assert fake.stats.chat_requests == 7  # with the history, then once without

            # the history is as it was (two turns: over the context again, so one more retry), not lost
            text, done = await ask(ws, questions[4])
            assert done["status"] == "ok" and text == answer_of(cfg, questions[4])
            assert [m["content"] for m in sent(fake, 2)[1:-1]] == [questions[2], answer_of(cfg, questions[2]),
                                                                  questions[3], answer_of(cfg, questions[3])]
            assert fake.stats.chat_requests == 9
        assert sys_.node.stats.context_retries == 3
        assert sys_.node.stats.by_code == {"llm_context": 1}


async def test_an_answer_that_fills_the_context_ends_the_conversation(tmp_path: Path, pki_dir: Path) -> None:
    """The prompt fits, the answer does not: llama.cpp's server sends an error object mid-answer. The text so far
    is kept, the user is told the answer was cut off and the history cleared; the next question is sent
    without it (it would only fill the context again)."""
    cfg = FakeLLMConfig(n_tokens=ANSWER_TOKENS, ctx_error="stream")
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        fake = sys_.fake
        questions, n_ctx = _conversation_ctx(sys_.node.cfg.system_prompt, cfg)
        fake.config.n_ctx = n_ctx - 20  # one previous turn still fits the prompt, not the whole answer after it
        async with sys_.chat_ws(s) as ws:
            _, done = await ask(ws, questions[0])
            assert done["status"] == "ok"
            text, done = await ask(ws, questions[1])
            assert done["status"] == "error" and done["error"]["code"] == "llm_context", done
            assert "回答不完整" in done["error"]["message"] and CONTEXT_RESET_NOTE in done["error"]["message"]
            assert text and answer_of(cfg, questions[1]).startswith(text) and text != answer_of(cfg, questions[1])
            assert fake.stats.chat_requests == 2  # text was sent: no retry
            text, done = await ask(ws, questions[2])
            assert done["status"] == "ok" and text == answer_of(cfg, questions[2])
            assert sent(fake)[1:] == [{"role": "user", "content": questions[2]}]


async def test_history_is_trimmed_to_the_budget_before_sending(tmp_path: Path, pki_dir: Path) -> None:
    """node.history_tokens holds one previous turn (by the node's estimate): the fake, which holds no more, never
    refuses a prompt however long the conversation grows, and each question carries the newest turn only."""
    cfg = FakeLLMConfig(n_tokens=ANSWER_TOKENS, ctx_error="http")
    probe, _ = _conversation_ctx("", cfg)
    one_turn = message_tokens({"role": "user", "content": probe[0]}) + \
        message_tokens({"role": "assistant", "content": answer_of(cfg, probe[0])})
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"history_tokens": one_turn + 5}) as sys_, \
            aiohttp.ClientSession() as s:
        fake = sys_.fake
        questions, fake.config.n_ctx = _conversation_ctx(sys_.node.cfg.system_prompt, cfg)
        async with sys_.chat_ws(s) as ws:
            for i, q in enumerate(questions[:5]):
                text, done = await ask(ws, q)
                assert done["status"] == "ok" and text == answer_of(cfg, q), done
                if i:
                    assert [m["content"] for m in sent(fake)[1:]] == [questions[i - 1],
                                                                     answer_of(cfg, questions[i - 1]), q]
        assert fake.stats.context_errors == 0 and fake.stats.chat_requests == 5
        assert sys_.node.stats.context_retries == 0


async def test_history_tokens_zero_sends_no_history(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, node={"history_tokens": 0}) as sys_, aiohttp.ClientSession() as s:
        async with sys_.chat_ws(s) as ws:
            await ask(ws, "第一个")
            await ask(ws, "第二个")
        assert sent(sys_.fake)[1:] == [{"role": "user", "content": "第二个"}]


# --------------------------------------------------------------------------- the start-up check


async def test_node_warns_at_start_when_the_llm_server_is_unreachable_and_starts_anyway(
        tmp_path: Path, pki_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node")
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with run_system(tmp_path, pki_dir, node={"llm_url": url}) as sys_:  # (returns once the node is online)
        await wait_until(lambda: any(url in w and "llm_unreachable" in w for w in node_warnings(caplog)), 5)
        warning = next(w for w in node_warnings(caplog) if url in w)
        assert "Start Server" in warning and "node.llm_url" in warning
        assert not sys_.node_task.done()


async def test_node_warns_at_start_when_no_model_is_loaded(tmp_path: Path, pki_dir: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node")
    async with run_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(models=[])) as sys_:
        await wait_until(lambda: any("no model loaded" in w for w in node_warnings(caplog)), 5)
        assert sys_.fake.url in next(w for w in node_warnings(caplog) if "no model loaded" in w)
        assert sys_.fake.stats.model_requests >= 1


async def test_node_warns_at_start_when_its_model_is_not_listed(tmp_path: Path, pki_dir: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node")
    async with run_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(models=["qwen2.5-7b"])):
        await wait_until(lambda: any("'fake-model' is not among" in w for w in node_warnings(caplog)), 5)
    caplog.clear()
    async with run_system(tmp_path / "ok", pki_dir) as sys_:  # a server with the model: no warning
        await wait_until(lambda: any("lists 1 model(s)" in r.getMessage() for r in caplog.records), 5)
        assert not [w for w in node_warnings(caplog) if sys_.fake.url in w]
