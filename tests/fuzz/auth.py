"""Every way the fuzz tests authenticate, in one place, so a change of the login flow (access + refresh
tokens, a WebSocket ticket, broker credentials) is adapted here only."""

from __future__ import annotations

import aiohttp

from tests.conftest import System


async def ws_auth(sys_: System, session: aiohttp.ClientSession, user: str) -> tuple[dict[str, str], dict[str, str]]:
    """What a WebSocket upgrade of ``user`` at ``/api/ws`` needs: (query parameters, extra headers).

    Today: a dev login (``POST /api/login``) gives a token that goes in the query."""
    async with session.post(f"{sys_.http}/api/login", json={"dev_user": user}) as r:
        assert r.status == 200, await r.text()
        token = (await r.json())["token"]
    return {"token": token}, {}


def device_credential(sys_: System, name: str) -> tuple[str, str]:
    """A broker credential (username, password) for MQTT device ``name`` (username ``dev.NAME``)."""
    from broker.creds import CredentialStore

    user, password = CredentialStore(sys_.settings.data_dir).add("device", name, replace=True)
    return user, password
