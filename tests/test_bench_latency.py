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


def _frame(frame_id: int, t: float, label: int, sweep: int = 0, refined: bool = False) -> dict:
    return {"type": "frame", "sweep_id": sweep, "frame_id": frame_id, "t_capture": t, "refined": refined,
            "source": {"case": "c", "sweep": sweep, "gt_label": label}}


def _best(frame_id: int, t_event: float, final: bool, decision_ms: float | None = None) -> dict:
    return {"type": "best_frame", "sweep_id": 0, "frame_id": frame_id, "t_event": t_event, "final": final,
            "decision_ms": decision_ms}


def test_decisions_compare_the_picks_and_time_the_first_optimal_best_frame() -> None:
    from pipeline.decisions import decisions, has_ground_truth

    labels = {i: int(10 <= i <= 12) for i in range(30)}
    every = [_frame(i, i / 30, labels[i]) for i in range(30)] + [_best(11, 2.0, True, 5.0)]
    run = [_frame(i, i / 30, labels[i]) for i in (0, 8, 16, 24)]
    run += [_frame(11, 11 / 30, 1, refined=True), _best(8, 0.4, False), _best(11, 0.9, False),
            _best(11, 1.2, True, 150.0)]
    assert has_ground_truth(every) and not has_ground_truth([_best(1, 0.0, True)])
    result = decisions(run, every, fps=30.0)
    row = result["sweeps"][0]
    assert row["pick"] == row["every_frame_pick"] == 11 and row["same_pick"] and row["pick_optimal"]
    assert row["decision_ms"] == 150.0
    assert row["first_optimal_to_best_ms"] == round((0.9 - 10 / 30) * 1e3, 1)  # frame 10 placed from 8
    summary = result["summary"]
    assert summary["same_pick_rate"] == 1.0 and summary["sweeps_with_optimal"] == 1


def test_a_suite_writes_its_machine_a_report_and_compares_with_a_saved_run(mp4_60: Path, tmp_path: Path
                                                                            ) -> None:
    """A shortened suite from a --matrix file (one source, flood, two batch limits): the figures are
    consistent, every scenario has its baseline, and --compare passes against an equal run and fails
    against a doctored one."""
    from pipeline.bench_report import compare_runs

    matrix = tmp_path / "suite.toml"
    matrix.write_text(f'sources = ["{mp4_60}"]\nno_pattern = true\nmodes = ["flood"]\nbatches = [1, 2]\n'
                      'frames = 30\nskip = 2\npixel_format = "gray"\n')
    out = tmp_path / "suite.json"

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "tools" / "bench_latency.py"), "--matrix",
                               str(matrix), "--json", str(out), *extra], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    result = run()
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "cpu_flags", "libraries", "gpu"} <= set(report["machine"])
    assert "avx512_vnni" in report["machine"]["cpu_flags"]
    names = [r["scenario"] for r in report["results"]]
    assert names == ["sweep.mp4 flood batch=1", "sweep.mp4 flood batch=2"]
    for entry in report["results"]:
        pipeline = entry["pipeline"]
        assert pipeline["read"] == 30 and pipeline["scored"] + pipeline["dropped"] == pipeline["read"]
        for values in pipeline["latency_ms"].values():
            if values.get("count"):
                assert values["p50"] <= values["p90"] <= values["p95"] <= values["p99"] <= values["max"]
                assert values["std"] >= 0
        assert entry["baseline"]["frames"] == 30 and entry["baseline"]["latency_ms"]["count"] > 0
        assert set(entry["processes"]) >= {"capture", "preprocess", "infer", "postprocess"}
        assert entry["first_event_s"] > 0
    page = out.with_suffix(".md").read_text()
    assert "# sweepstream latency benchmark" in page and "## sweep.mp4 flood batch=2" in page
    for name in ("suite.png", "suite-timeline.png", "suite-batch.png", "suite-stages.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert compare_runs(report, report)[1] == []  # against itself: nothing changed
    doctored = json.loads(out.read_text())
    for entry in doctored["results"]:
        entry["pipeline"]["throughput_fps"] *= 10  # the saved run was ten times faster
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(doctored))
    result = run("--compare", str(saved))
    assert result.returncode == 1 and "REGRESSED sweep.mp4 flood batch=1: throughput fps" in result.stdout
    saved.write_text(json.dumps(report))
    result = run("--compare", str(saved), "--tolerance", "100")  # any noise of this machine passes
    assert result.returncode == 0, result.stdout + result.stderr


def test_streams_share_one_infer_worker_and_report_each_stream(tmp_path: Path) -> None:
    """--streams 2: two runs at once on two phantom seeds, served by one infer worker process (one engine,
    two connections); every frame of both is scored (lossless), and the report has each stream, fairness
    and the per-stream CDF."""
    out = tmp_path / "streams.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_latency.py"), "--no-pattern", "--source",
         "phantom://3?cases=1&frames=20", "--frames", "40", "--modes", "flood", "--engine", "ort",
         "--threads", "1", "--policy", "lossless", "--streams", "2", "--skip", "2", "--pixel-format", "gray",
         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["scenario"] == "phantom-3 flood streams=2"
    streams = entry["streams"]
    assert streams["count"] == 2 and streams["share"] == "worker"
    assert [s["uri"] for s in streams["per_stream"]] == ["phantom://3?cases=1&frames=20",
                                                         "phantom://4?cases=1&frames=20"]
    for stream in streams["per_stream"]:
        assert stream["read"] == 40 and stream["scored"] == 40 and stream["dropped"] == 0
        assert stream["end_to_end_events_ms"]["count"] > 0
    assert len({s["run_id"] for s in streams["per_stream"]}) == 2
    assert entry["pipeline"]["read"] == 80 and entry["pipeline"]["scored"] == 80
    slowest = max(s["end_to_end_events_ms"]["p99"] for s in streams["per_stream"])
    fastest = min(s["end_to_end_events_ms"]["p99"] for s in streams["per_stream"])
    assert streams["fairness_p99"] == round(slowest / fastest, 3) >= 1.0
    assert "infer-worker" in entry["processes"] and "infer" not in entry["processes"]  # inference shared
    assert entry["baseline"]["frames"] == 40
    assert "| stream | source |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "streams-streams.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 streams sharing inference (worker)" in result.stdout


def test_each_stream_gets_its_own_phantom_seed_and_files_are_shared() -> None:
    from pipeline.streams import stream_uris

    assert stream_uris("phantom://7?cases=2", 3) == ["phantom://7?cases=2", "phantom://8?cases=2",
                                                     "phantom://9?cases=2"]
    assert stream_uris("phantom", 2) == ["phantom://0", "phantom://1"]  # the default case is seed 0
    assert stream_uris("/data/sweep.mp4", 2) == ["/data/sweep.mp4"] * 2


def test_gpu_memory_is_read_per_process_from_nvidia_smi() -> None:
    """The parser of nvidia-smi's per-process query, on its documented CSV (no GPU here: the sampler
    itself runs it only where nvidia-smi exists)."""
    from pipeline.bench_report import gpu_memory_by_pid

    csv = "4242, 1530\n4243, 812\n4242, 100\n4244, [N/A]\n"
    assert gpu_memory_by_pid(csv) == {4242: 1630.0, 4243: 812.0}
    assert gpu_memory_by_pid("") == {}
