"""Screening cascade: a fast screen model scores the newest frames and delimits the sweeps, the main model
scores only what refinement asks for (the screen's top frames, then around its own best) and alone picks
and measures the best frames. The graph expresses it; real processes, real engines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import read_journal, run_pipeline

from pipeline.config import DEFAULT_BUNDLE, REFERENCE_BUNDLE
from pipeline.graph import frame_accounting, pipeline_graph
from pipeline.refine import CANDIDATES, REACH, SweepScores, plan
from pipeline.sweep import FrameInfo, SweepTracker

MS = 1_000_000


def test_the_plan_starts_at_the_screens_candidates_and_completes_around_the_main_peak() -> None:
    """The screen scored every frame (its peak at 40, the main model's at 44): the main model is asked for
    the screen's top frames first, then climbs on its own scores to its own peak."""
    sweep = SweepScores(0, 0)
    for frame_id in range(100):
        sweep.add_screened(frame_id, 1.0 - 0.01 * abs(frame_id - 40), frame_id * 33 * MS)
    first = plan([sweep], held_since_ns=0, limit=CANDIDATES)
    assert first == [40, 39, 41, 38]  # the screen's best first, earliest on ties
    assert not sweep.complete(held_since_ns=0)

    def main(frame_id: int) -> float:
        return max(0.0, 1.0 - 0.05 * abs(frame_id - 44))

    asked = 0
    while not sweep.complete(held_since_ns=0):
        wanted = plan([sweep], held_since_ns=0, limit=1)
        assert wanted, "incomplete but nothing to ask for"
        sweep.add(wanted[0], main(wanted[0]), wanted[0] * 33 * MS)
        asked += 1
    assert sweep.best() == 44
    assert all(i in sweep.scores for i in range(44 - REACH, 44 + REACH + 1))
    assert all(i in sweep.scores for i in (38, 39, 40, 41))
    assert asked < 20  # a search, not every frame of the sweep


def test_a_screened_tracker_delimits_sweeps_but_ranks_only_the_main_models_frames() -> None:
    tracker = SweepTracker(hold_finals=True, screened=True)
    events = []
    for frame_id in range(10):  # the screen loves frame 3
        events += tracker.update(FrameInfo(frame_id, frame_id / 30, 0.99 if frame_id == 3 else 0.1, 0.9,
                                           {}))
    assert [e.type for e in events] == ["sweep_started"]  # no best_frame from a screen score
    events = tracker.add_refined(FrameInfo(5, 5 / 30, 0.7, 0.9, {}))
    assert events and events[0].best.frame_id == 5
    tracker.flush(1.0)
    final, ended = tracker.close(0)
    assert final.best.frame_id == 5 and final.best.score == pytest.approx(0.7)


def test_the_cascade_graph_keeps_the_main_models_frames_out_of_the_accounting() -> None:
    graph = pipeline_graph(screen=True)
    assert [s.name for s in graph.stages] == ["capture", "preprocess", "screen", "infer", "postprocess"]
    assert graph.stage("screen").bundle == "screen" and graph.stage("infer").bundle == "main"
    assert graph.link("screen_inputs").serves == "newest" and graph.link("inputs").serves == "refined"
    counters = {"capture": {"read": 10}, "preprocess": {"drop_held": 2},
                "postprocess": {"scored": 8, "refined": 5}, "infer": {"sent": 5}}
    accounting = frame_accounting(counters, graph)
    assert accounting["balanced"] and set(accounting["boundaries"]) == {
        "capture>preprocess", "preprocess>screen", "screen>postprocess"}
    with pytest.raises(ValueError, match="needs the refine link"):
        pipeline_graph(screen=True, refine=False)


def _int8_screen(out: Path) -> Path:
    """A screen bundle made of the demo's int8 model alone (a cheaper model of the same family: the shape
    of a student screening for its teacher), with the demo's fp32 model as the main one."""
    shutil.copytree(DEFAULT_BUNDLE, out)
    manifest = json.loads((out / "bundle.json").read_text())
    int8 = manifest["model"].pop("int8")
    manifest["name"] = "demo-int8-screen"
    manifest["model"].update(onnx=int8["onnx"], sha256=int8["sha256"])
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return out


def test_a_cascade_run_picks_with_the_main_model_where_the_screen_pointed(tmp_path: Path) -> None:
    """The demo's int8 model screens every frame of a live phantom case; the demo's fp32 model, capped at
    4 frames a second, scores the screen's candidates and the frames around its own best. Frame events
    say which model scored them; every final pick and its biometry are the main model's."""
    out = tmp_path / "run"
    screen = _int8_screen(tmp_path / "screen")
    result = run_pipeline("--source", "phantom://11?cases=1&frames=60", "--out", str(out), "--quiet",
                          "--bundle", str(DEFAULT_BUNDLE), "--set", f"infer.screen_bundle={screen}",
                          "--set", "infer.precision=fp32", "--set", "infer.rate_limit_fps=4",
                          "--set", "infer.refine_timeout_s=4", "--set", "infer.refine_window_s=8",
                          timeout=180)
    assert result.returncode == 0, result.stderr
    frames = read_journal(out, "frame")
    screened = [e for e in frames if not e["refined"]]
    main = {e["frame_id"]: e for e in frames if e["refined"]}
    assert {e["model"] for e in screened} == {"demo-int8-screen"}
    assert {e["model"] for e in main.values()} == {"demo"}
    summary = json.loads((out / "summary.json").read_text())
    assert "screen" in summary["graph"]["stages"]
    assert summary["frames"]["balanced"] and summary["frames"]["scored"] == len(screened)
    finals = [e for e in read_journal(out, "best_frame") if e["final"]]
    assert len(finals) == 6
    for final in (f for f in finals if f["frame_id"] is not None):
        assert final["score"] == pytest.approx(main[final["frame_id"]]["score"])
    for sweep in range(6):
        screen = {e["frame_id"]: e["score"] for e in screened if e["source"]["sweep"] == sweep}
        top = sorted(screen, key=lambda i: (-screen[i], i))[:CANDIDATES]
        assert all(i in main for i in top), f"sweep {sweep}: candidates {top} not scored by the main model"
    assert read_journal(out, "biometry"), "the demo model's mask measured the best frames"


def test_a_screen_that_does_not_fit_is_one_clear_line(tmp_path: Path) -> None:
    cases = {
        f"infer.screen_bundle={tmp_path}": "has no bundle.json",
        f"infer.screen_bundle={DEFAULT_BUNDLE}": "is the main bundle's own model",
    }
    for setting, problem in cases.items():
        result = run_pipeline("--bundle", str(DEFAULT_BUNDLE), "--set", setting,
                              "--out", str(tmp_path / "run"))
        assert result.returncode == 2 and problem in result.stderr.strip().splitlines()[-1], result.stderr
    result = run_pipeline("--bundle", str(DEFAULT_BUNDLE), "--set", f"infer.screen_bundle={REFERENCE_BUNDLE}",
                          "--set", "infer.refine=off",
                          "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "needs infer.refine on or auto" in result.stderr
