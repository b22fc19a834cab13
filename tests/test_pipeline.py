"""The whole pipeline as users run it: run_stream.py as a real command, four real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    alive,
    all_gone,
    children_of,
    read_journal,
    run_pipeline,
    run_stream_cmd,
    shm_segments,
    socket_dirs,
    stage_pids,
)

from engines.base import EngineOptions
from engines.bundle import load_bundle
from engines.export.reference import make_reference_bundle
from engines.registry import select_engine
from pipeline.events import COMMON_FIELDS, SCHEMA_VERSION


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _start_until_events(out: Path, *args: str, journal_bytes: int, new_group: bool = False
                        ) -> subprocess.Popen:
    """Start a run in the background and return once its journal holds at least `journal_bytes`."""
    process = subprocess.Popen(run_stream_cmd(*args, "--out", str(out)), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=new_group)
    journal = out / "events.jsonl"
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.stat().st_size >= journal_bytes):
        assert time.monotonic() < deadline and process.poll() is None, "the run produced no events"
        time.sleep(0.1)
    return process


def test_mp4_runs_through_all_four_processes(mp4_60: Path, tmp_path: Path) -> None:
    shm_before, dirs_before = shm_segments(), socket_dirs()
    out = tmp_path / "run"
    result = run_pipeline("--source", str(mp4_60), "--out", str(out), "--quiet",
                          "--set", "run.health_interval=0.5")
    assert result.returncode == 0, result.stderr
    summary = _summary(out)
    frames = summary["frames"]
    assert summary["outcome"] == "completed"
    assert frames["read"] == 60
    assert frames["balanced"] and frames["scored"] + frames["dropped"] == frames["read"]
    assert frames["dropped"] == 0  # 30 fps is far below any stage's cost; stages connect before frames flow
    events = read_journal(out, "frame")
    assert len(events) == frames["scored"] > 0
    for event in events:
        assert set(COMMON_FIELDS) <= set(event)
        assert event["schema"] == SCHEMA_VERSION and event["type"] == "frame"
        assert event["run_id"] == summary["run_id"]
        assert 0 <= event["score"] <= 1 and event["latency_ms"] > 0
    ids = [e["frame_id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for name in ("end_to_end", "capture", "preprocess", "infer", "postprocess"):
        stats = summary["latency_ms"][name]
        assert stats["count"] == frames["scored"] - 20  # first and last 10 skipped
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    # Paced at 30 fps, so the run takes at least about two seconds, not the instant a flood would.
    assert summary["duration_s"] > 1.5
    # Health events every 0.5 s while the pipeline runs: the status line's figures, for subscribers.
    health = read_journal(out, "health")
    assert len(health) >= 2
    assert [h["frames"]["read"] for h in health] == sorted(h["frames"]["read"] for h in health)
    for event in health:
        assert set(COMMON_FIELDS) <= set(event) and event["run_id"] == summary["run_id"]
        assert set(event["stages"]) == {"capture", "preprocess", "infer", "postprocess"}
        assert event["stages"]["postprocess"] == "ready" and event["frames"]["dropped"] == 0
        assert set(event["drops"]) == set(summary["frames"]["boundaries"])
        assert not any(event["drops"].values())
        assert event["interval_s"] > 0 and event["uptime_s"] > 0
    busy = [h for h in health if h["e2e_ms"]["count"]]
    assert busy and all(0 < h["e2e_ms"]["p50"] <= h["e2e_ms"]["p99"] <= h["e2e_ms"]["max"] for h in busy)
    assert any(15 < h["fps_out"] < 45 for h in busy)  # paced at 30 fps
    assert shm_segments() == shm_before and socket_dirs() == dirs_before


def test_flood_reads_faster_than_native_rate(mp4_60: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_pipeline("--source", str(mp4_60), "--out", str(out), "--quiet", "--flood",
                          "--set", "transport.policy=lossless")
    assert result.returncode == 0, result.stderr
    summary = _summary(out)
    assert summary["frames"]["scored"] == 60 and summary["frames"]["dropped"] == 0
    # Unpaced: while the ring has free slots (32), capture reads as fast as it decodes, far faster than the
    # frames' own timestamps say (measured against the source, not this machine's speed).
    events = read_journal(out, "frame")[:20]
    captured = events[-1]["t_capture"] - events[0]["t_capture"]
    assert captured < 0.5 * (events[-1]["source"]["pts"] - events[0]["source"]["pts"])


def test_max_frames_and_loop(mp4_60: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_pipeline("--source", str(mp4_60), "--out", str(out), "--quiet", "--flood", "--loop",
                          "--max-frames", "150", "--set", "transport.policy=lossless")
    assert result.returncode == 0, result.stderr
    events = read_journal(out, "frame")
    assert len(events) == 150
    assert [e["source_index"] for e in events][58:62] == [58, 59, 0, 1]


def test_sigint_stops_cleanly_within_two_seconds(tmp_path: Path) -> None:
    shm_before, dirs_before = shm_segments(), socket_dirs()
    out = tmp_path / "run"
    process = _start_until_events(out, "--source", "synthetic://640x480?fps=60", journal_bytes=2000)
    stages = stage_pids(process.pid)
    assert set(stages) == {"capture", "preprocess", "infer", "postprocess"}
    helpers = children_of(process.pid)
    process.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, stderr = process.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert process.returncode == 0, stderr
    assert elapsed < 2.0, f"took {elapsed:.2f} s to stop"
    assert not any(alive(pid) for pid in stages.values())
    assert all_gone(helpers)
    summary = _summary(out)
    assert summary["outcome"] == "interrupted" and summary["signal"] == "SIGINT"
    assert summary["frames"]["balanced"]
    assert len(read_journal(out, "frame")) == summary["frames"]["scored"]  # every scored frame was flushed
    assert shm_segments() == shm_before and socket_dirs() == dirs_before


def test_without_restarts_a_killed_stage_takes_the_run_down_with_one_clear_error(tmp_path: Path) -> None:
    shm_before = shm_segments()
    out = tmp_path / "run"
    process = _start_until_events(out, "--source", "synthetic://320x240?fps=30", "--quiet",
                                  "--set", "run.max_restarts=0", journal_bytes=1)
    stages = stage_pids(process.pid)
    helpers = children_of(process.pid)
    os.kill(stages["infer"], signal.SIGKILL)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == 1
    assert "stage 'infer' was killed by signal 9" in stderr.strip().splitlines()[-1]
    assert all_gone(helpers)
    assert _summary(out)["outcome"] == "failed"
    assert shm_segments() == shm_before


@pytest.mark.parametrize(("args", "message"), [
    (["--source", "/nonexistent/sweep.mp4"], "source /nonexistent/sweep.mp4: no such file"),
    (["--set", "ring.slots=1"], "ring.slots: 1 is below the minimum 2"),
    (["--set", "infer.max_batch=big"], "infer.max_batch: expected a number"),
    (["--bundle", "/nonexistent"], "infer.bundle: /nonexistent has no bundle.json"),
    (["--set", "sorce.uri=x"], "override sorce.uri"),
    (["--source", "rtsp://127.0.0.1:1/x", "--loop"], "is a live source and cannot loop"),
    (["--set", "preprocess.roi=-5,0,100,100"], "preprocess.roi: [-5, 0, 100, 100] needs x, y >= 0"),
    (["--config", "/"], "config /: cannot read"),
    (["--engine", "trt"], "infer.engine: engine 'trt' is not available"),
])
def test_bad_configuration_is_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_pipeline(*args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_corrupt_video_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    result = run_pipeline("--source", str(bad), "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "stage 'capture' failed" in last and str(bad) in last


def _engine_ms(bundle: Path) -> float:
    """Median cost of one frame through `bundle` on ONNX Runtime with one thread, as infer will run it."""
    engine, _ = select_engine("ort", load_bundle(bundle), EngineOptions(threads=1, max_batch=1))
    engine.load()
    frame = np.zeros((1, 224, 224), np.uint8)
    costs = []
    for _ in range(15):
        started = time.perf_counter()
        engine.infer(frame)
        costs.append((time.perf_counter() - started) * 1e3)
    engine.close()
    return float(np.median(costs))


def test_overload_keeps_latency_bounded_and_counts_drops(tmp_path: Path) -> None:
    """An engine slower than the source: infer pulls the newest frame when it is free, so latency stays
    about one inference plus one frame period instead of growing with a queue, and every lost frame is
    counted. The engine is made about three frame periods slow on this machine, whatever its speed."""
    period = 10.0  # ms: a 100 fps source
    probe = 40
    cost = _engine_ms(make_reference_bundle(tmp_path / "probe", work=probe))
    bundle = make_reference_bundle(tmp_path / "slow", work=max(probe, round(probe * 3 * period / cost)))
    out = tmp_path / "run"
    result = run_pipeline("--source", "synthetic://640x480?fps=100", "--bundle", str(bundle),
                          "--duration", "5", "--out", str(out), "--quiet", "--set", "infer.max_batch=1",
                          "--set", "infer.threads=1")
    assert result.returncode == 0, result.stderr
    summary = _summary(out)
    frames, latency = summary["frames"], summary["latency_ms"]
    assert frames["balanced"]
    assert frames["dropped"] > 0 and frames["scored"] < frames["read"]
    infer = latency["infer"]
    assert infer["p50"] > period, "the slow bundle should cost more than a frame period"
    # A newest frame may wait for the refinement in flight (pipeline.refine), never for more.
    assert latency["end_to_end"]["p99"] < 2 * infer["p99"] + 2 * period + 10
    events = [event for event in read_journal(out, "frame") if not event["refined"]]
    latencies = np.array([e["latency_ms"] for e in events])
    seconds = np.array([e["t_capture"] for e in events]) - events[0]["t_capture"]
    first, last = latencies[seconds < 1.5], latencies[seconds > seconds[-1] - 1.5]
    assert abs(np.median(last) - np.median(first)) < infer["p50"]  # flat, not growing with the run


def test_reused_run_folder_is_refused_before_anything_starts(mp4_60: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_pipeline("--source", str(mp4_60), "--out", str(out), "--quiet", "--flood")
    assert first.returncode == 0, first.stderr
    journal = (out / "events.jsonl").read_bytes()
    again = run_pipeline("--source", str(mp4_60), "--out", str(out), "--quiet", "--flood")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"sweepstream: error: run.out: {out} already holds a run (events.jsonl); choose another folder"]
    assert (out / "events.jsonl").read_bytes() == journal  # nothing recorded is lost


def test_sigterm_to_the_process_group_drains_like_ctrl_c(tmp_path: Path) -> None:
    """systemd and `kill -- -PGID` signal every process; the stages leave it to the supervisor."""
    out = tmp_path / "run"
    process = _start_until_events(out, "--source", "synthetic://320x240?fps=60", "--quiet",
                                  journal_bytes=2000, new_group=True)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    summary = _summary(out)
    assert summary["outcome"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert summary["frames"]["balanced"]


def test_ctrl_c_while_stages_start_is_a_clean_stop(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(run_stream_cmd("--source", "synthetic://320x240?fps=30", "--out", str(out),
                                              "--quiet"), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(stage_pids(process.pid)) < 4:  # stages spawned; the engine is still loading
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert _summary(out)["outcome"] == "interrupted"


def test_killed_supervisor_leaves_no_orphans_or_shared_memory(tmp_path: Path) -> None:
    """kill -9 of the supervisor: the stages notice their parent is gone and exit, and multiprocessing's
    resource tracker unlinks the ring the supervisor created."""
    shm_before = shm_segments()
    process = _start_until_events(tmp_path / "run", "--source", "synthetic://320x240?fps=30", "--quiet",
                                  journal_bytes=1)
    stages = stage_pids(process.pid)
    helpers = children_of(process.pid)
    process.kill()
    process.communicate(timeout=10)
    assert all_gone(set(stages.values()) | helpers, within=5.0)
    deadline = time.monotonic() + 5
    while shm_segments() != shm_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shm_segments() == shm_before


def test_phantom_sweeps_stream_with_their_sweep_and_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_pipeline("--source", "phantom://3?frames=12", "--out", str(out), "--quiet", "--flood",
                          "--set", "transport.policy=lossless")
    assert result.returncode == 0, result.stderr
    events = read_journal(out, "frame")
    assert len(events) == 6 * 12
    sources = [e["source"] for e in events]
    assert [s["sweep"] for s in sources] == [i // 12 for i in range(72)]
    assert all(s["pixel_spacing_mm"] == [0.28, 0.28] and s["gt_label"] in (0, 1, 2) for s in sources)
    assert len({s["case"] for s in sources}) == 1


def test_bad_phantom_uri_is_one_line(tmp_path: Path) -> None:
    result = run_pipeline("--source", "phantom://3?case=2", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "unknown parameter 'case'" in result.stderr.strip().splitlines()[-1]


def test_unwritable_run_folder_is_one_clear_line(tmp_path: Path) -> None:
    result = run_pipeline("--out", "/proc/sweepstream-run", "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "run.out: cannot write the run folder /proc/sweepstream-run" in lines[0]


REFERENCE = REPO / "bundles" / "reference"


def test_an_unwritable_best_frame_folder_keeps_the_stream_going_and_says_so(tmp_path: Path) -> None:
    """The final best frames' PNGs cannot be written (their folder is taken by a file): the stream goes
    on scoring and publishing every event (the finals without their PNG paths), and health says what is
    not being recorded."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "best").write_text("not a folder")
    result = run_pipeline("--source", "phantom://3?frames=20", "--bundle", str(REFERENCE),
                          "--out", str(out), "--quiet", "--set", "run.health_interval=0.2",
                          "--set", "sweep.min_score=0")  # every frame qualifies: each sweep has a best
    assert result.returncode == 0, result.stderr
    finals = [e for e in read_journal(out, "best_frame") if e["final"]]
    assert len(finals) == 6 and not any("frame_png" in e for e in finals)
    late = [e for e in read_journal(out, "health") if not e["recording"]]
    assert late and str(out / "best") in late[-1]["not_recording"]
    assert _summary(out)["outcome"] == "completed"
