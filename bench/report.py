"""Self-contained HTML report for the bench suite's JSON results (stdlib only).

``render_html(results) -> str`` turns one results dict into one HTML5 page: inline CSS, inline SVG
charts drawn by ``bench/chart.py``, no JavaScript, no external URLs.
``write_report(results, path)`` writes that page as UTF-8. ``python -m bench.report RESULTS.json
[OUT.html]`` does the same from the command line.

The results schema (written by ``bench/suite.py``). **Every key is optional**: a missing scenario is shown
as "not run", a missing number as "—", a value of the wrong type is skipped; rendering never raises::

    {
     "suite": "claw-bench", "version": 1, "started": "2026-12-01T22:30:00Z", "elapsed_s": 123.4,
     "env": {"commit": "abc123", "dirty": false, "python": "3.11.2", "cpus": 2, "machine": "x86_64",
             "platform": "Linux-...", "loop": "uvloop"},
     "settings": {...a flat dict, shown as a key/value table...},
     "checks": [{"name": "added TTFT p99 at 100 streams", "target": "<= 20 ms", "value": 7.3,
                 "unit": "ms", "ok": true, "status": "pass", "detail": "optional text"}, ...],
                # ok null with status "not measured": the run had nothing to evaluate it on
     "vs_thin": {"measured": true, "cpu_ratio_max": 1.5, "knee_share_min": 0.7,
                 "knee": {"smartclaw": 200, "thin": 500, "share": 0.4, ...},
                 "cpu_per_chunk": {"streams": 200, "smartclaw_us": 250.0, "thin_us": 75.0, "ratio": 3.33,
                                   "carried_by_both": true, "levels": [{"streams": 1, ...}, ...]}},
                # or {"measured": false, "reason": "..."}
     "scenarios": {
       "latency": {"streams": 1,
                   "ours": {"first_delta_ms": STATS, "chunk_relay_ms": STATS},
                   "direct": {"ttft_ms": STATS},
                   "added_ttft_ms": {"p50": 4.1, "p99": 7.9},
                   "cdf": {"ours first delta": [[ms, fraction], ...], ...}},
       "sweep": {"broker": "amqtt", "knee": 500, "knee_rule": "p99 chunk relay > 100 ms",
                 "levels": [LEVEL, ...]},
       "brokers": {"amqtt": {"knee": 300, "levels": [LEVEL, ...]},
                   "mosquitto": {"knee": 700, "levels": [LEVEL, ...]}, "knee_ratio": 2.3},
       "direct": {"levels": [{"streams": 1, "ttft_ms": STATS}, ...]},
       "wecom": {"rate": 200, "ack_ms": STATS, "callbacks": 3300, "failures_total": 0, ...},
       "memory": {"ws": {"clients": 1000, "rss_before_mb": 80.1, "rss_after_mb": 120.3,
                         "kb_per_client": 41.2},
                  "mqtt": {...the same...}}
     }
    }

    STATS = {"n": 123, "min": 0.5, "p50": 1.2, "p90": 2.0, "p99": 3.4, "p999": 5.0, "max": 9.9,
             "mean": 1.4}                                                   # milliseconds
    LEVEL = {"streams": 100, "chunk_ms": STATS, "first_delta_ms": STATS, "added_ttft_ms": STATS,
             "direct_ttft_ms": STATS, "chunks_per_s": 1234.5, "asks": 300, "errors": 0,
             "rss_edge_mb": 150.2, "cpu": {"edge": 85.0, "node": 40.0, "llm": 20.0, "load": 60.0}}

Charts (drawn by ``bench/chart.py``): per-chunk relay latency vs concurrent streams (sweep and every broker,
p50 dashed, p99 solid, the knee rule as a dashed horizontal line, knees as vertical marks), added time to first
token vs streams, edge RSS and CPU vs streams, direct TTFT vs streams and the latency CDF. Scenarios not listed
above are shown generically.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chart import COLORS, Series, esc, line_chart, num

__all__ = ["render_html", "write_report", "main"]

TITLE_ZH = "智控未来 SmartClaw 基准测试报告"
STAT_KEYS = ("n", "min", "p50", "p90", "p99", "p999", "max", "mean")
_STAT_LABELS = {"p999": "p99.9"}
KNEE_RULE_MS = 100.0  # the knee rule's threshold when ``sweep.knee_rule`` does not name one
NOT_MEASURED = "not measured"  # a check's result when this run had nothing to evaluate it on

# scenario key -> heading; shown in this order, unknown scenarios after them
SCENARIOS = {
    "latency": "latency — one stream, through SmartClaw vs direct",
    "sweep": "sweep — concurrent streams through one broker",
    "brokers": "brokers — broker comparison",
    "direct": "direct — the LLM without the tunnel",
    "wecom": "wecom — WeCom callbacks",
    "memory": "memory — RSS per connected client",
    "floor": "floor — one loopback TCP hop with no SmartClaw code (the ceiling of the sweep)",
}
_CPU_ORDER = ("edge", "node", "llm", "load")


# ---------------------------------------------------------------- safe access and formatting

def _dict(x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def _list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else []


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def _json_text(x: Any, limit: int = 2000) -> str:
    try:
        text = json.dumps(x, ensure_ascii=False, default=str, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        text = str(x)
    return text if len(text) <= limit else text[:limit] + " …"


def _fmt(x: Any) -> str:
    """A cell's text: numbers compact, None as a dash, containers as JSON."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "∞" if x > 0 else "-∞"
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    if isinstance(x, str):
        return x
    return _json_text(x)


def _is_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (str, int, float, bool))


def _is_stats(x: Any) -> bool:
    return isinstance(x, Mapping) and any(k in x for k in STAT_KEYS)


# ---------------------------------------------------------------- tables

def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] = ()) -> str:
    """A table; ``rows`` hold cell HTML that is already escaped, ``headers`` plain text."""
    if not rows:
        return '<p class="nodata">no data</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if i < len(row_classes) and row_classes[i] else ""
        attr = f' class="{cls}"' if cls else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _kv_table(d: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    rows = [[esc(k), esc(_fmt(v))] for k, v in d.items() if k not in skip]
    return _table(("key", "value"), rows) if rows else ""


def _scalars(d: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """A key/value table of the scalar entries of ``d`` (the numbers a scenario reports directly)."""
    return _kv_table({k: v for k, v in d.items() if _is_scalar(v)}, skip)


def _stats_table(rows: Sequence[tuple[str, Any]], first: str = "ms") -> str:
    """One row per (label, STATS) whose STATS has any statistic; "" when none has."""
    rows = [(label, s) for label, s in rows if _is_stats(s)]
    if not rows:
        return ""
    headers = [first] + [_STAT_LABELS.get(k, k) for k in STAT_KEYS]
    cells = [[esc(label)] + [esc(_fmt(s.get(k))) for k in STAT_KEYS] for label, s in rows]
    return _table(headers, cells)


# ---------------------------------------------------------------- level groups (sweep + brokers)

@dataclass
class _Group:
    name: str
    levels: list[Mapping[str, Any]]
    knee: Any
    color: str


def _levels(x: Any) -> list[Mapping[str, Any]]:
    levels = [lv for lv in _list(x) if isinstance(lv, Mapping)]
    return sorted(levels, key=lambda lv: (num(lv.get("streams")) is None, num(lv.get("streams")) or 0.0))


def _groups(scen: Mapping[str, Any]) -> list[_Group]:
    """The level lists to plot against streams: the sweep's, then each broker's."""
    raw: list[tuple[str, Any]] = []
    sweep = _dict(scen.get("sweep"))
    if sweep:
        raw.append(("sweep", sweep))
    raw += [(str(k), v) for k, v in _dict(scen.get("brokers")).items() if isinstance(v, Mapping)]
    out = []
    for name, d in raw:
        levels = _levels(d.get("levels"))
        if levels:
            out.append(_Group(name, levels, d.get("knee"), COLORS[len(out) % len(COLORS)]))
    return out


def _points(levels: Sequence[Mapping[str, Any]], *path: str) -> list[tuple[Any, Any]]:
    return [(lv.get("streams"), _get(lv, *path)) for lv in levels]


def _prefix(group: _Group, groups: Sequence[_Group]) -> str:
    return "" if len(groups) == 1 else f"{group.name} "


def _knee_rule_ms(sweep: Mapping[str, Any]) -> float:
    rule = sweep.get("knee_rule")
    m = re.search(r">=?\s*(\d+(?:\.\d+)?)\s*ms", rule) if isinstance(rule, str) else None
    return float(m.group(1)) if m else KNEE_RULE_MS


def _relay_chart(groups: Sequence[_Group], rule_ms: float) -> str:
    series, vlines = [], []
    for g in groups:
        p = _prefix(g, groups)
        series.append(Series(f"{p}p50", _points(g.levels, "chunk_ms", "p50"), g.color, dashed=True))
        series.append(Series(f"{p}p99", _points(g.levels, "chunk_ms", "p99"), g.color))
        if num(g.knee) is not None:
            vlines.append((g.knee, f"{p}knee {_fmt(g.knee)}", g.color))
    return line_chart("per-chunk relay latency vs concurrent streams", series,
                       x_label="concurrent streams", y_label="ms",
                       hlines=[(rule_ms, f"knee rule {_fmt(rule_ms)} ms")], vlines=vlines)


def _ttft_metric(levels: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(level key, legend suffix): added_ttft_ms when any level has it, else first_delta_ms."""
    if any(_is_stats(lv.get("added_ttft_ms")) for lv in levels):
        return "added_ttft_ms", ""
    return "first_delta_ms", " (first delta)"


def _ttft_chart(groups: Sequence[_Group]) -> str:
    series = []
    for g in groups:
        key, suffix = _ttft_metric(g.levels)
        p = _prefix(g, groups)
        series.append(Series(f"{p}p50{suffix}", _points(g.levels, key, "p50"), g.color, dashed=True))
        series.append(Series(f"{p}p99{suffix}", _points(g.levels, key, "p99"), g.color))
    return line_chart("added time to first token vs streams", series,
                       x_label="concurrent streams", y_label="ms")


def _rss_chart(groups: Sequence[_Group]) -> str:
    series = [Series(g.name, _points(g.levels, "rss_edge_mb"), g.color) for g in groups]
    return line_chart("edge RSS vs streams", series, x_label="concurrent streams", y_label="MB", y_log=False)


def _cpu_keys(levels: Sequence[Mapping[str, Any]]) -> list[str]:
    seen = {str(k) for lv in levels for k in _dict(lv.get("cpu"))}
    return [k for k in _CPU_ORDER if k in seen] + sorted(seen - set(_CPU_ORDER))


def _cpu_chart(group: _Group, groups: Sequence[_Group]) -> str:
    """One process per series; one chart per group (sweep, each broker) keeps it readable."""
    series = [Series(key, _points(group.levels, "cpu", key), COLORS[i % len(COLORS)])
              for i, key in enumerate(_cpu_keys(group.levels))]
    title = "CPU vs streams" + ("" if len(groups) == 1 else f" — {group.name}")
    return line_chart(title, series, x_label="concurrent streams", y_label="CPU % of one core", y_log=False)


# ---------------------------------------------------------------- scenario sections

_LEVEL_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("streams", ("streams",)),
    ("chunk p50 ms", ("chunk_ms", "p50")), ("chunk p99 ms", ("chunk_ms", "p99")),
    ("first delta p50 ms", ("first_delta_ms", "p50")), ("first delta p99 ms", ("first_delta_ms", "p99")),
    ("added TTFT p50 ms", ("added_ttft_ms", "p50")), ("added TTFT p99 ms", ("added_ttft_ms", "p99")),
    ("direct TTFT p50 ms", ("direct_ttft_ms", "p50")), ("direct TTFT p99 ms", ("direct_ttft_ms", "p99")),
    ("chunks/s", ("chunks_per_s",)), ("delivered", ("delivered",)), ("asks", ("asks",)), ("errors", ("errors",)),
    ("edge RSS MB", ("rss_edge_mb",)),
    ("CPU edge %", ("cpu", "edge")), ("CPU relay %", ("cpu", "relay")), ("CPU node %", ("cpu", "node")),
    ("CPU llm %", ("cpu", "llm")), ("CPU load %", ("cpu", "load")),
)


def _levels_table(levels: Sequence[Mapping[str, Any]], knee: Any = None) -> str:
    """One row per level; columns no level has are left out; the knee's row and errors are marked."""
    cols = [(h, p) for h, p in _LEVEL_COLUMNS if p == ("streams",) or any(_get(lv, *p) is not None for lv in levels)]
    rows, classes = [], []
    for lv in levels:
        rows.append([esc(_fmt(_get(lv, *p))) for _, p in cols])
        errors = num(lv.get("errors"))
        at_knee = num(knee) is not None and num(lv.get("streams")) == num(knee)
        classes.append(" ".join(c for c, on in (("knee", at_knee), ("bad", bool(errors))) if on))
    return _table([h for h, _ in cols], rows, classes)


def _latency_body(d: Mapping[str, Any], scen: Mapping[str, Any]) -> str:
    stats = [("ours first delta", _get(d, "ours", "first_delta_ms")),
             ("ours chunk relay", _get(d, "ours", "chunk_relay_ms")),
             ("direct TTFT", _get(d, "direct", "ttft_ms")),
             ("added TTFT (ours − direct)", d.get("added_ttft_ms"))]
    known = {"first_delta_ms", "chunk_relay_ms", "ttft_ms"}
    for side in ("ours", "direct"):  # any further stats the module reports
        stats += [(f"{side} {k}", v) for k, v in _dict(d.get(side)).items() if k not in known]
    cdf = [Series(str(name), pts, COLORS[i % len(COLORS)]) for i, (name, pts) in enumerate(_dict(d.get("cdf")).items())]
    chart = line_chart("latency CDF", cdf, x_label="ms", y_label="fraction", y_log=False, y_span=(0.0, 1.0))
    return _scalars(d) + _stats_table(stats) + _figure(chart)


def _sweep_body(d: Mapping[str, Any], scen: Mapping[str, Any]) -> str:
    levels = _levels(d.get("levels"))
    return _scalars(d) + _levels_table(levels, d.get("knee"))


def _brokers_body(d: Mapping[str, Any], scen: Mapping[str, Any]) -> str:
    brokers = {str(k): v for k, v in d.items() if isinstance(v, Mapping)}
    summary = [[esc(name), esc(_fmt(b.get("knee"))), esc(str(len(_levels(b.get("levels")))))]
               for name, b in brokers.items()]
    out = [_scalars(d), _table(("broker", "knee (streams)", "levels"), summary)]
    for name, b in brokers.items():
        out.append(f"<h3>{esc(name)}</h3>" + _scalars(b) + _levels_table(_levels(b.get("levels")), b.get("knee")))
    return "".join(out)


def _direct_body(d: Mapping[str, Any], scen: Mapping[str, Any]) -> str:
    levels = _levels(d.get("levels"))
    rows = [(f"{_fmt(lv.get('streams'))} streams", lv.get("ttft_ms")) for lv in levels]
    series = [Series("p50", _points(levels, "ttft_ms", "p50"), COLORS[0], dashed=True),
              Series("p99", _points(levels, "ttft_ms", "p99"), COLORS[0])]
    chart = line_chart("direct time to first token vs streams", series, x_label="concurrent streams", y_label="ms")
    return _scalars(d) + _stats_table(rows, first="TTFT ms") + _figure(chart)


def _memory_body(d: Mapping[str, Any], scen: Mapping[str, Any]) -> str:
    keys = ("clients", "rss_before_mb", "rss_after_mb", "kb_per_client")
    rows = [[esc(name)] + [esc(_fmt(m.get(k))) for k in keys]
            for name, m in d.items() if isinstance(m, Mapping)]
    headers = ("transport", "clients", "RSS before MB", "RSS after MB", "KB per client")
    return _scalars(d) + _table(headers, rows)


def _floor_body(d: Mapping[str, Any], scen: Mapping[str, Any]) -> str:
    keys = ("streams", "msgs_per_s", "sender_us", "receiver_us", "hop_us", "ceiling_streams")
    rows = [[esc(_fmt(m.get(k))) for k in keys] for m in _levels(d.get("levels"))]
    headers = ("connections", "messages/s", "sender µs/msg", "receiver µs/msg", "one hop µs",
               "two-hop ceiling, streams")
    return _scalars(d) + _table(headers, rows)


def _generic_body(d: Mapping[str, Any], scen: Mapping[str, Any]) -> str:
    """Any scenario: its scalars, its STATS, and everything else as JSON."""
    stats = [(str(k), v) for k, v in d.items() if _is_stats(v)]
    rest = {k: v for k, v in d.items() if not _is_scalar(v) and not _is_stats(v)}
    return _scalars(d) + _stats_table(stats) + _kv_table(rest)


_BODIES: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], str]] = {
    "latency": _latency_body, "sweep": _sweep_body, "brokers": _brokers_body,
    "direct": _direct_body, "memory": _memory_body, "floor": _floor_body,
}


def _figure(svg: str) -> str:
    return f'<figure>{svg}</figure>'


def _section(sid: str, heading: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(heading)}</h2>{body}</section>'


def _scenario_section(name: str, value: Any, scen: Mapping[str, Any]) -> str:
    heading = SCENARIOS.get(name, name)
    if value is None:
        return _section(f"s-{name}", heading, '<p class="notrun">not run</p>')
    if not isinstance(value, Mapping):  # e.g. "skipped: no mosquitto"
        return _section(f"s-{name}", heading, f'<p class="notrun">not run: {esc(_fmt(value))}</p>')
    body = _BODIES.get(name, _generic_body)(value, scen)
    return _section(f"s-{name}", heading, body or '<p class="nodata">no data</p>')


def _charts_section(scen: Mapping[str, Any]) -> str:
    """The charts over concurrent streams (sweep + brokers); "" when neither has levels."""
    groups = _groups(scen)
    if not groups:
        return ""
    charts = [_relay_chart(groups, _knee_rule_ms(_dict(scen.get("sweep")))), _ttft_chart(groups),
              _rss_chart(groups)] + [_cpu_chart(g, groups) for g in groups]
    return _section("s-concurrency", "concurrency — sweep and brokers vs streams", "".join(map(_figure, charts)))


# ---------------------------------------------------------------- header, settings, checks

def _header(r: Mapping[str, Any]) -> str:
    env = dict(_dict(r.get("env")))
    commit = env.pop("commit", None)
    dirty = env.pop("dirty", None)
    meta = {"suite": r.get("suite"), "version": r.get("version"), "started": r.get("started"),
            "elapsed s": r.get("elapsed_s"),
            "commit": None if commit is None else f"{_fmt(commit)}{' (dirty)' if dirty is True else ''}"}
    meta.update({str(k): v for k, v in env.items()})
    meta = {k: v for k, v in meta.items() if v is not None}
    table = _kv_table(meta) or '<p class="nodata">no environment recorded</p>'
    return f'<header><h1>{esc(TITLE_ZH)}</h1><p class="sub">SmartClaw bench report</p>{table}</header>'


def _settings_section(settings: Any) -> str:
    d = _dict(settings)
    return _section("settings", "settings", _kv_table({str(k): v for k, v in d.items()})
                    or '<p class="nodata">no settings recorded</p>')


def _check_row(c: Mapping[str, Any]) -> tuple[list[str], str]:
    value, unit = c.get("value"), c.get("unit")
    measured = _fmt(value) + (f" {_fmt(unit)}" if unit is not None and value is not None else "")
    detail = c.get("detail")
    if isinstance(detail, str) and detail:
        measured += f" ({detail})"
    ok = c.get("ok")
    if ok is True:
        result, cls = "PASS", "pass"
    elif ok is False:
        result, cls = "FAIL", "fail"
    elif c.get("status") == NOT_MEASURED:
        result, cls = NOT_MEASURED, "notmeasured"
    else:
        result, cls = "—", ""
    cell = f'<span class="{cls}">{esc(result)}</span>' if cls else result
    return [esc(_fmt(c.get("name"))), esc(_fmt(c.get("target"))), esc(measured), cell], cls


def _checks_section(checks: Any) -> str:
    items = [c for c in _list(checks) if isinstance(c, Mapping)]
    if not items:
        return _section("checks", "checks", '<p class="notrun">no checks recorded</p>')
    rows = [_check_row(c) for c in items]
    passed = sum(1 for _, cls in rows if cls == "pass")
    failed = sum(1 for _, cls in rows if cls == "fail")
    unmeasured = sum(1 for _, cls in rows if cls == "notmeasured")
    summary = (f'<p class="summary"><span class="pass">{passed} passed</span>, '
               f'<span class="fail">{failed} failed</span>'
               + (f', <span class="notmeasured">{unmeasured} not measured</span>' if unmeasured else "")
               + f" of {len(rows)}</p>")
    row_classes = ["bad" if cls == "fail" else "" for _, cls in rows]
    table = _table(("check", "target", "measured", "result"), [r for r, _ in rows], row_classes)
    return _section("checks", "checks", summary + table)


def _vs_thin_section(v: Any) -> str:
    """SmartClaw against the thin relay of the same run (``vs_thin``); "" when the run has none."""
    d = _dict(v)
    if not d:
        return ""
    head = "SmartClaw vs the thin relay (same run)"
    if d.get("measured") is not True:
        reason = d.get("reason")
        text = NOT_MEASURED + (f": {_fmt(reason)}" if reason is not None else "")
        return _section("vs-thin", head, f'<p class="notrun">{esc(text)}</p>')
    knee, cpu = _dict(d.get("knee")), _dict(d.get("cpu_per_chunk"))
    summary = _kv_table({
        "knee, SmartClaw (amqtt) / thin relay (streams)": f"{_fmt(knee.get('smartclaw'))} / {_fmt(knee.get('thin'))}",
        "knee share (target >= " + _fmt(d.get("knee_share_min")) + ")": knee.get("share"),
        "CPU per chunk compared at (streams)": cpu.get("streams"),
        "… a level both carried": cpu.get("carried_by_both"),
        "CPU µs per delivered chunk, SmartClaw / thin relay":
            f"{_fmt(cpu.get('smartclaw_us'))} / {_fmt(cpu.get('thin_us'))}",
        "CPU ratio (target <= " + _fmt(d.get("cpu_ratio_max")) + ")": cpu.get("ratio"),
    })
    levels = [lv for lv in _list(cpu.get("levels")) if isinstance(lv, Mapping)]
    cols = (("streams", "streams"), ("smartclaw_us", "SmartClaw µs/chunk"), ("thin_us", "thin relay µs/chunk"),
            ("ratio", "ratio"), ("smartclaw_chars_per_chunk", "SmartClaw chars/chunk"),
            ("thin_chars_per_chunk", "thin chars/chunk"), ("carried_by_both", "carried by both"))
    rows = [[esc(_fmt(lv.get(k))) for k, _ in cols] for lv in levels]
    picked = num(cpu.get("streams"))
    classes = ["knee" if picked is not None and num(lv.get("streams")) == picked else "" for lv in levels]
    note = ('<p class="sub">CPU of the relay\'s own processes (SmartClaw: edge with its embedded broker + '
            'node; the thin relay: its one process) ÷ chunks delivered per second, at every level both '
            'sweeps measured; the highlighted row is the one the target is evaluated at.</p>')
    table = _table([h for _, h in cols], rows, classes) if rows else ""
    return _section("vs-thin", head, summary + note + table)


def _nav(scen: Mapping[str, Any], names: Sequence[str], vs_thin: bool = False) -> str:
    items = ['<li><a href="#vs-thin">vs the thin relay</a></li>'] if vs_thin else []
    for n in names:
        ran = isinstance(scen.get(n), Mapping)
        note = "" if ran else ' <span class="notrun">(not run)</span>'
        items.append(f'<li><a href="#s-{esc(n)}">{esc(n)}</a>{note}</li>')
        if n == "brokers" and _groups(scen):
            items.append('<li><a href="#s-concurrency">concurrency charts</a></li>')
    items.append('<li><a href="#settings">settings</a></li>')
    return f'<nav><ul><li><a href="#checks">checks</a></li>{"".join(items)}</ul></nav>'


# ---------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;
 margin:24px auto;max-width:1100px;padding:0 16px;color:#222;background:#fafafa}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px}.sub{color:#666;margin:0 0 12px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td{font-variant-numeric:tabular-nums;word-break:break-word}
.pass{color:#137333;font-weight:bold}.fail{color:#c5221f;font-weight:bold}.notmeasured{color:#888;font-style:italic}
tr.bad td{background:#fde8e7}tr.knee td{background:#fff4d6}
.notrun,.nodata{color:#888;font-style:italic}.error{color:#c5221f}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 16px;font-size:13px}
figure{margin:8px 0 16px;overflow-x:auto}svg.chart{background:#fff;border:1px solid #e5e5e5;max-width:100%;height:auto}
"""


def _safe(fn: Callable[..., str], *args: Any) -> str:
    """``fn(*args)``, or a one-line note if it fails: one odd value must not cost the whole report."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the report must never raise on bad data
        return f'<p class="error">could not render {esc(fn.__name__)}: {esc(type(exc).__name__)}</p>'


def render_html(results: dict[str, Any]) -> str:
    """The whole report as one self-contained HTML5 page (see the module docstring for the schema)."""
    r = _dict(results)
    scen = _dict(r.get("scenarios"))
    names = list(SCENARIOS) + [str(k) for k in scen if k not in SCENARIOS]
    body = [_safe(_header, r), _safe(_nav, scen, names, bool(_dict(r.get("vs_thin")))), _safe(_checks_section, r.get("checks")),
            _safe(_vs_thin_section, r.get("vs_thin"))]
    for name in names:
        body.append(_safe(_scenario_section, name, scen.get(name), scen))
        if name == "brokers":
            body.append(_safe(_charts_section, scen))
    body.append(_safe(_settings_section, r.get("settings")))
    return ('<!DOCTYPE html>\n<html lang="zh-CN">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{esc(TITLE_ZH)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n'
            + "\n".join(b for b in body if b) + "\n</body>\n</html>\n")


def write_report(results: dict[str, Any], path: str | Path) -> Path:
    """Write ``render_html(results)`` to ``path`` as UTF-8 (parent directories made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json [OUT.html]``: 0 written, 2 bad usage or unreadable JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        print("usage: python -m bench.report RESULTS.json [OUT.html]", file=sys.stderr)
        return 2
    src = Path(args[0])
    try:
        results = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"bench.report: cannot read {src}: {exc}", file=sys.stderr)
        return 2
    out = write_report(results, args[1] if len(args) == 2 else src.with_suffix(".html"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
