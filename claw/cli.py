"""The ``claw`` command: demo, edge, node, chat, cred, token, init, bench."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from core.config import ConfigError, Settings, load_settings

log = logging.getLogger("claw")


def _hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {value!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="claw", description="SmartClaw 智控未来: private LLM assistant over MQTT")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run edge + embedded broker + node on this machine")
    d.add_argument("--http", type=_hostport, default="127.0.0.1:8080", help="edge HTTP address (default %(default)s)")
    d.add_argument("--mqtt", type=_hostport, default="127.0.0.1:8883",
                   help="broker MQTT-over-TLS address (default %(default)s)")
    d.add_argument("--data", default=".claw", help="data directory (default %(default)s)")
    d.add_argument("--llm", default="http://127.0.0.1:1234/v1",
                   help="LM Studio base URL (default %(default)s); the demo model is used if it does not answer")
    d.add_argument("--config", help="optional TOML (e.g. a [wecom] section) merged under the demo settings")

    for name, what in (("edge", "server A: edge + embedded broker"), ("node", "server B: the worker")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("--config", required=False, help="TOML config file")

    c = sub.add_parser("chat", help="terminal chat client (streams answers; Ctrl-C stops an answer)")
    c.add_argument("--url", default="http://127.0.0.1:8080", help="edge base URL (default %(default)s)")
    c.add_argument("--token-file", metavar="FILE",
                   help="sign in with the personal token in FILE (claw token issue); default: env CLAW_TOKEN, "
                        "else dev login")
    c.add_argument("--user", default=None,
                   help="dev-login name (uid web.NAME; default: your OS user name); ignored with a token")
    c.add_argument("--cafile", metavar="FILE", help="trust the HTTPS certificates of this CA (a private CA)")
    c.add_argument("--reconnect-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up when the edge has been unreachable this long after a disconnect (default %(default)g)")
    c.add_argument("question", nargs="*", help="ask this once and exit (default: interactive)")

    cr = sub.add_parser("cred", help="broker credentials (usable while the edge runs)")
    crs = cr.add_subparsers(dest="cred_cmd", required=True, metavar="ACTION")
    add = crs.add_parser("add", help="create a credential and print its password once")
    add.add_argument("role", choices=["node", "device"])
    add.add_argument("name")
    add.add_argument("--replace", action="store_true", help="replace an existing credential of that name")
    crs.add_parser("list", help="list credentials")
    rv = crs.add_parser("revoke", help="revoke a credential (next CONNECT is refused)")
    rv.add_argument("name")
    for sp in (add, crs.choices["list"], rv):
        sp.add_argument("--data", help="data directory of server A (default: from --config or .claw)")
        sp.add_argument("--config", help="a.toml of server A")

    tk = sub.add_parser("token", help="client tokens and sessions (usable while the edge runs)")
    tks = tk.add_subparsers(dest="token_cmd", required=True, metavar="ACTION")
    tis = tks.add_parser("issue", help="issue a personal token (claw chat, scripts) and print it once")
    tis.add_argument("uid", help="the user id it signs in as, usually web.NAME")
    tis.add_argument("--days", type=int, default=30, help="lifetime in days, 1..3650 (default %(default)s)")
    tis.add_argument("--note", default="", help="a note shown by claw token list (e.g. whose laptop)")
    tls = tks.add_parser("list", help="list personal tokens (never the tokens themselves)")
    tls.add_argument("uid", nargs="?", help="only this user's")
    trv = tks.add_parser("revoke", help="revoke a user's (or everybody's) access tokens, sessions and personal "
                                        "tokens, or one personal token")
    who = trv.add_mutually_exclusive_group(required=True)
    who.add_argument("uid", nargs="?", help="the user id, e.g. web.alice or wc.zhangsan")
    who.add_argument("--all", action="store_true", help="every user")
    who.add_argument("--pat", metavar="ID", help="one personal token (its id from claw token list)")
    for sp in (tis, tls, trv):
        sp.add_argument("--data", help="data directory of server A (default: from --config or .claw)")
        sp.add_argument("--config", help="a.toml of server A")

    i = sub.add_parser("init", help="write commented a.toml and b.toml, the CA, the broker certificate and a node credential")
    i.add_argument("--public-host", required=True, action="append",
                   help="server A's public DNS name or IP as nodes will dial it (repeatable)")
    i.add_argument("--dir", default="claw-deploy", help="output directory (default %(default)s)")
    i.add_argument("--node", default="b1", help="node name (default %(default)s)")
    i.add_argument("--force", action="store_true", help="overwrite existing files")

    b = sub.add_parser("bench", help="the bench suite (see bench/README.md)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # all of it, --help included, is bench.cli's (it lists the scenarios)
        from bench.cli import main as bench_main
        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    from core.runtime import configure_logging

    try:
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(args)
        if args.cmd in ("edge", "node"):
            settings = load_settings(args.config)
            configure_logging(args.log_level or settings.log.level)
            return _serve(args.cmd, settings)
        tool = {"chat": _chat, "cred": _cred, "token": _token}.get(args.cmd)
        if tool is not None:  # the client tools: quiet unless asked
            configure_logging(args.log_level or "WARNING")
            return tool(args)
        if args.cmd == "init":
            configure_logging(args.log_level or "INFO")
            from .init import run_init
            return run_init(args)
        if args.cmd == "bench":
            from bench.cli import main as bench_main
            return bench_main(args.args)  # (not reached from main(): "bench" is dispatched above)
    except ConfigError as exc:
        print(f"配置错误 / config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(which: str, settings: Settings) -> int:
    from core.runtime import run, stop_event

    async def go() -> None:
        stop = stop_event()
        if which == "edge":
            from edge.app import serve
        else:
            from node.app import serve
        await serve(settings, stop)

    try:
        run(go)
    except (RuntimeError, ValueError, OSError) as exc:
        log.error("%s failed to start: %s", which, exc)
        return 1
    return 0


def _cred(args: Any) -> int:
    from broker.creds import CredentialStore

    data = args.data or (load_settings(args.config).data_dir if args.config else load_settings().data_dir)
    store = CredentialStore(data)
    if args.cred_cmd == "add":
        try:
            username, password = store.add(args.role, args.name, replace=args.replace)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"role:     {args.role}\nusername: {username}\npassword: {password}")
        print("(the password is shown only once; only its hash is stored)", file=sys.stderr)
        return 0
    if args.cred_cmd == "list":
        rows = store.list()
        if not rows:
            print("(no credentials)")
        for c in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created))
            print(f"{c.username:40s} {c.role:7s} created {created}")
        return 0
    if store.revoke(args.name):
        print(f"revoked {args.name}")
        return 0
    print(f"no such credential: {args.name}", file=sys.stderr)
    return 1


def _chat(args: Any) -> int:
    import os

    from .chat import default_user, run_chat

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"无法读取令牌文件 / cannot read the token file {args.token_file}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        if not token:
            print(f"令牌文件为空 / the token file {args.token_file} is empty", file=sys.stderr)
            return 2
    elif os.environ.get("CLAW_TOKEN", "").strip():
        token = os.environ["CLAW_TOKEN"].strip()
    user = args.user or default_user()
    if token is None and not user:
        print("请用 --user NAME 指定开发登录的名字 / give a name with --user NAME", file=sys.stderr)
        return 2
    if args.cafile and not Path(args.cafile).is_file():
        print(f"找不到 CA 证书文件 / no such CA file: {args.cafile}", file=sys.stderr)
        return 2
    # A question given but empty (claw chat "") is refused by run_chat, not taken for interactive mode.
    return run_chat(args.url, user or "", " ".join(args.question) if args.question else None,
                    reconnect_timeout=args.reconnect_timeout, pat=token, cafile=args.cafile)


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "never"


def _token(args: Any) -> int:
    import wire
    from edge.auth import ENV_DIR, PAT_MAX_DAYS, Revocations, is_pat_id

    uid = getattr(args, "uid", None)
    if uid is not None and not wire.is_uid(uid):
        print(f"error: not a user id: {uid!r} (e.g. web.alice)", file=sys.stderr)
        return 2
    if args.token_cmd == "issue" and not 1 <= args.days <= PAT_MAX_DAYS:
        print(f"error: --days must be 1..{PAT_MAX_DAYS}", file=sys.stderr)
        return 2
    if args.token_cmd == "revoke" and args.pat is not None and not is_pat_id(args.pat):
        print(f"error: not a personal token id: {args.pat!r} (16 hex digits, see claw token list)", file=sys.stderr)
        return 2
    data = args.data or (load_settings(args.config).data_dir if args.config else load_settings().data_dir)
    fresh = not (Path(data) / ENV_DIR).exists()
    rev = Revocations(data)
    if args.token_cmd == "issue":
        if fresh:
            print(f"note: {Path(data) / ENV_DIR} did not exist and was created: is {data} the data directory of "
                  "the running edge (--config a.toml / --data)? Otherwise the token will not work there.",
                  file=sys.stderr)
        token, rec = rev.issue_pat(uid, args.days, args.note)
        print(token)  # stdout holds the token alone: claw token issue web.alice > alice.token
        print(f"personal token {rec.id} for {rec.uid}, expires {_when(rec.expires)}. It is shown only this once "
              "(only its SHA-256 is stored). Use it with: claw chat --url https://A --token-file FILE "
              "(or env CLAW_TOKEN)", file=sys.stderr)
        return 0
    if args.token_cmd == "list":
        rows = rev.list_pats(uid)
        if not rows:
            print("(no personal tokens)")
            return 0
        now = time.time()
        print(f"{'id':16s}  {'uid':32s}  {'created':16s}  {'expires':18s}  {'last used':16s}  note")
        for r in rows:
            expires = _when(r.expires) + (" (expired)" if r.expires < now else "")
            print(f"{r.id:16s}  {r.uid:32s}  {_when(r.created):16s}  {expires:18s}  {_when(r.last_used):16s}  {r.note}")
        return 0
    if args.pat is not None:
        got = rev.revoke_pat(args.pat)
        if got is None:
            print(f"no such personal token: {args.pat}", file=sys.stderr)
            return 1
        print(f"revoked personal token {got.id} of {got.uid} and the sessions signed in with it; its open "
              "WebSockets close within 10 s")
        return 0
    pats = len(rev.list_pats(None if args.all else uid))
    value = rev.revoke(None if args.all else uid)
    who = "every user" if args.all else uid
    print(f"revoked the tokens, sessions and {pats} personal token(s) of {who} (generation {value}); open "
          "WebSockets close within 10 s, the next request needs a new login")
    return 0


if __name__ == "__main__":
    sys.exit(main())
