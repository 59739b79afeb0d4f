"""Broker credentials for nodes and devices, kept in LMDB (``<data_dir>/broker.lmdb``, db ``creds``).

Roles and usernames:

- ``node``   NAME -> username ``node.NAME`` (NAME is the node id in ``claw/v1/node/NAME``)
- ``device`` NAME -> username ``dev.NAME`` (which is also the device's uid)

NAME = ``[A-Za-z0-9_-]{1,60}``. Only a salted scrypt hash of each password is stored; the password itself is
returned once by :meth:`CredentialStore.add` and never logged. The store may be changed by another process
(``claw cred add/revoke`` while the edge runs): every :meth:`CredentialStore.verify` reads the current LMDB
record, so a revoke or a replaced password takes effect at the next CONNECT. Successful *and* failed scrypt
checks are cached in memory per (username, keyed digest of the password, stored record), so a reconnect costs
one LMDB read and no scrypt, and a client hammering the same wrong password costs scrypt once. The two caches
are separate LRU tables (``_CACHE_MAX`` successes, ``_FAIL_CACHE_MAX`` failures): a flood of wrong passwords
can evict only other failures, never a good login.

:meth:`CredentialStore.averify` (the broker's path) runs scrypt in a worker thread, two at a time, and only
after :class:`core.guard.AuthThrottle` admitted it (failed-login buckets per (IP, username) and per username,
a bound on waiting checks); a refused one raises :class:`core.guard.AuthUnavailable` at once.

Two more named dbs in the same environment:

- ``creds_meta``: a generation counter, bumped in the same write transaction as every add, replace and revoke.
  The running broker polls it (:meth:`CredentialStore.generation`, one read) and, when it changed, compares each
  connected session's :meth:`CredentialStore.fingerprint` with the one taken at its login: a revoked or
  replaced credential's open sessions are closed (docs/broker.md "Revoking a credential").
- ``login_ok``: recent successful logins, ``<username> <ip>`` -> unix time, so the exemption of a known
  (IP, username) from the per-username failed-login bucket survives a restart
  (:meth:`CredentialStore.load_recent_logins`). A pair is written at most once per ``LOGIN_WRITE_EVERY`` s, in a
  worker thread and batched; entries older than ``GOOD_TTL`` are pruned and at most ``LOGIN_MAX`` are kept.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import lmdb

from core.guard import GOOD_TTL, TABLE_SIZE, AuthThrottle
from core.store import open_db, open_env

log = logging.getLogger(__name__)

Role = Literal["node", "device"]
ROLES: tuple[Role, ...] = ("node", "device")
PREFIXES: dict[str, str] = {"node": "node.", "device": "dev."}
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,60}")
DB_NAME = b"creds"
META_DB = b"creds_meta"
GEN_KEY = b"generation"
LOGIN_DB = b"login_ok"
LOGIN_WRITE_EVERY = 600.0  # seconds: a (IP, username) success is persisted at most this often
LOGIN_MAX = TABLE_SIZE  # persisted successes kept (the oldest are pruned beyond)
ENV_DIR = "broker.lmdb"

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_DKLEN = 32
_SALT_LEN = 16
_MAX_PASSWORD = 256  # longer passwords are refused without hashing
_CACHE_MAX = 4096  # successful logins remembered (LRU)
_FAIL_CACHE_MAX = 4096  # failed ones (LRU, a separate table)


@dataclass(frozen=True, slots=True)
class CredInfo:
    username: str
    role: Role
    created: float  # unix time


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid credential NAME, else raise ValueError."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ValueError(f"invalid credential name {name!r}: use 1-60 characters of A-Z a-z 0-9 _ -")
    return name


def username_for(role: str, name: str) -> str:
    """``node``/NAME -> ``node.NAME``, ``device``/NAME -> ``dev.NAME``; ValueError on a bad role or name."""
    prefix = PREFIXES.get(role)
    if prefix is None:
        raise ValueError(f"invalid role {role!r}: want one of {', '.join(ROLES)}")
    return prefix + check_name(name)


def role_of(username: str) -> Role | None:
    """The role a well-formed store username implies, else None."""
    for role, prefix in PREFIXES.items():
        if username.startswith(prefix) and NAME_RE.fullmatch(username[len(prefix):]):
            return role  # type: ignore[return-value]
    return None


def _hash(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
          dklen: int = _DKLEN) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=256 * n * r + (1 << 20))


@dataclass(frozen=True, slots=True)
class _Record:
    role: Role
    salt: bytes
    hash: bytes
    n: int
    r: int
    p: int
    created: float

    def encode(self) -> bytes:
        return json.dumps({
            "v": 1, "role": self.role, "kdf": "scrypt", "n": self.n, "r": self.r, "p": self.p,
            "salt": base64.b64encode(self.salt).decode(), "hash": base64.b64encode(self.hash).decode(),
            "created": self.created,
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _Record | None:
        try:
            d = json.loads(raw)
            role = d["role"]
            if role not in ROLES or d.get("kdf") != "scrypt":
                return None
            return cls(role=role, salt=base64.b64decode(d["salt"]), hash=base64.b64decode(d["hash"]),
                       n=int(d["n"]), r=int(d["r"]), p=int(d["p"]), created=float(d["created"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class _Job:
    key: tuple[str, bytes]
    raw: bytes
    rec: _Record


class CredentialStore:
    """Node and device credentials. Safe to use from several processes at once (LMDB)."""

    def __init__(self, data_dir: str | os.PathLike[str], *, throttle: AuthThrottle | None = None) -> None:
        self.path = Path(data_dir) / ENV_DIR
        self._env = open_env(self.path)
        self._db = open_db(self._env, DB_NAME)
        self._meta = open_db(self._env, META_DB)
        self._logins = open_db(self._env, LOGIN_DB)
        self._persisted: OrderedDict[tuple[str, str], float] = OrderedDict()  # pair -> wall time last written
        self._pending: dict[tuple[str, str], float] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._cache_key = secrets.token_bytes(32)
        # (username, keyed digest of password) -> (raw LMDB record it was checked against, role or None);
        # successes and failures in separate LRU tables so failures never evict a good login
        self._ok: OrderedDict[tuple[str, bytes], tuple[bytes, Role | None]] = OrderedDict()
        self._bad: OrderedDict[tuple[str, bytes], tuple[bytes, Role | None]] = OrderedDict()
        self._scrypt_slots: asyncio.Semaphore | None = None
        self.throttle = throttle if throttle is not None else AuthThrottle()

    # -- admin ---------------------------------------------------------------------------------------------

    def add(self, role: str, name: str, *, replace: bool = False) -> tuple[str, str]:
        """Create a credential and return ``(username, password)``; the password is not stored.

        Raises ValueError for a bad role/name, or if the name exists and ``replace`` is false.
        """
        username = username_for(role, name)
        key = username.encode()
        if not replace and self._get_raw(username) is not None:
            raise ValueError(f"credential {username!r} already exists (replace it to issue a new password)")
        password = secrets.token_urlsafe(24)
        salt = secrets.token_bytes(_SALT_LEN)
        rec = _Record(role=cast(Role, role), salt=salt, hash=_hash(password, salt),
                      n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, created=time.time())
        with self._env.begin(write=True, db=self._db) as txn:
            if not replace and txn.get(key) is not None:
                raise ValueError(f"credential {username!r} already exists (replace it to issue a new password)")
            txn.put(key, rec.encode())
            self._bump(txn)
        return username, password

    def list(self) -> list[CredInfo]:
        out: list[CredInfo] = []
        with self._env.begin(db=self._db) as txn:
            for key, raw in txn.cursor():
                rec = _Record.decode(bytes(raw))
                if rec is not None:
                    out.append(CredInfo(bytes(key).decode(), rec.role, rec.created))
        return out

    def get(self, username: str) -> CredInfo | None:
        raw = self._get_raw(username)
        rec = _Record.decode(raw) if raw is not None else None
        return CredInfo(username, rec.role, rec.created) if rec else None

    def revoke(self, name_or_username: str) -> bool:
        """Delete ``node.NAME``/``dev.NAME`` (or a plain NAME if only one of them exists); True if deleted.

        A plain NAME that exists as both a node and a device raises ValueError: pass the full username.
        """
        if not isinstance(name_or_username, str):
            raise ValueError(f"invalid credential name {name_or_username!r}")
        if role_of(name_or_username) is not None:
            candidates = [name_or_username]
        else:
            name = check_name(name_or_username)
            candidates = [prefix + name for prefix in PREFIXES.values()]
        with self._env.begin(write=True, db=self._db) as txn:
            found = [c for c in candidates if txn.get(c.encode()) is not None]
            if len(found) > 1:
                raise ValueError(f"{name_or_username!r} is ambiguous: both {' and '.join(found)} exist; "
                                 "revoke by full username")
            for c in found:
                txn.delete(c.encode())
            if found:
                self._bump(txn)
        return bool(found)

    def _bump(self, txn: lmdb.Transaction) -> None:
        raw = txn.get(GEN_KEY, db=self._meta)
        gen = int.from_bytes(raw, "big") if raw is not None else 0
        txn.put(GEN_KEY, (gen + 1).to_bytes(8, "big"), db=self._meta)

    # -- change detection (the broker's session sweep) -----------------------------------------------------

    def generation(self) -> int:
        """A counter bumped by every add, replace and revoke, in any process (one LMDB read)."""
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(GEN_KEY)
        return int.from_bytes(raw, "big") if raw is not None else 0

    def fingerprint(self, username: str) -> bytes | None:
        """A digest of ``username``'s stored record (changes when it is replaced), None if there is none."""
        raw = self._get_raw(username)
        return hashlib.sha256(raw).digest()[:16] if raw is not None else None

    def state(self, username: str) -> tuple[int, bytes | None]:
        """(:meth:`generation`, :meth:`fingerprint`) read in one transaction."""
        key = username.encode("utf-8", "replace")
        with self._env.begin(db=self._meta) as txn:
            gen = txn.get(GEN_KEY)
            raw = txn.get(key, db=self._db) if 0 < len(key) <= 511 else None
            fp = hashlib.sha256(bytes(raw)).digest()[:16] if raw is not None else None
        return (int.from_bytes(gen, "big") if gen is not None else 0), fp

    # -- recent successful logins (the throttle's exemption, persisted) ------------------------------------

    def load_recent_logins(self) -> int:
        """Feed the persisted successes younger than ``GOOD_TTL`` to :attr:`throttle`; prune the rest.
        Returns how many were loaded."""
        now = time.time()
        loaded = 0
        with self._env.begin(write=True, db=self._logins) as txn:
            for t, key in self._prune(txn, now):
                username, _, ip = key.decode("utf-8", "replace").partition(" ")
                self.throttle.remember(ip, username, now - t)
                self._mark_persisted((ip, username), t)
                loaded += 1
        return loaded

    def _mark_persisted(self, pair: tuple[str, str], t: float) -> None:
        self._persisted[pair] = t
        self._persisted.move_to_end(pair)
        while len(self._persisted) > LOGIN_MAX:
            self._persisted.popitem(last=False)

    def note_login(self, ip: str, username: str) -> None:
        """A successful login: persist (IP, username) unless it was written less than LOGIN_WRITE_EVERY s ago.
        Batched and written in a worker thread; the caller is not delayed (needs a running loop)."""
        if not ip or " " in ip or " " in username:
            return
        now = time.time()
        pair = (ip, username)
        last = self._persisted.get(pair)
        if last is not None and 0 <= now - last < LOGIN_WRITE_EVERY:
            return
        self._mark_persisted(pair, now)
        self._pending[pair] = now
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_logins())

    async def _flush_logins(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                await asyncio.to_thread(self._write_logins, batch)
            except Exception as exc:  # disk full ...: only the exemption after a restart is lost
                log.warning("could not persist %d recent logins: %s", len(batch), exc)

    async def flush_logins(self) -> None:
        """Wait until the successes noted so far are written."""
        task = self._flush_task
        if task is not None and not task.done():
            await asyncio.shield(task)

    def _write_logins(self, batch: dict[tuple[str, str], float]) -> None:
        with self._env.begin(write=True, db=self._logins) as txn:
            for (ip, username), t in batch.items():
                txn.put(f"{username} {ip}".encode(), struct.pack(">d", t))
            if txn.stat(self._logins)["entries"] > LOGIN_MAX:
                self._prune(txn, time.time())

    def _prune(self, txn: lmdb.Transaction, now: float) -> list[tuple[float, bytes]]:
        """Delete entries older than GOOD_TTL (or from the future) and the oldest beyond LOGIN_MAX; return the
        rest as (time, key), oldest first."""
        entries: list[tuple[float, bytes]] = []
        drop: list[bytes] = []
        for key, raw in txn.cursor(db=self._logins):
            t = struct.unpack(">d", bytes(raw))[0] if len(raw) == 8 else -1.0
            if 0 <= now - t < GOOD_TTL:
                entries.append((t, bytes(key)))
            else:
                drop.append(bytes(key))
        entries.sort()
        excess = max(0, len(entries) - LOGIN_MAX)
        drop.extend(key for _, key in entries[:excess])
        for key in drop:
            txn.delete(key, db=self._logins)
        return entries[excess:]

    # -- verification --------------------------------------------------------------------------------------

    def _get_raw(self, username: str) -> bytes | None:
        try:
            key = username.encode()
        except UnicodeEncodeError:
            return None
        if not key or len(key) > 511:  # LMDB max key size
            return None
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(key)
        return bytes(raw) if raw is not None else None

    def _mac(self, password: str) -> bytes:
        return hmac.new(self._cache_key, password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def _lookup(self, username: object, password: object) -> Role | None | _Job:
        """The answer if no hash is needed (cache hit, unknown user, malformed input), else a job for scrypt."""
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            return None
        if len(password) > _MAX_PASSWORD or role_of(username) is None:
            return None
        raw = self._get_raw(username)
        if raw is None:
            return None
        ck = (username, self._mac(password))
        for cache in (self._ok, self._bad):
            hit = cache.get(ck)
            if hit is not None:
                if hit[0] == raw:
                    cache.move_to_end(ck)
                    return hit[1]
                del cache[ck]  # checked against a replaced record
        rec = _Record.decode(raw)
        if rec is None:
            return None
        return _Job(ck, raw, rec)

    def _check(self, password: str, job: _Job) -> Role | None:
        ck, raw, rec = job.key, job.raw, job.rec
        try:
            dk = _hash(password, rec.salt, rec.n, rec.r, rec.p, len(rec.hash))
        except (ValueError, MemoryError):
            return None
        role = rec.role if hmac.compare_digest(dk, rec.hash) else None
        cache, limit = (self._ok, _CACHE_MAX) if role is not None else (self._bad, _FAIL_CACHE_MAX)
        cache[ck] = (raw, role)
        cache.move_to_end(ck)
        while len(cache) > limit:
            cache.popitem(last=False)
        return role

    def verify(self, username: str, password: str) -> Role | None:
        """The role of a valid ``username``/``password`` pair, else None (never raises for bad input)."""
        job = self._lookup(username, password)
        if not isinstance(job, _Job):
            return job
        return self._check(password, job)

    async def averify(self, username: str, password: str, ip: str = "") -> Role | None:
        """Like :meth:`verify`, but runs scrypt (~50-90 ms) in a worker thread, at most two at a time.

        A check that needs scrypt must first be admitted by :attr:`throttle` for (``ip``, ``username``);
        if not, :class:`core.guard.AuthUnavailable` is raised at once (the caller answers CONNACK 3).
        """
        job = self._lookup(username, password)
        if not isinstance(job, _Job):
            if job is not None:  # a cached success
                self.throttle.remember(ip, username)
                self.note_login(ip, username)
            return job
        charged = self.throttle.admit(ip, username)
        role: Role | None = None
        try:
            if self._scrypt_slots is None:
                self._scrypt_slots = asyncio.Semaphore(2)
            async with self._scrypt_slots:
                role = await asyncio.to_thread(self._check, password, job)
        finally:
            self.throttle.done(ip, username, ok=role is not None, charged=charged)
        if role is not None:
            self.note_login(ip, username)
        return role
