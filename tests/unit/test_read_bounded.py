"""edge.miniapp.read_bounded: WeChat's and WeCom's answers are read to their end (or the bound), whatever pieces
they arrive in. One ``StreamReader.read(n)`` returns only what has arrived so far."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp

from edge.miniapp import read_bounded


def _reader() -> aiohttp.StreamReader:
    return aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())


async def test_an_answer_in_two_pieces_is_read_whole() -> None:
    r = _reader()
    r.feed_data(b'{"openid": ')  # the first piece is there when reading starts ...
    task = asyncio.create_task(read_bounded(r, 1024))
    await asyncio.sleep(0)  # one loop turn (not a wait): the task's first step reads the buffered piece
    assert not task.done()  # ... and the reader waits for the rest instead of judging half an answer
    r.feed_data(b'"o1"}')
    r.feed_eof()
    assert await task == b'{"openid": "o1"}'


async def test_an_answer_over_the_bound_stops_one_byte_past_it() -> None:
    r = _reader()
    r.feed_data(b"x" * 100)
    r.feed_data(b"y" * 100)  # never read: the caller knows "too big" from limit + 1 bytes
    assert await read_bounded(r, 50) == b"x" * 51
