"""RFC 6455 WebSocket frames as bytes, with no I/O: encode one frame, decode the complete frames in a buffer.

Encoding: :func:`server_frame` builds a final, unmasked frame (server → client; ``edge.api.WsSession`` writes
text frames with it straight to the transport); :func:`client_frame` a final frame masked with a 4-byte key
(client → server). The length takes the shortest of the three forms (7 bits, 16 bits after 126, 64 bits after
127). Neither fragments nor compresses.

Decoding: :func:`frames` reads every complete frame in a buffer from a position on, in one call per read, and
says where the incomplete rest begins. ``masked`` says which side is reading: a client (``False``) refuses a
masked frame, a server (``True``) refuses an unmasked one and unmasks the payload; a refused frame stops the
scan with a :class:`FrameError` (RFC 6455 5.1). The reserved bits and control-frame rules are not checked:
the decoder serves the bench's load generator, which reports any opcode it does not expect.
"""

from __future__ import annotations

import os
import struct

__all__ = [
    "OP_CONTINUATION", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "Frame", "FrameError", "server_frame", "client_frame", "mask", "frames",
]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_FIN = 0x80
_MASKED = 0x80
_H1 = struct.Struct("!BB")  # FIN + opcode, mask bit + 7-bit length
_H2 = struct.Struct("!BBH")  # ... 126, then a 16-bit length
_H8 = struct.Struct("!BBQ")  # ... 127, then a 64-bit length
_pack1, _pack2, _pack8 = _H1.pack, _H2.pack, _H8.pack
_LEN16 = struct.Struct("!H").unpack_from
_LEN64 = struct.Struct("!Q").unpack_from


class FrameError(Exception):
    """The peer sent a frame this side must refuse (masked from a server, unmasked from a client)."""


Frame = tuple[bool, int, bytes]  # one decoded frame: (FIN bit, opcode, unmasked payload); a plain tuple is cheapest


def _header(b0: int, mask_bit: int, n: int) -> bytes:
    if n < 126:
        return _pack1(b0, mask_bit | n)
    if n < 65536:
        return _pack2(b0, mask_bit | 126, n)
    return _pack8(b0, mask_bit | 127, n)


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, unmasked frame (server → client): the header, then ``payload`` as it is."""
    n = len(payload)
    if n < 126:
        return _pack1(_FIN | opcode, n) + payload
    return _header(_FIN | opcode, 0, n) + payload


def mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``key`` repeated (RFC 6455 5.3); masking twice gives the payload back."""
    n = len(payload)
    if not n:
        return payload
    m = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """One final frame masked with ``key`` (4 random bytes when not given): client → server."""
    if key is None:
        key = os.urandom(4)
    return _header(_FIN | opcode, _MASKED, len(payload)) + key + mask(payload, key)


def frames(buf: bytes, pos: int = 0, *, masked: bool = False) -> tuple[list[Frame], int, FrameError | None]:
    """Every complete frame in ``buf`` from ``pos`` on: (the frames, the position after the last of them, the
    error that stopped the scan or None). The bytes from that position on are an incomplete frame (keep them
    for the next read) or, with an error, the refused frame.

    ``masked`` is True on the server side (frames must be masked; payloads come back unmasked) and False on the
    client side (frames must not be masked). A frame of the wrong kind stops the scan with a
    :class:`FrameError` as soon as its header has arrived; the frames before it are returned.
    """
    out: list[Frame] = []
    end = len(buf)
    while end - pos >= 2:
        b1 = buf[pos + 1]
        length = b1 & 0x7F
        if length < 126:
            start = pos + 2
        elif length == 126:
            if end - pos < 4:
                break
            length, start = _LEN16(buf, pos + 2)[0], pos + 4
        else:
            if end - pos < 10:
                break
            length, start = _LEN64(buf, pos + 2)[0], pos + 10
        if (b1 >> 7) != masked:
            return out, pos, FrameError("unmasked frame from a client" if masked else "masked frame from the server")
        if masked:
            start += 4
            if end < start + length:
                break
            payload = mask(bytes(buf[start:start + length]), bytes(buf[start - 4:start]))
        elif end < start + length:
            break
        else:
            payload = buf[start:start + length]
        b0 = buf[pos]
        out.append((b0 >= 0x80, b0 & 0x0F, payload))
        pos = start + length
    return out, pos, None

