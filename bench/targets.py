"""The knee rule and the project's targets, evaluated on measured rows and results (pure functions).

* the knee rule: :func:`past_knee` (one level's row fails it), :func:`knee_of` (the largest level before the
  first that fails it), :data:`KNEE_RULE` (its text in ``results.json``);
* :func:`vs_thin` -- SmartClaw against the thin relay swept in the same run (CPU per chunk, knee share);
* :func:`checks` -- every target with its value and pass / miss / not measured.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KNEE_MS", "KNEE_ERRORS", "KNEE_DELIVERED", "KNEE_RULE", "TARGET_STREAMS", "CPU_RATIO_MAX",
           "KNEE_SHARE_MIN", "NOT_MEASURED", "past_knee", "knee_of", "cpu_us_per_chunk", "compared_sweeps",
           "vs_thin", "checks"]

KNEE_MS = 100.0  # the knee rule: p99 per-chunk relay latency above this
KNEE_ERRORS = 0.01
# ... or less than this share of the offered text delivered in the window: a relay that cannot keep up with
# the fake LLM's pace makes its tokens late before they are stamped (in the fake LLM's and the relay's
# receive buffers), which the chunk latency does not see; the delivered share does.
KNEE_DELIVERED = 0.9
TARGET_STREAMS = 500  # the per-chunk relay target's level: a sweep that stops at its knee still measures it


def knee_of(rows: list[dict[str, Any]]) -> int | None:
    """The largest level before the first one past the knee rule (None if the first already is)."""
    knee = None
    for row in rows:
        if past_knee(row):
            break
        knee = row["streams"]
    return knee


def past_knee(row: dict[str, Any]) -> bool:
    p99 = row["chunk_ms"].get("p99")
    delivered = row.get("delivered")
    return (p99 is None or p99 != p99 or p99 > KNEE_MS
            or row["errors"] > KNEE_ERRORS * max(1, row["asks"]) or row["asks"] == 0
            or (delivered is not None and delivered < KNEE_DELIVERED))


KNEE_RULE = (f"largest level with p99 chunk relay <= {KNEE_MS:g} ms, < {KNEE_ERRORS:.0%} errors and "
             f">= {KNEE_DELIVERED:.0%} of the offered text delivered")


CPU_RATIO_MAX = 1.5  # SmartClaw's CPU per delivered chunk at most this many times the thin relay's ...
KNEE_SHARE_MIN = 0.7  # ... and its knee at least this share of the thin relay's, both in the same run
_INSTRUMENTS = ("llm", "load")  # processes in a level's ``cpu`` that are not the system under test
NOT_MEASURED = "not measured"


def cpu_us_per_chunk(row: dict[str, Any]) -> float | None:
    """CPU of the relay's own processes (every one in the level's ``cpu`` but the fake LLM and the load
    generator: edge with its embedded broker + node for SmartClaw, ``relay`` for the thin relay), in µs per
    chunk delivered to the clients: their mean CPU over the level ÷ the level's chunks/s. None if unknown."""
    cpu = row.get("cpu") or {}
    own = [v for k, v in cpu.items() if k not in _INSTRUMENTS and isinstance(v, (int, float))]
    cps = row.get("chunks_per_s")
    if not own or not isinstance(cps, (int, float)) or cps <= 0:
        return None
    return round(sum(own) / 100 / cps * 1e6, 1)


def _chars_per_chunk(row: dict[str, Any]) -> float | None:
    cps, chars = row.get("chunks_per_s"), row.get("chars_per_s")
    return round(chars / cps, 2) if isinstance(chars, (int, float)) and cps else None


def compared_sweeps(results: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(SmartClaw's sweep over the embedded amqtt, the thin relay's sweep) of this run; None where not run."""
    sc = results.get("scenarios") or {}
    br = sc.get("brokers") or {}
    sw = sc.get("sweep") or None
    ours = br.get("amqtt") or (sw if sw and sw.get("broker", "amqtt") == "amqtt" else None)
    thin = br.get("thin") or (sw if sw and sw.get("broker") == "thin" else None)
    return ours, thin


def vs_thin(ours: dict[str, Any] | None, thin: dict[str, Any] | None) -> dict[str, Any]:
    """SmartClaw (its amqtt sweep) against the thin relay swept in the same run: the two ratio targets.

    * **CPU per chunk**: :func:`cpu_us_per_chunk` of both at one level, the highest level both sweeps
      measured and both carried (at or below both knees): past a knee the machine is saturated and the CPU
      per chunk measures the saturation, not the relay. If no level was carried by both (SmartClaw's first
      level already past its knee), the lowest level both measured, flagged ``carried_by_both: false``.
      ``levels`` has the ratio at every level both measured.
    * **knee share**: SmartClaw's knee ÷ the thin relay's (a SmartClaw sweep with no knee counts 0).

    ``measured`` is False (and both targets "not measured") when either sweep is missing."""
    out: dict[str, Any] = {"measured": bool(ours and thin), "cpu_ratio_max": CPU_RATIO_MAX,
                           "knee_share_min": KNEE_SHARE_MIN}
    if not (ours and thin):
        out["reason"] = ("the thin relay was not swept in this run (claw bench brokers or all sweeps it)"
                         if ours else "SmartClaw over the embedded amqtt was not swept in this run")
        return out
    k_ours, k_thin = ours.get("knee"), thin.get("knee")
    share = round((k_ours or 0) / k_thin, 2) if k_thin else None
    out["knee"] = {"smartclaw": k_ours, "thin": k_thin, "share": share,
                   "smartclaw_exceeded": ours.get("knee_exceeded", True),
                   "thin_exceeded": thin.get("knee_exceeded", True)}
    rows_o = {r["streams"]: r for r in ours.get("levels") or []}
    rows_t = {r["streams"]: r for r in thin.get("levels") or []}
    levels = []
    for n in sorted(set(rows_o) & set(rows_t)):
        a, b = cpu_us_per_chunk(rows_o[n]), cpu_us_per_chunk(rows_t[n])
        levels.append({"streams": n, "smartclaw_us": a, "thin_us": b,
                       "ratio": round(a / b, 2) if a is not None and b else None,
                       "smartclaw_chars_per_chunk": _chars_per_chunk(rows_o[n]),
                       "thin_chars_per_chunk": _chars_per_chunk(rows_t[n]),
                       "carried_by_both": not past_knee(rows_o[n]) and not past_knee(rows_t[n])
                       and n <= (k_ours or 0) and n <= (k_thin or 0)})
    usable = [lv for lv in levels if lv["ratio"] is not None]
    carried = [lv for lv in usable if lv["carried_by_both"]]
    pick = carried[-1] if carried else (usable[0] if usable else None)
    out["cpu_per_chunk"] = {**(pick or {"streams": None, "smartclaw_us": None, "thin_us": None, "ratio": None,
                                        "carried_by_both": False}),
                            "levels": levels}
    return out


def _ratio_checks(v: dict[str, Any]) -> list[dict[str, Any]]:
    """The two targets relative to the thin relay; ``ok`` None ("not measured") without a thin relay sweep."""
    cpu_name = "CPU per chunk vs the thin relay (same run)"
    knee_name = "knee vs the thin relay's (same run)"
    cpu_target, knee_target = f"<= {CPU_RATIO_MAX:g}x", f">= {KNEE_SHARE_MIN:.0%} of it"
    if not v.get("measured"):
        note = v.get("reason", "")
        return [{"name": cpu_name, "target": cpu_target, "value": None, "unit": "x", "ok": None,
                 "status": NOT_MEASURED, "detail": note},
                {"name": knee_name, "target": knee_target, "value": None, "unit": "x", "ok": None,
                 "status": NOT_MEASURED, "detail": note}]
    c, k = v["cpu_per_chunk"], v["knee"]
    out = []
    if c["ratio"] is None:
        out.append({"name": cpu_name, "target": cpu_target, "value": None, "unit": "x", "ok": None,
                    "status": NOT_MEASURED, "detail": "no level with CPU and chunks/s in both sweeps"})
    else:
        detail = (f"at {c['streams']} streams: SmartClaw edge+broker+node {c['smartclaw_us']:g} µs, "
                  f"thin relay {c['thin_us']:g} µs of CPU per delivered chunk")
        if not c["carried_by_both"]:
            detail += " (no level was carried by both: the lowest level both measured)"
        out.append({"name": cpu_name, "target": cpu_target, "value": c["ratio"], "unit": "x",
                    "ok": c["ratio"] <= CPU_RATIO_MAX, "status": "", "detail": detail})
    if k["share"] is None:
        out.append({"name": knee_name, "target": knee_target, "value": None, "unit": "x", "ok": None,
                    "status": NOT_MEASURED, "detail": "the thin relay had no knee (its first level was past it)"})
    else:
        detail = f"SmartClaw {k['smartclaw'] or 'none'} / thin relay {k['thin']} streams"
        if not k["thin_exceeded"]:
            detail += "; the thin relay's sweep ended before its knee (its knee is at least that)"
        if not k["smartclaw_exceeded"]:
            detail += "; SmartClaw's sweep ended before its knee (its knee is at least that)"
        out.append({"name": knee_name, "target": knee_target, "value": k["share"], "unit": "x",
                    "ok": k["share"] >= KNEE_SHARE_MIN, "status": "", "detail": detail})
    for c_ in out:
        c_["status"] = c_["status"] or ("pass" if c_["ok"] else "miss")
    return out


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's targets, evaluated on what this run measured (absent scenarios are skipped; the two
    targets relative to the thin relay are "not measured", ``ok`` None, when a SmartClaw sweep ran without
    the thin relay's)."""
    out: list[dict[str, Any]] = []
    sc = results.get("scenarios", {})
    sw = sc.get("sweep") or (sc.get("brokers") or {}).get("amqtt")
    if sw and sw.get("broker") == "thin":
        sw = None  # the thin relay is the ceiling SmartClaw is compared with, not SmartClaw
    if sw:
        rows = {r["streams"]: r for r in sw["levels"]}
        r100 = rows.get(100)
        if r100 and r100.get("added_ttft_ms"):
            for q, lim in (("p50", 5.0), ("p99", 20.0)):
                v = r100["added_ttft_ms"].get(q)
                out.append({"name": f"added TTFT {q} at 100 streams", "target": f"<= {lim:g} ms", "value": v,
                            "unit": "ms", "ok": v is not None and v <= lim})
        r500 = rows.get(500)
        v = r500["chunk_ms"].get("p99") if r500 else None
        out.append({"name": "per-chunk relay p99 at 500 streams", "target": "<= 25 ms", "value": v, "unit": "ms",
                    "ok": v is not None and v <= 25})
        out.extend(_ratio_checks(vs_thin(*compared_sweeps(results))))
        rss = max((r.get("rss_edge_mb", 0) for r in sw["levels"] if r["streams"] <= (sw.get("knee") or 0)),
                  default=None)
        out.append({"name": "edge+broker RSS up to the knee", "target": "< 1024 MB", "value": rss, "unit": "MB",
                    "ok": rss is not None and rss < 1024})
    br = sc.get("brokers")
    if br and br.get("knee_ratio") is not None:
        out.append({"name": "amqtt knee within 2x of Mosquitto's", "target": "mosquitto/amqtt <= 2",
                    "value": br["knee_ratio"], "unit": "x", "ok": br["knee_ratio"] <= 2})
    wc = sc.get("wecom")
    if wc:
        v = (wc.get("ack_ms") or {}).get("p99")
        out.append({"name": "WeCom ack p99 at ~200/s", "target": "<= 50 ms", "value": v, "unit": "ms",
                    "ok": v is not None and v <= 50})
    for c in out:
        if isinstance(c.get("value"), float):
            c["value"] = round(c["value"], 3)
        c.setdefault("status", "pass" if c["ok"] else "miss")
    return out
