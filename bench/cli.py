"""``claw bench SCENARIO [options]``: the bench suite's entry point (see ``bench/README.md``).

Scenarios:

* ``tunnel`` -- latency through the whole system (WebSocket → edge → broker → node → back) over
  many asks; prints a table, optionally writes JSON.
* ``smoke`` -- the same with a handful of asks: a quick check that the bench (and the system) works;
  exits non-zero only if an ask fails.
* ``wecom`` -- WeCom callbacks at a fixed rate (open loop) into the edge: acknowledgement latency,
  and exactly one delivered answer per message despite retries (``bench/wecom.py``).

``main(argv) -> int``: 0 = every ask answered correctly, 1 = some failed (or the run timed out or
could not start), 2 = bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

SCENARIOS = ("tunnel", "smoke", "wecom")

# per-scenario defaults (the options are the same)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "tunnel": {"asks": 200, "concurrency": 1, "tokens": 50, "tps": 200.0, "warmup": 1},
    "smoke": {"asks": 10, "concurrency": 2, "tokens": 20, "tps": 400.0, "warmup": 1},
}


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return n


def _non_negative(value: str) -> float:
    x = float(value)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return x


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="claw bench", description="SmartClaw bench suite (see bench/README.md)")
    sub = p.add_subparsers(dest="scenario", metavar="SCENARIO")
    for name, help_ in (("tunnel", "latency WebSocket → edge → broker → node → client, per ask and per chunk"),
                        ("smoke", "tunnel with a few asks; fails only if an ask fails")):
        d = _DEFAULTS[name]
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--asks", type=_positive_int, default=d["asks"], help="measured asks (default %(default)s)")
        sp.add_argument("--concurrency", type=_positive_int, default=d["concurrency"],
                        help="WebSocket clients asking at once (default %(default)s)")
        sp.add_argument("--tokens", type=_positive_int, default=d["tokens"],
                        help="tokens per fake answer (default %(default)s)")
        sp.add_argument("--tps", type=_non_negative, default=d["tps"],
                        help="fake LLM tokens/s, 0 = as fast as possible (default %(default)s)")
        sp.add_argument("--ttft", type=_non_negative, default=0.0,
                        help="fake LLM time to first token in seconds (default %(default)s)")
        sp.add_argument("--token-chars", type=_positive_int, default=4,
                        help="characters per fake token (default %(default)s)")
        sp.add_argument("--coalesce-ms", type=_non_negative, default=None,
                        help="node.coalesce_ms (default: the product default)")
        sp.add_argument("--node-slots", type=_positive_int, default=None,
                        help="node.concurrency (default: max(2, --concurrency), so nothing queues in the node)")
        sp.add_argument("--warmup", type=int, default=d["warmup"],
                        help="unmeasured asks per client first (default %(default)s)")
        sp.add_argument("--timeout", type=float, default=None,
                        help="seconds for the whole run (default: derived from the settings)")
        sp.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop (default %(default)s, as the product runs)")
        sp.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON ('-' = stdout)")
        sp.add_argument("--raw", action="store_true",
                        help="include every ask's raw timestamps (µs) in the JSON report")
        sp.add_argument("--quiet", action="store_true", help="no progress on stderr")
        sp.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of the system under test (default %(default)s)")
    w = sub.add_parser("wecom", help="WeCom callbacks/s into the edge: ack latency and exactly-once answers",
                       description="WeCom callbacks/s into the edge: ack latency and exactly-once answers")
    w.add_argument("--rate", type=_non_negative, default=200.0, help="messages per second (default %(default)s)")
    w.add_argument("--seconds", type=_non_negative, default=10.0, help="duration (default %(default)s)")
    w.add_argument("--users", type=_positive_int, default=200, help="distinct WeCom users (default %(default)s)")
    w.add_argument("--retry-share", type=_non_negative, default=0.1,
                   help="share of messages WeCom re-sends (default %(default)s)")
    w.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    w.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON ('-' = stdout)")
    w.add_argument("--quiet", action="store_true")
    w.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _write_json(report: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return int(exc.code or 0)
    if args.scenario is None:
        p.print_help(sys.stderr)
        return 2
    if not logging.getLogger().handlers:  # a CLI run; under pytest, leave its logging alone
        from claw.runtime import configure_logging
        configure_logging(args.log_level)

    if args.scenario == "wecom":
        from .wecom import WeComBenchConfig, format_wecom, run_wecom

        wcfg = WeComBenchConfig(rate=args.rate, seconds=args.seconds, users=args.users,
                                retry_share=min(1.0, args.retry_share), loop=args.loop, progress=not args.quiet)
        try:
            wreport = run_wecom(wcfg)
        except (RuntimeError, OSError, EOFError) as exc:
            print(f"claw bench wecom: could not run: {exc}", file=sys.stderr)
            return 1
        print(format_wecom(wreport), flush=True)
        _write_json(wreport, args.json)
        return 0 if wreport["failures_total"] == 0 else 1

    from .tunnel import TunnelConfig, format_table, run_tunnel

    cfg = TunnelConfig(asks=args.asks, concurrency=args.concurrency, tokens=args.tokens, tps=args.tps,
                       ttft=args.ttft, token_chars=args.token_chars, coalesce_ms=args.coalesce_ms,
                       node_slots=args.node_slots, warmup=max(0, args.warmup), timeout=args.timeout,
                       loop=args.loop, progress=not args.quiet, raw=args.raw)
    try:
        report = run_tunnel(cfg)
    except (RuntimeError, OSError) as exc:
        print(f"claw bench {args.scenario}: could not run: {exc}", file=sys.stderr)
        return 1
    report["scenario"] = args.scenario
    print(format_table(report), flush=True)
    _write_json(report, args.json)
    return 0 if report["failures_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
