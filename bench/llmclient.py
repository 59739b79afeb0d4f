"""A/B bench of the node's LM Studio client alone (``node.llm.chat``): CPU per streamed chunk.

The driver serves LM Studio-shaped streams (chunked, one SSE event per chunk, one chunk per stream every
``--tick-ms`` so that a read holds about one chunk, as at the sweep's load) from a raw asyncio server on
127.0.0.1, and runs the client in a child process per run: ``--streams`` concurrent ``chat()`` calls of
``--chunks`` chunks each on one ``LLMClient`` (uvloop, as the node). The child measures its own CPU time
(``time.process_time``) over the calls only and divides by the chunks it received. With ``--tree`` given more
than once, runs alternate between the trees (each child gets ``PYTHONPATH=<tree>``), so that the machine's
drift hits every tree alike::

    .venv/bin/python bench/llmclient.py --tree . --tree ../llm-base --runs 5

It prints each run and, per tree, the median and the spread (min-max) of CPU µs per chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

CHUNK = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
         b'"model":"qwen2.5-7b-instruct","system_fingerprint":"qwen2.5-7b-instruct","choices":[{"index":0,'
         b'"delta":{"content":" token"},"logprobs":null,"finish_reason":null}]}\n\n')
END = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
       b'"model":"qwen2.5-7b-instruct","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],'
       b'"usage":{"prompt_tokens":10,"completion_tokens":1,"total_tokens":11}}\n\ndata: [DONE]\n\n')
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n")


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Stream(asyncio.Protocol):
    """One server connection: reads a request, then streams ``chunks`` chunks, one per tick."""

    def __init__(self, server: _Server) -> None:
        self.server, self.buf, self.left, self.transport = server, b"", -1, None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        n = int(head.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in head else 0
        if len(self.buf) < end + 4 + n:
            return
        self.buf = self.buf[end + 4 + n:]
        self.transport.write(HEAD)  # type: ignore[union-attr]
        self.left = self.server.chunks
        self.server.active.add(self)

    def tick(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self.server.active.discard(self)
        elif self.left > 0:
            self.left -= 1
            self.transport.write(_frame(CHUNK))
        else:
            self.transport.write(_frame(END) + b"0\r\n\r\n")
            self.server.active.discard(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.active.discard(self)


class _Server:
    def __init__(self, chunks: int, tick_s: float) -> None:
        self.chunks, self.tick_s, self.active = chunks, tick_s, set()

    async def run(self, started: asyncio.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: _Stream(self), "127.0.0.1", 0)
        started.set_result(srv.sockets[0].getsockname()[1])
        try:
            while True:
                await asyncio.sleep(self.tick_s)
                for s in list(self.active):
                    s.tick()
        finally:
            srv.close()


async def _client(url: str, streams: int) -> dict[str, object]:
    import node.llm as llm

    got = [0]

    def on_event(kind: str, text: str) -> None:
        got[0] += 1

    msgs = [{"role": "user", "content": "bench"}]
    async with llm.LLMClient() as client:
        await llm.chat(client, url, on_event=on_event, model="m", messages=msgs)  # warm-up (imports, caches)
        got[0] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(llm.chat(client, url, on_event=on_event, model="m", messages=msgs)
                               for _ in range(streams)))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"cpu_s": cpu, "wall_s": wall, "chunks": got[0], "module": llm.__file__}


async def _drive(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    started: asyncio.Future[int] = loop.create_future()
    server = asyncio.create_task(_Server(args.chunks, args.tick_ms / 1000).run(started))
    url = f"http://127.0.0.1:{await started}/v1"
    per: dict[str, list[float]] = {t: [] for t in args.tree}
    try:
        for r in range(args.runs):
            for tree in args.tree:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, os.path.abspath(__file__), "--client", url, "--streams", str(args.streams),
                    env=env, stdout=asyncio.subprocess.PIPE)
                out, _ = await proc.communicate()
                res = json.loads(out)
                us = res["cpu_s"] / res["chunks"] * 1e6
                per[tree].append(us)
                print(f"run {r + 1} {tree}: {us:.2f} µs CPU/chunk ({res['chunks']} chunks, wall {res['wall_s']:.2f} s, "
                      f"{res['module']})", flush=True)
    finally:
        server.cancel()
    for tree, v in per.items():
        print(f"{tree}: median {statistics.median(v):.2f} µs/chunk, min {min(v):.2f}, max {max(v):.2f} "
              f"({len(v)} runs)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", help="a source tree to import node.llm from (repeat for A/B)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--chunks", type=int, default=400, help="chunks per stream")
    p.add_argument("--tick-ms", type=float, default=2.0)
    p.add_argument("--client", help=argparse.SUPPRESS)  # the child: run the client against this URL
    args = p.parse_args()
    if args.client:
        import uvloop

        print(json.dumps(uvloop.run(_client(args.client, args.streams))))
        return
    args.tree = args.tree or ["."]
    asyncio.run(_drive(args))


if __name__ == "__main__":
    main()
