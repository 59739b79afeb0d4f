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
- **Personal token** (``claw token issue UID``, default 30 days): ``pat_<id>_<secret>``, for ``claw chat`` and
  scripts. Only its SHA-256 is stored (db ``pats``, keyed by the 16-hex ``id``, with uid, created, expires,
  note, last used). ``POST /api/login {"pat"}`` exchanges it for the usual pair, so it is sent at sign-in only.
  A session made from it (and every access token of that session: the token carries ``|<id>``) lives only as
  long as the personal token: revoking it (``claw token revoke --pat ID``, or the user's/everybody's tokens) or
  its expiry ends them at the next check. Failed sign-ins are throttled per client address
  (:class:`FailureThrottle`).

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
import ipaddress
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import lmdb

import wire
from core.store import Writer, close_env, open_db, open_env

ENV_DIR = "auth.lmdb"
MAP_SIZE = 256 << 20  # ~2 M sessions of ~100 bytes
TICKET_TTL_S = 30.0
MAX_TICKETS = 10_000  # outstanding WebSocket tickets (all users); more → the request is refused
MAX_TICKETS_PER_USER = 16  # ... and per user (one user cannot use up everybody's)
_EPOCH_KEY = b"\0epoch"  # in db "gen"; uids never start with NUL
PRUNE_EVERY_S = 3600.0  # expired sessions are deleted at most this often (on a login)
# Login sessions kept per user: a new sign-in over this ends the user's oldest session (its refresh token is
# refused from then on). Without a bound one user (a personal token's holder: measured 1 400 sign-ins a second,
# about 240 bytes each) could fill auth.lmdb and make every sign-in and renewal of everybody fail.
MAX_SESSIONS_PER_UID = 50
PAT_PREFIX = "pat_"
PAT_ID_LEN = 16  # hex characters of a personal token's id (8 random bytes)
PAT_DAYS = 30  # default lifetime of a personal token
PAT_MAX_DAYS = 3650
PAT_MAX_LEN = 128  # a personal token is 64 characters; anything longer is not looked at
PAT_NOTE_MAX = 200
PAT_KEEP_EXPIRED_S = 30 * 86400  # an expired personal token stays listed (as expired) this long
# Failed personal-token sign-ins per client address (an IPv6 /64 counts as one): PAT_FAIL_BURST at once, then
# one per PAT_FAIL_EVERY_S; over that, sign-ins with a personal token from that address are refused (429)
# without being checked. At most PAT_FAIL_MAX_ADDRS addresses are remembered (the least recently failing one
# is forgotten first), so a spray from many addresses costs bounded memory.
PAT_FAIL_BURST = 10
PAT_FAIL_EVERY_S = 6.0
PAT_FAIL_MAX_ADDRS = 10_000


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


def _index_key(uid: str, t: int, key: bytes) -> bytes:
    return uid.encode() + b"\0" + struct.pack(">Q", t) + key


_HEX = frozenset("0123456789abcdef")


def pat_id(token: str) -> str | None:
    """The id of a well-formed personal token (``pat_<16 hex>_<secret>``), else None."""
    if not isinstance(token, str) or len(token) > PAT_MAX_LEN or not token.startswith(PAT_PREFIX):
        return None
    ident = token[len(PAT_PREFIX):len(PAT_PREFIX) + PAT_ID_LEN]
    rest = token[len(PAT_PREFIX) + PAT_ID_LEN:]
    if len(ident) != PAT_ID_LEN or not set(ident) <= _HEX or not rest.startswith("_") or len(rest) < 17:
        return None
    return ident


def is_pat_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == PAT_ID_LEN and set(value) <= _HEX


class Claims(NamedTuple):
    uid: str
    gen: int
    epoch: int
    pat: str = ""  # the personal token the session was made from ("" for other sign-ins)


class PersonalToken(NamedTuple):
    """What ``claw token list`` shows of a personal token (never the token itself)."""
    id: str
    uid: str
    created: int
    expires: int
    note: str
    last_used: int  # 0: never


def _pat_record(ident: str, raw: bytes) -> PersonalToken:
    rec = json.loads(raw)
    return PersonalToken(ident, rec["uid"], rec["created"], rec["expires"], rec.get("note", ""),
                         rec.get("last_used", 0))


class FailureThrottle:
    """A token bucket of failures per client address (IPv6: per /64), in a bounded LRU map. ``retry_after``
    says whether the address may try now; ``failed`` spends one token."""

    def __init__(self, burst: int = PAT_FAIL_BURST, every_s: float = PAT_FAIL_EVERY_S,
                 max_addrs: int = PAT_FAIL_MAX_ADDRS) -> None:
        self.burst = burst
        self.every_s = every_s
        self.max_addrs = max_addrs
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    @staticmethod
    def key(ip: str) -> str:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return ip[:64]
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
        return str(addr)

    def _tokens(self, key: str, now: float) -> float:
        got = self._buckets.get(key)
        if got is None:
            return float(self.burst)
        tokens, at = got
        return min(float(self.burst), tokens + (now - at) / self.every_s)

    def retry_after(self, ip: str, now: float | None = None) -> float:
        """0 if ``ip`` may try now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens = self._tokens(self.key(ip), now)
        return 0.0 if tokens >= 1 else (1 - tokens) * self.every_s

    def failed(self, ip: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = self.key(ip)
        tokens = max(0.0, self._tokens(key, now) - 1)
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_addrs:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class Revocations:
    """The per-user generation and the global epoch, in ``<data_dir>/auth.lmdb`` (db ``gen``). Shared by the
    edge and ``claw token revoke`` (another process): reads always go to LMDB."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / ENV_DIR
        self.env = open_env(self.path, max_dbs=8, map_size=MAP_SIZE)
        self.gen_db = open_db(self.env, b"gen")
        self.sess_db = open_db(self.env, b"sessions")
        self.pat_db = open_db(self.env, b"pats")
        # per-user index of the sessions: uid NUL created(8 bytes, ns) sha256(refresh) -> b"" (sessions made
        # before it existed carry no "t" and are not indexed; they end within session_ttl)
        self.usess_db = open_db(self.env, b"user_sessions")

    def drop_session(self, txn: lmdb.Transaction, key: bytes, raw: bytes | None = None) -> None:
        """Delete one session (sha256 of its refresh token) and its index entry."""
        raw = txn.get(key, db=self.sess_db) if raw is None else raw
        if raw is None:
            return
        txn.delete(key, db=self.sess_db)
        rec = json.loads(raw)
        if "t" in rec:
            txn.delete(_index_key(rec["uid"], rec["t"], key), db=self.usess_db)

    def current(self, uid: str, txn: lmdb.Transaction | None = None) -> tuple[int, int]:
        """(the user's generation, the global epoch)."""
        if txn is None:
            with self.env.begin() as t:
                return self.current(uid, t)
        gen = txn.get(uid.encode(), db=self.gen_db)
        epoch = txn.get(_EPOCH_KEY, db=self.gen_db)
        return int(gen or 0), int(epoch or 0)

    def valid(self, claims: Claims, now: float | None = None) -> bool:
        """Not revoked since issued; for a personal token's session, that token still exists and has not
        expired."""
        with self.env.begin() as txn:
            if self.current(claims.uid, txn) != (claims.gen, claims.epoch):
                return False
            return not claims.pat or self.pat_alive(txn, claims.pat, claims.uid, time.time() if now is None else now)

    def pat_alive(self, txn: lmdb.Transaction, ident: str, uid: str, now: float) -> bool:
        raw = txn.get(ident.encode(), db=self.pat_db)
        if raw is None:
            return False
        rec = json.loads(raw)
        return bool(rec["uid"] == uid and rec["expires"] >= now)

    def revoke(self, uid: str | None) -> int:
        """Revoke every token, session and personal token of ``uid`` (None: of everybody). Synchronous (the
        CLI); returns the new generation or epoch. Sessions are deleted too (their gen/epoch would be refused
        anyway)."""
        with self.env.begin(write=True) as txn:
            key = _EPOCH_KEY if uid is None else uid.encode()
            value = int(txn.get(key, db=self.gen_db) or 0) + 1
            txn.put(key, str(value).encode(), db=self.gen_db)
            if uid is None:
                txn.drop(self.sess_db, delete=False)
                txn.drop(self.usess_db, delete=False)
                txn.drop(self.pat_db, delete=False)
            else:
                cur = txn.cursor(db=self.sess_db)
                doomed = [(k, v) for k, v in cur if json.loads(v).get("uid") == uid]
                for k, v in doomed:
                    self.drop_session(txn, k, v)
                cur = txn.cursor(db=self.pat_db)
                doomed = [k for k, v in cur if json.loads(v).get("uid") == uid]
                for k in doomed:
                    txn.delete(k, db=self.pat_db)
        return value

    # ---- personal tokens (the CLI; the edge reads them in Tokens.login_pat) -------------------------
    def issue_pat(self, uid: str, days: int = PAT_DAYS, note: str = "",
                  now: float | None = None) -> tuple[str, PersonalToken]:
        """A new personal token for ``uid``: (the token, shown once; its record). Only its SHA-256 is kept."""
        wire.check_uid(uid)
        if not 1 <= days <= PAT_MAX_DAYS:
            raise ValueError(f"days must be 1..{PAT_MAX_DAYS}")
        note = "".join(ch for ch in note if ch.isprintable())[:PAT_NOTE_MAX]
        now = time.time() if now is None else now
        with self.env.begin(write=True) as txn:
            while True:
                ident = secrets.token_hex(PAT_ID_LEN // 2)
                if txn.get(ident.encode(), db=self.pat_db) is None:
                    break
            token = f"{PAT_PREFIX}{ident}_{secrets.token_urlsafe(32)}"
            rec = {"uid": uid, "hash": _hash(token).hex(), "created": int(now), "expires": int(now + days * 86400),
                   "note": note, "last_used": 0}
            txn.put(ident.encode(), json.dumps(rec).encode(), db=self.pat_db)
        return token, _pat_record(ident, json.dumps(rec).encode())

    def list_pats(self, uid: str | None = None) -> list[PersonalToken]:
        with self.env.begin() as txn:
            rows = [_pat_record(k.decode(), v) for k, v in txn.cursor(db=self.pat_db)]
        return sorted((r for r in rows if uid is None or r.uid == uid), key=lambda r: (r.uid, r.created, r.id))

    def revoke_pat(self, ident: str) -> PersonalToken | None:
        """Delete one personal token and the sessions made from it; None if there is no such id."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(ident.encode(), db=self.pat_db)
            if raw is None:
                return None
            txn.delete(ident.encode(), db=self.pat_db)
            cur = txn.cursor(db=self.sess_db)
            doomed = [(k, v) for k, v in cur if json.loads(v).get("pat") == ident]
            for k, v in doomed:
                self.drop_session(txn, k, v)
        return _pat_record(ident, raw)


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
        self.pat_throttle = FailureThrottle()  # failed personal-token sign-ins per client address

    # ---- access tokens -----------------------------------------------------------------------
    def _current(self, uid: str) -> tuple[int, int]:
        return self.revocations.current(uid) if self.revocations is not None else (0, 0)

    def issue(self, uid: str, now: float | None = None, gen_epoch: tuple[int, int] | None = None,
              pat: str = "") -> tuple[str, int]:
        wire.check_uid(uid)
        gen, epoch = gen_epoch if gen_epoch is not None else self._current(uid)
        expires = int((now or time.time()) + self.ttl)
        body = (f"{uid}|{expires}|{gen}|{epoch}" + (f"|{pat}" if pat else "")).encode()
        sig = hmac.new(self._key, body, hashlib.sha256).digest()
        return f"{_b64(body)}.{_b64(sig)}", expires

    def check(self, token: str, now: float | None = None) -> Claims | None:
        """The token's claims, or None if it is forged, malformed, expired or revoked."""
        try:
            body_s, sig_s = token.split(".", 1)
            body, sig = _unb64(body_s), _unb64(sig_s)
        except (ValueError, AttributeError):
            return None
        if _b64(body) != body_s or _b64(sig) != sig_s:
            return None  # only the exact encoding the edge made (the decoder skips padding and stray characters)
        if not hmac.compare_digest(hmac.new(self._key, body, hashlib.sha256).digest(), sig):
            return None
        try:
            fields = body.decode().split("|")
            uid, exp, gen, epoch = fields[:4]
            pat = fields[4] if len(fields) == 5 else ""
            if len(fields) not in (4, 5) or (len(fields) == 5 and not is_pat_id(pat)):
                return None
            if int(exp) < (now or time.time()) or not wire.is_uid(uid):
                return None
            claims = Claims(uid, int(gen), int(epoch), pat)
        except ValueError:
            return None
        return claims if self.still_valid(claims) else None

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The uid the token was issued to, or None (see :meth:`check`)."""
        claims = self.check(token, now)
        return claims.uid if claims is not None else None

    def still_valid(self, claims: Claims) -> bool:
        """Not revoked since it was issued (per user or for all); made from a personal token: that token is
        still there and unexpired."""
        if self.revocations is None:
            return (claims.gen, claims.epoch) == (0, 0) and not claims.pat
        return self.revocations.valid(claims)

    # ---- sessions (refresh tokens) -------------------------------------------------------------
    def _writer_for(self) -> Writer:
        assert self.revocations is not None, "sessions need a data_dir"
        if self._writer is None:
            self._writer = Writer(self.revocations.env, name="edge-auth-writer")
        return self._writer

    def _new_session(self, txn: lmdb.Transaction, uid: str, gen: int, epoch: int, now: float, pat: str = "",
                     until: int | None = None) -> tuple[str, int]:
        """A new refresh token; a personal token's session records its id and ends with it (``until``)."""
        assert self.revocations is not None
        refresh = secrets.token_urlsafe(32)
        refresh_expires = int(now + self.session_ttl)
        if until is not None:
            refresh_expires = min(refresh_expires, until)
        rev = self.revocations
        t = time.time_ns()
        rec: dict[str, object] = {"uid": uid, "exp": refresh_expires, "gen": gen, "epoch": epoch, "t": t}
        if pat:
            rec["pat"] = pat
        key = _hash(refresh)
        txn.put(key, json.dumps(rec).encode(), db=rev.sess_db)
        txn.put(_index_key(uid, t, key), b"", db=rev.usess_db)
        # at most MAX_SESSIONS_PER_UID per user: the oldest go
        prefix = uid.encode() + b"\0"
        cur = txn.cursor(db=rev.usess_db)
        mine: list[bytes] = []
        if cur.set_range(prefix):
            for k in cur.iternext(values=False):
                if not k.startswith(prefix):
                    break
                mine.append(k)
        for k in mine[:max(0, len(mine) - MAX_SESSIONS_PER_UID)]:
            txn.delete(k, db=rev.usess_db)
            txn.delete(k[-32:], db=rev.sess_db)
        return refresh, refresh_expires

    def _pair(self, uid: str, gen: int, epoch: int, refresh: str, refresh_expires: int,
              now: float, pat: str = "") -> dict[str, object]:
        token, expires = self.issue(uid, now, (gen, epoch), pat)
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

    def pat_valid(self, token: str, now: float | None = None) -> bool:
        """Whether ``token`` is a personal token that exists, matches and has not expired: one LMDB read,
        synchronous, so that the edge charges a failure to the client's address before it awaits anything
        (a check that awaited let guesses sent at once all pass the throttle before any of them failed)."""
        ident = pat_id(token)
        if ident is None or self.revocations is None:
            return False
        now = time.time() if now is None else now
        with self.revocations.env.begin() as txn:
            raw = txn.get(ident.encode(), db=self.revocations.pat_db)
        if raw is None:
            return False
        rec = json.loads(raw)
        return hmac.compare_digest(rec["hash"], _hash(token).hex()) and rec["expires"] >= now

    async def login_pat(self, token: str) -> dict[str, object] | None:
        """A new session from a personal token (the usual pair), or None if the token is malformed, unknown,
        revoked or expired. Records its last use."""
        ident = pat_id(token)
        if ident is None:
            return None
        assert self.revocations is not None
        rev = self.revocations
        now = time.time()
        digest = _hash(token).hex()

        def fn(txn: lmdb.Transaction) -> tuple[str, int, int, str, int] | None:
            raw = txn.get(ident.encode(), db=rev.pat_db)
            if raw is None:
                return None
            rec = json.loads(raw)
            if not hmac.compare_digest(rec["hash"], digest) or rec["expires"] < now:
                return None
            uid = rec["uid"]
            rec["last_used"] = int(now)
            txn.put(ident.encode(), json.dumps(rec).encode(), db=rev.pat_db)
            gen, epoch = rev.current(uid, txn)
            return (uid, gen, epoch, *self._new_session(txn, uid, gen, epoch, now, ident, rec["expires"]))

        got = await self._writer_for().write(fn)
        if got is None:
            return None
        uid, gen, epoch, refresh, refresh_expires = got
        return self._pair(uid, gen, epoch, refresh, refresh_expires, now, ident)

    async def refresh(self, refresh: str) -> dict[str, object] | None:
        """Rotate a refresh token: a new pair, the old refresh token deleted; None if it is unknown (used
        already, logged out), expired or revoked."""
        assert self.revocations is not None
        rev = self.revocations
        now = time.time()
        key = _hash(refresh)

        def fn(txn: lmdb.Transaction) -> tuple[str, int, int, str, str, int] | None:
            raw = txn.get(key, db=rev.sess_db)
            if raw is None:
                return None
            rev.drop_session(txn, key, raw)
            rec = json.loads(raw)
            uid = rec["uid"]
            if rec["exp"] < now or rev.current(uid, txn) != (rec["gen"], rec["epoch"]):
                return None
            pat = rec.get("pat", "")
            until = None
            if pat:  # a personal token's session: only while that token exists and has not expired
                raw_pat = txn.get(pat.encode(), db=rev.pat_db)
                if raw_pat is None:
                    return None
                prec = json.loads(raw_pat)
                if prec["uid"] != uid or prec["expires"] < now:
                    return None
                prec["last_used"] = int(now)
                txn.put(pat.encode(), json.dumps(prec).encode(), db=rev.pat_db)
                until = prec["expires"]
            return (uid, rec["gen"], rec["epoch"], pat,
                    *self._new_session(txn, uid, rec["gen"], rec["epoch"], now, pat, until))

        got = await self._writer_for().write(fn)
        if got is None:
            return None
        uid, gen, epoch, pat, new, new_expires = got
        return self._pair(uid, gen, epoch, new, new_expires, now, pat)

    async def logout(self, refresh: str) -> bool:
        assert self.revocations is not None
        rev = self.revocations
        key = _hash(refresh)
        def fn(txn: lmdb.Transaction) -> bool:
            raw = txn.get(key, db=rev.sess_db)
            rev.drop_session(txn, key, raw)
            return raw is not None

        return bool(await self._writer_for().write(fn))

    def _prune(self, txn: lmdb.Transaction) -> int:
        assert self.revocations is not None
        now = time.time()
        cur = txn.cursor(db=self.revocations.sess_db)
        doomed = [(k, v) for k, v in cur if json.loads(v)["exp"] < now]
        for k, v in doomed:
            self.revocations.drop_session(txn, k, v)
        # personal tokens expired for more than PAT_KEEP_EXPIRED_S (claw token list shows them as expired until then)
        cur = txn.cursor(db=self.revocations.pat_db)
        old = [k for k, v in cur if json.loads(v)["expires"] < now - PAT_KEEP_EXPIRED_S]
        for k in old:
            txn.delete(k, db=self.revocations.pat_db)
        return len(doomed) + len(old)

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
