"""Sessions whose credential was revoked or replaced are closed (docs/broker.md "Revoking a credential").

At login the broker stores the credential's state (generation counter, record fingerprint) in the session's
``attributes[CRED_KEY]`` (the edge's own user gets none and is exempt). Every ``broker.cred_check_interval`` s
:meth:`CredentialSweep.run` reads the store's generation counter (one LMDB read; ``claw cred add/revoke`` bumps
it from any process); after a change, connected sessions whose record is gone or different from the one read at
their login are closed through the normal disconnect path (their will fires). Once a minute the connected
sessions also refresh their "recent good login" entries (the failed-login throttle's exemption).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from amqtt.session import Session

from broker.creds import CredentialStore

log = logging.getLogger(__name__)

CRED_KEY = "claw.cred"  # session.attributes: (credential generation, record fingerprint) read at login
LOGIN_REFRESH = 60.0  # seconds between refreshes of the connected sessions' "recent good login" entries

# (session, its protocol handler) for every session the broker holds
SessionsFn = Callable[[], Iterable[tuple[Session, Any]]]


class CredentialSweep:
    """The periodic check of one broker's connected sessions against the credential store."""

    def __init__(self, store: CredentialStore, sessions: SessionsFn, interval: float) -> None:
        self.store = store
        self._sessions = sessions
        self.interval = interval

    async def run(self) -> None:
        """Every ``interval`` s :meth:`check`; every ``LOGIN_REFRESH`` s :meth:`refresh_logins`. Runs until
        cancelled; a failing check (e.g. LMDB unreadable) is logged once per failure streak."""
        last_refresh = time.monotonic()
        failed = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
                if time.monotonic() - last_refresh >= LOGIN_REFRESH:
                    last_refresh = time.monotonic()
                    self.refresh_logins()
                failed = False
            except Exception:  # keep trying
                if not failed:
                    log.exception("broker: checking the connected sessions' credentials failed")
                failed = True

    async def check(self) -> int:
        """Close the connected sessions whose credential changed since their login; returns how many."""
        store = self.store
        gen = store.generation()
        stale: list[tuple[Session, Any, bool]] = []
        for session, handler in list(self._sessions()):
            seen = session.attributes.get(CRED_KEY)
            if seen is None or seen[0] == gen or not session.transitions.is_connected():
                continue
            now = store.state(session.username or "")
            if now[1] == seen[1]:
                session.attributes[CRED_KEY] = now  # unchanged: not re-read until the next change
            else:
                stale.append((session, handler, now[1] is None))
        for session, handler, revoked in stale:
            if not session.transitions.is_connected() or handler is None:
                continue
            log.warning("closing connection of client %r (user %r) from %s: its credential was %s",
                        session.client_id, session.username, session.remote_address,
                        "revoked" if revoked else "replaced")
            await handler.handle_connection_closed()  # the normal path: will, session disconnected
            if handler.writer is not None:
                with contextlib.suppress(Exception):
                    await handler.writer.close()
        return len(stale)

    def refresh_logins(self) -> None:
        store = self.store
        for session, _ in list(self._sessions()):
            if session.attributes.get(CRED_KEY) is not None and session.transitions.is_connected() and \
                    session.username and session.remote_address:
                store.throttle.remember(str(session.remote_address), session.username)
                store.note_login(str(session.remote_address), session.username)
