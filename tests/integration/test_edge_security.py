"""The edge's client authentication (short-lived access tokens, rotating refresh tokens, one-time WebSocket
tickets, revocation) and HTTP hardening (header/body timeouts, per-IP connection cap, query clamping, quiet
logging of malformed requests, WebSocket Origin allowlist, /healthz and /metrics exposure), and the WeCom
callback's time window -- all against the real edge on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from claw.cli import main as claw_main
from edge import api, auth
from edge.keys import TOKENS
from fakes.wecom import WeComSim
from tests.conftest import System, run_system

pytestmark = pytest.mark.integration

EDGE_ONLY: dict[str, Any] = {"start_node": False}


async def login(s: aiohttp.ClientSession, sys_: System, user: str = "alice") -> dict[str, Any]:
    async with s.post(f"{sys_.http}/api/login", json={"dev_user": user}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def tasks_status(s: aiohttp.ClientSession, sys_: System, token: str) -> int:
    async with s.get(f"{sys_.http}/api/tasks", headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def refresh(s: aiohttp.ClientSession, sys_: System, value: str) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{sys_.http}/api/refresh", json={"refresh": value}) as r:
        return r.status, await r.json()


async def ticket(s: aiohttp.ClientSession, sys_: System, token: str) -> str:
    async with s.post(f"{sys_.http}/api/ws-ticket", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["ticket"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ---- tokens ------------------------------------------------------------------------------------

async def test_login_returns_a_short_lived_token_and_a_refresh_token(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        got = await login(s, sys_)
        assert set(got) == {"token", "uid", "expires", "refresh", "refresh_expires"}
        assert got["expires"] - time.time() <= 900 + 5  # edge.token_ttl default: 15 min, not 7 days
        assert 7 * 86400 - 60 < got["refresh_expires"] - time.time() <= 7 * 86400 + 5
        assert await tasks_status(s, sys_, got["token"]) == 200


async def test_forged_expired_and_old_format_tokens_are_refused(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        good = (await login(s, sys_))["token"]
        body, sig = good.split(".")
        forged_body = _b64(base64.urlsafe_b64decode(body + "==").replace(b"web.alice", b"web.mallo"))
        secret = (Path(sys_.settings.data_dir) / "edge.secret").read_text().strip().encode()
        # the former 7-day format (uid|expires, signed with the former key) is not accepted any more
        old_key = hashlib.sha256(b"smartclaw-token\0" + secret).digest()
        old_body = f"web.alice|{int(time.time()) + 86400}".encode()
        old = f"{_b64(old_body)}.{_b64(hmac.new(old_key, old_body, hashlib.sha256).digest())}"
        expired, _ = sys_.app[TOKENS].issue("web.alice", now=time.time() - 3600)
        for bad in (f"{forged_body}.{sig}", f"{body}.{_b64(b'x' * 32)}", old, expired, "", "a.b.c", "garbage"):
            assert await tasks_status(s, sys_, bad) == 401, bad
            async with s.post(f"{sys_.http}/api/ws-ticket", headers={"Authorization": f"Bearer {bad}"}) as r:
                assert r.status == 401
        assert await tasks_status(s, sys_, good) == 200


async def test_refresh_rotates_and_an_old_refresh_token_is_refused(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        first = await login(s, sys_)
        status, second = await refresh(s, sys_, first["refresh"])
        assert status == 200 and second["uid"] == "web.alice"
        assert second["refresh"] != first["refresh"]
        assert await tasks_status(s, sys_, second["token"]) == 200
        status, body = await refresh(s, sys_, first["refresh"])  # used once already
        assert status == 401 and body["error"]["code"] == "refresh_invalid"
        status, third = await refresh(s, sys_, second["refresh"])
        assert status == 200
        async with s.post(f"{sys_.http}/api/logout", json={"refresh": third["refresh"]}) as r:
            assert r.status == 200
        assert (await refresh(s, sys_, third["refresh"]))[0] == 401  # logged out
        assert (await refresh(s, sys_, "not-a-refresh-token"))[0] == 401
        async with s.post(f"{sys_.http}/api/refresh", json={}) as r:
            assert r.status == 400


async def test_revoke_per_user_and_for_all(tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        alice, bob = await login(s, sys_, "alice"), await login(s, sys_, "bob")
        data = sys_.settings.data_dir
        # the CLI in another process, as an operator runs it while the edge runs (same LMDB, no restart)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "claw.cli", "token", "revoke", "web.alice",
                                                    "--data", data, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "web.alice" in out.decode()
        assert await tasks_status(s, sys_, alice["token"]) == 401
        assert (await refresh(s, sys_, alice["refresh"]))[0] == 401
        assert await tasks_status(s, sys_, bob["token"]) == 200  # others are not affected
        alice2 = await login(s, sys_, "alice")  # a new login works
        assert await tasks_status(s, sys_, alice2["token"]) == 200
        assert claw_main(["token", "revoke", "--all", "--data", data]) == 0  # in this process (same environment)
        assert "every user" in capsys.readouterr().out
        for who in (alice2, bob):
            assert await tasks_status(s, sys_, who["token"]) == 401
            assert (await refresh(s, sys_, who["refresh"]))[0] == 401
        assert await tasks_status(s, sys_, (await login(s, sys_, "bob"))["token"]) == 200
        assert claw_main(["token", "revoke", "nobody", "--data", data]) == 2  # not a uid


async def test_revoked_users_open_websocket_is_closed(tmp_path: Path, pki_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "WS_CHECK_S", 0.1)
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        alice, bob = await login(s, sys_, "alice"), await login(s, sys_, "bob")
        wa = await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": await ticket(s, sys_, alice["token"])})
        wb = await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": await ticket(s, sys_, bob["token"])})
        assert (await wa.receive_json(timeout=5))["type"] == "node"
        assert (await wb.receive_json(timeout=5))["type"] == "node"
        auth.Revocations(sys_.settings.data_dir).revoke("web.alice")
        msg = await wa.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == api.WS_REVOKED
        await wb.send_json({"type": "ping"})
        assert (await wb.receive_json(timeout=5))["type"] == "pong"  # bob's socket stays open
        await wb.close()


async def test_ws_ticket_is_one_time_and_short_lived(tmp_path: Path, pki_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        token = (await login(s, sys_))["token"]
        t = await ticket(s, sys_, token)
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": t}) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "node"
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": t})  # used already
        assert exc.value.status == 401
        monkeypatch.setattr(auth, "TICKET_TTL_S", 0.0)  # expired as soon as made
        stale = await ticket(s, sys_, token)
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": stale})
        assert exc.value.status == 401
        async with s.post(f"{sys_.http}/api/ws-ticket") as r:  # no bearer
            assert r.status == 401
        monkeypatch.setattr(auth, "TICKET_TTL_S", 30.0)
        for _ in range(auth.MAX_TICKETS_PER_USER):
            await ticket(s, sys_, token)
        async with s.post(f"{sys_.http}/api/ws-ticket", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 429  # unused tickets per user are bounded
        other = (await login(s, sys_, "bob"))["token"]
        await ticket(s, sys_, other)  # ... per user


async def test_query_token_is_refused_outside_the_websocket(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        token = (await login(s, sys_))["token"]
        for path in ("/api/tasks", f"/api/tasks/{'0' * 32}"):
            async with s.get(f"{sys_.http}{path}", params={"token": token}) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "token_in_query"
        async with s.post(f"{sys_.http}/api/ws-ticket", params={"token": token}) as r:
            assert r.status == 401
        assert await tasks_status(s, sys_, token) == 200


async def test_chat_cli_end_to_end_with_short_tokens(tmp_path: Path, pki_dir: Path) -> None:
    """claw chat logs in, gets a ticket and streams an answer; with a 1 s access token it renews it (rotating
    the refresh token) for the next connection."""
    import io

    from claw.chat import ChatClient
    from fakes.llm import FakeLLMConfig

    async with run_system(tmp_path, pki_dir, fake_cfg=FakeLLMConfig(reply="好的。", token_chars=2),
                          edge={"token_ttl": 1}) as sys_, aiohttp.ClientSession() as session:
        out, err = io.StringIO(), io.StringIO()
        client = ChatClient(sys_.http, "term", out, err)
        client.session = session
        try:
            await client.connect()
            first_refresh = client.refresh
            a = await client.ask("你好")
            assert await client.race(a.done, timeout=20) == "done" and a.done.result() == "ok"
            assert "好的。" in out.getvalue()
            ws = await client._open()  # the token has (nearly) expired: renewed, not a new login
            await ws.close()
            assert client.refresh is not None and client.refresh != first_refresh
            assert (await refresh(session, sys_, first_refresh))[0] == 401
        finally:
            await client.close()


# ---- HTTP hardening ------------------------------------------------------------------------------

def _port(sys_: System) -> int:
    return int(sys_.http.rsplit(":", 1)[1])


async def _closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


async def test_slow_header_sockets_are_closed(tmp_path: Path, pki_dir: Path) -> None:
    """50 sockets trickling a request's headers (and 5 sending nothing) are all closed by
    edge.header_timeout_s; they used to stay open 60 s and more."""
    async with run_system(tmp_path, pki_dir, edge={"header_timeout_s": 1.0}, **EDGE_ONLY) as sys_:
        conns = [await asyncio.open_connection("127.0.0.1", _port(sys_)) for _ in range(55)]
        for _, w in conns[:50]:
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        stop = asyncio.Event()

        async def trickle() -> None:
            while not stop.is_set():
                for _, w in conns[:50]:
                    if not w.is_closing():
                        w.write(b"X-a: b\r\n")
                await asyncio.sleep(0.2)

        t0 = time.monotonic()
        job = asyncio.create_task(trickle())
        try:
            closed = await asyncio.gather(*(_closed_by_peer(r, 15) for r, _ in conns))
        finally:
            stop.set()
            await job
            for _, w in conns:
                w.close()
        assert all(closed)
        assert time.monotonic() - t0 < 10  # generous: 1 s configured
        # a normal request is served as before
        async with aiohttp.ClientSession() as s, s.get(f"{sys_.http}/healthz") as r:
            assert r.status in (200, 503)


async def test_slow_body_is_answered_408_and_closed(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, edge={"body_timeout_s": 0.5}, **EDGE_ONLY) as sys_:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(sys_))
        writer.write(b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"dev_user\"")
        async with asyncio.timeout(10):
            head = await reader.readline()
        assert b" 408 " in head, head
        assert await _closed_by_peer(reader, 10)
        writer.close()


async def test_connections_per_ip_are_capped(tmp_path: Path, pki_dir: Path) -> None:
    """Connections from one (non-loopback) address beyond edge.max_conns_per_ip are closed at once; loopback
    peers (a reverse proxy on the same host, the bench) are not capped."""
    ip = _public_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    async with run_system(tmp_path, pki_dir, edge={"max_conns_per_ip": 5, "http": "0.0.0.0:0"}, **EDGE_ONLY) as sys_:
        local = [await asyncio.open_connection("127.0.0.1", _port(sys_)) for _ in range(8)]
        held = [await asyncio.open_connection(ip, _port(sys_)) for _ in range(5)]
        extra_r, extra_w = await asyncio.open_connection(ip, _port(sys_))
        extra_w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await _closed_by_peer(extra_r, 5)  # closed without an answer
        extra_w.close()
        r8, w8 = local[-1]  # the 8 loopback connections were not refused
        w8.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            assert b"HTTP/1.1" in await r8.readline()
        for _, w in held + local:
            w.close()

        async def served() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://{ip}:{_port(sys_)}/healthz") as r:
                    return r.status in (200, 503)
            except aiohttp.ClientError:
                return False

        ok = False
        for _ in range(100):  # the held sockets' slots are given back once the edge sees them closed
            if ok := await served():
                break
            await asyncio.sleep(0.05)
        assert ok


@pytest.mark.parametrize("query,status,count", [
    ({"before": "1e30"}, 200, 2), ({"before": str(10**30)}, 200, 2), ({"before": "-5"}, 200, 0),
    ({"before": "-1e30"}, 200, 0), ({"limit": "-5"}, 200, 1), ({"limit": "100000"}, 200, 2),
    ({"before": "nan"}, 400, None), ({"before": "abc"}, 400, None), ({"limit": "x"}, 400, None),
])
async def test_task_list_query_is_clamped(tmp_path: Path, pki_dir: Path, query: dict[str, str], status: int,
                                          count: int | None) -> None:
    async with run_system(tmp_path, pki_dir) as sys_, aiohttp.ClientSession() as s:
        token = (await login(s, sys_))["token"]
        async with s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": await ticket(s, sys_, token)}) as ws:
            for q in ("一", "二"):
                await ws.send_json({"type": "ask", "text": q})
                while (await ws.receive_json(timeout=10))["type"] != "done":
                    pass
        async with s.get(f"{sys_.http}/api/tasks", params=query,
                         headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == status, await r.text()
            if count is not None:
                assert len((await r.json())["tasks"]) == count


async def test_malformed_requests_are_logged_quietly(tmp_path: Path, pki_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async with run_system(tmp_path, pki_dir, **EDGE_ONLY) as sys_:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            for i in range(30):
                r, w = await asyncio.open_connection("127.0.0.1", _port(sys_))
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n" if i % 2 else
                        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"Content-Length: nope\r\n\r\n")
                async with asyncio.timeout(10):
                    head = await r.readline()
                assert b" 400 " in head, head
                w.close()
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert not errors, [rec.getMessage() for rec in errors]
        assert not [rec for rec in caplog.records if rec.exc_info and rec.levelno >= logging.INFO]
        warned = [rec for rec in caplog.records if "malformed HTTP request" in rec.getMessage()]
        assert 1 <= len(warned) <= 3  # rate-limited: 30 bad requests, one line (per 10 s)


async def test_websocket_origin_allowlist(tmp_path: Path, pki_dir: Path) -> None:
    async with run_system(tmp_path, pki_dir, edge={"public_url": "https://claw.example.com",
                                                  "allowed_origins": ["https://ops.example.com:8443"]},
                          **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        token = (await login(s, sys_))["token"]
        for origin in ("https://evil.example", "null", "https://claw.example.com.evil.example",
                       "http://127.0.0.1:1"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": await ticket(s, sys_, token)},
                                   headers={"Origin": origin})
            assert exc.value.status == 403, origin
        same_host = sys_.http  # http://127.0.0.1:PORT: the page served by this edge
        for origin in ("https://claw.example.com", "https://ops.example.com:8443", same_host, None):
            headers = {"Origin": origin} if origin else {}
            ws = await s.ws_connect(f"{sys_.http}/api/ws", params={"ticket": await ticket(s, sys_, token)},
                                    headers=headers)
            assert (await ws.receive_json(timeout=5))["type"] == "node", origin
            await ws.close()


def _public_ip() -> str | None:
    """A non-loopback address of this machine that it can connect to itself, if any."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.connect(("192.0.2.254", 9))  # no packet is sent
            ip = u.getsockname()[0]
        with socket.socket() as srv:
            srv.bind((ip, 0))
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


async def test_healthz_details_and_metrics_only_from_loopback_or_with_the_metrics_token(
        tmp_path: Path, pki_dir: Path) -> None:
    ip = _public_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    async with run_system(tmp_path, pki_dir, edge={"http": "0.0.0.0:0", "metrics_token": "m-Secret-1"},
                          **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        outside = f"http://{ip}:{_port(sys_)}"
        async with s.get(f"{outside}/healthz") as r:
            assert set(await r.json()) == {"ok"}
        async with s.get(f"{outside}/metrics") as r:
            assert r.status == 403
        async with s.get(f"{outside}/metrics", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 403
        bearer = {"Authorization": "Bearer m-Secret-1"}
        async with s.get(f"{outside}/metrics", headers=bearer) as r:
            assert r.status == 200 and "claw_edge_ws_sessions" in await r.text()
        async with s.get(f"{outside}/healthz", headers=bearer) as r:
            assert "nodes" in await r.json()
        async with s.get(f"{sys_.http}/metrics") as r:  # loopback
            assert r.status == 200
        async with s.get(f"{sys_.http}/healthz") as r:
            assert "nodes" in await r.json()


def test_edge_binds_loopback_by_default() -> None:
    from core.config import load_settings

    assert load_settings(env={}).edge.http == "127.0.0.1:8080"


# ---- WeCom time window -----------------------------------------------------------------------------

TOKEN, AES, CORP, AGENT = "QDG6eK", "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "wx5823bf96d3bd56c7", 1000002


async def test_wecom_callbacks_outside_the_time_window_are_refused(tmp_path: Path, pki_dir: Path) -> None:
    """The signed timestamp must be within wecom.replay_window_s (default 300 s) either way, for the URL
    verification (GET) as for messages (POST): 23 h in the future or an hour old is refused."""
    wecom = {"wecom": {"corp_id": CORP, "agent_id": AGENT, "secret": "s-1", "token": TOKEN,
                       "encoding_aes_key": AES, "api_base": "http://127.0.0.1:9"}}
    sim = WeComSim(TOKEN, AES, CORP, AGENT)
    async with run_system(tmp_path, pki_dir, **wecom, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        url = f"{sys_.http}/wecom/callback"
        now = int(time.time())
        for skew in (23 * 3600, -3600, 360, -360):  # margins: the clock moves on while this runs
            async with s.get(url, params=sim.url_check("echo-1", timestamp=now + skew)) as r:
                assert r.status == 403, skew
            status, _ = await sim.wrap(sim.text("zhangsan", "你好").inner, timestamp=now + skew).post(s, url)
            assert status == 403, skew
        for skew in (0, 120, -120):
            async with s.get(url, params=sim.url_check("echo-2", timestamp=now + skew)) as r:
                assert r.status == 200 and await r.text() == "echo-2"
        status, _ = await sim.text("zhangsan", "你好").post(s, url)
        assert status == 200


async def test_one_user_never_reads_resumes_or_stops_anothers_task(tmp_path: Path, pki_dir: Path) -> None:
    """Bob holds a valid token of his own and Alice's task id: every way to reach her task is refused."""
    from fakes.llm import FakeLLMConfig
    from tests.integration.test_e2e import collect

    cfg = FakeLLMConfig(n_tokens=30, tokens_per_s=300, token_chars=2)
    async with run_system(tmp_path, pki_dir, fake_cfg=cfg) as sys_, aiohttp.ClientSession() as s:
        alice, bob = await sys_.login(s, "alice"), await sys_.login(s, "bob")
        async with s.ws_connect(f"{sys_.http}/api/ws", headers={"Authorization": f"Bearer {alice}"}) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "ask", "text": "爱丽丝的问题"})
            frames, done = await collect(ws)
        task = done["task"]
        assert done["status"] == "ok" and done["text"]

        bearer = {"Authorization": f"Bearer {bob}"}
        async with s.get(f"{sys_.http}/api/tasks/{task}", headers=bearer) as r:
            assert r.status == 404
        async with s.get(f"{sys_.http}/api/tasks", headers=bearer) as r:
            assert r.status == 200 and (await r.json())["tasks"] == []
        async with s.ws_connect(f"{sys_.http}/api/ws", headers=bearer) as ws:
            await ws.receive_json()  # node presence
            for frame in ({"type": "resume", "task": task, "seq": 0}, {"type": "stop", "task": task},
                          {"type": "ask", "text": "偷看", "id": task}):
                await ws.send_json(frame)
                got = await asyncio.wait_for(ws.receive_json(), 10)
                # (a stop answers not_running alike for a task that is not yours, unknown or finished)
                assert got["type"] == "error" and got["code"] in ("forbidden", "not_found", "not_running"), \
                    (frame, got)
                assert done["text"] not in str(got)
            await ws.send_json({"type": "ping"})
            assert (await asyncio.wait_for(ws.receive_json(), 10)) == {"type": "pong"}  # nothing else came


async def test_rejected_wecom_callbacks_cannot_flood_the_log(tmp_path: Path, pki_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A stranger's unsigned POSTs were one WARNING each; now a burst of 20, then 20 a minute."""
    caplog.set_level(logging.INFO)
    wecom = {"wecom": {"corp_id": CORP, "agent_id": AGENT, "secret": "s-1", "token": TOKEN,
                       "encoding_aes_key": AES, "api_base": "http://127.0.0.1:9"}}
    async with run_system(tmp_path, pki_dir, **wecom, **EDGE_ONLY) as sys_, aiohttp.ClientSession() as s:
        url = f"{sys_.http}/wecom/callback"
        for i in range(100):
            async with s.post(url, params={"msg_signature": "0" * 40, "timestamp": str(int(time.time())),
                                           "nonce": str(i)}, data=b"<xml><Encrypt>x</Encrypt></xml>") as r:
                assert r.status == 403
    lines = [r for r in caplog.records if "wecom: callback rejected" in r.getMessage()]
    assert 1 <= len(lines) <= 21
