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


def test_baseline_scores_every_frame_as_the_pipeline_does(mp4_60: Path, tmp_path: Path) -> None:
    """The in-process baseline runs the stages' own per-frame steps with the run's settings (here a
    preprocess ROI and filter that change every score), so its scores equal the pipeline's frame by frame."""
    from pipeline.benchmark import run_baseline, run_pipeline
    from pipeline.config import REFERENCE_BUNDLE, load_config

    config = load_config(overrides={
        "source.uri": str(mp4_60), "source.flood": True, "source.max_frames": 30,
        "transport.policy": "lossless", "preprocess.roi": "40,30,200,150",
        "preprocess.interpolation": "nearest", "infer.bundle": str(REFERENCE_BUNDLE), "infer.engine": "ort",
        "postprocess.events": "tcp://127.0.0.1:*",
        "postprocess.control": None, "run.out": str(tmp_path / "run"), "run.quiet": True})
    run_pipeline(config, {"name": "roi"})
    run_baseline(config, tmp_path)

    def scores(journal: Path) -> dict[int, float]:
        events = [json.loads(line) for line in journal.read_text().splitlines()]
        return {e["frame_id"]: e["score"] for e in events if e["type"] == "frame"}

    piped, inline = scores(tmp_path / "run" / "events.jsonl"), scores(tmp_path / "baseline.jsonl")
    assert len(piped) == 30 and piped.keys() == inline.keys()
    assert all(abs(piped[i] - inline[i]) < 1e-6 for i in piped)
    without_roi = tmp_path / "without_roi"
    without_roi.mkdir()
    run_baseline(load_config(overrides={"source.uri": str(mp4_60), "source.flood": True,
                                        "source.max_frames": 30, "infer.bundle": str(REFERENCE_BUNDLE),
                                        "infer.engine": "ort"}), without_roi)
    assert scores(without_roi / "baseline.jsonl") != inline  # the ROI mattered
