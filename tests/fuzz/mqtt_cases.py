"""MQTT 3.1.1 packets, valid and broken, for the broker fuzz test (no library: we need to write what no
library would). ``make_case(rng, cred, spare)`` returns one case: a list of byte strings sent in order on one
fresh connection, and a label."""

from __future__ import annotations

import random
import struct

TEMPLATES = ("connect", "publish", "publish1", "subscribe", "unsubscribe", "pingreq", "disconnect", "puback")
BAD_UTF8 = [b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"a\x00b", b"\xf4\x90\x80\x80", b"\x80", b"\xe4\xb8"]
HUGE_LENGTHS = [b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff\x01", b"\x80\x80\x80\x80\x80", b"\xff\xff\x7f", b"\xff"]


def rl(n: int) -> bytes:
    """MQTT's variable-length "remaining length" encoding."""
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(x: bytes | str) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("!H", len(b) & 0xFFFF) + b


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + rl(len(body)) + body


def connect(client_id: bytes | str, user: str | None = None, password: str | None = None, *, level: int = 4,
            name: bytes = b"MQTT", keepalive: int = 30, clean: bool = True, will: tuple[str, bytes] | None = None,
            flags: int | None = None) -> bytes:
    f = (0x02 if clean else 0) | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    payload = s(client_id)
    if will is not None:
        f |= 0x04 | 0x08  # will, QoS 1
        payload += s(will[0]) + s(will[1])
    if user is not None:
        payload += s(user)
    if password is not None:
        payload += s(password)
    return packet(0x10, s(name) + bytes([level, f if flags is None else flags]) + struct.pack("!H", keepalive)
                  + payload)


def publish(topic: bytes | str, payload: bytes, qos: int = 0, pid: int = 1, retain: bool = False) -> bytes:
    return packet(0x30 | (qos << 1) | int(retain), s(topic) + (struct.pack("!H", pid) if qos else b"") + payload)


def subscribe(filters: list[tuple[bytes | str, int]], pid: int = 2) -> bytes:
    return packet(0x82, struct.pack("!H", pid) + b"".join(s(f) + bytes([q]) for f, q in filters))


def unsubscribe(filters: list[bytes | str], pid: int = 3) -> bytes:
    return packet(0xA2, struct.pack("!H", pid) + b"".join(s(f) for f in filters))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _uid_topic(rng: random.Random, user: str) -> str:
    return rng.choice([f"claw/v1/task/{user}", f"claw/v1/reply/{user}", "claw/v1/task/dev.lamp",
                       "claw/v1/task/+", "claw/v1/reply/+", "#", "claw/#", "$SYS/x", "", "claw/v1/node/t1",
                       "claw/v1/batch/t1", "a/+/b", "x" * rng.randint(1, 3000)])


def _payload(rng: random.Random) -> bytes:
    import wire

    kind = rng.random()
    if kind < 0.3:
        return rng.randbytes(rng.randint(0, 200))
    if kind < 0.6:  # a valid wire task (the node answers it: load, and its decoder sees real traffic)
        t = wire.Task(id=rng.randbytes(16), uid="dev.fuzz", ch="dev", text="fz" * rng.randint(1, 20), ts=1)
        data = bytearray(wire.encode(t))
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    return b""


def template(rng: random.Random, name: str, user: str) -> bytes:
    if name == "connect":
        return connect(f"fz-{rng.getrandbits(32):08x}", user, "not-the-password")
    if name in ("publish", "publish1"):
        return publish(_uid_topic(rng, user), _payload(rng), qos=1 if name == "publish1" else 0,
                       pid=rng.randint(0, 65535), retain=rng.random() < 0.1)
    if name == "subscribe":
        return subscribe([(_uid_topic(rng, user), rng.choice([0, 1, 2, 3, 0x80]))
                          for _ in range(rng.randint(1, 3))], pid=rng.randint(0, 65535))
    if name == "unsubscribe":
        return unsubscribe([_uid_topic(rng, user)], pid=rng.randint(0, 65535))
    if name == "pingreq":
        return PINGREQ
    if name == "disconnect":
        return DISCONNECT
    return b"\x40\x02" + struct.pack("!H", rng.randint(0, 65535))  # puback


def _header_len(pkt: bytes) -> int:
    i = 1
    while i < len(pkt) and pkt[i] & 0x80 and i < 5:
        i += 1
    return i + 1


def mutate(rng: random.Random, pkt: bytes) -> tuple[bytes, str]:
    """One or more mutations of a packet; returns (bytes, what was done)."""
    data = bytearray(pkt)
    what = rng.choice(["truncate", "extend", "bitflip", "byte", "length", "huge_length", "insert", "type",
                       "double", "zero_body"])
    if what == "truncate" and data:
        del data[rng.randrange(len(data)):]
    elif what == "extend":
        data += rng.randbytes(rng.randint(1, 64))
    elif what == "bitflip" and data:
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif what == "byte" and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif what == "length" and data:  # a wrong remaining length, the body as it was
        h = _header_len(bytes(data))
        data[1:h] = rl(max(0, len(data) - h + rng.choice([-3, -2, -1, 1, 2, 7, 100, 5000])))
    elif what == "huge_length" and data:
        h = _header_len(bytes(data))
        data[1:h] = rng.choice(HUGE_LENGTHS)
    elif what == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif what == "type" and data:  # the same body under another packet type / flags
        data[0] = rng.randrange(256)
    elif what == "double":
        data.extend(bytes(data))
    elif what == "zero_body" and data:
        data = bytearray(data[:1] + b"\x00")
    return bytes(data), what


def make_case(rng: random.Random, cred: tuple[str, str],
              spare: tuple[str, str] | None = None) -> tuple[list[bytes], str]:
    """One connection's worth of bytes. ``cred`` is a real device credential (post-CONNECT paths are reached
    with it, under a client id the broker accepts for it: ``<username>:<suffix>``); ``spare`` (default
    ``cred``), another one, is used by the CONNECTs likely to fail authentication, so that their failed logins
    do not get ``cred`` throttled (CONNACK 3) for the rest of the run. The case never uses the canary's
    client id."""
    user, password = cred
    good_connect = connect(f"{user}:fz-{rng.getrandbits(32):08x}", user, password,
                           keepalive=rng.choice([0, 5, 60]), clean=rng.random() < 0.8)
    s_user, s_password = spare or cred
    spare_connect = connect(f"{s_user}:fz-{rng.getrandbits(32):08x}", s_user, s_password,
                            keepalive=rng.choice([0, 5, 60]), clean=rng.random() < 0.8)
    r = rng.random()
    if r < 0.10:
        return [rng.randbytes(rng.randint(0, 300))], "random_bytes"
    if r < 0.25:  # a broken CONNECT (with the real credential, so a surviving mutation may log in)
        data, what = mutate(rng, spare_connect)
        return [data], f"connect_{what}"
    if r < 0.33:  # wrong protocol name / level, flags reserved bit, MQTT 5
        level = rng.choice([0, 1, 2, 3, 5, 6, 127, 255])
        name = rng.choice([b"MQTT", b"MQIsdp", b"MQTT5", b"", b"\xff\xfe", b"mqtt"])
        flags = rng.choice([None, 0x01, 0xFF, 0x20 | 0xC0, 0x18 | 0xC0])
        return [connect(f"{s_user}:fz-{rng.getrandbits(32):08x}", s_user, s_password, level=level, name=name,
                        flags=flags)], "connect_protocol"
    if r < 0.40:  # a packet before CONNECT
        return [template(rng, rng.choice(TEMPLATES[1:]), user)], "before_connect"
    if r < 0.45:  # a huge or malformed remaining length, before or after CONNECT
        first = bytes([rng.choice([0x10, 0x30, 0x32, 0x82, 0xC0, 0xE0, 0xF0, 0x00])])
        pkt = first + rng.choice(HUGE_LENGTHS) + rng.randbytes(rng.randint(0, 32))
        return ([good_connect, pkt] if rng.random() < 0.5 else [pkt]), "huge_length"
    if r < 0.55:  # bad UTF-8 in a topic or filter after a good CONNECT
        bad = rng.choice(BAD_UTF8)
        topic = rng.choice([bad, b"claw/v1/task/" + bad, f"claw/v1/task/{user}".encode() + bad])
        pkt = rng.choice([publish(topic, b"x", qos=rng.randint(0, 1)), subscribe([(topic, 1)]), unsubscribe([topic])])
        return [good_connect, pkt], "bad_utf8"
    if r < 0.60:  # a bad will, client id or username in CONNECT
        will = (rng.choice(["claw/v1/task/+", "claw/v1/node/t1", f"claw/v1/task/{s_user}", "#", ""]), b"w")
        cid = rng.choice([b"", b"\xff\xfe", b"dev.lamp", b"x" * 5000, b"node-t1", f"{s_user}:x".encode()])
        return [connect(cid, s_user, s_password, will=will, clean=rng.random() < 0.5)], "connect_fields"
    # a good CONNECT, then a few (mostly mutated) packets
    pkts = [good_connect]
    labels = []
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(TEMPLATES)
        pkt = template(rng, name, user)
        if rng.random() < 0.7:
            pkt, what = mutate(rng, pkt)
            labels.append(f"{name}_{what}")
        else:
            labels.append(name)
        pkts.append(pkt)
    if rng.random() < 0.1:
        pkts.append(rng.randbytes(rng.randint(1, 100)))
    return pkts, "after_connect:" + labels[0]
