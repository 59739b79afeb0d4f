"""The bench suite's CI smoke: ``claw bench smoke`` as a subprocess, as CI (and ``make bench-smoke``) run it.

Four real processes (fake LM Studio, edge + embedded amqtt, node, this load generator) on 127.0.0.1; it must
finish well under 60 s, write results.json and report.html, and pass — it fails only on a large regression
measured as a ratio to the direct baseline of the same run, never on an absolute time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]


def test_claw_bench_smoke_passes_and_writes_its_report(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "claw.cli", "bench", "smoke", "--quiet", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run] = list(tmp_path.iterdir())
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    smoke = results["scenarios"]["smoke"]
    assert smoke["ok"] and [v["streams"] for v in smoke["verdicts"]] == [1, 10]
    for row in smoke["levels"]:
        assert row["errors"] == 0 and row["asks"] > 0
        assert row["chunk_ms"]["n"] > 0 and row["direct_ttft_ms"]["n"] > 0
        assert set(row["cpu"]) == {"edge", "node", "llm", "load"}
    assert results["env"]["commit"] is not None and results["env"]["cpus"]
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "smoke" in html and "SmartClaw" in html
    assert "PASS" in proc.stdout
    print(f"claw bench smoke took {took:.1f} s")  # CI budget: < 60 s (bench/README.md)
