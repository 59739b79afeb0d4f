"""Client sessions at the edge's boundary, against the real edge on 127.0.0.1 with the real TokenStore
(auth.lmdb): forged and expired access tokens, ``claw token revoke`` from another process while a socket is
open, refresh-token reuse, one user reaching for another's running task, and a resume after a dropped socket.

test_edge_security.py has the basics (a forged uid, a bad signature, the old format, a revoke through the
library, one finished task of another user); these extend them and do not repeat them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge import api, auth
from edge.keys import BRIDGE, TOKENS
from fakes.llm import FakeLLMConfig
from tests.conftest import System, run_system, wait_until
from tests.integration.test_edge_security import refresh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
EDGE_ONLY: dict[str, Any] = {"start_node": False}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def login(s: aiohttp.ClientSession, sys_: System, user: str) -> dict[str, Any]:
    async with s.post(f"{sys_.http}/api/login", json={"dev_user": user}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def status_of(s: aiohttp.ClientSession, sys_: System, path: str, token: str) -> int:
    async with s.get(f"{sys_.http}{path}", headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def ticket_status(s: aiohttp.ClientSession, sys_: System, token: str) -> tuple[int, str | None]:
    async with s.post(f"{sys_.http}/api/ws-ticket", headers={"Authorization": f"Bearer {token}"}) as r:
        body = await r.json()
        return r.status, body.get("ticket")


async def open_ws(s: aiohttp.ClientSession, sys_: System, token: str) -> aiohttp.ClientWebSocketResponse:
    status, ticket = await ticket_status(s, sys_, token)
    assert status == 200
    ws = await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": ticket})
    assert (await ws.receive_json(timeout=5))["type"] == "node"
    return ws


async def ws_refused(s: aiohttp.ClientSession, sys_: System, token: str) -> bool:
    """Both non-ticket ways into /api/ws (Bearer header, ``?token=``) refuse ``token`` with 401."""
    for kw in ({"headers": {"Authorization": f"Bearer {token}"}}, {"params": {"token": token}}):
        try:
            ws = await s.ws_connect(f"{sys_.http}/api/ws", **kw)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 401:
                return False
        else:
            await ws.close()
            return False
    return True


# ---- forged and expired access tokens -------------------------------------------------------------

async def test_forged_access_tokens_are_refused_everywhere(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        pair = await login(s, sys_, "alice")
        good = pair["token"]
        body_s, sig_s = good.split(".")
        body = _unb64(body_s)
        uid, exp, gen, epoch = body.decode().split("|")
        secret = (Path(sys_.settings.data_dir) / "edge.secret").read_text().strip().encode()
        key = hashlib.sha256(b"smartclaw-access-v2\0" + secret).digest()

        def signed_with(k: bytes, b: bytes, algo: Any = hashlib.sha256) -> str:
            return f"{_b64(b)}.{_b64(hmac.new(k, b, algo).digest())}"

        far = str(int(time.time()) + 86400)
        pat, _ = auth.Revocations(sys_.settings.data_dir).issue_pat("web.alice")
        jwt_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        forged = {
            "altered uid": f"{_b64(body.replace(b'web.alice', b'web.bobby'))}.{sig_s}",
            "altered expiry": f"{_b64(f'{uid}|{far}|{gen}|{epoch}'.encode())}.{sig_s}",
            "altered generation": f"{_b64(f'{uid}|{exp}|{int(gen) + 1}|{epoch}'.encode())}.{sig_s}",
            "added personal-token id": f"{_b64(body + b'|' + b'0' * 16)}.{sig_s}",
            "bad hmac": f"{body_s}.{_b64(b'x' * 32)}",
            "truncated signature": good[:-3],
            "truncated body": f"{body_s[:-4]}.{sig_s}",
            "no signature": f"{body_s}.",
            "signature only": f".{sig_s}",
            "body only": body_s,
            "doubled signature": f"{good}.{sig_s}",
            "alg none (JWT)": f"{jwt_header}.{body_s}.",
            "JWT-shaped, our signature": f"{jwt_header}.{body_s}.{sig_s}",
            "signed with the raw secret": signed_with(secret, body),
            "signed with an empty key": signed_with(b"", body),
            "HMAC-SHA1 with the right key": signed_with(key, body, hashlib.sha1),
            "HMAC-SHA512 with the right key": signed_with(key, body, hashlib.sha512),
            "plain SHA-256, no key": f"{body_s}.{_b64(hashlib.sha256(body).digest())}",
            "the refresh token": pair["refresh"],
            "a personal token": pat,
            "padded base64": f"{body_s}==.{sig_s}==" if len(body_s) % 4 else f"{body_s}.{sig_s}=",
            "whitespace around": f" {good} ",
            "non-ASCII": good + "é",
            "stray characters in the body": f"{body_s[:5]}!*{body_s[5:]}.{sig_s}",
            "stray characters in the signature": f"{body_s}.{sig_s[:5]}$${sig_s[5:]}",
        }
        # a token signed with the right key but carrying junk fields is still refused (belt and braces)
        forged["right key, 6 fields"] = signed_with(key, body + b"|x|y")
        forged["right key, bad pat id"] = signed_with(key, body + b"|not-hex-pat-id!!")
        forged["right key, bad uid"] = signed_with(key, f"nobody|{far}|{gen}|{epoch}".encode())
        for what, token in forged.items():
            assert await status_of(s, sys_, "/api/tasks", token) == 401, what
            assert await status_of(s, sys_, f"/api/tasks/{'0' * 32}", token) == 401, what
            assert (await ticket_status(s, sys_, token))[0] == 401, what
            assert await ws_refused(s, sys_, token), what
        assert await status_of(s, sys_, "/api/tasks", good) == 200  # the real one still works
        # (the "padded" and "stray characters" variants decode to the very bytes the edge signed -- Python's
        # base64 decoder skips padding and characters outside the alphabet -- and were accepted; a token is now
        # taken only in the exact encoding the edge made, so no two strings are the same token)


async def test_expired_access_token_is_refused_but_its_open_socket_and_session_live_on(
        tmp_path: Path, pki_dir: Path) -> None:
    """edge.token_ttl = 1 s: after it, the token opens nothing (HTTP 401, no ticket, no socket), while the
    socket it opened before stays open (its handshake authenticated it) and the refresh token renews."""
    async with run_system(tmp_path, pki_dir, edge={"token_ttl": 1}, **EDGE_ONLY) as sys_, \
            aiohttp.ClientSession() as s:
        pair = await login(s, sys_, "alice")
        ws = await open_ws(s, sys_, pair["token"])
        await wait_until(lambda: time.time() > pair["expires"] + 1, timeout=10, step=0.1)
        assert await status_of(s, sys_, "/api/tasks", pair["token"]) == 401
        assert (await ticket_status(s, sys_, pair["token"]))[0] == 401
        assert await ws_refused(s, sys_, pair["token"])
        await ws.send_json({"type": "ping"})
        assert await ws.receive_json(timeout=5) == {"type": "pong"}
        status, renewed = await refresh(s, sys_, pair["refresh"])
        assert status == 200 and renewed["uid"] == "web.alice"
        assert await status_of(s, sys_, "/api/tasks", renewed["token"]) == 200
        # the same check with an injected clock: a token the edge made is refused one second past its expiry
        tokens = sys_.app[TOKENS]
        token, expires = tokens.issue("web.alice")
        assert tokens.check(token, now=expires) is not None
        assert tokens.check(token, now=expires + 1) is None
        await ws.close()


# ---- revocation from another process --------------------------------------------------------------

async def test_cli_revoke_while_a_websocket_is_open_closes_it_and_refuses_refresh_and_the_personal_token(
        tmp_path: Path, pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "WS_CHECK_S", 0.1)
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        data = sys_.settings.data_dir
        pat, _ = auth.Revocations(data).issue_pat("web.alice")
        async with s.post(f"{sys_.http}/api/login", json={"pat": pat}) as r:
            via_pat = await r.json()
        dev = await login(s, sys_, "alice")
        bob = await login(s, sys_, "bob")
        ws_pat, ws_dev, ws_bob = (await open_ws(s, sys_, via_pat["token"]), await open_ws(s, sys_, dev["token"]),
                                  await open_ws(s, sys_, bob["token"]))
        spare_status, spare = await ticket_status(s, sys_, dev["token"])  # a ticket made before the revoke
        assert spare_status == 200
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAW_")}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "claw.cli", "token", "revoke", "web.alice",
                                                    "--data", data, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        for ws in (ws_pat, ws_dev):
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == api.WS_REVOKED
        for pair in (via_pat, dev):
            assert (await refresh(s, sys_, pair["refresh"]))[0] == 401
            assert await status_of(s, sys_, "/api/tasks", pair["token"]) == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": spare})
        assert exc.value.status == 401  # a ticket made before the revoke is refused too
        async with s.post(f"{sys_.http}/api/login", json={"pat": pat}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "pat_invalid"
        await ws_bob.send_json({"type": "ping"})
        assert await ws_bob.receive_json(timeout=5) == {"type": "pong"}  # another user's socket stays
        await ws_bob.close()


# ---- refresh-token reuse ----------------------------------------------------------------------------

async def test_refresh_token_reuse_is_refused_and_concurrent_renewals_have_one_winner(tmp_path: Path,
                                                                                      pki_dir: Path) -> None:
    """Rotation: a refresh token works once. What happens on reuse (documented in api.md): the reuse gets 401
    refresh_invalid and the session rotated from it lives on -- no family revocation."""
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        first = await login(s, sys_, "alice")
        results = await asyncio.gather(*[refresh(s, sys_, first["refresh"]) for _ in range(8)])
        winners = [body for status, body in results if status == 200]
        assert len(winners) == 1, [status for status, _ in results]
        assert all(body["error"]["code"] == "refresh_invalid" for status, body in results if status != 200)
        second = winners[0]
        assert (await refresh(s, sys_, first["refresh"]))[0] == 401  # and later too
        assert await status_of(s, sys_, "/api/tasks", second["token"]) == 200  # the family is not killed
        status, third = await refresh(s, sys_, second["refresh"])
        assert status == 200 and third["refresh"] not in (first["refresh"], second["refresh"])
        # the same for a session signed in with a personal token
        pat, _ = auth.Revocations(sys_.settings.data_dir).issue_pat("web.alice")
        async with s.post(f"{sys_.http}/api/login", json={"pat": pat}) as r:
            p1 = await r.json()
        assert (await refresh(s, sys_, p1["refresh"]))[0] == 200
        assert (await refresh(s, sys_, p1["refresh"]))[0] == 401


# ---- another user's task -----------------------------------------------------------------------------

async def test_another_users_running_task_is_neither_read_nor_resumed(tmp_path: Path, pki_dir: Path) -> None:
    """Bob's answer is still streaming; Alice has his task id and a valid token of her own: GET is 404 (not 403:
    it does not even confirm the task exists), a resume is an error frame, and none of his deltas reach her."""
    cfg = FakeLLMConfig(n_tokens=40, tokens_per_s=20, token_chars=3)  # ~2 s of streaming
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        alice, bob = await login(s, sys_, "alice"), await login(s, sys_, "bob")
        wb = await open_ws(s, sys_, bob["token"])
        await wb.send_json({"type": "ask", "text": "鲍勃的问题"})
        task = None
        async with asyncio.timeout(15):
            while True:
                f = await wb.receive_json()
                if f["type"] == "accepted":
                    task = f["task"]
                if f["type"] == "delta":
                    break
        assert task is not None
        live = sys_.app[BRIDGE].get(bytes.fromhex(task))
        assert live is not None and live.finished_at is None  # still running

        assert await status_of(s, sys_, f"/api/tasks/{task}", alice["token"]) == 404
        assert await status_of(s, sys_, f"/api/tasks/{task}", bob["token"]) == 200
        wa = await open_ws(s, sys_, alice["token"])
        seen: list[dict[str, Any]] = []
        for seq in (0, 1):
            await wa.send_json({"type": "resume", "task": task, "seq": seq})
            got = await wa.receive_json(timeout=10)
            assert got["type"] == "error" and got["code"] == "not_found" and got["task"] == task, got
        # Bob's answer finishes; Alice's socket got nothing of it (a ping answered right after shows nothing
        # was queued in between)
        async with asyncio.timeout(20):
            while (f := await wb.receive_json())["type"] != "done":
                pass
        assert f["status"] == "ok"
        await wa.send_json({"type": "ping"})
        async with asyncio.timeout(10):
            while (g := await wa.receive_json()) != {"type": "pong"}:
                seen.append(g)
        assert not [g for g in seen if g.get("task") == task], seen
        assert await status_of(s, sys_, f"/api/tasks/{task}", alice["token"]) == 404  # finished: still 404
        await wa.close()
        await wb.close()


# ---- resume after a dropped socket ---------------------------------------------------------------------

async def test_resume_after_a_dropped_socket_gives_exactly_the_missing_deltas(tmp_path: Path, pki_dir: Path) -> None:
    """The socket is closed mid-answer (the LLM streams slowly); a new socket with a new ticket sends resume
    {task, seq: k}: exactly the deltas k+1..n follow, then the done, whose text is the concatenation."""
    cfg = FakeLLMConfig(n_tokens=60, tokens_per_s=25, token_chars=3)  # ~2.4 s of streaming
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg, node={"coalesce_ms": 0}) as sys_, \
            aiohttp.ClientSession() as s:
        pair = await login(s, sys_, "alice")
        ws = await open_ws(s, sys_, pair["token"])
        await ws.send_json({"type": "ask", "text": "慢一点的回答"})
        before: list[dict[str, Any]] = []
        task = None
        async with asyncio.timeout(15):
            while len(before) < 3:
                f = await ws.receive_json()
                task = f.get("task", task)
                if f["type"] == "delta":
                    before.append(f)
        await ws.close()  # dropped mid-answer
        assert task is not None
        live = sys_.app[BRIDGE].get(bytes.fromhex(task))
        assert live is not None
        k = before[-1]["seq"]
        await wait_until(lambda: len(live.stream.parts) > k + 2, 10)  # more was produced while away
        assert live.finished_at is None  # ... and the answer is still running

        ws2 = await open_ws(s, sys_, pair["token"])  # a new ticket
        await ws2.send_json({"type": "resume", "task": task, "seq": k})
        after: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            while True:
                f = await ws2.receive_json()
                if f.get("task") != task:
                    continue
                after.append(f)
                if f["type"] == "done":
                    break
        await ws2.close()
        deltas = [f for f in after if f["type"] == "delta"]
        done = after[-1]
        assert done["status"] == "ok"
        assert all(f["type"] == "delta" for f in after[:-1]), after
        assert [d["seq"] for d in deltas] == list(range(k + 1, k + 1 + len(deltas)))  # no gap, no duplicate
        assert len(deltas) >= 2
        assert [d["seq"] for d in before] == list(range(1, k + 1))
        assert "".join(d["text"] for d in before + deltas) == done["text"]
        assert len(done["text"]) == 60 * 3


async def test_one_user_cannot_fill_the_session_store(tmp_path: Path, pki_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sign-in stored a session for 7 days and nothing bounded how many one user had: the holder of one
    personal token signed in 1 400 times a second (about 240 bytes each), so within minutes auth.lmdb was full
    and every sign-in and renewal of everybody failed (503 auth_store). Now a user keeps at most
    MAX_SESSIONS_PER_UID sessions (made small here); a new one ends the oldest."""
    monkeypatch.setattr(auth, "MAX_SESSIONS_PER_UID", 5, raising=False)
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        other = await login(s, sys_, "bob")
        token, _ = auth.Revocations(sys_.settings.data_dir).issue_pat("web.mallory")
        pairs = []
        for _ in range(12):
            async with s.post(f"{sys_.http}/api/login", json={"pat": token}) as r:
                assert r.status == 200
                pairs.append(await r.json())
        rev = sys_.app[TOKENS].revocations
        with rev.env.begin() as txn:
            uids = [json.loads(v)["uid"] for _, v in txn.cursor(db=rev.sess_db)]
        assert uids.count("web.mallory") == 5 and uids.count("web.bob") == 1
        assert (await refresh(s, sys_, pairs[0]["refresh"]))[0] == 401  # the oldest were ended
        status, renewed = await refresh(s, sys_, pairs[-1]["refresh"])  # the newest live
        assert status == 200
        assert (await refresh(s, sys_, other["refresh"]))[0] == 200  # another user is untouched
        # logout, renewal and revocation keep the per-user index in step with the sessions
        async with s.post(f"{sys_.http}/api/logout", json={"refresh": renewed["refresh"]}) as r:
            assert r.status == 200
        auth.Revocations(sys_.settings.data_dir).revoke("web.mallory")
        with rev.env.begin() as txn:
            left = [k for k in txn.cursor(db=rev.usess_db).iternext(values=False)]
        assert left and all(k.startswith(b"web.bob\0") for k in left) and len(left) == 1
