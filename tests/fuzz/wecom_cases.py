"""Broken WeCom callbacks, made with the real crypto (wechatpy, through fakes/wecom.py's WeComSim): each
case is one HTTP request (method, query string, body, headers) and a label."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from fakes.wecom import WeComSim, _cdata, signature

BAD_TS = ["", "abc", "-1", " 1700000000", "1700000000 ", "1e9", "0x10", "²", "١٧٠٠٠٠٠٠٠٠", "9" * 40, "0",
          "1409659589", "99999999999", "1.5", "+1700000000", "\u0661"]


@dataclass
class Req:
    method: str
    query: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/xml"})
    chunked: bool = False


def _q(params: dict[str, str]) -> str:
    return urlencode(params, quote_via=quote)


def envelope(corp: str, encrypt: str, agent: object = 1000002) -> bytes:
    return (f"<xml><ToUserName>{_cdata(corp)}</ToUserName><Encrypt>{_cdata(encrypt)}</Encrypt>"
            f"<AgentID>{_cdata(agent)}</AgentID></xml>").encode()


def _signed(sim: WeComSim, encrypt: str, ts: str, nonce: str = "123456789") -> dict[str, str]:
    return {"msg_signature": signature(sim.token, ts, nonce, encrypt), "timestamp": ts, "nonce": nonce}


def _bytes_mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        what = rng.random()
        if what < 0.4 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif what < 0.6 and b:
            del b[rng.randrange(len(b)):rng.randrange(len(b)) + 1 + rng.randrange(20)]
        elif what < 0.8:
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.choice([b"<", b">", b"&", b"]]>", b"<![CDATA[", b"\x00", b"\xff", b"&amp;", b"<x>",
                                   rng.randbytes(8)])
        elif b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _inner(rng: random.Random, sim: WeComSim) -> str:
    """A plaintext message XML, often with odd values (what a buggy or hostile sender with the keys sends)."""
    user = rng.choice(["fz" + rng.randbytes(3).hex(), "", "a" * 65, "a" * 64, "张三", "a b", "../x", "x\u0000y",
                       "user@corp", "u-" + "9" * 20, "fz" + rng.randbytes(3).hex()])
    mtype = rng.choice(["text", "text", "text", "event", "image", "voice", "file", "location", "link", "unknown",
                        "TEXT", "", "mpnews", "\u202etext"])
    fields: dict[str, object] = {"ToUserName": rng.choice([sim.corp_id, sim.corp_id, "other", ""]),
                                 "FromUserName": user,
                                 "CreateTime": rng.choice([1700000000, -1, 0, "abc", "", 2 ** 70, "1.5", "١٢"]),
                                 "MsgType": mtype}
    if mtype.lower() == "event":
        fields["Event"] = rng.choice(["enter_agent", "subscribe", "click", "", "x" * 100, "LOCATION"])
    else:
        fields["Content"] = rng.choice(["你好", "", " ", "/help", "/stop", "/new", "／NEW", "/", "x" * 9000,
                                        "]]>", "<b>", "\u0000"])
        # (MsgIds are never reused across cases: a text reusing a command's MsgId is a known 500, see
        # test_findings.py::test_a_text_reusing_a_commands_msgid_is_a_duplicate)
        fields["MsgId"] = rng.choice([rng.getrandbits(62), -rng.getrandbits(40), 0, "abc", "",
                                      2 ** 80 + rng.getrandbits(40), "1e3"])
    fields["AgentID"] = rng.choice([sim.agent_id, sim.agent_id, 1, "abc", "", -1])
    for k in list(fields):
        if rng.random() < 0.08:
            del fields[k]
    xml = "<xml>" + "".join(f"<{k}>{_cdata(v)}</{k}>" for k, v in fields.items()) + "</xml>"
    if rng.random() < 0.2:
        xml = _bytes_mutate(rng, xml.encode()).decode("utf-8", "replace")
    if rng.random() < 0.05:
        xml = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">'
               '<!ENTITY c "&b;&b;&b;&b;&b;&b;">]>' + xml.replace("<Content>", "<Content>&c;"))
    return xml


def make_case(rng: random.Random, sim: WeComSim, other: WeComSim) -> tuple[Req, str]:
    r = rng.random()
    good = sim.text("fz" + rng.randbytes(3).hex(), "模糊测试")
    ts, nonce = good.query["timestamp"], good.query["nonce"]
    import xmltodict

    encrypt = xmltodict.parse(good.body)["xml"]["Encrypt"]
    if r < 0.12:  # the envelope's bytes mutated (signature of the original Encrypt)
        return Req("POST", _q(good.query), _bytes_mutate(rng, good.body)), "envelope_bytes"
    if r < 0.22:  # envelopes that are not quite the envelope
        body = rng.choice([
            b"", b"<xml/>", b"<xml><Encrypt></Encrypt></xml>", b"<xml><Encrypt><a>1</a></Encrypt></xml>",
            b"<xml><Encrypt>a</Encrypt><Encrypt>b</Encrypt></xml>", b"<Encrypt>x</Encrypt>", b"{\"xml\": 1}",
            b"\xff\xfe<\x00x\x00m\x00l\x00>\x00", b"<?xml version='1.0' encoding='utf-16'?><xml/>",
            b'<!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><Encrypt>&e;</Encrypt></xml>',
            b'<!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><xml><Encrypt>&b;</Encrypt></xml>',
            b"<xml>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</xml>",
            b"<xml><Encrypt a='" + b"x" * 30000 + b"'>e</Encrypt></xml>",
            good.body.replace(b"<xml>", b"<xml><xml>"), good.body + b"<trailing/>", good.body[: len(good.body) // 2],
        ])
        return Req("POST", _q(good.query), body), "envelope_shape"
    if r < 0.32:  # bad signatures
        sig = rng.choice(["", "0" * 40, "f" * 39, good.query["msg_signature"].upper(), "é" * 40, "%00",
                          good.query["msg_signature"][:-1] + "0", "x" * 5000, good.query["msg_signature"] + " "])
        return Req("POST", _q({**good.query, "msg_signature": sig}), good.body), "bad_signature"
    if r < 0.42:  # bad timestamps, signed with the real token (the signature is right)
        bad = rng.choice(BAD_TS)
        return Req("POST", _q(_signed(sim, encrypt, bad, nonce)), good.body), "bad_timestamp"
    if r < 0.54:  # the ciphertext mutated, signed again (reaches the AES decryption)
        enc = encrypt
        how = rng.choice(["flip", "cut", "junk", "short", "pad", "other_key", "other_corp"])
        if how == "flip":
            b = bytearray(enc.encode())
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = ord(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/="))
            enc = b.decode()
        elif how == "cut":
            enc = enc[: rng.randrange(1, len(enc))]
        elif how == "junk":
            enc = enc[:10] + rng.choice(["!!", "\u00e9", "%", " ", "\n", "-_"]) + enc[10:]
        elif how == "short":
            enc = rng.choice(["A", "AAAA", "AAAAAAAAAAAAAAAAAAAAAA==", "=", "===="])
        elif how == "pad":
            enc = enc.rstrip("=") + "=" * rng.randint(0, 5)
        elif how == "other_key":
            enc = xmltodict.parse(other.text("fz", "x").body)["xml"]["Encrypt"]
        else:
            corp = WeComSim(sim.token, "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wwOther000001", 1)
            enc = xmltodict.parse(corp.text("fz", "x").body)["xml"]["Encrypt"]
        return Req("POST", _q(_signed(sim, enc, ts, nonce)), envelope(sim.corp_id, enc)), f"ciphertext_{how}"
    if r < 0.74:  # well encrypted and signed, the inner message odd
        cb = sim.wrap(_inner(rng, sim))
        return Req("POST", _q(cb.query), cb.body), "inner"
    if r < 0.80:  # oversized bodies, with and without a Content-Length
        n = rng.choice([64 * 1024 + 1, 100_000, 250_000, 400_000])
        body = good.body[:-6] + b"<Pad>" + b"A" * n + b"</Pad></xml>"
        return Req("POST", _q(good.query), body, chunked=rng.random() < 0.5), "oversized"
    if r < 0.86:  # wrong content types with a good (fresh) callback
        ct = rng.choice(["application/json", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                         "text/plain; charset=gbk", "", "application/octet-stream", "text/xml; charset=utf-16"])
        return Req("POST", _q(good.query), good.body, headers={"Content-Type": ct}), "content_type"
    if r < 0.92:  # junk queries
        query = rng.choice(["", "msg_signature", "msg_signature=&timestamp=&nonce=", "%zz=%zz", "a=%ff%fe",
                            _q(good.query) + "&" + _q(good.query), _q(good.query).replace("=", "%3D"),
                            "timestamp=" + "9" * 3000, "&&&&", "msg_signature=%00&timestamp=%00&nonce=%00"])
        return Req("POST", query, good.body), "junk_query"
    # GET URL verification with junk
    echo_plain = rng.choice(["1616140317555161061", "", "x" * 2000, "回声"])
    q = sim.url_check(echo_plain) if echo_plain else sim.url_check("e")
    how = rng.choice(["bad_sig", "mutated_echo", "missing", "other_key", "junk_echo", "ts", "ok"])
    if how == "bad_sig":
        q["msg_signature"] = "0" * 40
    elif how == "mutated_echo":
        echo = q["echostr"]
        echo = echo[: rng.randrange(1, len(echo))] + rng.choice(["A", "=", "!", ""])
        q.update(_signed(sim, echo, q["timestamp"], q["nonce"]), echostr=echo)
    elif how == "missing":
        q.pop(rng.choice(list(q)))
    elif how == "other_key":
        q = other.url_check("x")
    elif how == "junk_echo":
        echo = rng.choice(["", "%", "\u00e9" * 10, "A" * 5000, "=" * 8])
        q.update(_signed(sim, echo, q["timestamp"], q["nonce"]), echostr=echo)
    elif how == "ts":
        q.update(_signed(sim, q["echostr"], rng.choice(BAD_TS), q["nonce"]), echostr=q["echostr"])
    return Req("GET", _q(q)), f"get_{how}"
