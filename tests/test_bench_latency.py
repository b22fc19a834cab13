"""The latency benchmark runs end to end on a small case and writes figures a reader can trust."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_bench_latency_writes_json_and_png(mp4_60: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_latency.py"), "--frames", "40", "--size", "320x240",
         "--modes", "flood", "--source", str(mp4_60), "--pixel-format", "gray", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [r["scenario"] for r in report["results"]] == ["pattern 320x240 flood", "sweep.mp4 flood"]
    for entry in report["results"]:
        pipeline, baseline = entry["pipeline"], entry["baseline"]
        assert pipeline["read"] == 40 and pipeline["scored"] + pipeline["dropped"] == 40
        assert baseline["frames"] == 40 and baseline["throughput_fps"] > 0
        assert pipeline["latency_ms"]["end_to_end"]["p50"] > 0
        assert entry["ratio"]["p50"] > 0 and "p99" in entry["overhead_ms"]
        assert all(0.0 <= entry["host_cpu_steal_pct"][run] <= 100.0 for run in ("pipeline", "baseline"))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "transport overhead" in result.stdout and "host CPU steal" in result.stdout
