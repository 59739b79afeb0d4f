"""Broken LM Studio responses for the node's client (node.llm), while a well-behaved stream keeps being read.

A raw asyncio server on 127.0.0.1 answers each fuzz request with a case of ``llm_cases.py`` (a mutated LM
Studio stream, or random bytes; cut into random writes) and closes or holds the connection; the canary's
requests on the same LLMClient get a well-formed kept-alive stream. Every fuzz request must end, well within
its deadlines, with the answer or an LLMError of a documented code -- never another exception or a hang --
with no ERROR log record, and the canary must keep getting its answer. The pure SSE decoder is fuzzed too:
random bytes cut at random places decode to the events of the uncut bytes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from node.llm import ERROR_CODES, LLMClient, LLMError, stream_chat
from node.sse import SSEDecoder, SSEError
from tests.fuzz import harness
from tests.fuzz.llm_cases import make_case
from tests.unit.test_llm import MSGS, _sse_body

pytestmark = pytest.mark.integration

STALL_S = 0.3  # stall_timeout and first_token_timeout of the fuzz requests (cases held open end this way)
BOUND_S = 3.0  # every fuzz request ends within this
GOOD = _sse_body("ok", "!")
GOOD_RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(GOOD) + GOOD


async def test_llm_client_fuzz() -> None:
    fuzz = harness.Fuzz("llm")
    cases: dict[int, tuple[bytes, bool]] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(n)
                target = head.split(b" ", 2)[1].decode()
                if target.startswith("/ok/"):
                    writer.write(GOOD_RESP)
                    await writer.drain()
                    continue
                data, hold = cases[int(target.split("/")[2])]
                rng = fuzz.rng(int(target.split("/")[2]))
                i = 0
                while i < len(data):  # random writes (the socket may still merge some)
                    j = i + rng.randrange(1, 400)
                    writer.write(data[i:j])
                    await writer.drain()
                    i = j
                if hold:
                    while await reader.read(65536):
                        pass
                break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async with LLMClient() as client:
        async def canary_round(k: int) -> None:
            text = "".join([ev.text async for ev in stream_chat(client, f"{base}/ok/{k}", model="m",
                                                                 messages=MSGS, stall_timeout=5)])
            assert text == "ok!", text

        with harness.ErrorLog().installed() as errors:
            async with harness.Canary("llm", canary_round).running() as canary:
                fuzz.begin()
                for i in fuzz.indices():
                    cases[i] = make_case(fuzz.rng(i))
                    fuzz.start(0, f"{fuzz.where(i)} {cases[i][0][:300]!r}")
                    t0 = time.monotonic()
                    try:
                        async for _ in stream_chat(client, f"{base}/case/{i}", model="m", messages=MSGS,
                                                   stall_timeout=STALL_S, first_token_timeout=STALL_S):
                            pass
                        fuzz.count("ok")
                    except LLMError as exc:
                        assert exc.code in ERROR_CODES and exc.user_message, (fuzz.in_flight(), exc)
                        fuzz.count(exc.code)
                    except BaseException as exc:  # noqa: BLE001 - anything but LLMError is a bug
                        pytest.fail(f"{type(exc).__name__} escaped stream_chat(): {exc!r}\n{fuzz.in_flight()}")
                    assert time.monotonic() - t0 < BOUND_S, fuzz.in_flight()
                    del cases[i]
                    canary.check(fuzz.where(i))
                await canary.wait_rounds(2)
                print(fuzz.summary(), canary.stats(), sep="\n")
            assert not errors.records, errors.report()
    server.close()
    assert fuzz.cases > 20 and fuzz.outcomes.get("ok", 0) > 0


def _decode(data: bytes, bounds: list[int]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The events of ``data`` fed cut at ``bounds`` (up to an SSEError), and whether one was raised."""
    d, got = SSEDecoder(max_line=50), []
    try:
        for a, b in zip(bounds, bounds[1:]):
            got += d.feed(data[a:b])
    except SSEError as exc:
        return got + exc.events, True
    return got, False


def test_sse_decoder_fuzz() -> None:
    """Random bytes (and mutated SSE) cut at random places decode to the same events as uncut, and raise
    SSEError (a line over the limit) after the same events."""
    fuzz = harness.Fuzz("sse", budget=harness.budget_s() / 3)  # pure and fast: a third of the budget
    fuzz.begin()
    seeds = [b"data: x\n\n", b"event: error\r\ndata: y\r\n\r\n", b": c\rdata:z\r\r", b"data: [DONE]\n\n"]
    for i in fuzz.indices():
        rng = fuzz.rng(i)
        if rng.random() < 0.5:
            data = bytes(rng.choice(b"data:event \r\n\x00\xff[]{}") for _ in range(rng.randrange(0, 200)))
        else:
            data = b"".join(rng.choice(seeds) for _ in range(rng.randrange(1, 10)))
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 10)))
        bounds = [0, *cuts, len(data)]
        whole, whole_raised = _decode(data, [0, len(data)])
        cut, cut_raised = _decode(data, bounds)
        assert (cut, cut_raised) == (whole, whole_raised), (fuzz.where(i), data, cuts)
        fuzz.count("long-line" if whole_raised else "ok")
    print(fuzz.summary())
