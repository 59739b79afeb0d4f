"""Client tokens: ``base64url(uid|expires).base64url(hmac_sha256)`` signed with the edge secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

import wire


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


class Tokens:
    def __init__(self, secret: bytes, ttl: int) -> None:
        self._key = hashlib.sha256(b"smartclaw-token\0" + secret).digest()
        self.ttl = ttl

    def issue(self, uid: str, now: float | None = None) -> tuple[str, int]:
        wire.check_uid(uid)
        expires = int((now or time.time()) + self.ttl)
        body = f"{uid}|{expires}".encode()
        sig = hmac.new(self._key, body, hashlib.sha256).digest()
        return f"{_b64(body)}.{_b64(sig)}", expires

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The uid the token was issued to, or None if it is forged, malformed or expired."""
        try:
            body_s, sig_s = token.split(".", 1)
            body, sig = _unb64(body_s), _unb64(sig_s)
        except (ValueError, AttributeError):
            return None
        if not hmac.compare_digest(hmac.new(self._key, body, hashlib.sha256).digest(), sig):
            return None
        try:
            uid, exp = body.decode().rsplit("|", 1)
            if int(exp) < (now or time.time()) or not wire.is_uid(uid):
                return None
        except ValueError:
            return None
        return uid
