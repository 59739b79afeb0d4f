"""edge.miniapp.read_bounded: WeChat's and WeCom's answers are read to their end (or the bound), whatever pieces
they arrive in. One ``StreamReader.read(n)`` returns only what has arrived so far."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp

from edge.miniapp import read_bounded


def _reader() -> aiohttp.StreamReader:
    return aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())


class _TwoPieces(aiohttp.StreamReader):
    """An answer whose second piece arrives only after the first was read: the next ``read`` finds nothing
    buffered and must wait for it. Records what each read returned."""

    def __init__(self, first: bytes, rest: bytes) -> None:
        super().__init__(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
        self.feed_data(first)
        self._rest: bytes | None = rest
        self.reads: list[bytes] = []

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self.reads.append(data)
        if self._rest is not None:
            asyncio.get_running_loop().call_soon(self._arrive, self._rest)
            self._rest = None
        return data

    def _arrive(self, rest: bytes) -> None:
        self.feed_data(rest)
        self.feed_eof()


async def test_an_answer_in_two_pieces_is_read_whole() -> None:
    r = _TwoPieces(b'{"openid": ', b'"o1"}')
    assert await read_bounded(r, 1024) == b'{"openid": "o1"}'
    # the first read returned half an answer; the reader asked again instead of judging it
    assert r.reads == [b'{"openid": ', b'"o1"}', b""]


async def test_an_answer_over_the_bound_stops_one_byte_past_it() -> None:
    r = _reader()
    r.feed_data(b"x" * 100)
    r.feed_data(b"y" * 100)  # never read: the caller knows "too big" from limit + 1 bytes
    assert await read_bounded(r, 50) == b"x" * 51
