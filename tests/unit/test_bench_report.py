"""``bench.report``: the HTML report renders any results dict, escapes what it shows, and its SVG parses."""

from __future__ import annotations

import copy
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.chart import log_ticks
from bench.report import TITLE_ZH, main, render_html, write_report

EVIL = "<script>alert(1)</script>"
_SVG = re.compile(r"<svg\b.*?</svg>", re.S)
_COORDS = ("x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "width", "height")


def _stats(p50: float, scale: float = 1.0) -> dict[str, float]:
    return {"n": 100, "min": p50 / 2, "p50": p50, "p90": p50 * 1.5 * scale, "p99": p50 * 2 * scale,
            "p999": p50 * 3 * scale, "max": p50 * 4 * scale, "mean": p50 * 1.1}


def _level(streams: int, chunk_p50: float) -> dict[str, Any]:
    return {"streams": streams, "chunk_ms": _stats(chunk_p50), "first_delta_ms": _stats(chunk_p50 + 3),
            "added_ttft_ms": _stats(chunk_p50 + 1), "direct_ttft_ms": _stats(2.0),
            "chunks_per_s": 1234.5 * streams, "asks": 3 * streams, "errors": 0,
            "rss_edge_mb": 100 + streams / 10,
            "cpu": {"edge": min(99.0, streams / 5), "node": 40.0, "llm": 20.0, "load": 60.0}}


def _cdf(scale: float) -> list[list[float]]:
    return [[scale * (1 + i / 10), (i + 1) / 50] for i in range(50)]


def _sample() -> dict[str, Any]:
    return {
        "suite": "claw-bench", "version": 1, "started": "2026-12-01T22:30:00Z", "elapsed_s": 123.4,
        "env": {"commit": "abc123", "dirty": False, "python": "3.11.2", "cpus": 2, "machine": "x86_64",
                "platform": "Linux-6.1-x86_64", "loop": "uvloop"},
        "settings": {"tokens": 50, "tps": 200.0, "levels": "1,10,100,1000"},
        "checks": [
            {"name": "added TTFT p99 at 100 streams", "target": "<= 20 ms", "value": 7.3, "unit": "ms", "ok": True},
            {"name": "knee at least 500 streams", "target": ">= 500", "value": 300, "unit": "streams", "ok": False},
        ],
        "scenarios": {
            "latency": {"streams": 1, "ours": {"first_delta_ms": _stats(5.0), "chunk_relay_ms": _stats(0.8)},
                        "direct": {"ttft_ms": _stats(1.0)}, "added_ttft_ms": {"p50": 4.1, "p99": 7.9},
                        "cdf": {"ours first delta": _cdf(5.0), "direct TTFT": _cdf(1.0), "chunk relay": _cdf(0.8)}},
            "sweep": {"broker": "amqtt", "knee": 500, "knee_rule": "p99 chunk relay > 100 ms",
                      "levels": [_level(1, 0.9), _level(10, 1.5), _level(100, 8.0), _level(500, 60.0),
                                 _level(1000, 250.0)]},
            "brokers": {"amqtt": {"knee": 300, "levels": [_level(1, 1.0), _level(300, 70.0), _level(1000, 400.0)]},
                        "mosquitto": {"knee": 700, "levels": [_level(1, 0.5), _level(700, 55.0), _level(2000, 150.0)]},
                        "knee_ratio": 2.3},
            "direct": {"levels": [{"streams": 1, "ttft_ms": _stats(1.0)}, {"streams": 100, "ttft_ms": _stats(3.0)}]},
            "wecom": {"rate": 200, "ack_ms": _stats(2.5), "callbacks": 3300, "failures_total": 0,
                      "failures": ["one", "two"]},
            "floor": {"message_bytes": 150, "tps": 20, "levels": [
                {"streams": 100, "msgs_per_s": 1999, "sender_us": 47.1, "receiver_us": 17.5, "hop_us": 64.6,
                 "ceiling_streams": 774}]},
            "memory": {"ws": {"clients": 1000, "rss_before_mb": 80.1, "rss_after_mb": 120.3, "kb_per_client": 41.2},
                       "mqtt": {"clients": 500, "rss_before_mb": 1.0, "rss_after_mb": 2.0, "kb_per_client": 60.1}},
        },
    }


def _svgs(page: str) -> list[ET.Element]:
    blocks = _SVG.findall(page)
    assert page.count("<svg") == len(blocks)  # none left unclosed
    return [ET.fromstring(b) for b in blocks]


def _chart(page: str, title: str) -> ET.Element:
    matches = [svg for svg in _svgs(page) if svg.findtext("title") == title]
    assert len(matches) == 1, title
    return matches[0]


def _assert_finite_geometry(svg: ET.Element) -> None:
    for el in svg.iter():
        for name in _COORDS:
            if name in el.attrib:
                assert math.isfinite(float(el.attrib[name])), (el.tag, name, el.attrib[name])
        for pair in el.attrib.get("points", "").split():
            assert all(math.isfinite(float(v)) for v in pair.split(",")), pair


def test_full_sample_renders_a_self_contained_page() -> None:
    page = render_html(_sample())
    assert page.startswith("<!DOCTYPE html>")
    assert '<html lang="zh-CN">' in page and '<meta charset="utf-8">' in page
    assert TITLE_ZH == "智控未来 SmartClaw 基准测试报告" and TITLE_ZH in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "not run" not in page and "could not render" not in page
    for text in ("abc123", "uvloop", "added TTFT p99 at 100 streams", "knee at least 500 streams",
                 "PASS", "FAIL", "1 passed", "1 failed", "knee_ratio", "3300", "41.2", "KB per client"):
        assert text in page, text
    assert '<tr class="knee"><td>500</td>' in page  # the sweep's knee row is marked


def test_every_svg_parses_and_the_charts_are_there() -> None:
    page = render_html(_sample())
    svgs = _svgs(page)
    titles = [svg.findtext("title") for svg in svgs]
    assert titles == ["latency CDF", "per-chunk relay latency vs concurrent streams",
                      "added time to first token vs streams", "edge RSS vs streams", "CPU vs streams — sweep",
                      "CPU vs streams — amqtt", "CPU vs streams — mosquitto", "direct time to first token vs streams"]
    for svg in svgs:
        assert svg.tag == "svg"
        assert svg.findall("polyline"), svg.findtext("title")
        _assert_finite_geometry(svg)


def test_relay_chart_has_series_knee_rule_and_knees() -> None:
    svg = _chart(render_html(_sample()), "per-chunk relay latency vs concurrent streams")
    texts = [t.text for t in svg.iter("text")]
    for label in ("sweep p50", "sweep p99", "amqtt p99", "mosquitto p99", "knee rule 100 ms",
                  "sweep knee 500", "amqtt knee 300", "mosquitto knee 700"):
        assert label in texts, label
    assert len(svg.findall("polyline")) == 6
    assert {"1", "10", "100", "1000"} <= set(texts)  # log ticks on the streams axis
    assert svg.find("line[@stroke-dasharray='6 4']") is not None  # the dashed rule
    assert len(svg.findall("line[@stroke-dasharray='2 3']")) == 3 * 2  # knee marks and their legend rows


def test_cdf_chart_fraction_axis_and_one_line_per_series() -> None:
    svg = _chart(render_html(_sample()), "latency CDF")
    texts = [t.text for t in svg.iter("text")]
    assert {"0", "0.2", "0.4", "0.6", "0.8", "1"} <= set(texts)
    assert {"ours first delta", "direct TTFT", "chunk relay"} <= set(texts)
    assert len(svg.findall("polyline")) == 3


def test_knee_rule_threshold_is_taken_from_the_rule() -> None:
    results = _sample()
    results["scenarios"]["sweep"]["knee_rule"] = "p99 chunk relay > 250 ms"
    svg = _chart(render_html(results), "per-chunk relay latency vs concurrent streams")
    assert "knee rule 250 ms" in [t.text for t in svg.iter("text")]


def test_malicious_strings_are_escaped() -> None:
    results = _sample()
    results["env"]["commit"] = EVIL
    results["env"][EVIL] = EVIL
    results["settings"] = {"note": EVIL, EVIL: 1}
    results["checks"].append({"name": EVIL, "target": EVIL, "value": EVIL, "unit": EVIL, "ok": None})
    results["scenarios"]["latency"]["cdf"][EVIL] = _cdf(2.0)
    results["scenarios"]["brokers"][EVIL] = {"knee": 10, "levels": [_level(10, 2.0)]}
    results["scenarios"]["wecom"]["note"] = EVIL
    results["scenarios"][EVIL] = {EVIL: EVIL}
    page = render_html(results)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for svg in _svgs(page):
        _assert_finite_geometry(svg)


def test_empty_results_show_not_run() -> None:
    page = render_html({})
    assert TITLE_ZH in page and "could not render" not in page
    for name in ("latency", "sweep", "brokers", "direct", "wecom", "memory"):
        section = re.search(rf'<section id="s-{name}">.*?</section>', page, re.S)
        assert section and "not run" in section.group(0), name
    assert "no checks recorded" in page
    assert "<svg" not in page


@pytest.mark.parametrize("junk", [None, [], "text", 3, {"scenarios": None, "checks": None, "env": None}])
def test_not_a_dict_or_nulls_render(junk: Any) -> None:
    page = render_html(junk)
    assert "not run" in page and "could not render" not in page


def test_wrong_types_everywhere_do_not_break_it() -> None:
    results = {
        "env": [1, 2], "settings": 5, "checks": ["x", {"name": None, "ok": "yes"}, 7],
        "scenarios": {
            "latency": {"ours": "x", "direct": [1], "added_ttft_ms": 5,
                        "cdf": {"a": "zz", "b": [[1], [None, 0.5], ["x", 1], [float("nan"), 0.2], 3]}},
            "sweep": {"levels": "abc", "knee": "none", "knee_rule": 7},
            "brokers": {"amqtt": 3, "knee_ratio": "n/a", "mosquitto": {"levels": [None, "x", {"streams": "many"}]}},
            "direct": {"levels": {"streams": 1}},
            "wecom": "skipped: no wechatpy",
            "memory": {"ws": None, "mqtt": {"clients": "lots"}},
        },
    }
    page = render_html(results)
    assert "could not render" not in page
    assert "not run: skipped: no wechatpy" in page
    assert "no data" in page  # the CDF had no usable point
    for svg in _svgs(page):
        _assert_finite_geometry(svg)


def test_one_level_sweep_draws_a_point() -> None:
    results = {"scenarios": {"sweep": {"knee": None, "levels": [_level(100, 8.0)]}}}
    page = render_html(results)
    assert "could not render" not in page
    svg = _chart(page, "per-chunk relay latency vs concurrent streams")
    assert len(svg.findall("circle")) == 2  # p50 and p99, one point each
    assert not svg.findall("polyline")
    _assert_finite_geometry(svg)
    assert "not run" in page  # the other scenarios


def test_none_nan_zero_and_negative_values() -> None:
    levels = [_level(1, 1.0), _level(10, 2.0), _level(100, 5.0)]
    levels[0]["chunk_ms"] = {"p50": None, "p99": float("nan")}
    levels[1]["added_ttft_ms"] = {"p50": -3.0, "p99": 0.0}  # ours faster than direct: clamped on the log axis
    levels[2]["cpu"] = None
    levels[2]["rss_edge_mb"] = None
    levels.append({"streams": None, "chunk_ms": _stats(9.0)})
    levels.append({"streams": 0, "chunk_ms": {"p50": 0.0, "p99": 0.0}})
    results = {"scenarios": {"sweep": {"levels": levels, "knee": 0},
                             "latency": {"cdf": {"zeros": [[0.0, 0.0], [0.0, 0.5], [1.0, 1.0]]}}}}
    page = render_html(results)
    assert "could not render" not in page and "NaN" in page  # the table shows the NaN as such
    svgs = _svgs(page)
    assert len(svgs) == 5
    for svg in svgs:
        _assert_finite_geometry(svg)
    assert "0.001" in [t.text for t in _chart(page, "added time to first token vs streams").iter("text")]


def test_extreme_magnitudes_are_drawn_finite() -> None:
    levels = [{"streams": 5e-324, "chunk_ms": {"p99": 1e308}, "rss_edge_mb": 1.7e308, "cpu": {"edge": 5e-324}},
              {"streams": 1e308, "chunk_ms": {"p99": 1e-308}, "rss_edge_mb": -1.7e308, "cpu": {"edge": 1e-10}}]
    results = {"scenarios": {"sweep": {"levels": levels, "knee": 1e308},
                             "latency": {"cdf": {"a": [[1e308, 1e308], [5e-324, -1e308]]}}}}
    page = render_html(results)
    assert "could not render" not in page
    for svg in _svgs(page):
        _assert_finite_geometry(svg)


def test_all_none_series_say_no_data() -> None:
    levels = [{"streams": 10, "chunk_ms": {"p50": None, "p99": None}}, {"streams": 20}]
    page = render_html({"scenarios": {"sweep": {"levels": levels}}})
    for title in ("per-chunk relay latency vs concurrent streams", "edge RSS vs streams", "CPU vs streams"):
        assert "no data" in [t.text for t in _chart(page, title).iter("text")], title


def test_ttft_chart_falls_back_to_first_delta() -> None:
    levels = [_level(1, 1.0), _level(10, 2.0)]
    for lv in levels:
        del lv["added_ttft_ms"]
    page = render_html({"scenarios": {"sweep": {"levels": levels}}})
    texts = [t.text for t in _chart(page, "added time to first token vs streams").iter("text")]
    assert "p99 (first delta)" in texts


def test_the_sample_is_not_modified() -> None:
    results = _sample()
    before = copy.deepcopy(results)
    render_html(results)
    assert results == before


def test_log_ticks_are_1_2_5() -> None:
    assert log_ticks(1, 100) == [1, 2, 5, 10, 20, 50, 100]
    assert log_ticks(0.5, 5) == [0.5, 1, 2, 5]
    assert log_ticks(1e-3, 1e6) == [10.0 ** e for e in range(-3, 7)]  # too many: decades only


def test_write_report_and_main(tmp_path: Path) -> None:
    out = write_report(_sample(), tmp_path / "sub" / "report.html")
    assert out.read_text(encoding="utf-8") == render_html(_sample())
    src = tmp_path / "results.json"
    src.write_text(json.dumps(_sample()), encoding="utf-8")
    assert main([str(src)]) == 0
    assert TITLE_ZH in (tmp_path / "results.html").read_text(encoding="utf-8")
    assert main([]) == 2 and main([str(tmp_path / "missing.json")]) == 2


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 5e-324, 1e-9, 1e308, -1e308]) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_STATS = st.dictionaries(st.sampled_from(["n", "p50", "p99", "min"]), _JSON, max_size=4)
_LEVEL = st.fixed_dictionaries({}, optional={"streams": _JSON, "chunk_ms": _STATS | _JSON, "added_ttft_ms": _STATS,
                                             "first_delta_ms": _STATS, "rss_edge_mb": _JSON,
                                             "cpu": st.dictionaries(st.sampled_from(["edge", "x"]), _JSON)})


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(levels=st.lists(_LEVEL, max_size=5), knee=_JSON, cdf=st.dictionaries(st.text(max_size=5), _JSON, max_size=3),
       other=_JSON)
def test_arbitrary_json_never_breaks_a_section(levels: list[Any], knee: Any, cdf: Any, other: Any) -> None:
    results = {"env": other, "settings": other, "checks": [other, {"name": other, "ok": other}],
               "vs_thin": {"measured": True, "knee": other, "cpu_ratio_max": other,
                           "cpu_per_chunk": {"levels": [other, *levels], "streams": knee, "ratio": other}},
               "scenarios": {"sweep": {"levels": levels, "knee": knee, "knee_rule": other},
                             "brokers": {"a": {"levels": levels, "knee": other}, "b": other},
                             "latency": {"cdf": cdf, "ours": other}, "direct": {"levels": levels},
                             "wecom": other, "memory": other, "extra": other}}
    page = render_html(results)
    assert "could not render" not in page
    for svg in _svgs(page):
        _assert_finite_geometry(svg)


def test_control_characters_in_names_still_make_well_formed_svg() -> None:
    """Found by the property test in CI: a CDF series named "\x1f" made the SVG unparsable."""
    import xml.etree.ElementTree as ET

    from bench.report import render_html
    page = render_html({"scenarios": {"latency": {"cdf": {"\x1f\x00bad": [[1.0, 0.5], [2.0, 1.0]]}}}})
    svgs = [page[i:page.index("</svg>", i) + 6] for i in range(len(page)) if page.startswith("<svg", i)]
    assert svgs
    for svg in svgs:
        ET.fromstring(svg)


def test_floor_scenario_is_a_table_of_hop_costs() -> None:
    r = {"suite": "claw-bench", "scenarios": {"floor": {"message_bytes": 150, "tps": 20, "levels": [
        {"streams": 1000, "msgs_per_s": 19993, "sender_us": 16.3, "receiver_us": 10.0, "hop_us": 26.3,
         "ceiling_streams": 1904},
        {"streams": 100, "msgs_per_s": 1999, "sender_us": 47.1, "receiver_us": 17.5, "hop_us": 64.6,
         "ceiling_streams": 774}]}}}
    page = render_html(r)
    section = page[page.index('id="s-floor"'):]
    section = section[:section.index("</section>")]
    cells = re.findall(r"<td>([^<]*)</td>", section)
    assert "one hop µs" in section and "26.3" in cells and "1904" in cells
    assert section.index("774") < section.index("1904")  # rows by connections


def _vs_thin_results() -> dict[str, Any]:
    return {
        "checks": [
            {"name": "CPU per chunk vs the thin relay (same run)", "target": "<= 1.5x", "value": 3.5, "unit": "x",
             "ok": False, "status": "miss",
             "detail": "at 200 streams: SmartClaw edge+broker+node 262.5 µs, thin relay 75 µs of CPU per delivered chunk"},
            {"name": "knee vs the thin relay's (same run)", "target": ">= 70% of it", "value": 0.4, "unit": "x",
             "ok": False, "status": "miss", "detail": "SmartClaw 200 / thin relay 500 streams"},
        ],
        "vs_thin": {"measured": True, "cpu_ratio_max": 1.5, "knee_share_min": 0.7,
                    "knee": {"smartclaw": 200, "thin": 500, "share": 0.4},
                    "cpu_per_chunk": {"streams": 200, "smartclaw_us": 262.5, "thin_us": 75.0, "ratio": 3.5,
                                      "carried_by_both": True, "levels": [
                                          {"streams": 100, "smartclaw_us": 495.0, "thin_us": 105.0, "ratio": 4.71,
                                           "carried_by_both": True},
                                          {"streams": 200, "smartclaw_us": 262.5, "thin_us": 75.0, "ratio": 3.5,
                                           "carried_by_both": True},
                                          {"streams": 300, "smartclaw_us": 205.0, "thin_us": 71.0, "ratio": 2.89,
                                           "carried_by_both": False}]}},
    }


def test_ratio_targets_show_in_the_checks_and_their_own_section() -> None:
    page = render_html(_vs_thin_results())
    assert "could not render" not in page
    checks = page[page.index('id="checks"'):]
    checks = checks[:checks.index("</section>")]
    for text in ("CPU per chunk vs the thin relay (same run)", "&lt;= 1.5x", "3.5 x", "at 200 streams",
                 "knee vs the thin relay&#x27;s (same run)", "&gt;= 70% of it", "0.4 x",
                 "SmartClaw 200 / thin relay 500 streams", "0 passed", "2 failed"):
        assert text in checks, text
    assert '<a href="#vs-thin">' in page
    section = page[page.index('id="vs-thin"'):]
    section = section[:section.index("</section>")]
    assert "SmartClaw vs the thin relay" in section
    cells = re.findall(r"<td>([^<]*)</td>", section)
    for text in ("200 / 500", "262.5 / 75", "3.5", "4.71", "2.89"):
        assert text in cells, text
    assert '<tr class="knee"><td>200</td>' in section  # the level the target is evaluated at is marked


def test_ratio_targets_not_measured_without_the_thin_relay() -> None:
    reason = "the thin relay was not swept in this run (claw bench brokers or all sweeps it)"
    page = render_html({
        "checks": [{"name": "CPU per chunk vs the thin relay (same run)", "target": "<= 1.5x", "value": None,
                    "unit": "x", "ok": None, "status": "not measured", "detail": reason},
                   {"name": "WeCom ack p99 at ~200/s", "target": "<= 50 ms", "value": 12.0, "unit": "ms",
                    "ok": True, "status": "pass"}],
        "vs_thin": {"measured": False, "reason": reason}})
    checks = page[page.index('id="checks"'):]
    checks = checks[:checks.index("</section>")]
    assert '<span class="notmeasured">not measured</span>' in checks
    assert "1 passed" in checks and "0 failed" in checks and "1 not measured" in checks
    assert "PASS" in checks and "FAIL" not in checks
    section = page[page.index('id="vs-thin"'):]
    assert "not measured: the thin relay was not swept in this run" in section[:section.index("</section>")]


def test_no_vs_thin_no_section() -> None:
    page = render_html(_sample())
    assert 'id="vs-thin"' not in page and "#vs-thin" not in page
