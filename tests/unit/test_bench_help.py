"""``claw bench --help`` lists every scenario; the summary the CLI prints carries the ratio targets."""

from __future__ import annotations

import pytest

from bench.cli import ALL, SCENARIOS, summary
from bench.cli import main as bench_main
from claw.cli import main as claw_main


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_claw_bench_help_lists_every_scenario_with_a_description(flag: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert claw_main(["bench", flag]) == 0
    out = capsys.readouterr().out
    assert "usage: claw bench" in out
    lines = out.splitlines()
    for name in SCENARIOS:
        # "    name      one-line description" (argparse's listing of the subcommands)
        row = [ln for ln in lines if ln.strip().startswith(name + " ")]
        assert row and len(row[0].split(None, 1)) == 2, (name, out)
    assert "SCENARIO --help" in out  # how to get a scenario's options


def test_a_scenarios_own_help_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert claw_main(["bench", "sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: claw bench sweep" in out and "--levels" in out and "--broker" in out
    assert "90 %" in out and "%%" not in out
    assert claw_main(["bench", "tunnel", "--help"]) == 0
    assert "--asks" in capsys.readouterr().out
    assert bench_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS)


def test_claw_bench_usage_errors_still_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert claw_main(["bench"]) == 2  # no scenario: the help on stderr
    assert "scenarios" in capsys.readouterr().err
    assert claw_main(["bench", "nope"]) == 2
    assert claw_main(["bench", "--levels", "1"]) == 2


def test_claw_help_still_names_bench(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        claw_main(["--help"])
    assert exc.value.code == 0
    assert "bench" in capsys.readouterr().out


def test_all_is_the_documented_set() -> None:
    assert ALL == ["floor", "latency", "brokers", "memory", "wecom"]


def _results(checks: list[dict], vs_thin: dict | None = None) -> dict:
    r = {"scenario": "all", "env": {"commit": "abc1234", "dirty": False, "cpus": 2}, "elapsed_s": 600.0,
         "checks": checks, "scenarios": {}}
    if vs_thin is not None:
        r["vs_thin"] = vs_thin
    return r


def test_summary_prints_the_ratio_targets_and_the_levels_behind_them() -> None:
    text = summary(_results([
        {"name": "CPU per chunk vs the thin relay (same run)", "target": "<= 1.5x", "value": 3.5, "unit": "x",
         "ok": False, "detail": "at 200 streams: SmartClaw edge+broker+node 262.5 µs, thin relay 75 µs"},
        {"name": "knee vs the thin relay's (same run)", "target": ">= 70% of it", "value": 0.4, "unit": "x",
         "ok": False, "detail": "SmartClaw 200 / thin relay 500 streams"},
        {"name": "WeCom ack p99 at ~200/s", "target": "<= 50 ms", "value": 12.0, "unit": "ms", "ok": True}],
        {"measured": True, "cpu_per_chunk": {"levels": [
            {"streams": 100, "smartclaw_us": 495.0, "thin_us": 105.0, "ratio": 4.71},
            {"streams": 200, "smartclaw_us": 262.5, "thin_us": 75.0, "ratio": 3.5}]}}))
    assert "[MISS] CPU per chunk vs the thin relay (same run): 3.5 x (target <= 1.5x); at 200 streams" in text
    assert "[MISS] knee vs the thin relay's (same run): 0.4 x (target >= 70% of it); SmartClaw 200 / thin" in text
    assert "[PASS] WeCom ack p99 at ~200/s: 12.0 ms (target <= 50 ms)" in text
    assert "100: 495.0 / 105.0 (4.71x), 200: 262.5 / 75.0 (3.5x)" in text


def test_summary_says_not_measured_rather_than_pass_or_miss() -> None:
    text = summary(_results([
        {"name": "knee vs the thin relay's (same run)", "target": ">= 70% of it", "value": None, "unit": "x",
         "ok": None, "status": "not measured", "detail": "the thin relay was not swept in this run"}],
        {"measured": False}))
    assert "[----] knee vs the thin relay's (same run): not measured (target >= 70% of it)" in text
    assert "PASS" not in text and "MISS" not in text
