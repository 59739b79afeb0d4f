"""Client authentication: short-lived access tokens, server-side refresh sessions, one-time WebSocket tickets
and revocation.

- **Access token** (``edge.token_ttl``, default 15 min): ``base64url(uid|expires|gen|epoch).base64url(hmac)``
  signed with a key derived from the edge secret. Stateless except for ``gen``/``epoch``: the user's
  generation and the global epoch when it was issued. A token whose ``gen`` or ``epoch`` is no longer the
  current one is refused, which is how ``claw token revoke UID`` / ``--all`` revoke tokens already issued.
- **Refresh token** (``edge.session_ttl``, default 7 days): 32 random bytes; only its SHA-256 is stored, in
  ``<data_dir>/auth.lmdb`` (db ``sessions``) with the uid, expiry, gen and epoch. Every use rotates it: the old
  one is deleted in the same LMDB transaction that stores the new one, so a refresh token works once.
- **WebSocket ticket**: 30 s, one use, held in the edge's memory; made from a valid access token by
  ``POST /api/ws-ticket`` so that no long-lived credential goes into a URL (proxy logs).

The generation/epoch table (db ``gen``) may be changed by another process (``claw token revoke`` while the
edge runs): every check reads it from LMDB (one read transaction, microseconds), so a revoke takes effect at
the next request and, for open WebSockets, within ``WS_CHECK_S`` seconds (edge.api). No restart is needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

import lmdb

import wire
from claw.store import Writer, close_env, open_db, open_env

ENV_DIR = "auth.lmdb"
MAP_SIZE = 256 << 20  # ~2 M sessions of ~100 bytes
TICKET_TTL_S = 30.0
MAX_TICKETS = 10_000  # outstanding WebSocket tickets (all users); more → the request is refused
MAX_TICKETS_PER_USER = 16  # ... and per user (one user cannot use up everybody's)
_EPOCH_KEY = b"\0epoch"  # in db "gen"; uids never start with NUL
PRUNE_EVERY_S = 3600.0  # expired sessions are deleted at most this often (on a login)


def load_or_create_secret(configured: str, data_dir: str | Path) -> bytes:
    if configured:
        return configured.encode()
    path = Path(data_dir) / "edge.secret"
    if path.exists():
        return path.read_text().strip().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value.encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hash(refresh: str) -> bytes:
    return hashlib.sha256(refresh.encode("utf-8", "replace")).digest()


class Claims(NamedTuple):
    uid: str
    gen: int
    epoch: int


class Revocations:
    """The per-user generation and the global epoch, in ``<data_dir>/auth.lmdb`` (db ``gen``). Shared by the
    edge and ``claw token revoke`` (another process): reads always go to LMDB."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / ENV_DIR
        self.env = open_env(self.path, max_dbs=4, map_size=MAP_SIZE)
        self.gen_db = open_db(self.env, b"gen")
        self.sess_db = open_db(self.env, b"sessions")

    def current(self, uid: str, txn: lmdb.Transaction | None = None) -> tuple[int, int]:
        """(the user's generation, the global epoch)."""
        if txn is None:
            with self.env.begin() as t:
                return self.current(uid, t)
        gen = txn.get(uid.encode(), db=self.gen_db)
        epoch = txn.get(_EPOCH_KEY, db=self.gen_db)
        return int(gen or 0), int(epoch or 0)

    def valid(self, claims: Claims) -> bool:
        return self.current(claims.uid) == (claims.gen, claims.epoch)

    def revoke(self, uid: str | None) -> int:
        """Revoke every token and session of ``uid`` (None: of everybody). Synchronous (the CLI); returns the new
        generation or epoch. Sessions are deleted too (their gen/epoch would be refused anyway)."""
        with self.env.begin(write=True) as txn:
            key = _EPOCH_KEY if uid is None else uid.encode()
            value = int(txn.get(key, db=self.gen_db) or 0) + 1
            txn.put(key, str(value).encode(), db=self.gen_db)
            if uid is None:
                txn.drop(self.sess_db, delete=False)
            else:
                cur = txn.cursor(db=self.sess_db)
                doomed = [k for k, v in cur if json.loads(v).get("uid") == uid]
                for k in doomed:
                    txn.delete(k, db=self.sess_db)
        return value


class Tokens:
    def __init__(self, secret: bytes, ttl: int, data_dir: str | Path | None = None,
                 session_ttl: int = 7 * 86400) -> None:
        self._key = hashlib.sha256(b"smartclaw-access-v2\0" + secret).digest()
        self.ttl = ttl
        self.session_ttl = session_ttl
        self.revocations = Revocations(data_dir) if data_dir is not None else None
        self._writer: Writer | None = None
        self._tickets: dict[str, tuple[Claims, float]] = {}
        self._per_user: dict[str, int] = {}  # outstanding tickets per uid
        self._pruned = 0.0

    # ---- access tokens -----------------------------------------------------------------------
    def _current(self, uid: str) -> tuple[int, int]:
        return self.revocations.current(uid) if self.revocations is not None else (0, 0)

    def issue(self, uid: str, now: float | None = None, gen_epoch: tuple[int, int] | None = None) -> tuple[str, int]:
        wire.check_uid(uid)
        gen, epoch = gen_epoch if gen_epoch is not None else self._current(uid)
        expires = int((now or time.time()) + self.ttl)
        body = f"{uid}|{expires}|{gen}|{epoch}".encode()
        sig = hmac.new(self._key, body, hashlib.sha256).digest()
        return f"{_b64(body)}.{_b64(sig)}", expires

    def check(self, token: str, now: float | None = None) -> Claims | None:
        """The token's claims, or None if it is forged, malformed, expired or revoked."""
        try:
            body_s, sig_s = token.split(".", 1)
            body, sig = _unb64(body_s), _unb64(sig_s)
        except (ValueError, AttributeError):
            return None
        if not hmac.compare_digest(hmac.new(self._key, body, hashlib.sha256).digest(), sig):
            return None
        try:
            uid, exp, gen, epoch = body.decode().rsplit("|", 3)
            if int(exp) < (now or time.time()) or not wire.is_uid(uid):
                return None
            claims = Claims(uid, int(gen), int(epoch))
        except ValueError:
            return None
        return claims if self.still_valid(claims) else None

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The uid the token was issued to, or None (see :meth:`check`)."""
        claims = self.check(token, now)
        return claims.uid if claims is not None else None

    def still_valid(self, claims: Claims) -> bool:
        """Not revoked since it was issued (per user or for all)."""
        return self._current(claims.uid) == (claims.gen, claims.epoch)

    # ---- sessions (refresh tokens) -------------------------------------------------------------
    def _writer_for(self) -> Writer:
        assert self.revocations is not None, "sessions need a data_dir"
        if self._writer is None:
            self._writer = Writer(self.revocations.env, name="edge-auth-writer")
        return self._writer

    def _new_session(self, txn: lmdb.Transaction, uid: str, gen: int, epoch: int, now: float) -> tuple[str, int]:
        assert self.revocations is not None
        refresh = secrets.token_urlsafe(32)
        refresh_expires = int(now + self.session_ttl)
        txn.put(_hash(refresh), json.dumps({"uid": uid, "exp": refresh_expires, "gen": gen, "epoch": epoch}).encode(),
                db=self.revocations.sess_db)
        return refresh, refresh_expires

    def _pair(self, uid: str, gen: int, epoch: int, refresh: str, refresh_expires: int,
              now: float) -> dict[str, object]:
        token, expires = self.issue(uid, now, (gen, epoch))
        return {"token": token, "uid": uid, "expires": expires, "refresh": refresh, "refresh_expires": refresh_expires}

    async def login(self, uid: str) -> dict[str, object]:
        """A new session for ``uid``: ``{token, uid, expires, refresh, refresh_expires}``."""
        wire.check_uid(uid)
        assert self.revocations is not None
        rev = self.revocations
        now = time.time()

        def fn(txn: lmdb.Transaction) -> tuple[int, int, str, int]:
            gen, epoch = rev.current(uid, txn)
            return (gen, epoch, *self._new_session(txn, uid, gen, epoch, now))

        writer = self._writer_for()
        gen, epoch, refresh, refresh_expires = await writer.write(fn)
        if now - self._pruned > PRUNE_EVERY_S:
            self._pruned = now
            writer.submit(self._prune)
        return self._pair(uid, gen, epoch, refresh, refresh_expires, now)

    async def refresh(self, refresh: str) -> dict[str, object] | None:
        """Rotate a refresh token: a new pair, the old refresh token deleted; None if it is unknown (used
        already, logged out), expired or revoked."""
        assert self.revocations is not None
        rev = self.revocations
        now = time.time()
        key = _hash(refresh)

        def fn(txn: lmdb.Transaction) -> tuple[str, int, int, str, int] | None:
            raw = txn.get(key, db=rev.sess_db)
            if raw is None:
                return None
            txn.delete(key, db=rev.sess_db)
            rec = json.loads(raw)
            uid = rec["uid"]
            if rec["exp"] < now or rev.current(uid, txn) != (rec["gen"], rec["epoch"]):
                return None
            return (uid, rec["gen"], rec["epoch"], *self._new_session(txn, uid, rec["gen"], rec["epoch"], now))

        got = await self._writer_for().write(fn)
        if got is None:
            return None
        uid, gen, epoch, new, new_expires = got
        return self._pair(uid, gen, epoch, new, new_expires, now)

    async def logout(self, refresh: str) -> bool:
        assert self.revocations is not None
        rev = self.revocations
        key = _hash(refresh)
        return bool(await self._writer_for().write(lambda txn: txn.delete(key, db=rev.sess_db)))

    def _prune(self, txn: lmdb.Transaction) -> int:
        assert self.revocations is not None
        now = time.time()
        cur = txn.cursor(db=self.revocations.sess_db)
        doomed = [k for k, v in cur if json.loads(v)["exp"] < now]
        for k in doomed:
            txn.delete(k, db=self.revocations.sess_db)
        return len(doomed)

    # ---- WebSocket tickets ---------------------------------------------------------------------
    def ticket(self, claims: Claims) -> tuple[str, int] | None:
        """A one-time ticket for ``GET /api/ws?ticket=``, valid TICKET_TTL_S; None when too many are
        outstanding."""
        now = time.monotonic()
        if len(self._tickets) >= MAX_TICKETS or self._per_user.get(claims.uid, 0) >= MAX_TICKETS_PER_USER:
            for t in [t for t, (_, exp) in self._tickets.items() if exp < now]:
                self._drop(t)
            if len(self._tickets) >= MAX_TICKETS or self._per_user.get(claims.uid, 0) >= MAX_TICKETS_PER_USER:
                return None
        value = secrets.token_urlsafe(24)
        self._tickets[value] = (claims, now + TICKET_TTL_S)
        self._per_user[claims.uid] = self._per_user.get(claims.uid, 0) + 1
        return value, int(time.time() + TICKET_TTL_S)

    def _drop(self, ticket: str) -> tuple[Claims, float] | None:
        got = self._tickets.pop(ticket, None)
        if got is not None:
            left = self._per_user[got[0].uid] - 1
            if left:
                self._per_user[got[0].uid] = left
            else:
                del self._per_user[got[0].uid]
        return got

    def take_ticket(self, ticket: str) -> Claims | None:
        """The ticket's claims, once; None if unknown, used, expired or revoked meanwhile."""
        got = self._drop(ticket)
        if got is None or got[1] < time.monotonic() or not self.still_valid(got[0]):
            return None
        return got[0]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.revocations is not None:
            close_env(self.revocations.path)
            self.revocations = None
