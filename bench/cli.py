"""``claw bench SCENARIO [options]``: the bench suite's entry point (see ``bench/README.md``).

The suite (``bench/suite.py`` runs the scenarios of ``bench/scenarios.py``, every part in its own process;
results as JSON + an HTML report):

* ``latency`` -- one user, ask → first delta and per-chunk relay, against the direct baseline;
* ``sweep`` -- 1 → 2000 concurrent streams, the knee where p99 per-chunk relay passes 100 ms (or less than
  90 % of the offered text arrives); ``--broker thin`` sweeps the thin relay (bench/thin.py) instead;
* ``brokers`` -- the sweep over the embedded amqtt, over Mosquitto and over the thin relay (bench/thin.py,
  the ceiling) in one run: the knee ratio and the two targets relative to the thin relay (CPU per chunk,
  knee share; ``bench.targets.vs_thin``);
* ``direct`` -- the client reads the fake LLM's SSE itself (the floor);
* ``memory`` -- server A's RSS per idle WebSocket client and per idle MQTT device;
* ``devices`` -- MQTT devices asking the node over the broker: a sweep of their own;
* ``floor`` -- what one loopback TCP hop costs this machine (CPU per message, no SmartClaw code): the
  ceiling the knee is measured against;
* ``wecom`` -- WeCom callbacks at a fixed rate (open loop) into the edge: acknowledgement latency,
  and exactly one delivered answer per message despite retries (``bench/wecom.py``);
* ``smoke`` -- CI: a few seconds of latency at 1 and 10 streams; fails only when ours/direct passes a
  large ratio (or an ask fails), never on an absolute time;
* ``all`` -- floor, latency, brokers, memory, wecom.

And ``tunnel``: the single-process tunnel latency table (per-stage breakdown, ``bench/tunnel.py``).

``main(argv) -> int``: 0 = ran (smoke: and passed), 1 = failed (or could not start), 2 = bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

SUITE = ("latency", "sweep", "brokers", "direct", "memory", "devices", "floor", "smoke", "all")
SCENARIOS = ("tunnel", "wecom", *SUITE)
ALL = ["floor", "latency", "brokers", "memory", "wecom"]

# per-scenario defaults of the tunnel options
_DEFAULTS: dict[str, dict[str, Any]] = {
    "tunnel": {"asks": 200, "concurrency": 1, "tokens": 50, "tps": 200.0, "warmup": 1},
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


def parse_levels(value: str) -> list[int]:
    """``--levels``: comma-separated stream counts, each >= 1, as a sorted list without repeats."""
    try:
        out = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {value!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("levels must be >= 1")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="claw bench", description="SmartClaw bench suite (see bench/README.md and docs/performance.md)",
        epilog="'claw bench SCENARIO --help' lists a scenario's options. Suite scenarios write "
               "bench-results/<time>-<scenario>/results.json and report.html and print the targets.")
    sub = p.add_subparsers(dest="scenario", metavar="SCENARIO", title="scenarios")
    for name, help_ in (("tunnel", "latency WebSocket → edge → broker → node → client, per ask and per chunk"),):
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
    helps = {"latency": "one user: first delta and chunk relay vs the direct baseline",
             "sweep": "concurrent streams 1 → 2000: the knee (p99 chunk relay <= 100 ms, >= 90 %% delivered)",
             "brokers": "the sweep over embedded amqtt, Mosquitto and the thin relay in one run: the ratio targets",
             "direct": "the client reads the fake LLM's SSE itself: the floor",
             "memory": "server A's RSS per idle WebSocket client and per idle MQTT device",
             "devices": "MQTT devices asking the node over the broker (the edge not on their path): a sweep",
             "floor": "what one loopback TCP hop costs this machine: the ceiling the knee is measured against",
             "smoke": "CI: a few seconds at 1 and 10 streams; fails only on a large ratio to direct",
             "all": "floor, latency, brokers, memory and wecom; one JSON + HTML report with every target"}
    for name in SUITE:
        # help= is %-formatted by argparse (hence "%%" in it), description= is not
        sp = sub.add_parser(name, help=helps[name], description=helps[name].replace("%%", "%"))
        sp.add_argument("--levels", type=parse_levels, default=None,
                        help="concurrent streams per level, e.g. 1,10,100 (default 1,10,50,100,200,500,1000,1500,2000)")
        sp.add_argument("--level-s", type=_non_negative, default=6.0, help="measured seconds per level (default %(default)s)")
        sp.add_argument("--warm-s", type=_non_negative, default=2.0, help="unmeasured seconds first (default %(default)s)")
        sp.add_argument("--tps", type=_non_negative, default=20.0, help="fake LLM tokens/s per stream (default %(default)s)")
        sp.add_argument("--tokens", type=_positive_int, default=40, help="tokens per answer (default %(default)s)")
        sp.add_argument("--token-chars", type=_positive_int, default=4, help="characters per token (default %(default)s)")
        sp.add_argument("--ttft", type=_non_negative, default=0.0, help="fake LLM time to first token, s (default 0)")
        sp.add_argument("--coalesce-ms", type=_non_negative, default=None, help="node.coalesce_ms (default: product's)")
        sp.add_argument("--batch-linger-ms", type=_non_negative, default=None,
                        help="node.batch_linger_ms (default: product's)")
        sp.add_argument("--broker", choices=["amqtt", "mosquitto", "thin"], default="amqtt",
                        help="for sweep (default amqtt; thin: the thin relay of bench/thin.py, no SmartClaw)")
        sp.add_argument("--keep-going", action="store_true", help="sweep: do not stop at the knee")
        sp.add_argument("--ws-idle", type=_positive_int, default=1000, help="memory: idle WebSockets (default 1000)")
        sp.add_argument("--mqtt-idle", type=_positive_int, default=200, help="memory: idle MQTT devices (default 200)")
        sp.add_argument("--out", metavar="DIR", default="bench-results",
                        help="write results.json and report.html into DIR/<time>-<scenario>/ (default %(default)s)")
        sp.add_argument("--json", metavar="PATH", default=None, help="also write the results JSON here ('-' = stdout)")
        sp.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
        sp.add_argument("--quiet", action="store_true", help="no progress on stderr")
        sp.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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
        from core.runtime import configure_logging
        configure_logging(args.log_level)

    if args.scenario in SUITE:
        return _suite(args)

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


def _suite(args: argparse.Namespace) -> int:
    import asyncio
    import time
    from pathlib import Path

    from .options import Options
    from .suite import run

    if args.broker == "thin" and args.scenario != "sweep":
        print(f"claw bench {args.scenario}: --broker thin is for sweep only (the thin relay is no broker; "
              "brokers and all sweep it anyway)", file=sys.stderr)
        return 2

    o = Options(tokens=args.tokens, tps=args.tps, token_chars=args.token_chars, ttft=args.ttft,
                coalesce_ms=args.coalesce_ms, batch_linger_ms=args.batch_linger_ms, level_s=args.level_s,
                warm_s=args.warm_s, stop_at_knee=not args.keep_going, broker=args.broker, loop=args.loop, progress=not args.quiet,
                log_level=args.log_level, ws_idle=args.ws_idle, mqtt_idle=args.mqtt_idle)
    if args.levels:
        o.levels = args.levels
    names = ALL if args.scenario == "all" else [args.scenario]
    try:
        results = asyncio.run(run(names, o))
    except (RuntimeError, OSError) as exc:
        print(f"claw bench {args.scenario}: could not run: {exc}", file=sys.stderr)
        return 1
    results["scenario"] = args.scenario
    out = Path(args.out) / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.scenario}"
    out.mkdir(parents=True, exist_ok=True)
    _write_json(results, str(out / "results.json"))
    _write_json(results, args.json)
    from .report import write_report

    write_report(results, out / "report.html")
    print(summary(results), flush=True)
    print(f"results: {out / 'results.json'}  report: {out / 'report.html'}", flush=True)
    if args.scenario == "smoke":
        return 0 if results["scenarios"]["smoke"]["ok"] else 1
    return 0


def summary(results: dict[str, Any]) -> str:
    """The text printed after a suite run: the commit, the machine, the run time and every target's verdict."""
    lines = [f"claw bench {results.get('scenario')}: commit {results['env'].get('commit')}"
             f"{' (dirty)' if results['env'].get('dirty') else ''}, {results['env'].get('cpus')} CPUs, "
             f"{results.get('elapsed_s')} s"]
    for c in results.get("checks", []):
        v = c.get("value")
        mark = "PASS" if c["ok"] is True else "MISS" if c["ok"] is False else "----"
        shown = "not measured" if c["ok"] is None and v is None else f"{v if v is not None else '-'} {c.get('unit', '')}"
        detail = f"; {c['detail']}" if c.get("detail") else ""
        lines.append(f"  [{mark}] {c['name']}: {shown.strip()} (target {c['target']}){detail}")
    sw = results["scenarios"].get("sweep") or {}
    if sw.get("broker") == "thin":  # the thin relay alone: its knee is the figure
        lines.append(f"  [INFO] thin relay (bench/thin.py, no SmartClaw) knee: {sw.get('knee') or '-'} streams")
    per_level = ((results.get("vs_thin") or {}).get("cpu_per_chunk") or {}).get("levels") or []
    if per_level:
        lines.append("  [INFO] CPU µs per delivered chunk, SmartClaw / thin relay: " + ", ".join(
            f"{lv['streams']}: {lv['smartclaw_us']} / {lv['thin_us']}"
            + (f" ({lv['ratio']:g}x)" if lv.get("ratio") is not None else "") for lv in per_level))
    sm = results["scenarios"].get("smoke")
    if sm:
        for v in sm["verdicts"]:
            lines.append(f"  [{'PASS' if v['ok'] else 'FAIL'}] smoke {v['streams']} streams: first delta / direct TTFT "
                         f"p50 = {v['first_delta_over_direct_p50']}x (fails above {sm['max_ratio']:g}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
