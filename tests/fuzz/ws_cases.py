"""WebSocket frames (RFC 6455), valid and broken, and JSON for the ``/api/ws`` fuzz test."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True,
          length: int | None = None, form: int | None = None, key: bytes = b"\x11\x22\x33\x44") -> bytes:
    """One frame; ``length`` lies about the payload length, ``form`` forces the 7/16/64-bit length field."""
    n = len(payload) if length is None else length
    form = form or (7 if n < 126 else 16 if n < 65536 else 64)
    head = bytes([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)])
    m = 0x80 if mask else 0
    if form == 7:
        head += bytes([m | (n & 0x7F)])
    elif form == 16:
        head += bytes([m | 126]) + struct.pack("!H", n & 0xFFFF)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n & 0xFFFFFFFFFFFFFFFF)
    if not mask:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(obj: Any, **kw: Any) -> bytes:
    return frame(TEXT, json.dumps(obj, ensure_ascii=False).encode(), **kw)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 4 or r < 0.35:
        return rng.choice([None, True, False, 0, -1, 2 ** 63, -(2 ** 64), 1e308, 0.5, "", "ask", "x" * 300,
                           "你好", "\u0000", "\ud7ff", "ping", rng.getrandbits(64)])
    if r < 0.65:
        return {rng.choice(["type", "text", "task", "seq", "id", "conv", "trace", "x", ""]):
                random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}
    return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def valid_frames(rng: random.Random) -> list[dict[str, Any]]:
    tid = rng.randbytes(16).hex()
    return [
        {"type": "ask", "text": "你好" * rng.randint(1, 5)},
        {"type": "ask", "text": "再问一次", "id": tid, "conv": "c1", "trace": True},
        {"type": "stop", "task": tid},
        {"type": "resume", "task": tid, "seq": rng.randint(0, 5)},
        {"type": "ping"},
    ]


def mutate_json(rng: random.Random, obj: dict[str, Any]) -> Any:
    """A structural mutation of a valid frame: a field dropped, retyped, overlong, odd numbers ..."""
    out = dict(obj)
    what = rng.random()
    keys = list(out) or ["type"]
    k = rng.choice(keys + ["type", "task", "seq", "id", "text", "conv"])
    if what < 0.25:
        out.pop(k, None)
    elif what < 0.7:
        out[k] = rng.choice([None, True, 0, -1, 1.5, 2 ** 70, -(2 ** 63), "", " ", "\n\t", [], {}, [1, 2],
                             {"type": "ask"}, "z" * 9000, "A" * 32, "g" * 32, "0" * 31, "０" * 32,
                             "\u202e", "😀" * 100, rng.randbytes(16).hex().upper(), "NaN"])
    elif what < 0.85:
        out[rng.choice(["extra", "", "Type", "type "])] = random_json(rng)
    else:
        return random_json(rng)
    return out


def nested(rng: random.Random) -> bytes:
    depth = rng.choice([600, 1500, 5000, 20000, 30000])
    if rng.random() < 0.5:
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def upgrade_request(port: int, query: str, headers: dict[str, str], key: str, extra: str = "") -> bytes:
    lines = [f"GET /api/ws?{query} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def make_raw_case(rng: random.Random) -> tuple[list[bytes], str]:
    """Frames sent on one socket right after a real upgrade; and a label."""
    r = rng.random()
    ping = json.dumps({"type": "ping"}).encode()
    if r < 0.08:
        op = rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
        return [frame(op, rng.randbytes(rng.randint(0, 40)))], "bad_opcode"
    if r < 0.14:
        return [frame(TEXT, ping, rsv=rng.randint(1, 7))], "rsv_bits"
    if r < 0.22:
        return [frame(TEXT, ping, mask=False)], "unmasked"
    if r < 0.32:
        payload = rng.randbytes(rng.randint(0, 40))
        how = rng.choice(["longer", "shorter", "huge64", "msb64", "nonminimal16", "nonminimal64"])
        if how == "longer":
            return [frame(TEXT, payload, length=len(payload) + rng.randint(1, 100))], "length_longer"
        if how == "shorter":
            return [frame(TEXT, ping, length=max(0, len(ping) - rng.randint(1, 5)))], "length_shorter"
        if how == "huge64":
            return [frame(TEXT, payload, length=rng.choice([2 ** 32, 2 ** 40, 10 ** 9]), form=64)], "length_huge"
        if how == "msb64":
            return [frame(TEXT, payload, length=2 ** 63 + 5, form=64)], "length_msb"
        return [frame(TEXT, ping, form=16 if how == "nonminimal16" else 64)], how
    if r < 0.42:
        how = rng.choice(["ping_nofin", "close_nofin", "ping_big", "cont_first", "text_in_text",
                          "ping_between", "cont_after_end"])
        if how == "ping_nofin":
            return [frame(PING, b"x", fin=False), frame(CONT, b"y")], how
        if how == "close_nofin":
            return [frame(CLOSE, struct.pack("!H", 1000), fin=False)], how
        if how == "ping_big":
            return [frame(PING, b"p" * rng.choice([126, 200, 4000]))], how
        if how == "cont_first":
            return [frame(CONT, ping)], how
        if how == "text_in_text":
            return [frame(TEXT, ping[:4], fin=False), frame(TEXT, ping[4:])], how
        if how == "ping_between":  # legal: a control frame between fragments
            return [frame(TEXT, ping[:4], fin=False), frame(PING, b"hi"), frame(CONT, ping[4:])], how
        return [frame(TEXT, ping), frame(CONT, b"}")], how
    if r < 0.50:
        bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe4\xbd"])
        body = b'{"type":"ask","text":"' + bad + b'"}'
        if rng.random() < 0.3:  # split inside a valid multi-byte character: legal
            good = '{"type":"ask","text":"你好"}'.encode()
            return [frame(TEXT, good[:23], fin=False), frame(CONT, good[23:])], "utf8_split_ok"
        return [frame(TEXT, body)], "bad_utf8"
    if r < 0.56:
        how = rng.choice([b"", b"\x03", struct.pack("!H", 999), struct.pack("!H", 1005), struct.pack("!H", 5000),
                          struct.pack("!H", 1000) + b"\xff\xfe", struct.pack("!H", 1000) + b"r" * 200])
        return [frame(CLOSE, how)], "close_payload"
    if r < 0.66:
        return [frame(TEXT, json.dumps(random_json(rng)).encode())], "random_json"
    if r < 0.72:
        return [frame(TEXT, nested(rng))], "deep_json"
    if r < 0.78:
        n = rng.choice([64 * 1024 + 1, 100_000, 300_000])
        body = b'{"type":"ask","text":"' + b"a" * (n - 24) + b'"}'
        parts = rng.choice([1, 4])
        if parts == 1:
            return [frame(TEXT, body)], "huge_frame"
        step = len(body) // 4 + 1
        chunks = [body[i:i + step] for i in range(0, len(body), step)]
        return [frame(TEXT if j == 0 else CONT, c, fin=j == len(chunks) - 1) for j, c in enumerate(chunks)], \
            "huge_fragmented"
    if r < 0.82:
        return [frame(BINARY, rng.randbytes(rng.randint(0, 100)))], "binary"
    if r < 0.90:  # a valid frame, mutated at the byte level (then re-framed properly)
        body = bytearray(json.dumps(rng.choice(valid_frames(rng)), ensure_ascii=False).encode())
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return [frame(TEXT, bytes(body))], "bytes_mutated"
    if r < 0.95:  # a whole frame's bytes mutated
        data = bytearray(text({"type": "ping"}))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return [bytes(data)], "frame_bitflip"
    return [rng.randbytes(rng.randint(1, 200))], "random_bytes"
