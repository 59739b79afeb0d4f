"""Config generator for running SmartClaw against an external Mosquitto 2.0 broker (instead of the embedded one).

``write_mosquitto_config(dir, port=..., cafile=..., certfile=..., keyfile=..., users=[(name, password, role)])``
writes three files into ``dir`` and returns the path of the first:

- ``mosquitto.conf`` — one TLS listener (no plain listener), no anonymous access, no persistence, retained
  messages off, TCP_NODELAY on, bounded packets and queues, client id forced to the username;
- ``passwd`` — ``user:$7$ITER$SALT$HASH`` lines (PBKDF2-HMAC-SHA512, the format ``mosquitto_passwd`` 2.0 writes;
  generated here, so the generator does not need ``mosquitto_passwd``);
- ``acl`` — the topic rules of the embedded broker (``broker/acl.py``, the topic table of docs/protocol.md) as an acl_file.

Roles (same as the embedded broker):

========  ===========================================  =================================================
role      username                                     acl_file lines
========  ===========================================  =================================================
edge      any name that is not a uid / node./dev. name ``user NAME`` + ``topic readwrite claw/v1/task/+``,
                                                       ``topic read claw/v1/reply/+``, ``topic read claw/v1/node/+``,
                                                       ``topic read claw/v1/batch/+``
node      ``node.<id>``                                ``user node.<id>`` + ``topic read claw/v1/task/+``,
                                                       ``topic write claw/v1/reply/+``, ``topic write claw/v1/node/<id>``,
                                                       ``topic write claw/v1/batch/<id>``
device    ``dev.<name>`` (= the device's uid)          no ``user`` block: only the two ``pattern`` lines
                                                       ``pattern write claw/v1/task/%u``, ``pattern read claw/v1/reply/%u``
========  ===========================================  =================================================

Pattern lines apply to *every* user. For an edge or node user they would grant ``claw/v1/task/<username>`` and
``claw/v1/reply/<username>``; those are not valid v1 topics (``edge``/``node.x`` are not uids, so every end drops
such messages), and the generator still writes ``topic deny`` lines for them in that user's block (mosquitto 2.0
checks a user's ``deny`` lines before any grant, patterns included), so the mosquitto ACL is exactly the embedded
one. Mosquitto's acl_file never refuses a SUBSCRIBE: it grants it and then delivers nothing the subscriber may
not read (docs/mosquitto.md).

CLI::

    python -m broker.mosquitto --dir /etc/mosquitto/claw --port 8883 --bind 0.0.0.0 --pki .claw/pki \\
        --user edge::edge --user node.b1::node --user dev.lamp::device

An empty password (``NAME::ROLE``) keeps that user's hash from an existing ``DIR/passwd`` (so users can be added
or removed by re-running the command with the same list) or, for a new user, generates one, printed once. Then run
``mosquitto -c DIR/mosquitto.conf``; after a change, ``kill -HUP`` it to reload ``passwd`` and ``acl``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from wire import BATCH_FILTER, NODE_FILTER, PREFIX, REPLY_FILTER, TASK_FILTER, is_node_id, is_uid

ROLES = ("edge", "node", "device")
NODE_USER_PREFIX = "node."
DEVICE_USER_PREFIX = "dev."
CONF_NAME, PASSWD_NAME, ACL_NAME = "mosquitto.conf", "passwd", "acl"
# mosquitto_passwd 2.0 defaults: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, 64-byte hash
PBKDF2_ITERATIONS = 101
SALT_LEN = 12
DEFAULT_MAX_PACKET = 1024 * 1024  # same as broker.max_packet

_USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_mosquitto(name: str = "mosquitto") -> str | None:
    """Path of the mosquitto binary (or ``mosquitto_passwd``): $PATH plus the sbin directories Debian uses."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    return shutil.which(name, path=path)


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """A Mosquitto 2.0 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_user(username: str, password: str | None, role: str) -> None:
    """Raise ValueError unless (username, password, role) is usable with the generated ACL.

    ``password`` None means "keep the hash already in the passwd file"."""
    if role not in ROLES:
        raise ValueError(f"user {username!r}: role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(username, str) or _USERNAME_RE.fullmatch(username) is None:
        raise ValueError(f"invalid username {username!r}: use 1-128 characters of A-Z a-z 0-9 _ . @ -")
    if password is not None:
        if not password or any(c in password for c in "\r\n\0"):
            raise ValueError(f"user {username!r}: password must be non-empty and single-line")
        if len(password.encode("utf-8")) > 256:
            raise ValueError(f"user {username!r}: password longer than 256 bytes")
    if role == "node":
        if not (username.startswith(NODE_USER_PREFIX) and is_node_id(username[len(NODE_USER_PREFIX):])):
            raise ValueError(f"node user {username!r} must be 'node.<id>' with <id> of [A-Za-z0-9_-], max 64")
    elif role == "device":
        if not (username.startswith(DEVICE_USER_PREFIX) and is_uid(username)):
            raise ValueError(f"device user {username!r} must be its uid 'dev.<name>' ([A-Za-z0-9_.@-], max 128)")
    else:  # edge: must not look like a node/device user, nor be a uid (the %u patterns must grant it nothing)
        if username.startswith((NODE_USER_PREFIX, DEVICE_USER_PREFIX)) or is_uid(username):
            raise ValueError(f"edge user {username!r} must not start with node./dev. nor be a uid like 'wc.x'")


User = tuple[str, str | None, str]  # (username, password or None = keep the existing hash, role)


def _check_users(users: Iterable[User]) -> list[User]:
    out, seen = [], set()
    for entry in users:
        if len(entry) != 3:
            raise ValueError(f"a user is (username, password, role), got {entry!r}")
        username, password, role = entry
        check_user(username, password, role)
        if username in seen:
            raise ValueError(f"user {username!r} given twice")
        seen.add(username)
        out.append((username, password, role))
    if not out:
        raise ValueError("no users: at least the edge and one node are needed")
    return out


def read_passwd(path: Path) -> dict[str, str]:
    """username -> hash from a Mosquitto password file ({} if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        username, sep, hashed = line.strip().partition(":")
        if sep and username and not username.startswith("#"):
            out[username] = hashed
    return out


def passwd_text(users: Iterable[User], *, iterations: int = PBKDF2_ITERATIONS,
                existing: dict[str, str] | None = None) -> str:
    lines = []
    for username, password, _ in _check_users(users):
        if password is None:
            hashed = (existing or {}).get(username)
            if not hashed:
                raise ValueError(f"user {username!r}: no password given and none in the existing passwd file")
        else:
            hashed = hash_password(password, iterations=iterations)
        lines.append(f"{username}:{hashed}\n")
    return "".join(lines)


def acl_text(users: Iterable[User]) -> str:
    """The acl_file equivalent of ``broker/acl.py`` for these users (devices need no entry at all)."""
    users = _check_users(users)
    task_p, reply_p = f"{PREFIX}/task/%u", f"{PREFIX}/reply/%u"
    lines = [
        "# SmartClaw topic ACL (generated by broker.mosquitto; mirrors broker/acl.py, the embedded broker's rules).",
        "# Anything not granted here is denied. acl_file never refuses a SUBSCRIBE: a client may subscribe",
        "# to anything, but only receives messages on topics it may read.",
        "",
        "# Devices (username = uid 'dev.<name>'): publish tasks for and read replies of their own uid only.",
        "# Patterns apply to every user; each edge/node block below denies its own two pattern topics.",
        f"pattern write {task_p}",
        f"pattern read {reply_p}",
    ]
    for username, _, role in users:
        if role == "device":
            continue
        own = [f"topic deny {PREFIX}/task/{username}", f"topic deny {PREFIX}/reply/{username}"]
        if role == "edge":
            grants = [f"topic readwrite {TASK_FILTER}", f"topic read {REPLY_FILTER}", f"topic read {NODE_FILTER}",
                      f"topic read {BATCH_FILTER}"]
            what = "edge: publishes tasks for any uid; reads replies and node beats"
        else:
            node_id = username[len(NODE_USER_PREFIX):]
            grants = [f"topic read {TASK_FILTER}", f"topic write {REPLY_FILTER}",
                      f"topic write {PREFIX}/node/{node_id}", f"topic write {PREFIX}/batch/{node_id}"]
            what = f"node {node_id}: reads tasks (also via $share/claw/...), writes replies and its own beats/will"
        lines += ["", f"# {what}", f"user {username}", *own, *grants]
    return "\n".join(lines) + "\n"


def conf_text(dir: Path, *, port: int, bind: str, cafile: str | Path, certfile: str | Path, keyfile: str | Path,
              max_packet: int = DEFAULT_MAX_PACKET, run_as: str | None = None, log_dest: str = "stderr") -> str:
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    if max_packet < 1024:
        raise ValueError("max_packet must be >= 1024")
    for name, value in (("bind", bind), ("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile),
                        ("run_as", run_as or ""), ("log_dest", log_dest)):
        if any(c in str(value) for c in "\r\n"):
            raise ValueError(f"{name} must be a single line")
    dir = dir.resolve()
    lines = [
        "# SmartClaw external broker (generated by broker.mosquitto; Mosquitto 2.0).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {dir / PASSWD_NAME}",
        f"acl_file {dir / ACL_NAME}",
        "",
        "# The ends keep the promises: no broker persistence, no retained messages.",
        "persistence false",
        "retain_available false",
        "",
        "# Limits: same packet bound as the embedded broker; bounded per-client queues.",
        f"max_packet_size {max_packet}",  # the whole packet; bigger ones close the connection (any MQTT version)
        "max_inflight_messages 100",
        "max_queued_messages 10000",
        f"max_queued_bytes {64 * 1024 * 1024}",
        "max_keepalive 3600",
        "",
        "# Nagle off on the broker side too (QoS 1 round trips otherwise stall on delayed ACKs: ~88 ms vs ~1 ms).",
        "set_tcp_nodelay true",
        "",
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if run_as:
        lines += ["", "# When started as root, run as this user (it must be able to read the files above).",
                  f"user {run_as}"]
    lines += [
        "",
        "# MQTT over TLS only (server certificate from our private CA; clients authenticate with a password).",
        f"listener {port} {bind}",
        "protocol mqtt",
        f"cafile {Path(cafile).resolve()}",
        f"certfile {Path(certfile).resolve()}",
        f"keyfile {Path(keyfile).resolve()}",
        "require_certificate false",
        "tls_version tlsv1.2",
        "# One connection per username: the client id is replaced by the username, so nobody can take",
        "# over (disconnect) another user's session by reusing its client id.",
        "use_username_as_clientid true",
    ]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_mosquitto_config(
    dir: Path,
    *,
    port: int,
    bind: str = "127.0.0.1",
    cafile: str | Path,
    certfile: str | Path,
    keyfile: str | Path,
    users: Sequence[User],
    max_packet: int = DEFAULT_MAX_PACKET,
    run_as: str | None = None,
    iterations: int = PBKDF2_ITERATIONS,
    log_dest: str = "stderr",
    group: str | None = None,
) -> Path:
    """Write ``mosquitto.conf``, ``passwd`` and ``acl`` into ``dir``; return the path of ``mosquitto.conf``.

    ``users`` are ``(username, password, role)`` with role ``edge``, ``node`` (``node.<id>``) or ``device``
    (``dev.<name>``); password None keeps the user's hash from an existing ``dir/passwd``. ``run_as`` sets mosquitto's ``user`` option (only matters when it is started as root:
    by default it then drops to ``mosquitto``, which must be able to read the files, the key included).
    ``group`` makes that group the owner group of ``passwd`` (mode 0640), e.g. ``mosquitto``.
    """
    dir = Path(dir)
    users = _check_users(users)
    conf = conf_text(dir, port=port, bind=bind, cafile=cafile, certfile=certfile, keyfile=keyfile,
                     max_packet=max_packet, run_as=run_as, log_dest=log_dest)
    acl = acl_text(users)
    passwd = passwd_text(users, iterations=iterations, existing=read_passwd(dir / PASSWD_NAME))
    dir.mkdir(parents=True, exist_ok=True)
    # The password file holds hashes only, the ACL no secrets; both must be readable by the broker's user.
    _write(dir / PASSWD_NAME, passwd, 0o640)
    _write(dir / ACL_NAME, acl, 0o644)
    _write(dir / CONF_NAME, conf, 0o644)
    if group:
        import grp

        os.chown(dir / PASSWD_NAME, -1, grp.getgrnam(group).gr_gid)
    return dir / CONF_NAME


def _default_group() -> str | None:
    """As root, the group mosquitto will run as (so it can read the 0640 passwd file), if that group exists."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import grp

    try:
        grp.getgrnam("mosquitto")
    except KeyError:
        return None
    return "mosquitto"


def _parse_user(spec: str, existing: dict[str, str]) -> tuple[str, str | None, str, bool]:
    """``USER:PASS:ROLE`` -> (user, password, role, generated). PASS may contain ':'. An empty PASS keeps the
    user's hash from ``existing`` (password None) or, for a new user, generates a password."""
    username, sep1, rest = spec.partition(":")
    password, sep2, role = rest.rpartition(":")
    if not sep1 or not sep2:
        raise ValueError(f"--user {spec!r}: want USER:PASS:ROLE (PASS may be empty: keep or generate)")
    if password:
        return username, password, role, False
    if username in existing:
        return username, None, role, False
    return username, secrets.token_urlsafe(24), role, True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m broker.mosquitto",
        description="Write mosquitto.conf, passwd and acl for running SmartClaw against Mosquitto 2.0.")
    p.add_argument("--dir", required=True, type=Path, help="directory to write the three files into")
    p.add_argument("--port", required=True, type=int, help="TLS listener port (e.g. 8883)")
    p.add_argument("--bind", default="127.0.0.1", help="listener address (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--pki", type=Path, help="directory with ca.crt, server.crt, server.key (e.g. .claw/pki)")
    p.add_argument("--cafile", type=Path)
    p.add_argument("--certfile", type=Path)
    p.add_argument("--keyfile", type=Path)
    p.add_argument("--user", action="append", default=[], metavar="USER:PASS:ROLE",
                   help="repeatable; ROLE edge|node|device; empty PASS keeps the user's current hash in "
                        "DIR/passwd, or generates a password for a new user (printed once)")
    p.add_argument("--max-packet", type=int, default=DEFAULT_MAX_PACKET, help="bytes (default 1 MiB)")
    p.add_argument("--run-as", help="mosquitto 'user' option (the account it drops to when started as root)")
    p.add_argument("--group", help="owner group for the passwd file (default as root: mosquitto, if it exists)")
    args = p.parse_args(argv)

    cafile = args.cafile or (args.pki / "ca.crt" if args.pki else None)
    certfile = args.certfile or (args.pki / "server.crt" if args.pki else None)
    keyfile = args.keyfile or (args.pki / "server.key" if args.pki else None)
    if not (cafile and certfile and keyfile):
        p.error("give --pki DIR or all of --cafile, --certfile, --keyfile")
    missing = [str(f) for f in (cafile, certfile, keyfile) if not Path(f).is_file()]
    if missing:
        p.error(f"not found: {', '.join(missing)}")
    try:
        existing = read_passwd(args.dir / PASSWD_NAME)
        parsed = [_parse_user(spec, existing) for spec in args.user]
        conf = write_mosquitto_config(args.dir, port=args.port, bind=args.bind, cafile=cafile, certfile=certfile,
                                      keyfile=keyfile, users=[(u, pw, r) for u, pw, r, _ in parsed],
                                      max_packet=args.max_packet, run_as=args.run_as,
                                      group=args.group or (None if args.run_as else _default_group()))
    except (ValueError, KeyError, OSError) as exc:
        p.error(str(exc))
    print(f"wrote {conf}, {conf.parent / PASSWD_NAME}, {conf.parent / ACL_NAME}")
    kept = [u for u, pw, _, _ in parsed if pw is None]
    if kept:
        print(f"  kept the current password of: {', '.join(kept)}")
    for username, password, role, generated in parsed:
        if generated and password:
            print(f"  {role:6} {username}  password: {password}   (shown once; only its hash is stored)")
    binary = find_mosquitto() or "mosquitto"
    print("run the broker with:")
    print(f"  {binary} -c {conf}")
    print("after a change while it runs, reload passwd and acl: kill -HUP <pid of mosquitto>")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and args.run_as != "root":
        print(f"note: started as root, mosquitto reads every file as user {args.run_as or 'mosquitto'}: that user "
              f"must be able to read {keyfile} and {conf.parent / PASSWD_NAME} (and enter their directories)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
