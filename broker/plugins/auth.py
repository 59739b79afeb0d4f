"""amqtt authentication plugin: the edge's in-process user plus node/device credentials from LMDB.

No anonymous access: a CONNECT without both username and password is refused. On success the role is stored
in ``session.attributes[ROLE_KEY]`` for the topic ACL. A CONNECT whose last will the client could not publish
itself is refused too, because amqtt broadcasts wills without any ACL check. Refusals are logged at WARNING
with the username and the reason, never the password.

A login the failed-login throttle or the bounded verification queue did not admit
(:class:`core.guard.AuthUnavailable`) is refused with CONNACK 3 "server unavailable": the code is left in
``session.attributes[REFUSE_KEY]`` for :class:`broker.amqtt_overrides.AmqttBroker`, and the refusal is logged at most once a
minute per kind.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from amqtt.contexts import BaseContext
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from broker import acl
from broker.creds import CredentialStore
from core.guard import AUTH_QUEUE, AuthThrottle, AuthUnavailable, Counters, LogBudget, RateLimitedLog
from broker.plugins import REFUSE_KEY, ROLE_KEY

log = logging.getLogger(__name__)
SERVER_UNAVAILABLE = 3  # CONNACK return code


def _peer(session: Session) -> str:
    return f"{session.remote_address}:{session.remote_port}"


class ClawAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        data_dir: str
        internal_user: str = "edge"
        internal_hash: str = ""  # sha256 hex of the edge's per-start password ("" = no internal user)
        auth_queue: int = AUTH_QUEUE  # password checks waiting or running at once (broker.auth_queue)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        cfg: ClawAuthPlugin.Config = self.config
        self.internal_user = cfg.internal_user
        self._internal_hash = cfg.internal_hash.lower()
        self.store = CredentialStore(cfg.data_dir, throttle=AuthThrottle(queue=cfg.auth_queue))
        self.counters = Counters()  # the broker replaces it with its own
        self._ratelog = RateLimitedLog(log)
        self._refusal_log = LogBudget(log)  # refused CONNECTs: 20 lines a minute at most

    def _refuse(self, session: Session, reason: str) -> bool:
        # an outsider can repeat this with ever new usernames: a log budget, not one line per attempt
        self._refusal_log.log(logging.WARNING, "MQTT CONNECT refused: user %r, client id %r from %s: %s",
                              (session.username or "")[:100], (session.client_id or "")[:100], _peer(session), reason)
        return False

    async def authenticate(self, *, session: Session) -> bool:
        username, password = session.username, session.password
        if not username or not password:
            return self._refuse(session, "no username/password (anonymous access is disabled)")
        role: str | None
        if username == self.internal_user:
            digest = hashlib.sha256(password.encode("utf-8", "surrogatepass")).hexdigest()
            ok = bool(self._internal_hash) and hmac.compare_digest(digest, self._internal_hash)
            role = "edge" if ok else None
        else:
            try:
                role = await self.store.averify(username, password, str(session.remote_address or ""))
            except AuthUnavailable as exc:
                if exc.busy:
                    self.counters.auth_busy += 1
                else:
                    self.counters.auth_throttled += 1
                session.attributes[REFUSE_KEY] = SERVER_UNAVAILABLE
                self._ratelog.log("busy" if exc.busy else "throttled", logging.WARNING,
                                  "MQTT CONNECT refused (CONNACK 3): user %r from %s: %s",
                                  username[:100], _peer(session), exc)
                return False
        if role is None:
            return self._refuse(session, "bad username or password")
        if session.will_flag and not acl.will_allowed(role, username, session.will_topic):
            return self._refuse(session, f"last will topic {str(session.will_topic)[:200]!r} not allowed "
                                         f"for role {role}")
        session.attributes[ROLE_KEY] = role
        session.is_anonymous = False
        return True
