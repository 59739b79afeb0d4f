"""core.wsframe: RFC 6455's own example frames, the three length forms, a round trip for any payload and
split, the bytes the edge wrote before the module existed, and agreement with aiohttp's WebSocket reader and
writer in both directions."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue  # what aiohttp's own ClientWebSocketResponse reads from
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_websocket import WebSocketReader, WebSocketWriter
from hypothesis import given
from hypothesis import strategies as st

from core.wsframe import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, FrameError,
                          client_frame, frames, mask, server_frame)

# RFC 6455 section 5.7, byte for byte.
HELLO_UNMASKED = bytes([0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
HELLO_MASKED = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
HEL_LO_FRAGMENTS = bytes([0x01, 0x03, 0x48, 0x65, 0x6C, 0x80, 0x02, 0x6C, 0x6F])
PING_HELLO = bytes([0x89, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
PONG_HELLO_MASKED = bytes([0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
KEY = bytes([0x37, 0xFA, 0x21, 0x3D])



def test_the_rfc_hello_frames_encode_byte_for_byte() -> None:
    assert server_frame(b"Hello") == HELLO_UNMASKED
    assert client_frame(OP_TEXT, b"Hello", KEY) == HELLO_MASKED
    assert server_frame(b"Hello", OP_PING) == PING_HELLO
    assert client_frame(OP_PONG, b"Hello", KEY) == PONG_HELLO_MASKED


def test_the_rfc_hello_frames_decode() -> None:
    hello = (True, OP_TEXT, b"Hello")
    assert frames(HELLO_UNMASKED) == ([hello], len(HELLO_UNMASKED), None)
    assert frames(HELLO_MASKED, masked=True) == ([hello], len(HELLO_MASKED), None)
    assert frames(PING_HELLO) == ([(True, OP_PING, b"Hello")], len(PING_HELLO), None)
    assert frames(PONG_HELLO_MASKED, masked=True) == ([(True, OP_PONG, b"Hello")], len(PONG_HELLO_MASKED), None)
    assert frames(HEL_LO_FRAGMENTS) == ([(False, OP_TEXT, b"Hel"), (True, OP_CONTINUATION, b"lo")],
                                        len(HEL_LO_FRAGMENTS), None)


def test_the_rfc_16_and_64_bit_length_forms() -> None:
    # "256 bytes binary message in a single unmasked frame" and "64KiB binary message in a single unmasked frame"
    body256, body64k = bytes(range(256)), bytes(65536)
    assert server_frame(body256, OP_BINARY) == bytes([0x82, 0x7E, 0x01, 0x00]) + body256
    assert server_frame(body64k, OP_BINARY) == bytes([0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]) + body64k
    assert frames(server_frame(body64k, OP_BINARY)) == ([(True, OP_BINARY, body64k)], 10 + 65536, None)


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_the_length_form_boundaries(n: int) -> None:
    head = server_frame(b"x" * n)[:10]
    if n < 126:
        assert head[1] == n
    elif n < 65536:
        assert head[1] == 126 and struct.unpack("!H", head[2:4])[0] == n
    else:
        assert head[1] == 127 and struct.unpack("!Q", head[2:10])[0] == n
    masked = client_frame(OP_TEXT, b"y" * n, KEY)
    assert masked[1] & 0x80
    assert frames(masked, masked=True) == ([(True, OP_TEXT, b"y" * n)], len(masked), None)


def _before(data: bytes) -> bytes:
    """The text frame header the edge and the thin relay wrote by hand before core.wsframe."""
    n = len(data)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + data
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + data
    return struct.pack("!BBQ", 0x81, 127, n) + data


def test_the_same_bytes_on_the_wire_as_before() -> None:
    for n in (*range(0, 300), 65534, 65535, 65536, 65537, 100_000):
        data = bytes([n % 251]) * n
        assert server_frame(data) == _before(data)


def test_an_incomplete_frame_waits_and_a_wrong_mask_stops_the_scan() -> None:
    for frame, masked in ((server_frame(b"z" * 300), False), (client_frame(OP_TEXT, b"z" * 70000), True)):
        for cut in (0, 1, 2, 3, 4, 9, 10, 13, len(frame) - 1):
            assert frames(frame[:cut], masked=masked) == ([], 0, None)
    hello = (True, OP_TEXT, b"Hello")
    got, pos, error = frames(HELLO_UNMASKED + HELLO_MASKED)  # the frames before the refused one still count
    assert (got, pos) == ([hello], len(HELLO_UNMASKED))
    assert isinstance(error, FrameError) and str(error) == "masked frame from the server"
    got, pos, error = frames(HELLO_UNMASKED, masked=True)
    assert (got, pos) == ([], 0) and str(error) == "unmasked frame from a client"
    assert frames(b"\x00" + HELLO_UNMASKED, 1) == ([hello], 1 + len(HELLO_UNMASKED), None)
    assert frames(HELLO_UNMASKED + HELLO_UNMASKED[:3]) == ([hello], len(HELLO_UNMASKED), None)


_long = st.builds(lambda head, n: head + bytes(n), st.binary(max_size=8), st.integers(65530, 65540))
_frames = st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE]),
                             st.binary(max_size=300) | _long),
                   min_size=1, max_size=4)


@given(_frames, st.booleans(), st.data())
def test_round_trip_in_any_split(sent: list[tuple[int, bytes]], from_client: bool, data: Any) -> None:
    wire = b"".join(client_frame(op, p) if from_client else server_frame(p, op) for op, p in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    got: list[tuple[int, bytes]] = []
    buf, prev = b"", 0
    for cut in [*cuts, len(wire)]:
        buf += wire[prev:cut]
        prev = cut
        out, pos, error = frames(buf, masked=from_client)
        assert error is None and all(fin for fin, _, _ in out)
        got += [(op, bytes(payload)) for _, op, payload in out]
        buf = buf[pos:]
    assert got == sent and buf == b""


@given(st.binary(max_size=400), st.booleans())
def test_any_bytes_give_frames_or_a_frame_error_never_another_exception(data: bytes, masked: bool) -> None:
    got, pos, error = frames(data, masked=masked)
    assert 0 <= pos <= len(data) and (error is None or isinstance(error, FrameError))
    assert sum(2 + len(p) for _, _, p in got) <= pos  # every frame returned was read whole
    if error is None:
        assert frames(data[pos:], masked=masked) == ([], 0, None)  # the rest is one incomplete frame


@given(st.binary(max_size=200), st.binary(min_size=4, max_size=4))
def test_masking_twice_gives_the_payload_back(payload: bytes, key: bytes) -> None:
    assert mask(mask(payload, key), key) == payload


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return False


PAYLOADS = ["", "Hello", "问" * 50, "x" * 125, "x" * 126, "y" * 65535, "z" * 65536, "w" * 70000]


async def test_aiohttps_reader_reads_our_server_and_client_frames() -> None:
    loop = asyncio.get_running_loop()
    queue = WebSocketDataQueue(BaseProtocol(loop), 2 ** 24, loop=loop)
    reader = WebSocketReader(queue, max_msg_size=0, compress=False, decode_text=True)
    wire = b"".join(server_frame(t.encode()) for t in PAYLOADS)
    wire += b"".join(client_frame(OP_TEXT, t.encode()) for t in PAYLOADS)
    wire += server_frame(b"ping!", OP_PING) + client_frame(OP_CLOSE, struct.pack("!H", 1000))
    for i in range(0, len(wire), 4099):  # in pieces that cut headers and payloads
        reader.feed_data(wire[i:i + 4099])
    for text in PAYLOADS * 2:
        msg = await queue.read()
        assert (msg.type, msg.data) == (WSMsgType.TEXT, text)
    msg = await queue.read()
    assert (msg.type, msg.data) == (WSMsgType.PING, b"ping!")
    msg = await queue.read()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1000)


@pytest.mark.parametrize("use_mask", [False, True])
async def test_we_read_aiohttps_frames(use_mask: bool) -> None:
    tr = _Transport()
    writer = WebSocketWriter(BaseProtocol(asyncio.get_running_loop()), tr,  # type: ignore[arg-type]
                             use_mask=use_mask, limit=2 ** 30,
                             random=random.Random(7))
    for text in PAYLOADS:
        await writer.send_frame(text.encode(), OP_TEXT)
    got, pos, error = frames(bytes(tr.out), masked=use_mask)
    assert error is None and pos == len(tr.out)
    assert got == [(True, OP_TEXT, t.encode()) for t in PAYLOADS]
    if not use_mask:  # aiohttp's server frames are ours, byte for byte
        assert bytes(tr.out) == b"".join(server_frame(t.encode()) for t in PAYLOADS)
